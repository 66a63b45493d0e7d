//! Databases: a ledger per backend, seeded (and given a history for step 5)
//! by SQL in the binary's own schema.

use std::str::FromStr;

use crate::*;

/// A database of the bench's own: a SQLite file in a temporary folder, or a
/// PostgreSQL database dropped when this is dropped.
pub struct Database {
    pub url: String,
    pub sqlite_dir: Option<tempfile::TempDir>,
    pub postgres: Option<(String, String)>,
    pub keep: bool,
}

impl Database {
    pub async fn create(backend: Backend, options: &Options, tag: &str) -> BenchResult<Database> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().map_err(fail("a temporary folder"))?;
                let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
                Ok(Database {
                    url,
                    sqlite_dir: Some(dir),
                    postgres: None,
                    keep: options.keep,
                })
            }
            Backend::Postgres => {
                let name = format!("tc_bench_{}_{tag}", std::process::id());
                let admin = sqlx::PgPool::connect(&options.postgres)
                    .await
                    .map_err(fail("PostgreSQL (is it running? see --postgres)"))?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&admin)
                .await
                .map_err(fail("drop an old bench database"))?;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                    .execute(&admin)
                    .await
                    .map_err(fail("create the bench database"))?;
                admin.close().await;
                // The same server and parameters (`?sslmode=…`), another database.
                let (address, parameters) = match options.postgres.split_once('?') {
                    Some((address, parameters)) => (address, format!("?{parameters}")),
                    None => (options.postgres.as_str(), String::new()),
                };
                let base = &address[..address.rfind('/').unwrap_or(0)];
                Ok(Database {
                    url: format!("{base}/{name}{parameters}"),
                    sqlite_dir: None,
                    postgres: Some((options.postgres.clone(), name)),
                    keep: options.keep,
                })
            }
        }
    }

    pub fn backend(&self) -> Backend {
        if self.postgres.is_some() {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }

    /// Runs `sql` (several statements) on this database.
    pub async fn execute(&self, sql: &str) -> BenchResult<()> {
        match self.backend() {
            Backend::Sqlite => {
                let options = sqlx::sqlite::SqliteConnectOptions::from_str(&self.url)
                    .map_err(fail("SQLite URL"))?
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
                let pool = sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(options)
                    .await
                    .map_err(fail("SQLite opens"))?;
                let result = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                    .execute(&pool)
                    .await;
                pool.close().await;
                result.map_err(fail("SQL"))?;
            }
            Backend::Postgres => {
                let pool = sqlx::PgPool::connect(&self.url)
                    .await
                    .map_err(fail("PostgreSQL connects"))?;
                let result = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                    .execute(&pool)
                    .await;
                pool.close().await;
                result.map_err(fail("SQL"))?;
            }
        }
        Ok(())
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if self.keep {
            if let Some(dir) = self.sqlite_dir.take() {
                let _ = dir.keep();
            }
            eprintln!("  kept the database {}", self.url);
            return;
        }
        let Some((admin, name)) = self.postgres.take() else {
            return;
        };
        // Drop may run inside the runtime, which cannot block on itself.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(pool) = sqlx::PgPool::connect(&admin).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    )))
                    .execute(&pool)
                    .await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}

/// SQL pieces that differ between the backends.
pub struct Dialect {
    pub backend: Backend,
    pub now_micros: i64,
}

impl Dialect {
    /// `(prefix, from)`: `{prefix}INSERT … SELECT … FROM {from}` makes one
    /// row per `column` in `0..count`.
    pub fn series(&self, column: &str, count: u64) -> (String, String) {
        let last = count.saturating_sub(1);
        match self.backend {
            Backend::Postgres => (
                String::new(),
                format!("generate_series(0, {last}) AS {column}"),
            ),
            Backend::Sqlite => (
                format!(
                    "WITH RECURSIVE s({column}) AS (SELECT 0 UNION ALL SELECT {column} + 1 FROM s WHERE {column} < {last}) "
                ),
                "s".to_owned(),
            ),
        }
    }

    /// The instant `days` from now, plus `per_i` × `i` seconds (if given).
    pub fn instant(&self, days: i64, step: Option<(&str, i64)>) -> String {
        match self.backend {
            Backend::Postgres => {
                let mut text = format!("(now() + interval '{days} days'");
                if let Some((i, seconds)) = step {
                    text.push_str(&format!(" + {i} * interval '{seconds} seconds'"));
                }
                text.push(')');
                text
            }
            Backend::Sqlite => {
                let mut text = format!("({}", self.now_micros + days * 86_400_000_000);
                if let Some((i, seconds)) = step {
                    text.push_str(&format!(" + {i} * {}", seconds * 1_000_000));
                }
                text.push(')');
                text
            }
        }
    }
}

/// The pre-existing accounts `acct-0…` (30 % manual), each with one owner
/// and one funded lot whose purchase is in the journal.
pub fn seed_sql(dialect: &Dialect, accounts: u64) -> String {
    let (prefix, from) = dialect.series("a", accounts);
    let now = dialect.instant(0, None);
    let expires = dialect.instant(365, None);
    let remind = dialect.instant(335, None);
    format!(
        "BEGIN;
{prefix}INSERT INTO accounts (account_id, name, status, approval_mode, code, code_key, scope, low_balance_threshold, notes, created_at)
  SELECT 'acct-' || a, 'Account ' || a, 'active', CASE WHEN a % 10 < 3 THEN 'manual' ELSE 'automatic' END,
  'BENCH-' || a, 'BENCH' || a, '{{\"kind\":\"all\"}}', NULL, NULL, {now} FROM {from};
{prefix}INSERT INTO owners (email, account_id, name, position)
  SELECT 'owner-' || a || '@example.com', 'acct-' || a, 'Owner ' || a, 0 FROM {from};
{prefix}INSERT INTO lots (account_id, purchase_id, credits, remaining, held, expired, purchased_at, expires_at,
  price_amount, price_currency, channel, reminded_stage, remind_at, fingerprint)
  SELECT 'acct-' || a, 'seed-' || a, {SEED_CREDITS_CENTS}, {SEED_CREDITS_CENTS}, 0, 0, {now}, {expires},
  NULL, NULL, 'grant', NULL, {remind}, '' FROM {from};
{prefix}INSERT INTO journal (at, account_id, entry, purchase_id, request_id, amount, held_delta, balance_after, actor, causation_id)
  SELECT {now}, 'acct-' || a, 'purchase', 'seed-' || a, NULL, {SEED_CREDITS_CENTS}, 0, {SEED_CREDITS_CENTS}, 'seed', 'seed-' || a FROM {from};
COMMIT;"
    )
}

/// The history's first redemption is this many days old…
pub const HISTORY_DAYS: i64 = 730;
/// …and redemption `hist-req-I` of account `acct-(I % accounts)` came
/// `I` × this many seconds after it.
pub const HISTORY_STEP_SECONDS: i64 = 30;

/// How many redemptions (`hist-req-0…`) a history of `entries` journal
/// entries on `accounts` accounts holds: the rest are purchases.
pub fn history_redeems(accounts: u64, entries: u64) -> u64 {
    entries.saturating_sub(accounts + accounts * OLD_LOTS)
}

/// A history on the same accounts that brings the journal to `entries`:
/// per account 19 old lots, bought two years ago, spent by approved
/// redemptions of 25.00 and expired a year ago; a redemption row, an
/// idempotency record and a dispatched outbound event per entry. The
/// redemptions belong to 100,000 learners, among them the workload's.
pub fn history_sql(dialect: &Dialect, accounts: u64, entries: u64) -> String {
    let redeems = history_redeems(accounts, entries);
    let (prefix, from) = dialect.series("i", redeems);
    let at = dialect.instant(-HISTORY_DAYS, Some(("i", HISTORY_STEP_SECONDS)));
    let bought = dialect.instant(-731, None);
    let expired = dialect.instant(-365, None);
    let lot = format!("'old-' || (i % {accounts}) || '-' || ((i / {accounts}) % {OLD_LOTS})");
    let learner = format!("(i % {HISTORY_LEARNERS})");
    let cost = HISTORY_COST_CENTS;
    let cost_text = cents(cost);
    format!(
        "BEGIN;
{prefix}INSERT INTO journal (at, account_id, entry, purchase_id, request_id, amount, held_delta, balance_after, actor, causation_id)
  SELECT {at}, 'acct-' || (i % {accounts}), 'redeem', {lot}, 'hist-req-' || i, -{cost}, 0, {SEED_CREDITS_CENTS},
  'learner-' || {learner} || '@learners.example', 'hist-ev-' || i FROM {from};
INSERT INTO lots (account_id, purchase_id, credits, remaining, held, expired, purchased_at, expires_at,
  price_amount, price_currency, channel, reminded_stage, remind_at, fingerprint)
  SELECT account_id, purchase_id, SUM(-amount), 0, 0, 0, {bought}, {expired}, SUM(-amount), 'USD', 'card', 1, NULL, ''
  FROM journal WHERE entry = 'redeem' GROUP BY account_id, purchase_id;
INSERT INTO journal (at, account_id, entry, purchase_id, request_id, amount, held_delta, balance_after, actor, causation_id)
  SELECT {bought}, account_id, 'purchase', purchase_id, NULL, credits, 0, credits, 'shop', 'hist-buy-' || purchase_id
  FROM lots WHERE purchase_id LIKE 'old-%';
{prefix}INSERT INTO redemptions (request_id, account_id, learner_id, learner_email, learner_name, item_id, item_kind,
  item_title, item_group_ids, cost, status, reason, requested_at, created_at, decided_by, decided_at, allocations,
  refunded, fingerprint)
  SELECT 'hist-req-' || i, 'acct-' || (i % {accounts}), 'learner-' || {learner},
  'learner-' || {learner} || '@learners.example', 'Learner ' || {learner}, 'hist-item-' || i, 'course',
  'Course ' || i, '[]', {cost}, 'approved', NULL, {at}, {at}, 'system', {at},
  '[{{\"purchase_id\":\"' || {lot} || '\",\"amount\":\"{cost_text}\"}}]', 0, 'hist-' || i FROM {from};
{prefix}INSERT INTO processed (source, event_id, digest, outcome, processed_at)
  SELECT 'lms', 'hist-ev-' || i, 'digest-' || i, 'applied', {at} FROM {from};
INSERT INTO processed (source, event_id, digest, outcome, processed_at)
  SELECT 'shop', 'hist-buy-' || purchase_id, 'digest-' || purchase_id, 'applied', {bought} FROM lots WHERE purchase_id LIKE 'old-%';
INSERT INTO outbox (id, kind, payload, created_at, attempts, next_attempt_at, dispatched_at, last_error)
  SELECT 'hist-out-buy-' || purchase_id, 'event', '{{\"type\":\"training-credits.purchase.recorded\",\"data\":{{\"purchase_id\":\"' || purchase_id || '\"}}}}',
  {bought}, 0, {bought}, {bought}, NULL FROM lots WHERE purchase_id LIKE 'old-%';
{prefix}INSERT INTO outbox (id, kind, payload, created_at, attempts, next_attempt_at, dispatched_at, last_error)
  SELECT 'hist-out-' || i, 'event',
  '{{\"specversion\":\"1.0\",\"id\":\"hist-out-' || i || '\",\"source\":\"training-credits\",\"type\":\"training-credits.redemption.approved\",\"subject\":\"acct-' || (i % {accounts}) || '\",\"data\":{{\"account_id\":\"acct-' || (i % {accounts}) || '\",\"request_id\":\"hist-req-' || i || '\",\"cost\":\"{cost_text}\",\"decided_by\":\"system\",\"causation_id\":\"hist-ev-' || i || '\"}}}}',
  {at}, 0, {at}, {at}, NULL FROM {from};
COMMIT;"
    )
}
