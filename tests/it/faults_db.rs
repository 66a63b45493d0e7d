//! The worker when its database fails under it (issue 6, item 3), against
//! the real PostgreSQL, RabbitMQ and an SMTP server on a socket, while a
//! stream of purchases and redemptions flows:
//!
//! - every PostgreSQL connection of the worker is terminated by the server
//!   (`pg_terminate_backend`, from an admin connection), several times;
//! - PostgreSQL is unreachable for 30 seconds (the worker reaches it through
//!   a proxy the test takes down: open connections cut, new ones refused);
//! - on SQLite, another connection holds the write lock longer than the
//!   worker's busy timeout.
//!
//! The worker pauses (PostgreSQL down: `/readyz` says not ready and the
//! messages wait in the queue), retries and resumes; nothing is
//! dead-lettered for it, every message is applied once (each balance is the
//! one computed from the stream), every outbound event and every email goes
//! out once, the outbox empties, and `verify` finds nothing wrong.

use crate::support as common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use training_credits::broker::topology::WORKER_QUEUE;
use training_credits::domain::Ts;
use training_credits::notify::Email;
use training_credits::store::{PgStore, Store};

use common::available_now as available;
use common::broker::{
    Client, SmtpSink, TestWorker, Vhost, config, eventually, try_http_get_within,
};
use common::events::{event, purchase};
use common::proxy::{Mode, Proxy};

/// How long the worker may take to come back after a fault: its backoff
/// reaches 10 s, and so does the pool's wait for a connection.
const RECOVERY: Duration = Duration::from_secs(45);
/// Long enough for anything the worker does at once, on a loaded machine.
const SOON: Duration = Duration::from_secs(20);
/// How long PostgreSQL is out of reach (issue 6: 30 seconds).
const OUTAGE: Duration = Duration::from_secs(30);
/// Messages applied between two faults, and after the last one.
const PROGRESS: i64 = 30;
/// Time between two published messages of the stream.
const PACE: Duration = Duration::from_millis(20);
/// Messages published at most: a bound, should the worker never recover.
const STREAM_MAX: usize = 20_000;
/// Accounts the stream spreads over; each owner is emailed per purchase and
/// each learner per approval.
const ACCOUNTS: usize = 3;
/// What each account is funded with before the stream: redemptions never
/// lack credits, whatever order their messages end up applied in.
const FUNDING: i64 = 1_000;
/// The `application_name` of the worker's PostgreSQL connections, which
/// tells them apart from the test's own.
const WORKER_APPLICATION: &str = "tc_faults_worker";

fn account(n: usize) -> String {
    format!("acct-{n}")
}

fn opened(n: usize) -> Value {
    let id = account(n);
    event(
        &format!("open-{n}"),
        "portal",
        "credits.account.opened",
        json!({
            "account_id": id, "approval_mode": "automatic", "code": format!("CODE-{n}"),
            "owners": [{"email": format!("owner@{id}.test"), "name": format!("Owner {n}")}],
        }),
    )
}

fn request(event_id: &str, code: &str, request_id: &str, cost: i64) -> Value {
    event(
        event_id,
        "lms",
        "credits.redemption.requested",
        json!({
            "request_id": request_id, "code": code,
            "learner": {"id": request_id, "email": format!("{request_id}@learners.test"), "name": "Learner"},
            "item": {"id": request_id, "kind": "course", "title": format!("Course {request_id}")},
            "cost": cost.to_string(), "requested_at": Ts::now(),
        }),
    )
}

/// The stream's message number `k`: on account `k % ACCOUNTS`, a purchase of
/// 2 credits or a redemption of 1, in turn. Returns the message, the account
/// and the change it makes to that account's balance.
fn message(k: usize) -> (Value, usize, i64) {
    let n = k % ACCOUNTS;
    if (k / ACCOUNTS).is_multiple_of(2) {
        let id = format!("buy-{k}");
        (purchase(&id, &account(n), &format!("p-{k}"), "2"), n, 2)
    } else {
        let id = format!("req-{k}");
        (
            request(&id, &format!("CODE-{n}"), &format!("r-{k}"), 1),
            n,
            -1,
        )
    }
}

/// The stream: messages published one after another (each confirmed by the
/// broker) until stopped; returns how many.
fn start_stream(client: Arc<Client>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut k = 0;
        while k < STREAM_MAX && !stop.load(Ordering::SeqCst) {
            client.publish(&message(k).0).await;
            k += 1;
            tokio::time::sleep(PACE).await;
        }
        k
    })
}

/// A SQL pool of the test's own on the ledger (not the worker's).
enum Ledger {
    Pg(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

impl Ledger {
    async fn open(url: &str) -> Ledger {
        if url.starts_with("sqlite:") {
            Ledger::Sqlite(sqlx::SqlitePool::connect(url).await.expect("SQLite opens"))
        } else {
            Ledger::Pg(
                sqlx::PgPool::connect(url)
                    .await
                    .expect("PostgreSQL connects"),
            )
        }
    }

    async fn count(&self, query: &'static str) -> i64 {
        match self {
            Ledger::Pg(pool) => sqlx::query_scalar::<_, i64>(query).fetch_one(pool).await,
            Ledger::Sqlite(pool) => sqlx::query_scalar::<_, i64>(query).fetch_one(pool).await,
        }
        .expect("a count")
    }

    /// Inbound messages applied so far.
    async fn applied(&self) -> i64 {
        self.count("SELECT count(*) FROM processed").await
    }

    /// Outbox rows not dispatched yet.
    async fn undispatched(&self) -> i64 {
        self.count("SELECT count(*) FROM outbox WHERE dispatched_at IS NULL")
            .await
    }

    /// The rows not dispatched yet, by kind, attempts and when they are
    /// due: what an assertion shows when they do not go.
    async fn undispatched_summary(&self, out: impl Fn(&str, &str) -> bool) -> String {
        const QUERY: &str = "SELECT kind, id, payload, attempts, next_attempt_at, last_error \
             FROM outbox WHERE dispatched_at IS NULL ORDER BY seq";
        let now = Ts::now().utc();
        let rows: Vec<(String, String, String, i64, Ts, Option<String>)> = match self {
            Ledger::Pg(pool) => sqlx::query_as(QUERY).fetch_all(pool).await,
            Ledger::Sqlite(pool) => sqlx::query_as(QUERY).fetch_all(pool).await,
        }
        .expect("the outbox");
        let mut summary: BTreeMap<String, usize> = BTreeMap::new();
        for (kind, id, payload, attempts, due, error) in rows {
            let due_in = due.utc().signed_duration_since(now).num_seconds();
            let sent = if out(&id, &payload) {
                "already out"
            } else {
                "not out"
            };
            *summary
                .entry(format!(
                    "{kind} ({sent}), {attempts} attempts, due in {due_in} s, {}",
                    error.unwrap_or_default()
                ))
                .or_default() += 1;
        }
        format!("{summary:#?}")
    }

    /// Every email of the outbox, dispatched or not.
    async fn emails(&self) -> Vec<Email> {
        const QUERY: &str = "SELECT payload FROM outbox WHERE kind = 'email' ORDER BY seq";
        let payloads: Vec<String> = match self {
            Ledger::Pg(pool) => sqlx::query_scalar::<_, String>(QUERY).fetch_all(pool).await,
            Ledger::Sqlite(pool) => sqlx::query_scalar::<_, String>(QUERY).fetch_all(pool).await,
        }
        .expect("the outbox");
        payloads
            .iter()
            .map(|p| serde_json::from_str(p).expect("an email row"))
            .collect()
    }
}

/// The `DATABASE_URL` of the worker: the test's database, reached through
/// `proxy` if given, its connections named [`WORKER_APPLICATION`].
fn worker_url(url: &str, proxy: Option<&Proxy>) -> String {
    let mut parsed = url::Url::parse(url).expect("a PostgreSQL URL");
    if let Some(proxy) = proxy {
        parsed.set_host(Some("127.0.0.1")).expect("a host");
        parsed.set_port(Some(proxy.port())).expect("a port");
    }
    parsed
        .query_pairs_mut()
        .append_pair("application_name", WORKER_APPLICATION);
    parsed.to_string()
}

/// `host:port` of the PostgreSQL server of `url`.
fn upstream(url: &str) -> String {
    let parsed = url::Url::parse(url).expect("a PostgreSQL URL");
    format!(
        "{}:{}",
        parsed.host_str().unwrap_or("127.0.0.1"),
        parsed.port().unwrap_or(5432)
    )
}

/// `/readyz`: (status, body), read with more patience than the worker's
/// wait for a database connection (10 s), which it may spend answering.
async fn readyz(addr: std::net::SocketAddr) -> (u16, Value) {
    let (status, body) = try_http_get_within(addr, "/readyz", Duration::from_secs(30))
        .await
        .expect("/readyz answers in time");
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Shows the worker's warnings when a test fails (captured otherwise).
fn trace() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("training_credits=warn")
        .with_test_writer()
        .try_init();
}

/// What a stream left behind, checked once it is over: every message
/// applied once, each balance the one computed from the stream, every
/// outbound event and every email out once, nothing dead-lettered.
struct Run<S: Store> {
    store: S,
    ledger: Ledger,
    client: Arc<Client>,
    smtp: SmtpSink,
    worker: TestWorker,
    vhost: Vhost,
    stop: Arc<AtomicBool>,
    stream: tokio::task::JoinHandle<usize>,
    _mail_dir: tempfile::TempDir,
}

impl<S: Store> Run<S> {
    /// Starts the worker on `store` (whose URL for the binary's
    /// configuration is `worker_url`), opens and funds the accounts, and
    /// starts the stream.
    async fn start(store: S, worker_url: &str, direct_url: &str) -> Run<S> {
        trace();
        let smtp = SmtpSink::start_new().await;
        let vhost = Vhost::new();
        let client = Arc::new(Client::new(&vhost).await);
        let mail_dir = tempfile::tempdir().expect("a folder");
        let smtp_url = format!("{}?timeout=5s", smtp.url());
        let worker = TestWorker::start(
            store.clone(),
            config(&vhost, worker_url, Some(&smtp_url), mail_dir.path()),
        )
        .await;
        for n in 0..ACCOUNTS {
            client.publish(&opened(n)).await;
            client
                .publish(&purchase(
                    &format!("fund-{n}"),
                    &account(n),
                    &format!("fund-{n}"),
                    &FUNDING.to_string(),
                ))
                .await;
        }
        client
            .await_outbound("training-credits.purchase.recorded", ACCOUNTS)
            .await;
        let stop = Arc::new(AtomicBool::new(false));
        let stream = start_stream(client.clone(), stop.clone());
        Run {
            store,
            ledger: Ledger::open(direct_url).await,
            client,
            smtp,
            worker,
            vhost,
            stop,
            stream,
            _mail_dir: mail_dir,
        }
    }

    /// Waits until `more` messages beyond `since` are applied; returns the
    /// count then.
    async fn progress(&self, since: i64, more: i64, limit: Duration, what: &str) -> i64 {
        let wanted = since + more;
        eventually(
            limit,
            &format!("{wanted} messages applied ({what})"),
            || async { self.ledger.applied().await >= wanted },
        )
        .await;
        self.ledger.applied().await
    }

    /// Whether the outbox row `id` (its `payload`) was published or
    /// delivered already.
    fn is_out(&self, id: &str, payload: &str) -> bool {
        let message_id = serde_json::from_str::<Email>(payload)
            .map(|email| email.message_id)
            .unwrap_or_default();
        self.client.outbound().iter().any(|e| e["id"] == id)
            || (!message_id.is_empty()
                && self
                    .smtp
                    .mails()
                    .iter()
                    .any(|m| message_id.contains(m.message_id.as_str())))
    }

    /// Stops the stream and checks everything it should have left.
    async fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let published = (&mut self.stream).await.expect("the stream published");
        assert!(published < STREAM_MAX, "the stream was stopped");
        // Setup: each account opened and funded.
        let setup = 2 * ACCOUNTS;
        let total = i64::try_from(setup + published).expect("a count");
        eventually(RECOVERY, &format!("{total} messages applied"), || async {
            self.ledger.applied().await == total
        })
        .await;

        let mut purchases = Vec::new();
        let mut requests = Vec::new();
        let mut expected = [FUNDING; ACCOUNTS];
        for k in 0..published {
            let (_, n, change) = message(k);
            expected[n] += change;
            if change > 0 {
                purchases.push(format!("p-{k}"));
            } else {
                requests.push(format!("r-{k}"));
            }
        }
        // Everything the outbox holds goes out, none of it left waiting for
        // a lease to run out.
        let deadline = Instant::now() + SOON;
        while self.ledger.undispatched().await > 0 {
            assert!(
                Instant::now() < deadline,
                "the outbox still holds, {SOON:?} after the last message was applied: {}",
                self.ledger
                    .undispatched_summary(|id, payload| self.is_out(id, payload))
                    .await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let recorded = self
            .client
            .await_outbound(
                "training-credits.purchase.recorded",
                ACCOUNTS + purchases.len(),
            )
            .await;
        let approved = self
            .client
            .await_outbound("training-credits.redemption.approved", requests.len())
            .await;
        let emails = self.ledger.emails().await;
        // One email per purchase (one owner) and per approval (the learner).
        assert_eq!(emails.len(), ACCOUNTS + published, "emails in the outbox");
        eventually(SOON, "every email delivered", || async {
            self.smtp.received().len() >= emails.len()
        })
        .await;
        assert_eq!(
            self.client.dead_letter_count().await,
            0,
            "nothing dead-lettered"
        );
        let addr = self.worker.http_addr;
        eventually(SOON, "the worker ready", || async {
            readyz(addr).await.0 == 200
        })
        .await;
        self.worker.stop().await;

        // Each balance is the one the stream makes.
        for (n, credits) in expected.iter().enumerate() {
            assert_eq!(
                available(&self.store, &account(n)).await,
                Some(format!("{credits}.00")),
                "the balance of {}",
                account(n)
            );
        }
        // Every outbound event once: one per cause, and no cause repeated
        // on the wire.
        let by_key = |events: &[Value], key: &str| {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for e in events {
                *counts
                    .entry(e["data"][key].as_str().unwrap_or_default().to_owned())
                    .or_default() += 1;
            }
            counts
        };
        let recorded = by_key(&recorded, "purchase_id");
        let mut wanted: BTreeMap<String, usize> =
            purchases.iter().map(|p| (p.clone(), 1)).collect();
        for n in 0..ACCOUNTS {
            wanted.insert(format!("fund-{n}"), 1);
        }
        assert_eq!(recorded, wanted, "one purchase.recorded per purchase");
        let approved = by_key(&approved, "request_id");
        let wanted: BTreeMap<String, usize> = requests.iter().map(|r| (r.clone(), 1)).collect();
        assert_eq!(approved, wanted, "one redemption.approved per request");
        let events = self.client.outbound();
        let distinct: std::collections::BTreeSet<&str> =
            events.iter().filter_map(|e| e["id"].as_str()).collect();
        assert_eq!(distinct.len(), events.len(), "no outbound event twice");
        // Every email once, by Message-ID and by recipient and subject.
        let bare = |id: &str| id.trim_matches(|c| c == '<' || c == '>').to_owned();
        let mut received: Vec<(String, String, String)> = self
            .smtp
            .mails()
            .into_iter()
            .map(|m| (bare(&m.message_id), m.to, m.subject))
            .collect();
        let mut sent: Vec<(String, String, String)> = emails
            .iter()
            .map(|e| (bare(&e.message_id), e.to_email.clone(), e.subject.clone()))
            .collect();
        received.sort();
        sent.sort();
        assert_eq!(received, sent, "every email delivered once");
        let problems = self.store.verify().await.expect("verify runs");
        assert!(problems.is_empty(), "verify found: {problems:#?}");
        println!(
            "{published} messages streamed: {} events and {} emails, each out once",
            events.len(),
            received.len()
        );
    }
}

/// Messages in the worker queue, ready and unacknowledged
/// (`rabbitmqctl` blocks; the runtime's other thread goes on meanwhile).
fn queued(vhost: &Vhost) -> u64 {
    tokio::task::block_in_place(|| vhost.queue_messages(WORKER_QUEUE)).unwrap_or(0)
}

/// Terminates every backend of the worker on `database`; returns how many.
async fn terminate_worker_backends(admin: &sqlx::PgPool, database: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name = $2",
    )
    .bind(database)
    .bind(WORKER_APPLICATION)
    .fetch_one(admin)
    .await
    .expect("the backends terminated")
}

// 1. PostgreSQL connections terminated.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_outlives_its_postgresql_connections_being_terminated_and_applies_each_message_once()
 {
    /// Times every connection of the worker is terminated.
    const ROUNDS: usize = 5;
    let (_direct, url, _keep) = common::pg_store().await;
    let database = url::Url::parse(&url).expect("a URL").path()[1..].to_owned();
    let worker_url = worker_url(&url, None);
    let store = PgStore::connect(&worker_url)
        .await
        .expect("PostgreSQL connects");
    let run = Run::start(store, &worker_url, &url).await;
    let admin = sqlx::PgPool::connect(&common::admin_url())
        .await
        .expect("PostgreSQL connects");
    let mut applied = run.ledger.applied().await;
    let mut terminated = 0;
    for round in 1..=ROUNDS {
        applied = run
            .progress(
                applied,
                PROGRESS,
                RECOVERY,
                &format!("before termination {round}"),
            )
            .await;
        let killed = terminate_worker_backends(&admin, &database).await;
        assert!(
            killed >= 1,
            "round {round}: the worker's connections terminated"
        );
        terminated += killed;
    }
    run.progress(applied, PROGRESS, RECOVERY, "after the last termination")
        .await;
    println!("{ROUNDS} rounds, {terminated} connections terminated");
    run.finish().await;
}

// 2. PostgreSQL out of reach for 30 seconds.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_pauses_while_postgresql_is_unreachable_for_30_seconds_and_resumes_losing_and_doubling_nothing()
 {
    let (_direct, url, _keep) = common::pg_store().await;
    let proxy = Proxy::start(&upstream(&url)).await;
    let worker_url = worker_url(&url, Some(&proxy));
    let store = PgStore::connect(&worker_url)
        .await
        .expect("PostgreSQL connects through the proxy");
    let run = Run::start(store, &worker_url, &url).await;
    let applied = run
        .progress(0, PROGRESS, RECOVERY, "before the outage")
        .await;
    let addr = run.worker.http_addr;
    assert_eq!(readyz(addr).await.0, 200, "ready before the outage");

    proxy.set(Mode::Down);
    let down = Instant::now();
    // Not ready while the database is out of reach.
    let (status, body) = readyz(addr).await;
    assert_eq!(status, 503, "not ready while PostgreSQL is down: {body}");
    assert_eq!(body["database_reachable"], false, "{body}");
    // A batch in flight when the proxy went down may still have committed;
    // after that nothing is applied: the messages wait in the queue.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let paused_at = run.ledger.applied().await;
    let waiting_before = queued(&run.vhost);
    tokio::time::sleep(OUTAGE.saturating_sub(down.elapsed())).await;
    assert_eq!(
        run.ledger.applied().await,
        paused_at,
        "nothing applied while PostgreSQL was out of reach"
    );
    let waiting = queued(&run.vhost);
    assert!(
        waiting > waiting_before + 100,
        "the stream waited in the queue: {waiting_before} then {waiting}"
    );
    assert_eq!(
        run.client.dead_letter_count().await,
        0,
        "nothing dead-lettered"
    );
    let (status, body) = readyz(addr).await;
    assert_eq!(
        status, 503,
        "still not ready at the end of the outage: {body}"
    );
    proxy.set(Mode::Pass);
    let back = Instant::now();

    run.progress(
        paused_at,
        i64::try_from(waiting).expect("a count"),
        RECOVERY,
        "after the outage",
    )
    .await;
    println!(
        "outage of {:?}, {waiting} messages waited; caught up {:?} after",
        back - down,
        back.elapsed()
    );
    assert!(applied > 0);
    run.finish().await;
}

// 3. SQLite's write lock held by another connection.

/// Longer than the worker's SQLite busy timeout (10 s): its writes fail
/// with `database is locked`, not merely wait.
const LOCK_HELD: Duration = Duration::from_secs(13);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_waits_while_another_connection_holds_the_sqlite_write_lock_and_resumes() {
    use sqlx::Connection;
    let (store, url, _keep) = common::sqlite_store().await;
    let run = Run::start(store, &url, &url).await;
    let applied = run.progress(0, PROGRESS, RECOVERY, "before the lock").await;

    let mut holder = sqlx::SqliteConnection::connect(&url)
        .await
        .expect("SQLite opens");
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut holder)
        .await
        .expect("the write lock taken");
    let locked_at = run.ledger.applied().await;
    tokio::time::sleep(LOCK_HELD).await;
    assert_eq!(
        run.ledger.applied().await,
        locked_at,
        "nothing applied while the lock was held"
    );
    assert_eq!(
        run.client.dead_letter_count().await,
        0,
        "nothing dead-lettered"
    );
    sqlx::query("ROLLBACK")
        .execute(&mut holder)
        .await
        .expect("the lock released");
    holder.close().await.expect("closed");

    run.progress(locked_at, PROGRESS, RECOVERY, "after the lock")
        .await;
    assert!(applied > 0);
    run.finish().await;
}
