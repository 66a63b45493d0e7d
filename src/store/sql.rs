//! The storage code shared by both backends: one [`SqlStore`], generic over
//! the sqlx [`Database`] it runs on, implements every role of the store
//! ([`Books`], [`Outbox`], [`Firings`], [`Reports`]) once.
//!
//! The SQL is portable between SQLite and PostgreSQL (numbered binds,
//! `ON CONFLICT … DO UPDATE`, row values). The few places where the two
//! differ (how a write transaction begins, row locks, how a list or a set of
//! pairs is bound, the string aggregate, the owners as JSON, whether a lease
//! holder is alive, the bulk insert, the migrations) are the items of the
//! [`Backend`] trait, which `sqlite.rs` and `postgres.rs` implement for sqlx's
//! own zero-sized `Sqlite` and `Postgres` types. Everything else is plain
//! generic Rust that rustfmt formats and an IDE follows, and a column is
//! added in one place here ([`rows`](super::rows), the decoders below) plus
//! the migration of each backend.
//!
//! Statements whose text depends on the backend are composed once per
//! process ([`Statements`], kept by each backend in a `OnceLock`) and handed
//! to sqlx as shared strings, so a batch neither formats text nor loses the
//! per-connection cache of prepared statements, which is keyed by that text.
//!
//! The generic code needs a few facts about the database that Rust cannot
//! carry over from a trait's `where` clause (it only implies bounds on
//! `Self` and its associated types, rust-lang/rust#20671): that its
//! connections execute queries, that rows are read by column name, and
//! which values bind and decode. They are written out on each `impl` below.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use futures_util::stream::{BoxStream, StreamExt};
use sqlx::migrate::{Migrate, Migrator};
use sqlx::pool::{Pool, PoolOptions};
use sqlx::query::Query;
use sqlx::{
    AssertSqlSafe, ColumnIndex, ConnectOptions, Database, Decode, Encode, Executor, IntoArguments,
    Row, SqlSafeStr, SqlStr, Type,
};
use tokio::sync::{Mutex, MutexGuard};

use super::rows::{
    ACCOUNTS, AUDIT, CODE_ATTEMPTS, JOURNAL, LOTS, OUTBOX, OWNERS, PROCESSED, PURCHASE_REFUNDS,
    REDEMPTIONS, Rows, from_json, from_text, id, opt_id, to_json, to_text,
};
use super::{
    Backlog, Books, FIRING_LEASE, Firings, Holder, HolderId, Loaded, LotWrite, Outbox, OutboxKind,
    OutboxRow, Reports, SentMarks, StoreError, ToLoad, Writes,
};
use crate::decode::EventKey;
use crate::domain::command::ReportKind;
use crate::domain::ledger::{EntryKind, Ledger, PurchaseRefund};
use crate::domain::model::{
    Account, Allocation, Item, Learner, Lot, Owner, Price, Redemption, RedemptionStatus,
    lot_figures_hold,
};
use crate::domain::report::{Cell, ReportQuery};
use crate::domain::{CodeKey, Credits, Id, Ts};

/// What differs between the two databases. Implemented by sqlx's `Sqlite`
/// and `Postgres`; every statement is otherwise the same text on both.
///
/// Public, with what it names ([`Rows`], [`Statements`], [`Value`]), only
/// because the impls of the public [`SqlStore`] are bounded by it; its module
/// is private, so nothing outside `store` implements or calls it.
pub trait Backend:
    Database<Arguments: IntoArguments<Self>, Connection: Migrate> + sqlx::database::HasStatementCache
{
    /// How a write transaction begins.
    const BEGIN: &'static str;
    /// Appended to the load of the accounts a batch writes: locks them for
    /// the rest of the transaction.
    const LOCK: &'static str;
    /// Appended to the outbox claim's inner select, so that concurrent
    /// claims skip each other's rows instead of waiting for them.
    const SKIP_LOCKED: &'static str;
    /// Whether the lease holder `holder` is gone, as an SQL condition.
    const HOLDER_DEAD: &'static str;
    /// A redemption request's position in the order requests were written.
    const REQUEST_SEQ: &'static str;
    /// The string aggregate, `name(value, separator)`.
    const AGG: &'static str;
    /// Follows a column: it is one of the list bound as `$1`
    /// ([`Backend::bind_list`]).
    const IN_LIST: &'static str;
    /// Follows `(learner_id, item_id)`: the pair is one of those bound by
    /// [`Backend::bind_pairs`].
    const PAIRS_IN: &'static str;
    /// An account's owners, in order, as a JSON array of `[email, name]`,
    /// in a select from `accounts`.
    const OWNERS_JSON: &'static str;

    /// Binds a list of values as one parameter, for [`Backend::IN_LIST`].
    fn bind_list<'q>(
        query: Query<'q, Self, Self::Arguments>,
        items: &[String],
    ) -> Query<'q, Self, Self::Arguments>;

    /// Binds (learner, item) pairs, for [`Backend::PAIRS_IN`].
    fn bind_pairs<'q>(
        query: Query<'q, Self, Self::Arguments>,
        pairs: &BTreeSet<[&str; 2]>,
    ) -> Query<'q, Self, Self::Arguments>;

    /// Inserts the rows of `tables` (each has some), in order, in as few
    /// exchanges with the database as its statements allow.
    fn insert(
        conn: &mut Self::Connection,
        tables: Vec<Rows>,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// This backend's schema and its upgrades.
    fn migrator() -> &'static Migrator;

    /// How many rows a statement changed.
    fn rows_affected(result: &Self::QueryResult) -> u64;

    /// The statements of this backend, built once ([`Statements::new`]).
    fn statements() -> &'static Statements;

    /// A new lease holder, alive for as long as the returned value lives.
    fn hold(pool: &Pool<Self>) -> impl Future<Output = Result<Holder, StoreError>> + Send;
}

/// A value that binds to and decodes from `D`'s statements.
pub trait Value<D: Database>:
    for<'q> Encode<'q, D> + for<'r> Decode<'r, D> + Type<D> + Send
{
}

impl<D: Database, T> Value<D> for T where
    T: for<'q> Encode<'q, D> + for<'r> Decode<'r, D> + Type<D> + Send
{
}

/// The ledger's storage on a database `D`: [`SqliteStore`](super::SqliteStore)
/// or [`PgStore`](super::PgStore).
#[derive(Debug)]
pub struct SqlStore<D: Database> {
    /// Reads (snapshots, reports, backlog).
    pub(super) pool: Pool<D>,
    /// Every write goes through this pool: the reads' pool on PostgreSQL,
    /// one connection of its own on SQLite (see `sqlite.rs`).
    writer: Pool<D>,
    /// Taken around every write where the database lets one writer at a
    /// time in and would not make them take turns (SQLite).
    gate: Option<Arc<Mutex<()>>>,
    marks: SentMarks,
}

impl<D: Database> Clone for SqlStore<D> {
    fn clone(&self) -> Self {
        SqlStore {
            pool: self.pool.clone(),
            writer: self.writer.clone(),
            gate: self.gate.clone(),
            marks: self.marks.clone(),
        }
    }
}

impl<D: Database> SqlStore<D> {
    pub(super) fn new(pool: Pool<D>, writer: Pool<D>, gate: Option<Arc<Mutex<()>>>) -> Self {
        SqlStore {
            pool,
            writer,
            gate,
            marks: SentMarks::default(),
        }
    }

    async fn write_gate(&self) -> Option<MutexGuard<'_, ()>> {
        match &self.gate {
            Some(gate) => Some(gate.lock().await),
            None => None,
        }
    }
}

const LOT_COLUMNS: &str = "SELECT account_id, purchase_id, credits, remaining, held, expired, \
    purchased_at, expires_at, price_amount, price_currency, channel, refunded, reminded_stage, \
    fingerprint FROM lots WHERE";
/// The `transactions` report's columns (SPEC §8) and their position; the
/// conditions follow.
const TRANSACTIONS: &str = "SELECT j.seq AS position, j.at, j.account_id, j.entry, j.amount, \
    j.balance_after, j.purchase_id, j.request_id, r.learner_email, r.item_title, j.actor \
    FROM journal j LEFT JOIN redemptions r ON r.request_id = j.request_id WHERE";
const REQUEST_COLUMNS: &str = "SELECT request_id, account_id, learner_id, learner_email, \
    learner_name, item_id, item_kind, item_title, item_group_ids, cost, status, reason, \
    requested_at, created_at, decided_by, decided_at, allocations, refunded, fingerprint \
    FROM redemptions WHERE";
/// The statements whose text depends on the backend, or is composed from
/// the column lists above. Those that end in `IN_LIST` take their list as
/// `$1` ([`Backend::bind_list`]).
pub struct Statements {
    requests: SqlStr,
    accounts_by_code_key: SqlStr,
    accounts_by_owner: SqlStr,
    accounts: SqlStr,
    accounts_locked: SqlStr,
    pending_requests: SqlStr,
    lots: SqlStr,
    live_lots: SqlStr,
    spent_lots: SqlStr,
    active_requests: SqlStr,
    limited_requests: SqlStr,
    refunds: SqlStr,
    code_attempts: SqlStr,
    processed: SqlStr,
    delete_owners: SqlStr,
    mark_sent: SqlStr,
    claim_outbox: SqlStr,
    release_dead_holders: SqlStr,
    credits_report: SqlStr,
    balances_report: SqlStr,
    verify_requests: SqlStr,
    requests_page: SqlStr,
    requests_page_of_status: SqlStr,
    transactions_report: SqlStr,
    journal_page: SqlStr,
    journal_entry_at: SqlStr,
}

impl Statements {
    pub(super) fn new<D: Backend>() -> Statements {
        let in_list = D::IN_LIST;
        // An account's row with its owners, the column compared then follows.
        let accounts = format!(
            "SELECT account_id, name, status, approval_mode, code, scope, \
             low_balance_threshold, learner_limit, notes, created_at, {} AS owners FROM accounts \
             WHERE account_id",
            D::OWNERS_JSON
        );
        // An account's owners' emails, in order, joined by `; `, in a select
        // from `accounts a`.
        let owners_list = format!(
            "(SELECT {}(o.email, '; ') FROM \
             (SELECT email FROM owners WHERE owners.account_id = a.account_id ORDER BY position) o)",
            D::AGG
        );
        Statements {
            requests: text(format!("{REQUEST_COLUMNS} request_id{in_list}")),
            accounts_by_code_key: text(format!(
                "SELECT code_key, account_id FROM accounts WHERE code_key{in_list}"
            )),
            accounts_by_owner: text(format!(
                "SELECT email, account_id FROM owners WHERE email{in_list}"
            )),
            accounts: text(format!("{accounts}{in_list} ORDER BY account_id")),
            accounts_locked: text(format!(
                "{accounts}{in_list} ORDER BY account_id{}",
                D::LOCK
            )),
            pending_requests: text(format!(
                "{REQUEST_COLUMNS} status = 'pending' AND account_id{in_list}"
            )),
            lots: text(format!("{LOT_COLUMNS} account_id{in_list}")),
            live_lots: text(format!(
                "{LOT_COLUMNS} account_id{in_list} AND (remaining <> 0 OR held <> 0)"
            )),
            spent_lots: text(format!(
                "{LOT_COLUMNS} remaining = 0 AND held = 0 AND purchase_id{in_list}"
            )),
            active_requests: text(format!(
                "SELECT learner_id, item_id, request_id FROM redemptions \
                 WHERE status IN ('pending', 'approved') AND (learner_id, item_id){}",
                D::PAIRS_IN
            )),
            limited_requests: text(format!(
                "{REQUEST_COLUMNS} status IN ('pending', 'approved') AND created_at > $2 \
                 AND learner_id{in_list}"
            )),
            refunds: text(format!(
                "SELECT account_id, refund_id, purchase_id, refunded, shortfall, reason, \
                 refunded_at, fingerprint FROM purchase_refunds WHERE (account_id, refund_id){}",
                D::PAIRS_IN
            )),
            code_attempts: text(format!(
                "SELECT learner_id, at FROM code_attempts WHERE learner_id{in_list}"
            )),
            processed: text(format!(
                "SELECT source, event_id, digest FROM processed WHERE event_id{in_list}"
            )),
            delete_owners: text(format!("DELETE FROM owners WHERE account_id{in_list}")),
            mark_sent: text(format!(
                "UPDATE outbox SET dispatched_at = $2 WHERE dispatched_at IS NULL AND id{in_list}"
            )),
            claim_outbox: text(format!(
                "UPDATE outbox SET next_attempt_at = $1, leased_by = $5 WHERE seq IN (SELECT seq \
                 FROM outbox WHERE dispatched_at IS NULL AND kind = $2 AND next_attempt_at <= $3 \
                 ORDER BY seq LIMIT $4{}) RETURNING seq, id, kind, payload, created_at, \
                 next_attempt_at, attempts, leased_by",
                D::SKIP_LOCKED
            )),
            release_dead_holders: text(format!(
                "UPDATE outbox SET next_attempt_at = $1, leased_by = NULL WHERE dispatched_at IS \
                 NULL AND leased_by IN (SELECT holder FROM (SELECT DISTINCT leased_by AS holder \
                 FROM outbox WHERE dispatched_at IS NULL AND leased_by IS NOT NULL AND leased_by \
                 <> $2) AS holders WHERE {})",
                D::HOLDER_DEAD
            )),
            credits_report: text(format!(
                "SELECT l.account_id, a.name AS account_name, {owners_list} AS owners, a.code, \
                 l.purchase_id, l.credits, l.price_amount, l.price_currency, l.remaining, l.held, \
                 l.expires_at, a.notes FROM lots l JOIN accounts a ON a.account_id = l.account_id \
                 WHERE ($1 IS NULL OR l.account_id = $1) AND ($2 IS NULL OR l.purchased_at >= $2) \
                 AND ($3 IS NULL OR l.purchased_at < $3) \
                 ORDER BY l.account_id, l.expires_at, l.purchase_id"
            )),
            balances_report: text(format!(
                "SELECT a.account_id, a.name AS account_name, a.status, \
                 CAST(COALESCE(SUM(CASE WHEN l.expires_at > $2 THEN l.remaining ELSE l.held END), 0) \
                 AS BIGINT) AS balance, \
                 CAST(COALESCE(SUM(l.held), 0) AS BIGINT) AS held, \
                 CAST(COALESCE(SUM(CASE WHEN l.expires_at > $2 AND l.expires_at <= $3 \
                 THEN l.remaining - l.held ELSE 0 END), 0) AS BIGINT) AS expiring_30d, \
                 {owners_list} AS owners FROM accounts a LEFT JOIN lots l ON l.account_id = a.account_id \
                 WHERE ($1 IS NULL OR a.account_id = $1) \
                 GROUP BY a.account_id, a.name, a.status ORDER BY a.account_id"
            )),
            verify_requests: text(format!(
                "{REQUEST_COLUMNS} status IN ('pending', 'approved', 'refunded', 'unenrolled')"
            )),
            requests_page: requests_page::<D>(""),
            requests_page_of_status: requests_page::<D>("AND status = $4 "),
            transactions_report: text(format!(
                "{TRANSACTIONS} ($1 IS NULL OR j.account_id = $1) AND ($2 IS NULL OR j.at >= $2) \
                 AND ($3 IS NULL OR j.at < $3) ORDER BY j.seq"
            )),
            // Oldest first: by instant, then by position among entries of
            // one instant; the page starts after the bound `($2, $3)`.
            journal_page: text(format!(
                "{TRANSACTIONS} j.account_id = $1 AND (j.at, j.seq) > ($2, $3) AND j.at < $4 \
                 ORDER BY j.at, j.seq LIMIT $5"
            )),
            journal_entry_at: text("SELECT at FROM journal WHERE seq = $1".to_owned()),
        }
    }
}

/// A page of an account's requests after position `$2`, `$3` of them, in
/// the order they were written, narrowed by `filter`.
fn requests_page<D: Backend>(filter: &str) -> SqlStr {
    text(format!(
        "{}, {seq} AS position FROM redemptions WHERE account_id = $1 {filter}\
         AND {seq} > $2 ORDER BY {seq} LIMIT $3",
        REQUEST_COLUMNS
            .strip_suffix(" FROM redemptions WHERE")
            .expect("the request columns end with their table"),
        seq = D::REQUEST_SEQ,
    ))
}

/// A pool that tells of a long wait for a connection at `info`, not `warn`.
/// sqlx's slow-statement and slow-acquire messages are figures of load,
/// which the metrics show, not faults: at `warn` they would break a
/// command's one-line reason on stderr (SPEC §3) when the machine is busy,
/// and fill a loaded worker's log with whole multi-row statements.
pub(super) fn pool_options<DB: Database>() -> PoolOptions<DB> {
    PoolOptions::new().acquire_slow_level(log::LevelFilter::Info)
}

/// Connection options that log a statement slower than a second at `info`
/// (see [`pool_options`]).
pub(super) fn quiet<O: ConnectOptions>(options: O) -> O {
    options.log_slow_statements(log::LevelFilter::Info, std::time::Duration::from_secs(1))
}

/// A statement text, shared: handing it to a query copies no text.
fn text(sql: String) -> SqlStr {
    // The text is this module's own, composed of constants; values are bound.
    AssertSqlSafe(Arc::<str>::from(sql)).into_sql_str()
}

fn strings<T: AsRef<str>>(items: impl IntoIterator<Item = T>) -> Vec<String> {
    let set: BTreeSet<String> = items.into_iter().map(|i| i.as_ref().to_owned()).collect();
    set.into_iter().collect()
}

fn credits(cents: i64) -> Credits {
    Credits::from_cents(cents)
}

fn credits_text(cents: i64) -> String {
    Credits::from_cents(cents).to_string()
}

/// The rows of `outbox` to insert, followed by `tail`.
fn outbox_rows(outbox: &[OutboxRow], tail: &'static str) -> Rows {
    let mut rows = Rows::new(&OUTBOX, outbox.len(), tail);
    for o in outbox {
        rows.text(o.id.clone())
            .text(o.kind.as_str().to_owned())
            .text(o.payload.clone())
            .time(o.created_at)
            .time(o.next_attempt_at)
            .int(o.leased_by.map(HolderId::get));
    }
    rows
}

/// Inserts the rows of `tables` (those that have any), in order: a batch's
/// writes are one exchange with the database (on SQLite, a large batch's
/// prepared chunks one each), not one per table.
async fn insert<D: Backend>(
    conn: &mut D::Connection,
    tables: Vec<Rows>,
) -> Result<(), sqlx::Error> {
    let tables: Vec<Rows> = tables.into_iter().filter(|rows| !rows.is_empty()).collect();
    if tables.is_empty() {
        return Ok(());
    }
    D::insert(conn, tables).await
}

/// The rows a batch writes, in the order they are inserted (owners after
/// their account, lots before the journal that names them).
fn rows_of(writes: &Writes, now: Ts) -> Vec<Rows> {
    let mut tables = Vec::with_capacity(9);
    let changed: Vec<&Account> = writes
        .accounts
        .iter()
        .filter(|w| w.row_changed())
        .map(|w| &w.after)
        .collect();
    let mut rows = Rows::new(
        &ACCOUNTS,
        changed.len(),
        " ON CONFLICT (account_id) DO UPDATE SET name = excluded.name, \
         status = excluded.status, approval_mode = excluded.approval_mode, code = excluded.code, \
         code_key = excluded.code_key, scope = excluded.scope, \
         low_balance_threshold = excluded.low_balance_threshold, \
         learner_limit = excluded.learner_limit, notes = excluded.notes",
    );
    for a in changed {
        rows.text(a.id.to_string())
            .text(a.name.clone())
            .text(to_text(&a.status))
            .text(to_text(&a.approval_mode))
            .text(a.code.to_string())
            .text(a.code.key().as_str().to_owned())
            .text(to_json(&a.scope))
            .int(a.low_balance_threshold.map(Credits::cents))
            .int(a.learner_limit.map(Credits::cents))
            .text(a.notes.clone())
            .time(a.created_at);
    }
    tables.push(rows);
    let reowned: Vec<&Account> = writes
        .accounts
        .iter()
        .filter(|w| w.owners_changed())
        .map(|w| &w.after)
        .collect();
    let mut rows = Rows::new(&OWNERS, reowned.len(), "");
    for a in reowned {
        for (position, o) in a.owners.iter().enumerate() {
            rows.text(o.email.to_string())
                .text(a.id.to_string())
                .text(o.name.clone())
                .int(i64::try_from(position).expect("an account has few owners"));
        }
    }
    tables.push(rows);
    let mut rows = Rows::new(
        &LOTS,
        writes.lots.len(),
        " ON CONFLICT (account_id, purchase_id) DO UPDATE SET \
         remaining = excluded.remaining, held = excluded.held, expired = excluded.expired, \
         refunded = excluded.refunded, expires_at = excluded.expires_at, reminded_stage = excluded.reminded_stage, \
         remind_at = excluded.remind_at",
    );
    for LotWrite {
        account_id,
        lot: l,
        remind_at,
    } in &writes.lots
    {
        rows.text(account_id.to_string())
            .text(l.purchase_id.to_string())
            .int(l.credits.cents())
            .int(l.remaining.cents())
            .int(l.held.cents())
            .int(l.expired.cents())
            .time(l.purchased_at)
            .time(l.expires_at)
            .int(l.price_paid.as_ref().map(|p| p.amount.cents()))
            .text(l.price_paid.as_ref().map(|p| p.currency.clone()))
            .text(l.channel.clone())
            .int(l.refunded.cents())
            .int(l.reminded_stage.map(i64::from))
            .time(*remind_at)
            .text(l.fingerprint.clone());
    }
    tables.push(rows);
    let mut rows = Rows::new(
        &REDEMPTIONS,
        writes.requests.len(),
        " ON CONFLICT (request_id) DO UPDATE SET \
         status = excluded.status, reason = excluded.reason, decided_by = excluded.decided_by, \
         decided_at = excluded.decided_at, refunded = excluded.refunded",
    );
    for r in &writes.requests {
        rows.text(r.request_id.to_string())
            .text(r.account_id.as_ref().map(Id::to_string))
            .text(r.learner.id.to_string())
            .text(r.learner.email.to_string())
            .text(r.learner.name.clone())
            .text(r.item.id.to_string())
            .text(to_text(&r.item.kind))
            .text(r.item.title.clone())
            .text(to_json(&r.item.group_ids))
            .int(r.cost.cents())
            .text(r.status.as_str().to_owned())
            .text(r.reason.clone())
            .time(r.requested_at)
            .time(r.created_at)
            .text(r.decided_by.clone())
            .time(r.decided_at)
            .text(to_json(&r.allocations))
            .int(r.refunded.cents())
            .text(r.fingerprint.clone());
    }
    tables.push(rows);
    let mut rows = Rows::new(&JOURNAL, writes.journal.len(), "");
    for (e, cause) in &writes.journal {
        rows.time(e.at)
            .text(e.account_id.to_string())
            .text(e.kind.as_str().to_owned())
            .text(e.purchase_id.to_string())
            .text(e.request_id.as_ref().map(Id::to_string))
            .int(e.amount.cents())
            .int(e.held_delta.cents())
            .int(e.balance_after.cents())
            .text(e.actor.clone())
            .text(cause.clone());
    }
    tables.push(rows);
    let mut rows = Rows::new(&AUDIT, writes.audit.len(), "");
    for (e, cause) in &writes.audit {
        rows.time(e.at)
            .text(e.account_id.to_string())
            .text(e.actor.clone())
            .text(e.field.clone())
            .text(e.old.to_string())
            .text(e.new.to_string())
            .text(cause.clone());
    }
    tables.push(rows);
    let mut rows = Rows::new(&PROCESSED, writes.processed.len(), "");
    for (key, digest, outcome) in &writes.processed {
        rows.text(key.source.clone())
            .text(key.id.clone())
            .text(digest.clone())
            .text((*outcome).to_owned())
            .time(now);
    }
    tables.push(rows);
    let mut rows = Rows::new(&PURCHASE_REFUNDS, writes.refunds.len(), "");
    for (r, cause) in &writes.refunds {
        rows.text(r.account_id.to_string())
            .text(r.refund_id.to_string())
            .text(r.purchase_id.to_string())
            .int(r.refunded.cents())
            .int(r.shortfall.cents())
            .text(r.reason.clone())
            .time(r.refunded_at)
            .text(r.fingerprint.clone())
            .text(cause.clone());
    }
    tables.push(rows);
    let mut rows = Rows::new(&CODE_ATTEMPTS, writes.attempts.len(), "");
    for (learner, at) in &writes.attempts {
        rows.text(learner.to_string()).time(*at);
    }
    tables.push(rows);
    tables.push(outbox_rows(&writes.outbox, ""));
    tables
}

/// The instant before which a firing's claim has run out.
fn firing_stale(now: Ts) -> Ts {
    now.plus(-chrono::Duration::from_std(FIRING_LEASE).expect("a short lease"))
}

/// The steps a batch is made of, and the decoding of rows: the code the
/// roles below share.
impl<D> SqlStore<D>
where
    D: Backend,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    &'static str: ColumnIndex<D::Row>,
    String: Value<D>,
    Option<String>: Value<D>,
    i64: Value<D>,
    Ts: Value<D>,
    Option<Ts>: Value<D>,
    bool: Value<D>,
{
    /// Creates or upgrades the schema. Done once, on the store just opened,
    /// before it is handed to the code that uses its roles.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        D::migrator().run(&self.pool).await?;
        Ok(())
    }

    /// Runs `statement`, which ends in [`Backend::IN_LIST`], with `items`
    /// bound as its list: the text is the same however many items there
    /// are, so the statement is prepared once per connection.
    async fn fetch_in(
        conn: &mut D::Connection,
        statement: &SqlStr,
        items: &[String],
    ) -> Result<Vec<D::Row>, sqlx::Error> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        D::bind_list(sqlx::query(statement.clone()), items)
            .fetch_all(&mut *conn)
            .await
    }

    /// Loads what `wanted` names; with `lock`, the accounts are locked for
    /// the rest of the transaction (in a stable order, so that two workers
    /// never deadlock).
    async fn load(
        conn: &mut D::Connection,
        wanted: &ToLoad,
        lock: bool,
    ) -> Result<Loaded, StoreError> {
        let statements = D::statements();
        let mut loaded = Loaded::default();
        let mut account_ids: BTreeSet<String> = strings(&wanted.account_ids).into_iter().collect();
        let mut requests = Vec::new();
        let request_ids = strings(&wanted.request_ids);
        for row in Self::fetch_in(conn, &statements.requests, &request_ids).await? {
            let request = Self::request_from(&row)?;
            account_ids.extend(request.account_id.as_ref().map(Id::to_string));
            requests.push(request);
        }
        let code_keys = strings(wanted.code_keys.iter().map(|k| k.as_str()));
        for row in Self::fetch_in(conn, &statements.accounts_by_code_key, &code_keys).await? {
            let account: String = row.try_get("account_id")?;
            let key = CodeKey::of(&row.try_get::<String, _>("code_key")?);
            loaded.ledger.codes.insert(key, id(account.clone())?);
            account_ids.insert(account);
        }
        let emails = strings(&wanted.owner_emails);
        for row in Self::fetch_in(conn, &statements.accounts_by_owner, &emails).await? {
            loaded.ledger.owner_of.insert(
                row.try_get::<String, _>("email")?
                    .parse()
                    .map_err(StoreError::corrupt)?,
                id(row.try_get("account_id")?)?,
            );
        }
        let account_ids: Vec<String> = account_ids.into_iter().collect();
        let statement = if lock {
            &statements.accounts_locked
        } else {
            &statements.accounts
        };
        let mut accounts: HashMap<Id, Account> = HashMap::new();
        for row in Self::fetch_in(conn, statement, &account_ids).await? {
            let account = Self::account_from(&row)?;
            accounts.insert(account.id.clone(), account);
        }
        let pending_of = strings(&wanted.pending_of);
        for row in Self::fetch_in(conn, &statements.pending_requests, &pending_of).await? {
            requests.push(Self::request_from(&row)?);
        }
        let statement = if wanted.live_lots {
            &statements.live_lots
        } else {
            &statements.lots
        };
        let mut lots = Self::fetch_in(conn, statement, &account_ids).await?;
        if wanted.live_lots {
            let named = strings(
                wanted.purchase_ids.iter().chain(
                    requests
                        .iter()
                        .flat_map(|r| r.allocations.iter().map(|a| &a.purchase_id)),
                ),
            );
            lots.extend(Self::fetch_in(conn, &statements.spent_lots, &named).await?);
        }
        for row in lots {
            if let Some(account) = accounts.get_mut(&id(row.try_get("account_id")?)?) {
                account.lots.push(Self::lot_from(&row)?);
            }
        }
        for (_, mut account) in accounts {
            account.sort_lots();
            loaded.ledger.insert_account(account);
        }
        // Of a learner's requests only whether the items asked for are
        // taken matters (a learner's approved requests grow without end).
        let pairs: BTreeSet<[&str; 2]> = wanted
            .learner_items
            .iter()
            .map(|(learner, item)| [learner.as_str(), item.as_str()])
            .collect();
        if !pairs.is_empty() {
            let query = sqlx::query(statements.active_requests.clone());
            let rows = D::bind_pairs(query, &pairs).fetch_all(&mut *conn).await?;
            for row in rows {
                loaded.ledger.active.insert(
                    (
                        id(row.try_get("learner_id")?)?,
                        id(row.try_get("item_id")?)?,
                    ),
                    id(row.try_get("request_id")?)?,
                );
            }
        }
        // Rule 12: the learners' recent requests on accounts with a limit.
        let limited: HashSet<&Id> = loaded
            .ledger
            .accounts
            .values()
            .filter(|a| a.learner_limit.is_some())
            .map(|a| &a.id)
            .collect();
        if let Some(since) = wanted.limited_since.filter(|_| !limited.is_empty()) {
            let learners = strings(wanted.learner_items.iter().map(|(learner, _)| learner));
            let query = sqlx::query(statements.limited_requests.clone());
            let rows = D::bind_list(query, &learners)
                .bind(since)
                .fetch_all(&mut *conn)
                .await?;
            for row in rows {
                let request = Self::request_from(&row)?;
                if request
                    .account_id
                    .as_ref()
                    .is_some_and(|account| limited.contains(account))
                {
                    requests.push(request);
                }
            }
        }
        for request in requests {
            loaded.ledger.insert_request(request);
        }
        let pairs: BTreeSet<[&str; 2]> = wanted
            .refund_ids
            .iter()
            .map(|(account, refund)| [account.as_str(), refund.as_str()])
            .collect();
        if !pairs.is_empty() {
            let query = sqlx::query(statements.refunds.clone());
            for row in D::bind_pairs(query, &pairs).fetch_all(&mut *conn).await? {
                let refund = PurchaseRefund {
                    account_id: id(row.try_get("account_id")?)?,
                    refund_id: id(row.try_get("refund_id")?)?,
                    purchase_id: id(row.try_get("purchase_id")?)?,
                    refunded: credits(row.try_get("refunded")?),
                    shortfall: credits(row.try_get("shortfall")?),
                    reason: row.try_get("reason")?,
                    refunded_at: row.try_get("refunded_at")?,
                    fingerprint: row.try_get("fingerprint")?,
                };
                loaded.ledger.refunds.insert(
                    (refund.account_id.clone(), refund.refund_id.clone()),
                    refund,
                );
            }
        }
        if let Some(since) = wanted.attempts_since {
            let learners = strings(wanted.learner_items.iter().map(|(learner, _)| learner));
            for row in Self::fetch_in(conn, &statements.code_attempts, &learners).await? {
                let at: Ts = row.try_get("at")?;
                if at > since {
                    let learner = id(row.try_get("learner_id")?)?;
                    loaded.ledger.attempts.entry(learner).or_default().push(at);
                }
            }
        }
        // Looked up by event id (indexed), the source compared here: a
        // row-value IN list would not use the key's index on SQLite.
        let wanted_keys: HashSet<&EventKey> = wanted.keys.iter().collect();
        let event_ids = strings(wanted.keys.iter().map(|k| k.id.as_str()));
        for row in Self::fetch_in(conn, &statements.processed, &event_ids).await? {
            let key = EventKey {
                source: row.try_get("source")?,
                id: row.try_get("event_id")?,
            };
            if wanted_keys.contains(&key) {
                loaded.seen.insert(key, row.try_get("digest")?);
            }
        }
        Ok(loaded)
    }

    async fn write(conn: &mut D::Connection, writes: &Writes) -> Result<(), StoreError> {
        let now = writes.now.unwrap_or_else(Ts::now);
        // Rows replaced are deleted first; everything else is inserted or
        // upserted in one exchange below.
        let reowned: Vec<String> = writes
            .accounts
            .iter()
            .filter(|w| w.owners_changed())
            .map(|w| w.after.id.to_string())
            .collect();
        if !reowned.is_empty() {
            let query = sqlx::query(D::statements().delete_owners.clone());
            D::bind_list(query, &reowned).execute(&mut *conn).await?;
        }
        if let Some(until) = writes.forget_attempts_until {
            sqlx::query("DELETE FROM code_attempts WHERE at <= $1")
                .bind(until)
                .execute(&mut *conn)
                .await?;
        }
        insert::<D>(conn, rows_of(writes, now)).await?;
        Ok(())
    }

    /// Marks the outbox rows `ids` sent, now.
    async fn mark_sent(conn: &mut D::Connection, ids: &[String]) -> Result<(), StoreError> {
        if !ids.is_empty() {
            let query = sqlx::query(D::statements().mark_sent.clone());
            D::bind_list(query, ids)
                .bind(Ts::now())
                .execute(conn)
                .await?;
        }
        Ok(())
    }

    fn account_from(row: &D::Row) -> Result<Account, StoreError> {
        Ok(Account {
            id: id(row.try_get("account_id")?)?,
            name: row.try_get("name")?,
            status: from_text(row.try_get("status")?)?,
            approval_mode: from_text(row.try_get("approval_mode")?)?,
            owners: from_json::<Vec<(String, String)>>(&row.try_get::<String, _>("owners")?)?
                .into_iter()
                .map(|(email, name)| {
                    Ok(Owner {
                        email: email.parse().map_err(StoreError::corrupt)?,
                        name,
                    })
                })
                .collect::<Result<_, StoreError>>()?,
            code: row
                .try_get::<String, _>("code")?
                .parse()
                .map_err(StoreError::corrupt)?,
            scope: from_json(&row.try_get::<String, _>("scope")?)?,
            low_balance_threshold: row
                .try_get::<Option<i64>, _>("low_balance_threshold")?
                .map(credits),
            learner_limit: row.try_get::<Option<i64>, _>("learner_limit")?.map(credits),
            notes: row.try_get("notes")?,
            created_at: row.try_get("created_at")?,
            lots: Vec::new(),
        })
    }

    fn lot_from(row: &D::Row) -> Result<Lot, StoreError> {
        let price_paid = match (
            row.try_get::<Option<i64>, _>("price_amount")?,
            row.try_get::<Option<String>, _>("price_currency")?,
        ) {
            (Some(amount), Some(currency)) => Some(Price {
                amount: credits(amount),
                currency,
            }),
            _ => None,
        };
        Ok(Lot {
            purchase_id: id(row.try_get("purchase_id")?)?,
            credits: credits(row.try_get("credits")?),
            remaining: credits(row.try_get("remaining")?),
            held: credits(row.try_get("held")?),
            expired: credits(row.try_get("expired")?),
            purchased_at: row.try_get("purchased_at")?,
            expires_at: row.try_get("expires_at")?,
            price_paid,
            channel: row.try_get("channel")?,
            refunded: credits(row.try_get("refunded")?),
            reminded_stage: row
                .try_get::<Option<i64>, _>("reminded_stage")?
                .map(|s| u32::try_from(s).map_err(StoreError::corrupt))
                .transpose()?,
            fingerprint: row.try_get("fingerprint")?,
        })
    }

    fn request_from(row: &D::Row) -> Result<Redemption, StoreError> {
        Ok(Redemption {
            request_id: id(row.try_get("request_id")?)?,
            account_id: opt_id(row.try_get("account_id")?)?,
            learner: Learner {
                id: id(row.try_get("learner_id")?)?,
                email: row
                    .try_get::<String, _>("learner_email")?
                    .parse()
                    .map_err(StoreError::corrupt)?,
                name: row.try_get("learner_name")?,
            },
            item: Item {
                id: id(row.try_get("item_id")?)?,
                kind: from_text(row.try_get("item_kind")?)?,
                title: row.try_get("item_title")?,
                group_ids: from_json(&row.try_get::<String, _>("item_group_ids")?)?,
            },
            cost: credits(row.try_get("cost")?),
            status: from_text(row.try_get("status")?)?,
            reason: row.try_get("reason")?,
            requested_at: row.try_get("requested_at")?,
            created_at: row.try_get("created_at")?,
            decided_by: row.try_get("decided_by")?,
            decided_at: row.try_get("decided_at")?,
            allocations: from_json::<Vec<Allocation>>(&row.try_get::<String, _>("allocations")?)?,
            refunded: credits(row.try_get("refunded")?),
            fingerprint: row.try_get("fingerprint")?,
        })
    }

    fn outbox_from(row: &D::Row) -> Result<OutboxRow, StoreError> {
        let kind: String = row.try_get("kind")?;
        Ok(OutboxRow {
            id: row.try_get("id")?,
            kind: OutboxKind::parse(&kind)
                .ok_or_else(|| StoreError::corrupt(format!("outbox kind `{kind}`")))?,
            payload: row.try_get("payload")?,
            created_at: row.try_get("created_at")?,
            next_attempt_at: row.try_get("next_attempt_at")?,
            attempts: row.try_get("attempts")?,
            leased_by: row
                .try_get::<Option<i64>, _>("leased_by")?
                .map(HolderId::from_stored),
        })
    }

    /// A report row: every column of its kind, in SPEC order.
    fn report_row(kind: ReportKind, row: &D::Row, now: Ts) -> Result<Vec<Cell>, StoreError> {
        let text = |name: &'static str| -> Result<Cell, StoreError> {
            Ok(Cell::text(row.try_get::<Option<String>, _>(name)?))
        };
        let amount = |name: &'static str| -> Result<Cell, StoreError> {
            Ok(Cell::Amount(credits(row.try_get(name)?)))
        };
        let instant = |name: &'static str| -> Result<Cell, StoreError> {
            Ok(Cell::instant(row.try_get::<Option<Ts>, _>(name)?))
        };
        let json_text = |name: &'static str| -> Result<Cell, StoreError> {
            let value: serde_json::Value = from_json(&row.try_get::<String, _>(name)?)?;
            Ok(match value {
                serde_json::Value::Null => Cell::Empty,
                serde_json::Value::String(text) => Cell::Text(text),
                other => Cell::Text(other.to_string()),
            })
        };
        Ok(match kind {
            ReportKind::Transactions => vec![
                instant("at")?,
                text("account_id")?,
                text("entry")?,
                amount("amount")?,
                amount("balance_after")?,
                text("purchase_id")?,
                text("request_id")?,
                text("learner_email")?,
                text("item_title")?,
                text("actor")?,
            ],
            ReportKind::Credits => {
                let expires_at: Ts = row.try_get("expires_at")?;
                let price = match (
                    row.try_get::<Option<i64>, _>("price_amount")?,
                    row.try_get::<Option<String>, _>("price_currency")?,
                ) {
                    (Some(amount), Some(currency)) => {
                        Cell::Text(format!("{} {currency}", credits(amount)))
                    }
                    _ => Cell::Empty,
                };
                let status = if expires_at <= now {
                    "expired"
                } else {
                    "active"
                };
                vec![
                    text("account_id")?,
                    text("account_name")?,
                    text("owners")?,
                    text("code")?,
                    text("purchase_id")?,
                    amount("credits")?,
                    price,
                    amount("remaining")?,
                    amount("held")?,
                    Cell::Instant(expires_at),
                    Cell::Text(status.to_owned()),
                    text("notes")?,
                ]
            }
            ReportKind::Redemptions => vec![
                instant("requested_at")?,
                text("request_id")?,
                text("account_id")?,
                text("learner_email")?,
                text("item_id")?,
                text("item_title")?,
                amount("cost")?,
                text("status")?,
                text("decided_by")?,
                instant("decided_at")?,
                amount("refunded")?,
            ],
            ReportKind::Balances => {
                let balance = credits(row.try_get("balance")?);
                let held = credits(row.try_get("held")?);
                vec![
                    text("account_id")?,
                    text("account_name")?,
                    text("status")?,
                    Cell::Amount(balance),
                    Cell::Amount(held),
                    Cell::Amount(balance - held),
                    amount("expiring_30d")?,
                    text("owners")?,
                ]
            }
            ReportKind::Audit => vec![
                instant("at")?,
                text("account_id")?,
                text("actor")?,
                text("field")?,
                json_text("old_value")?,
                json_text("new_value")?,
            ],
        })
    }
}

impl<D> Books for SqlStore<D>
where
    D: Backend,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    &'static str: ColumnIndex<D::Row>,
    String: Value<D>,
    Option<String>: Value<D>,
    i64: Value<D>,
    Ts: Value<D>,
    Option<Ts>: Value<D>,
    bool: Value<D>,
{
    async fn transact<T, F>(&self, wanted: &ToLoad, work: F) -> Result<T, StoreError>
    where
        T: Send,
        F: FnOnce(Loaded) -> (T, Writes) + Send,
    {
        let _gate = self.write_gate().await;
        let mut tx = self.writer.begin_with(D::BEGIN).await?;
        let loaded = Self::load(&mut tx, wanted, true).await?;
        let (result, writes) = work(loaded);
        Self::write(&mut tx, &writes).await?;
        let marks = self.marks.take();
        Self::mark_sent(&mut tx, &marks.ids).await?;
        tx.commit().await?;
        marks.marked();
        Ok(result)
    }

    async fn snapshot(&self, wanted: &ToLoad) -> Result<Ledger, StoreError> {
        let mut conn = self.pool.acquire().await?;
        Ok(Self::load(&mut conn, wanted, false).await?.ledger)
    }

    async fn sweep_candidates(&self, at: Ts, pending_before: Ts) -> Result<Vec<Id>, StoreError> {
        let rows = sqlx::query(
            "SELECT account_id FROM lots WHERE remaining > held AND expires_at <= $1 \
             UNION SELECT account_id FROM lots WHERE remaining > held AND remind_at <= $1 \
             UNION SELECT account_id FROM redemptions WHERE status = 'pending' AND created_at <= $2 \
             ORDER BY account_id",
        )
        .bind(at)
        .bind(pending_before)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| id(row.try_get("account_id")?))
            .collect()
    }

    async fn account_ids(&self, after: Option<&Id>, limit: i64) -> Result<Vec<Id>, StoreError> {
        let rows = sqlx::query(
            "SELECT account_id FROM accounts WHERE ($1 IS NULL OR account_id > $1) \
             ORDER BY account_id LIMIT $2",
        )
        .bind(after.map(Id::to_string))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| id(row.try_get("account_id")?))
            .collect()
    }

    async fn verify(&self) -> Result<Vec<String>, StoreError> {
        let mut problems = Vec::new();
        let mut conn = self.pool.acquire().await?;
        let sums = sqlx::query(
            "SELECT l.account_id, l.purchase_id, l.credits, l.remaining, l.held, l.expired, \
             l.refunded, CAST(COALESCE(SUM(j.amount), 0) AS BIGINT) AS journal_remaining, \
             CAST(COALESCE(SUM(j.held_delta), 0) AS BIGINT) AS journal_held, \
             CAST(COALESCE(SUM(CASE WHEN j.entry = 'purchase' THEN j.amount ELSE 0 END), 0) \
             AS BIGINT) AS journal_credits, \
             CAST(COALESCE(SUM(CASE WHEN j.entry IN ('expire', 'reinstate') THEN -j.amount \
             ELSE 0 END), 0) AS BIGINT) AS journal_expired, \
             CAST(COALESCE(SUM(CASE WHEN j.entry = 'purchase_refund' THEN -j.amount \
             ELSE 0 END), 0) AS BIGINT) AS journal_refunded \
             FROM lots l LEFT JOIN journal j \
             ON j.account_id = l.account_id AND j.purchase_id = l.purchase_id \
             GROUP BY l.account_id, l.purchase_id, l.credits, l.remaining, l.held, l.expired, \
             l.refunded",
        )
        .fetch_all(&mut *conn)
        .await?;
        let mut held_by_pending: HashMap<(String, String), i64> = HashMap::new();
        for row in sums {
            let account: String = row.try_get("account_id")?;
            let purchase: String = row.try_get("purchase_id")?;
            let [credits, remaining, held, expired, refunded]: [i64; 5] = [
                row.try_get("credits")?,
                row.try_get("remaining")?,
                row.try_get("held")?,
                row.try_get("expired")?,
                row.try_get("refunded")?,
            ];
            let journal: [i64; 5] = [
                row.try_get("journal_credits")?,
                row.try_get("journal_remaining")?,
                row.try_get("journal_held")?,
                row.try_get("journal_expired")?,
                row.try_get("journal_refunded")?,
            ];
            for (name, kept, from_journal) in [
                ("credits", credits, journal[0]),
                ("remaining", remaining, journal[1]),
                ("held", held, journal[2]),
                ("expired", expired, journal[3]),
                ("refunded", refunded, journal[4]),
            ] {
                if kept != from_journal {
                    problems.push(format!(
                        "lot {purchase} of {account}: {name} is {} but the journal gives {}",
                        credits_text(kept),
                        credits_text(from_journal)
                    ));
                }
            }
            let [c, r, h, e] = [credits, remaining, held, expired].map(Credits::from_cents);
            if !lot_figures_hold(c, r, h, e) {
                problems.push(format!(
                    "lot {purchase} of {account}: 0 ≤ held ({}) ≤ remaining ({}) ≤ credits ({}) \
                     does not hold",
                    credits_text(held),
                    credits_text(remaining),
                    credits_text(credits)
                ));
            }
            held_by_pending.insert((account, purchase), 0);
        }
        let orphans: i64 = sqlx::query(
            "SELECT COUNT(*) AS orphans FROM journal j WHERE NOT EXISTS \
             (SELECT 1 FROM lots l WHERE l.account_id = j.account_id AND l.purchase_id = j.purchase_id)",
        )
        .fetch_one(&mut *conn)
        .await?
        .try_get("orphans")?;
        if orphans > 0 {
            problems.push(format!("{orphans} journal entries name no lot"));
        }
        let requests = sqlx::query(D::statements().verify_requests.clone())
            .fetch_all(&mut *conn)
            .await?;
        for row in requests {
            let request = Self::request_from(&row)?;
            let Some(account) = &request.account_id else {
                problems.push(format!(
                    "request {} is {} without an account",
                    request.request_id,
                    request.status.as_str()
                ));
                continue;
            };
            if request.allocated() != request.cost {
                problems.push(format!(
                    "request {}: allocations of {} do not make its cost {}",
                    request.request_id,
                    request.allocated(),
                    request.cost
                ));
            }
            if request.status == RedemptionStatus::Refunded && request.refunded != request.cost {
                problems.push(format!(
                    "request {}: refunded {} of {}",
                    request.request_id, request.refunded, request.cost
                ));
            }
            if request.status == RedemptionStatus::Pending {
                for allocation in &request.allocations {
                    *held_by_pending
                        .entry((account.to_string(), allocation.purchase_id.to_string()))
                        .or_default() += allocation.amount.cents();
                }
            }
        }
        let lots = sqlx::query("SELECT account_id, purchase_id, held FROM lots")
            .fetch_all(&mut *conn)
            .await?;
        for row in lots {
            let key: (String, String) = (row.try_get("account_id")?, row.try_get("purchase_id")?);
            let held: i64 = row.try_get("held")?;
            let pending = held_by_pending.get(&key).copied().unwrap_or_default();
            if held != pending {
                problems.push(format!(
                    "lot {} of {}: held {} but pending requests hold {}",
                    key.1,
                    key.0,
                    credits_text(held),
                    credits_text(pending)
                ));
            }
        }
        let ownerless = sqlx::query(
            "SELECT account_id FROM accounts a \
             WHERE NOT EXISTS (SELECT 1 FROM owners o WHERE o.account_id = a.account_id)",
        )
        .fetch_all(&mut *conn)
        .await?;
        for row in ownerless {
            let account: String = row.try_get("account_id")?;
            problems.push(format!("account {account} has no owner"));
        }
        let unclosed = sqlx::query(
            "SELECT DISTINCT l.account_id FROM lots l JOIN accounts a ON a.account_id = l.account_id \
             WHERE a.status = 'closed' AND l.remaining <> 0",
        )
        .fetch_all(&mut *conn)
        .await?;
        for row in unclosed {
            let account: String = row.try_get("account_id")?;
            problems.push(format!("closed account {account} still has credits"));
        }
        let kinds = sqlx::query("SELECT DISTINCT entry FROM journal")
            .fetch_all(&mut *conn)
            .await?;
        for row in kinds {
            let kind: String = row.try_get("entry")?;
            if EntryKind::parse(&kind).is_none() {
                problems.push(format!("journal entry kind `{kind}` is unknown"));
            }
        }
        Ok(problems)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

impl<D> Outbox for SqlStore<D>
where
    D: Backend,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    &'static str: ColumnIndex<D::Row>,
    String: Value<D>,
    Option<String>: Value<D>,
    i64: Value<D>,
    Ts: Value<D>,
    Option<Ts>: Value<D>,
    bool: Value<D>,
{
    fn sent_marks(&self) -> &SentMarks {
        &self.marks
    }

    async fn claim_outbox(
        &self,
        kinds: &[OutboxKind],
        now: Ts,
        lease_until: Ts,
        limit: i64,
        holder: HolderId,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let _gate = self.write_gate().await;
        // One kind at a time, each walked in order by its own index.
        let mut rows: Vec<(i64, OutboxRow)> = Vec::new();
        for kind in kinds {
            let wanted = limit - i64::try_from(rows.len()).unwrap_or(limit);
            if wanted <= 0 {
                break;
            }
            let claimed = sqlx::query(D::statements().claim_outbox.clone())
                .bind(lease_until)
                .bind(kind.as_str().to_owned())
                .bind(now)
                .bind(wanted)
                .bind(holder.get())
                .fetch_all(&self.writer)
                .await?;
            for row in &claimed {
                rows.push((row.try_get("seq")?, Self::outbox_from(row)?));
            }
        }
        rows.sort_by_key(|(seq, _)| *seq);
        Ok(rows.into_iter().map(|(_, row)| row).collect())
    }

    async fn register_holder(&self) -> Result<Holder, StoreError> {
        D::hold(&self.pool).await
    }

    async fn release_dead_holders(&self, me: HolderId, now: Ts) -> Result<u64, StoreError> {
        let _gate = self.write_gate().await;
        // The holders are looked at one by one (DISTINCT), each found dead
        // or alive once, in this statement's transaction.
        let released = sqlx::query(D::statements().release_dead_holders.clone())
            .bind(now)
            .bind(me.get())
            .execute(&self.writer)
            .await?;
        Ok(D::rows_affected(&released))
    }

    async fn outbox_release(&self, lease_until: Ts, now: Ts) -> Result<(), StoreError> {
        let _gate = self.write_gate().await;
        sqlx::query(
            "UPDATE outbox SET next_attempt_at = $1, leased_by = NULL \
             WHERE dispatched_at IS NULL AND next_attempt_at = $2",
        )
        .bind(now)
        .bind(lease_until)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn outbox_mark_sent(&self) -> Result<(), StoreError> {
        if self.marks.is_empty() {
            return Ok(());
        }
        let _gate = self.write_gate().await;
        let marks = self.marks.take();
        let mut conn = self.writer.acquire().await?;
        Self::mark_sent(&mut conn, &marks.ids).await?;
        marks.marked();
        Ok(())
    }

    async fn outbox_complete(
        &self,
        id: &str,
        follow_up: &[OutboxRow],
        now: Ts,
    ) -> Result<(), StoreError> {
        let _gate = self.write_gate().await;
        let mut tx = self.writer.begin_with(D::BEGIN).await?;
        insert::<D>(&mut tx, vec![outbox_rows(follow_up, "")]).await?;
        sqlx::query("UPDATE outbox SET dispatched_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id.to_owned())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn outbox_failed(
        &self,
        id: &str,
        next_attempt_at: Ts,
        error: &str,
    ) -> Result<(), StoreError> {
        let _gate = self.write_gate().await;
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $1, last_error = $2, \
             leased_by = NULL WHERE id = $3",
        )
        .bind(next_attempt_at)
        .bind(error.to_owned())
        .bind(id.to_owned())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn outbox_backlog(&self) -> Result<Vec<Backlog>, StoreError> {
        let rows = sqlx::query(
            "SELECT kind, COUNT(*) AS backlog, MIN(created_at) AS oldest \
             FROM outbox WHERE dispatched_at IS NULL GROUP BY kind",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get("kind")?;
                Ok(Backlog {
                    kind: OutboxKind::parse(&kind)
                        .ok_or_else(|| StoreError::corrupt(format!("outbox kind `{kind}`")))?,
                    rows: row.try_get("backlog")?,
                    oldest: row.try_get("oldest")?,
                })
            })
            .collect()
    }

    async fn enqueue_outbox(&self, rows: &[OutboxRow]) -> Result<(), StoreError> {
        let _gate = self.write_gate().await;
        let mut conn = self.writer.acquire().await?;
        let rows = outbox_rows(rows, " ON CONFLICT (id) DO NOTHING");
        insert::<D>(&mut conn, vec![rows]).await?;
        Ok(())
    }

    async fn pending_outbox(&self, limit: i64) -> Result<Vec<OutboxRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, kind, payload, created_at, next_attempt_at, attempts, leased_by \
             FROM outbox WHERE dispatched_at IS NULL ORDER BY seq LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Self::outbox_from).collect()
    }
}

impl<D> Firings for SqlStore<D>
where
    D: Backend,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    &'static str: ColumnIndex<D::Row>,
    String: Value<D>,
    Option<String>: Value<D>,
    i64: Value<D>,
    Ts: Value<D>,
    Option<Ts>: Value<D>,
    bool: Value<D>,
{
    async fn claim_firing(
        &self,
        job: &str,
        fire_at: Ts,
        now: Ts,
        baseline: bool,
    ) -> Result<bool, StoreError> {
        let _gate = self.write_gate().await;
        let claimed = sqlx::query(
            "INSERT INTO job_firings (job, fire_at, claimed_at, baseline, done) \
             VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (job, fire_at) DO UPDATE SET claimed_at = excluded.claimed_at \
             WHERE NOT job_firings.done AND job_firings.claimed_at <= $5",
        )
        .bind(job.to_owned())
        .bind(fire_at)
        .bind(now)
        .bind(baseline)
        .bind(firing_stale(now))
        .execute(&self.writer)
        .await?;
        Ok(D::rows_affected(&claimed) == 1)
    }

    async fn release_firing(&self, job: &str, fire_at: Ts) -> Result<(), StoreError> {
        let _gate = self.write_gate().await;
        sqlx::query("DELETE FROM job_firings WHERE job = $1 AND fire_at = $2")
            .bind(job.to_owned())
            .bind(fire_at)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn firing_done(&self, job: &str, fire_at: Ts) -> Result<(), StoreError> {
        let _gate = self.write_gate().await;
        sqlx::query("UPDATE job_firings SET done = TRUE WHERE job = $1 AND fire_at = $2")
            .bind(job.to_owned())
            .bind(fire_at)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn last_done_firing(&self, job: &str) -> Result<Option<Ts>, StoreError> {
        let row =
            sqlx::query("SELECT MAX(fire_at) AS last FROM job_firings WHERE job = $1 AND done")
                .bind(job.to_owned())
                .fetch_one(&self.pool)
                .await?;
        Ok(row.try_get::<Option<Ts>, _>("last")?)
    }

    async fn last_firing(&self, job: &str, now: Ts) -> Result<Option<Ts>, StoreError> {
        let row = sqlx::query(
            "SELECT MAX(fire_at) AS last FROM job_firings \
             WHERE job = $1 AND (done OR claimed_at > $2)",
        )
        .bind(job.to_owned())
        .bind(firing_stale(now))
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<Option<Ts>, _>("last")?)
    }
}

impl<D> Reports for SqlStore<D>
where
    D: Backend,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    &'static str: ColumnIndex<D::Row>,
    String: Value<D>,
    Option<String>: Value<D>,
    i64: Value<D>,
    Ts: Value<D>,
    Option<Ts>: Value<D>,
    bool: Value<D>,
{
    fn report_rows<'a>(
        &'a self,
        query: &'a ReportQuery,
    ) -> BoxStream<'a, Result<Vec<Cell>, StoreError>> {
        let account = query.account.as_ref().map(Id::to_string);
        let (kind, now) = (query.kind, query.now);
        let statements = D::statements();
        let rows = match kind {
            ReportKind::Transactions => sqlx::query(statements.transactions_report.clone())
                .bind(account)
                .bind(query.from)
                .bind(query.to)
                .fetch(&self.pool),
            ReportKind::Credits => sqlx::query(statements.credits_report.clone())
                .bind(account)
                .bind(query.from)
                .bind(query.to)
                .fetch(&self.pool),
            ReportKind::Redemptions => sqlx::query(
                "SELECT requested_at, request_id, account_id, learner_email, item_id, item_title, \
                 cost, status, decided_by, decided_at, refunded FROM redemptions \
                 WHERE ($1 IS NULL OR account_id = $1) AND ($2 IS NULL OR requested_at >= $2) \
                 AND ($3 IS NULL OR requested_at < $3) ORDER BY requested_at, request_id",
            )
            .bind(account)
            .bind(query.from)
            .bind(query.to)
            .fetch(&self.pool),
            ReportKind::Balances => sqlx::query(statements.balances_report.clone())
                .bind(account)
                .bind(now)
                .bind(now.plus_days(30))
                .fetch(&self.pool),
            ReportKind::Audit => sqlx::query(
                "SELECT at, account_id, actor, field, old_value, new_value FROM audit \
                 WHERE ($1 IS NULL OR account_id = $1) AND ($2 IS NULL OR at >= $2) \
                 AND ($3 IS NULL OR at < $3) ORDER BY seq",
            )
            .bind(account)
            .bind(query.from)
            .bind(query.to)
            .fetch(&self.pool),
        };
        rows.map(move |row| Self::report_row(kind, &row?, now))
            .boxed()
    }

    // The pages are planned with their values each time (not prepared): a
    // plan made for any values would take `journal_by_at` for a window, or
    // the account's every request for a status none has.
    async fn requests_page(
        &self,
        account: &Id,
        status: Option<RedemptionStatus>,
        after: i64,
        limit: u32,
    ) -> Result<Vec<(i64, Redemption)>, StoreError> {
        let statements = D::statements();
        let query = match status {
            None => sqlx::query(statements.requests_page.clone()),
            Some(_) => sqlx::query(statements.requests_page_of_status.clone()),
        }
        .bind(account.to_string())
        .bind(after)
        .bind(i64::from(limit))
        .persistent(false);
        let rows = match status {
            None => query,
            Some(status) => query.bind(status.as_str().to_owned()),
        }
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("position")?, Self::request_from(row)?)))
            .collect()
    }

    async fn journal_page(
        &self,
        account: &Id,
        from: Option<Ts>,
        to: Option<Ts>,
        after: i64,
        limit: u32,
    ) -> Result<Vec<(i64, Vec<Cell>)>, StoreError> {
        let (start, end) = Ts::rfc3339_span();
        // The page starts after its cursor's entry, and at `from` at the
        // earliest: one bound, so that both backends seek straight to it.
        let window_start = (from.unwrap_or(start), 0);
        let cursor = if after > 0 {
            sqlx::query(D::statements().journal_entry_at.clone())
                .bind(after)
                .fetch_optional(&self.pool)
                .await?
                .map(|row| row.try_get::<Ts, _>("at"))
                .transpose()?
                .map(|at| (at, after))
        } else {
            None
        };
        let (bound_at, bound_seq) = cursor.map_or(window_start, |cursor| cursor.max(window_start));
        let rows = sqlx::query(D::statements().journal_page.clone())
            .bind(account.to_string())
            .bind(bound_at)
            .bind(bound_seq)
            .bind(to.unwrap_or(end))
            .bind(i64::from(limit))
            .persistent(false)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let cells = Self::report_row(ReportKind::Transactions, row, Ts::now())?;
                Ok((row.try_get("position")?, cells))
            })
            .collect()
    }
}
