//! The test harness: a [`World`] per test, with its own database (a SQLite
//! file in a temporary folder, or a PostgreSQL database created for it and
//! dropped after), a controlled clock, and helpers that drive the ledger by
//! steps: send a message, run the jobs, read the outbox, verify. The
//! integration tests (`tests/it`) and the throughput bench share it (the
//! bench through `#[path]`), so each helper has one copy.
#![allow(dead_code)]

pub mod broker;
pub mod child;
pub mod events;
pub mod metrics;
pub mod proxy;
pub mod stream;

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};
use training_credits::apply::{Applier, Input};
use training_credits::config::Settings;
use training_credits::decode::{Malformed, Schemas, decode};
use training_credits::domain::model::Account;
use training_credits::domain::rules::Policy;
use training_credits::domain::{Id, Outcome, Ts};
use training_credits::notify::Email;
use training_credits::schedule::{JobsReport, run_jobs_at};
use training_credits::store::{OutboxKind, PgStore, SqliteStore, Store, ToLoad};

/// Runs each named generic test `async fn NAME<S: Store>(world: World<S>)`
/// once on SQLite and once on PostgreSQL.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::common::sqlite_world().await).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::common::pg_world().await).await
                }
            )*
        }
    };
}

/// Runs each generic test `async fn NAME<S: Store>(store: S, url: String)`
/// once on a fresh SQLite ledger and once on a fresh PostgreSQL one, each on
/// a runtime of two threads (the worker under test runs beside the test).
/// The tests go in modules `sqlite` and `postgres`, or in the two named
/// first: `on_both_stores!(mod on_sqlite, on_postgres; NAME, …)`.
#[macro_export]
macro_rules! on_both_stores {
    (mod $sqlite:ident, $postgres:ident; $($name:ident),* $(,)?) => {
        mod $sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (store, url, _keep) = super::common::sqlite_store().await;
                    super::$name(store, url).await
                }
            )*
        }
        mod $postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (store, url, _keep) = super::common::pg_store().await;
                    super::$name(store, url).await
                }
            )*
        }
    };
    ($($name:ident),* $(,)?) => {
        $crate::on_both_stores!(mod sqlite, postgres; $($name),*);
    };
}

pub const STAFF: &str = "admin";

/// The binary under test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_training-credits");

/// Every variable the binary reads, removed from the environment of each run
/// so that none leaks in from the one the tests run in.
pub fn contract_variables() -> impl Iterator<Item = &'static str> {
    training_credits::config::VARIABLES
        .iter()
        .copied()
        .chain(training_credits::trace::export::VARIABLES)
        .chain(["RUST_LOG", "LOG_FORMAT", "TEST_POSTGRES_URL"])
}

pub fn settings() -> Settings {
    Settings {
        policy: Policy::default(),
        admin_sources: [STAFF.to_owned()].into_iter().collect(),
        event_source: "training-credits".to_owned(),
        portal_url: "http://portal.test".to_owned(),
    }
}

/// Drops the test's PostgreSQL database when the test ends.
pub struct PgGuard {
    name: String,
}

impl Drop for PgGuard {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot block on itself.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for cleaning up");
            runtime.block_on(async move {
                if let Ok(pool) = sqlx::PgPool::connect(&admin_url()).await {
                    let statement = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(statement))
                        .execute(&pool)
                        .await;
                }
            });
        })
        .join();
    }
}

pub enum Keep {
    Sqlite(tempfile::TempDir),
    Postgres(PgGuard),
}

pub fn admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique_name() -> String {
    format!(
        "tc_test_{}_{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )
}

/// A fresh SQLite ledger and its URL.
pub async fn sqlite_store() -> (SqliteStore, String, Keep) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let store = SqliteStore::connect(&url).await.expect("SQLite opens");
    store.migrate().await.expect("SQLite migrates");
    (store, url, Keep::Sqlite(dir))
}

/// A fresh PostgreSQL database and its URL.
pub async fn pg_store() -> (PgStore, String, Keep) {
    let name = unique_name();
    let admin = sqlx::PgPool::connect(&admin_url())
        .await
        .expect("PostgreSQL is running (see README)");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&admin)
        .await
        .expect("a test database is created");
    admin.close().await;
    let base = admin_url();
    let url = format!(
        "{}/{name}",
        &base[..base.rfind('/').expect("a URL with a database")]
    );
    let store = PgStore::connect(&url).await.expect("PostgreSQL connects");
    store.migrate().await.expect("PostgreSQL migrates");
    (store, url, Keep::Postgres(PgGuard { name }))
}

pub async fn sqlite_world() -> World<SqliteStore> {
    let (store, url, keep) = sqlite_store().await;
    World::new(store, url, keep)
}

pub async fn pg_world() -> World<PgStore> {
    let (store, url, keep) = pg_store().await;
    World::new(store, url, keep)
}

pub struct World<S: Store> {
    pub applier: Applier<S>,
    pub schemas: Schemas,
    /// The ledger's clock: every step is applied as of this instant.
    pub now: Ts,
    pub url: String,
    seq: u64,
    _keep: Keep,
}

pub fn ts(text: &str) -> Ts {
    Ts::parse(text).expect("a test instant")
}

pub fn id(text: &str) -> Id {
    text.parse().expect("a test identifier")
}

impl<S: Store> World<S> {
    pub fn new(store: S, url: String, keep: Keep) -> World<S> {
        World::with_settings(store, url, keep, settings())
    }

    pub fn with_settings(store: S, url: String, keep: Keep, settings: Settings) -> World<S> {
        World {
            applier: Applier::new(store, settings),
            schemas: Schemas::load().expect("the schemas compile"),
            now: ts("2026-01-01T09:00:00Z"),
            url,
            seq: COUNTER.fetch_add(1, Ordering::Relaxed) * 1_000_000,
            _keep: keep,
        }
    }

    pub fn store(&self) -> &S {
        self.applier.store()
    }

    /// A complete inbound CloudEvent with a fresh id.
    pub fn event(&mut self, source: &str, type_name: &str, data: Value) -> Value {
        self.seq += 1;
        json!({
            "specversion": "1.0",
            "id": format!("ev-{}", self.seq),
            "source": source,
            "type": type_name,
            "time": self.now,
            "datacontenttype": "application/json",
            "data": data,
        })
    }

    /// Decodes and applies raw bytes, as the worker would.
    pub async fn deliver(&mut self, bytes: &[u8]) -> Result<Outcome, Malformed> {
        let decoded = decode(&self.schemas, bytes)?;
        let outcomes = self
            .applier
            .apply(&[Input::from(decoded)], self.now)
            .await
            .expect("the database answers");
        Ok(outcomes.into_iter().next().expect("one outcome per input"))
    }

    /// Applies a whole batch of events in one transaction.
    pub async fn deliver_batch(&mut self, events: &[Value]) -> Vec<Result<Outcome, Malformed>> {
        let mut results: Vec<Option<Result<Outcome, Malformed>>> = Vec::new();
        let mut inputs = Vec::new();
        let mut slots = Vec::new();
        for (i, event) in events.iter().enumerate() {
            match decode(&self.schemas, event.to_string().as_bytes()) {
                Ok(decoded) => {
                    inputs.push(Input::from(decoded));
                    slots.push(i);
                    results.push(None);
                }
                Err(malformed) => results.push(Some(Err(malformed))),
            }
        }
        let outcomes = self
            .applier
            .apply(&inputs, self.now)
            .await
            .expect("the database answers");
        for (slot, outcome) in slots.into_iter().zip(outcomes) {
            results[slot] = Some(Ok(outcome));
        }
        results
            .into_iter()
            .map(|r| r.expect("every slot filled"))
            .collect()
    }

    /// Sends an event from `source` and returns what became of it; panics if
    /// it is malformed.
    pub async fn send_from(&mut self, source: &str, type_name: &str, data: Value) -> Outcome {
        let event = self.event(source, type_name, data);
        self.deliver_ok(&event).await
    }

    /// Applies `event`, which must be well formed.
    pub async fn deliver_ok(&mut self, event: &Value) -> Outcome {
        self.deliver(event.to_string().as_bytes())
            .await
            .unwrap_or_else(|m| {
                panic!(
                    "{} was malformed: {m:?}",
                    event["type"].as_str().unwrap_or_default()
                )
            })
    }

    /// Sends an event from the portal.
    pub async fn send(&mut self, type_name: &str, data: Value) -> Outcome {
        self.send_from("portal", type_name, data).await
    }

    /// Sends an event from a staff source.
    pub async fn send_staff(&mut self, type_name: &str, data: Value) -> Outcome {
        self.send_from(STAFF, type_name, data).await
    }

    pub fn advance_days(&mut self, days: i64) {
        self.now = self.now.plus_days(days);
    }

    pub fn advance(&mut self, duration: chrono::Duration) {
        self.now = self.now.plus(duration);
    }

    pub async fn sweep(&mut self) -> JobsReport {
        run_jobs_at(&self.applier, self.now)
            .await
            .expect("the jobs run")
    }

    pub async fn account(&self, account_id: &str) -> Account {
        self.find_account(account_id)
            .await
            .unwrap_or_else(|| panic!("account {account_id} exists"))
    }

    pub async fn find_account(&self, account_id: &str) -> Option<Account> {
        let wanted = ToLoad {
            account_ids: vec![id(account_id)],
            ..ToLoad::default()
        };
        let mut ledger = self.store().snapshot(&wanted).await.expect("a snapshot");
        ledger.accounts.remove(&id(account_id))
    }

    /// `available` of an account now, as a two-decimal string.
    pub async fn available(&self, account_id: &str) -> String {
        self.account(account_id)
            .await
            .available_at(self.now)
            .to_string()
    }

    /// Every outbound event in the outbox, each checked against its schema.
    pub async fn events(&self) -> Vec<Value> {
        let rows = self
            .store()
            .pending_outbox(1_000_000)
            .await
            .expect("the outbox");
        rows.into_iter()
            .filter(|row| row.kind == OutboxKind::Event)
            .map(|row| {
                let event: Value = serde_json::from_str(&row.payload).expect("an event is JSON");
                if let Err(problem) = self.schemas.check_outbound(&event) {
                    panic!("outbound event breaks its schema: {problem}\n{event:#}");
                }
                event
            })
            .collect()
    }

    /// The `data` of every outbound event of `type_name`.
    pub async fn events_of(&self, type_name: &str) -> Vec<Value> {
        self.events()
            .await
            .into_iter()
            .filter(|e| e["type"] == type_name)
            .map(|e| e["data"].clone())
            .collect()
    }

    /// The `data` of the last outbound event of `type_name`.
    pub async fn last_event(&self, type_name: &str) -> Value {
        self.events_of(type_name)
            .await
            .pop()
            .unwrap_or_else(|| panic!("an event {type_name} was produced"))
    }

    pub async fn emails(&self) -> Vec<Email> {
        let rows = self
            .store()
            .pending_outbox(1_000_000)
            .await
            .expect("the outbox");
        rows.into_iter()
            .filter(|row| row.kind == OutboxKind::Email)
            .map(|row| serde_json::from_str(&row.payload).expect("an email row"))
            .collect()
    }

    pub async fn emails_to(&self, address: &str) -> Vec<Email> {
        self.emails()
            .await
            .into_iter()
            .filter(|e| e.to_email == address)
            .collect()
    }

    /// Asserts that `verify` finds nothing wrong.
    pub async fn verify_ok(&self) {
        let problems = self.store().verify().await.expect("verify runs");
        assert!(problems.is_empty(), "verify found: {problems:#?}");
    }

    // Builders for the usual messages.

    pub async fn open(&mut self, account_id: &str, mode: &str, owner: &str, code: &str) -> Outcome {
        self.send(
            "credits.account.opened",
            json!({
                "account_id": account_id,
                "owners": [{"email": owner, "name": "Owner"}],
                "approval_mode": mode,
                "code": code,
            }),
        )
        .await
    }

    pub async fn purchase(
        &mut self,
        account_id: &str,
        purchase_id: &str,
        credits: &str,
    ) -> Outcome {
        let purchased_at = self.now;
        self.send_from(
            "shop",
            "credits.purchase.completed",
            json!({
                "account_id": account_id,
                "purchase_id": purchase_id,
                "credits": credits,
                "purchased_at": purchased_at,
            }),
        )
        .await
    }

    pub async fn purchase_expiring(
        &mut self,
        account_id: &str,
        purchase_id: &str,
        credits: &str,
        expires_at: Ts,
    ) -> Outcome {
        let purchased_at = self.now;
        self.send_from(
            "shop",
            "credits.purchase.completed",
            json!({
                "account_id": account_id,
                "purchase_id": purchase_id,
                "credits": credits,
                "purchased_at": purchased_at,
                "expires_at": expires_at,
            }),
        )
        .await
    }

    pub async fn request(
        &mut self,
        request_id: &str,
        code: &str,
        learner: &str,
        item: &str,
        cost: &str,
    ) -> Outcome {
        let event = self.request_event(request_id, code, learner, item, cost);
        self.deliver_ok(&event).await
    }

    /// The event [`World::request`] sends, to send in a batch.
    pub fn request_event(
        &mut self,
        request_id: &str,
        code: &str,
        learner: &str,
        item: &str,
        cost: &str,
    ) -> Value {
        let requested_at = self.now;
        self.event(
            "lms",
            "credits.redemption.requested",
            json!({
                "request_id": request_id,
                "code": code,
                "learner": {"id": learner, "email": format!("{learner}@learners.test"), "name": format!("Learner {learner}")},
                "item": {"id": item, "kind": "course", "title": format!("Course {item}")},
                "cost": cost,
                "requested_at": requested_at,
            }),
        )
    }

    pub async fn approve(&mut self, request_id: &str, approver: &str) -> Outcome {
        self.send(
            "credits.redemption.approved",
            json!({"request_id": request_id, "approver": approver}),
        )
        .await
    }

    pub async fn deny(&mut self, request_id: &str, approver: &str) -> Outcome {
        self.send(
            "credits.redemption.denied",
            json!({"request_id": request_id, "approver": approver, "reason": "not this quarter"}),
        )
        .await
    }

    pub async fn cancel(&mut self, request_id: &str, learner: &str) -> Outcome {
        let event = self.cancel_event(request_id, learner);
        self.deliver_ok(&event).await
    }

    /// The event [`World::cancel`] sends, to send in a batch.
    pub fn cancel_event(&mut self, request_id: &str, learner: &str) -> Value {
        self.event(
            "lms",
            "credits.redemption.cancelled",
            json!({"request_id": request_id, "learner_id": learner}),
        )
    }

    pub async fn unenroll(&mut self, request_id: &str) -> Outcome {
        let unenrolled_at = self.now;
        self.send_from(
            "lms",
            "credits.enrollment.unenrolled",
            json!({"request_id": request_id, "unenrolled_at": unenrolled_at}),
        )
        .await
    }
}

impl<S: Store> World<S> {
    /// The id of the last inbound event sent (the `command_id` of a refusal).
    pub fn last_event_id(&self) -> String {
        format!("ev-{}", self.seq)
    }

    /// A redemption request as the ledger keeps it.
    pub async fn find_request(
        &self,
        request_id: &str,
    ) -> Option<training_credits::domain::model::Redemption> {
        let wanted = ToLoad {
            request_ids: vec![id(request_id)],
            ..ToLoad::default()
        };
        let mut ledger = self.store().snapshot(&wanted).await.expect("a snapshot");
        ledger.requests.remove(&id(request_id))
    }

    /// The status of a redemption request (`pending`, `approved`, …).
    pub async fn status_of(&self, request_id: &str) -> String {
        self.find_request(request_id)
            .await
            .unwrap_or_else(|| panic!("request {request_id} exists"))
            .status
            .as_str()
            .to_owned()
    }

    /// The whole journal, oldest first: `entry`, `account_id`, `purchase_id`,
    /// `request_id`, `amount` and `held_delta` (as two-decimal strings) and
    /// `actor` of each line.
    pub async fn journal(&self) -> Vec<Value> {
        const QUERY: &str = "SELECT entry, account_id, purchase_id, request_id, amount, held_delta, actor \
             FROM journal ORDER BY seq";
        let cents = |c: i64| training_credits::domain::Credits::from_cents(c).to_string();
        let mut lines = Vec::new();
        if self.url.starts_with("sqlite:") {
            let pool = sqlx::SqlitePool::connect(&self.url)
                .await
                .expect("SQLite opens");
            for row in sqlx::query(QUERY)
                .fetch_all(&pool)
                .await
                .expect("the journal")
            {
                use sqlx::Row;
                lines.push(json!({
                    "entry": row.get::<String, _>("entry"),
                    "account_id": row.get::<String, _>("account_id"),
                    "purchase_id": row.get::<String, _>("purchase_id"),
                    "request_id": row.get::<Option<String>, _>("request_id"),
                    "amount": cents(row.get::<i64, _>("amount")),
                    "held_delta": cents(row.get::<i64, _>("held_delta")),
                    "actor": row.get::<String, _>("actor"),
                }));
            }
            pool.close().await;
        } else {
            let pool = sqlx::PgPool::connect(&self.url)
                .await
                .expect("PostgreSQL connects");
            for row in sqlx::query(QUERY)
                .fetch_all(&pool)
                .await
                .expect("the journal")
            {
                use sqlx::Row;
                lines.push(json!({
                    "entry": row.get::<String, _>("entry"),
                    "account_id": row.get::<String, _>("account_id"),
                    "purchase_id": row.get::<String, _>("purchase_id"),
                    "request_id": row.get::<Option<String>, _>("request_id"),
                    "amount": cents(row.get::<i64, _>("amount")),
                    "held_delta": cents(row.get::<i64, _>("held_delta")),
                    "actor": row.get::<String, _>("actor"),
                }));
            }
            pool.close().await;
        }
        lines
    }

    /// A redemption request for an item of `kind` in `group_ids`.
    pub async fn request_item(
        &mut self,
        request_id: &str,
        code: &str,
        learner: &str,
        item: Value,
        cost: &str,
    ) -> Outcome {
        let requested_at = self.now;
        self.send_from(
            "lms",
            "credits.redemption.requested",
            json!({
                "request_id": request_id,
                "code": code,
                "learner": {"id": learner, "email": format!("{learner}@learners.test"), "name": format!("Learner {learner}")},
                "item": item,
                "cost": cost,
                "requested_at": requested_at,
            }),
        )
        .await
    }

    /// Extends a lot from a staff source.
    pub async fn extend(&mut self, account_id: &str, purchase_id: &str, expires_at: Ts) -> Outcome {
        self.send_staff(
            "credits.lot.extended",
            json!({
                "account_id": account_id,
                "purchase_id": purchase_id,
                "expires_at": expires_at,
                "actor": "staff@admin.test",
            }),
        )
        .await
    }

    /// Closes an account from a staff source.
    pub async fn close(&mut self, account_id: &str) -> Outcome {
        self.send_staff(
            "credits.account.closed",
            json!({"account_id": account_id, "actor": "staff@admin.test", "reason": "contract ended"}),
        )
        .await
    }

    /// Remaining and held of one lot, as two-decimal strings.
    pub async fn lot(&self, account_id: &str, purchase_id: &str) -> (String, String) {
        let account = self.account(account_id).await;
        let lot = account
            .lots
            .iter()
            .find(|l| l.purchase_id.as_str() == purchase_id)
            .unwrap_or_else(|| panic!("lot {purchase_id} of {account_id} exists"));
        (lot.remaining.to_string(), lot.held.to_string())
    }
}

/// The URL of a SQLite ledger file that does not exist yet, in a temporary
/// folder kept as long as the returned [`Keep`].
pub fn empty_sqlite_url() -> (String, Keep) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    (url, Keep::Sqlite(dir))
}

/// A fresh PostgreSQL database without any schema, and its URL; it is
/// dropped with the returned [`Keep`].
pub async fn empty_pg_url() -> (String, Keep) {
    let name = format!(
        "tc_test_{}_{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let admin = sqlx::PgPool::connect(&admin_url())
        .await
        .expect("PostgreSQL is running (see README)");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&admin)
        .await
        .expect("a test database is created");
    admin.close().await;
    let base = admin_url();
    let url = format!(
        "{}/{name}",
        &base[..base.rfind('/').expect("a URL with a database")]
    );
    (url, Keep::Postgres(PgGuard { name }))
}

/// Runs one SQL statement on the database at `url`, whichever backend it
/// is, bypassing the ledger: for tests that tamper with what it wrote.
pub async fn execute_sql(url: &str, statement: &str) -> u64 {
    let statement = sqlx::AssertSqlSafe(statement.to_owned());
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.expect("SQLite opens");
        let done = sqlx::query(statement)
            .execute(&pool)
            .await
            .expect("the statement runs");
        pool.close().await;
        done.rows_affected()
    } else {
        let pool = sqlx::PgPool::connect(url)
            .await
            .expect("PostgreSQL connects");
        let done = sqlx::query(statement)
            .execute(&pool)
            .await
            .expect("the statement runs");
        pool.close().await;
        done.rows_affected()
    }
}

/// An account as the ledger in `store` keeps it, if it knows it.
pub async fn account_in<S: Store>(store: &S, account_id: &str) -> Option<Account> {
    let id = id(account_id);
    let wanted = ToLoad {
        account_ids: vec![id.clone()],
        ..ToLoad::default()
    };
    let mut ledger = store.snapshot(&wanted).await.expect("a snapshot");
    ledger.accounts.remove(&id)
}

/// `available` of an account now, as a two-decimal string; `None` if the
/// ledger does not know it.
pub async fn available_now<S: Store>(store: &S, account_id: &str) -> Option<String> {
    account_in(store, account_id)
        .await
        .map(|account| account.available_at(Ts::now()).to_string())
}

/// Asserts that `verify` finds nothing wrong in the ledger of `store`.
pub async fn assert_verified<S: Store>(store: &S) {
    let problems = store.verify().await.expect("verify runs");
    assert!(problems.is_empty(), "verify found: {problems:#?}");
}
