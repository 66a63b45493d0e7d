//! Storage: one trait, [`Store`], with a SQLite and a PostgreSQL
//! implementation written once (see `sql.rs`) and instantiated for each.
//!
//! A batch is one call to [`Store::transact`]: lock and load what the batch
//! names ([`Wanted`]), let the caller run the rules on that [`Ledger`], write
//! what changed ([`Writes`]) and commit, all in one transaction.

mod postgres;
mod sql;
mod sqlite;

use std::collections::HashMap;
use std::future::Future;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use crate::decode::EventKey;
use crate::domain::ledger::{AuditEntry, JournalEntry, Ledger};
use crate::domain::model::{Account, Redemption};
use crate::domain::{CodeKey, Email, Id, Ts};

/// How long a claimed firing is its worker's: one whose worker died is run
/// again by the next tick after this.
pub const FIRING_LEASE: std::time::Duration = std::time::Duration::from_secs(3600);

/// A database failure. Every one is worth retrying later: the database may be
/// down, busy, or have lost a race with another worker; a message is only
/// dead-lettered for it once its retries are spent.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether the database is out of reach (down, restarting, refusing
    /// connections), as opposed to refusing this particular batch. The
    /// worker waits out the former and isolates the latter.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Database(error) => match error {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Protocol(_) => true,
                sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                    // PostgreSQL: connection exceptions (08), operator
                    // intervention such as a restart (57), insufficient
                    // resources (53). SQLite: busy (5), locked (6).
                    code.starts_with("08")
                        || code.starts_with("57")
                        || code.starts_with("53")
                        || code == "5"
                        || code == "6"
                }),
                _ => false,
            },
            StoreError::Migrate(_) | StoreError::Corrupt(_) => false,
        }
    }

    pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt(what.to_string())
    }
}

/// What a batch refers to, so that it can all be loaded (and locked) at once.
#[derive(Clone, Debug, Default)]
pub struct Wanted {
    pub keys: Vec<EventKey>,
    pub account_ids: Vec<Id>,
    pub code_keys: Vec<CodeKey>,
    pub request_ids: Vec<Id>,
    pub owner_emails: Vec<Email>,
    /// (learner, item) pairs asked for: whether each is already pending or
    /// approved, and the learners' recent invalid codes.
    pub learner_items: Vec<(Id, Id)>,
    /// Accounts whose pending requests must all be loaded (closing, sweep).
    pub pending_of: Vec<Id>,
    /// Invalid-code attempts after this instant count.
    pub attempts_since: Option<Ts>,
    /// Load of the accounts' lots only those with credits in them or held,
    /// and the lots of `purchase_ids` and of the loaded requests'
    /// allocations: a spent lot changes only through those (a repeated
    /// purchase, an extension, a refund), and an account's spent lots grow
    /// without end. Otherwise every lot is loaded.
    pub live_lots: bool,
    /// Lots a batch names (purchases, extensions), loaded even if spent.
    pub purchase_ids: Vec<Id>,
}

/// What a batch found: the ledger view and the digests of events seen before.
#[derive(Debug, Default)]
pub struct Loaded {
    pub ledger: Ledger,
    pub seen: HashMap<EventKey, String>,
}

/// One outbox row: an outbound event, an email or a report job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: String,
    pub kind: OutboxKind,
    pub payload: String,
    pub created_at: Ts,
    /// When a dispatcher may claim it: at once, at the end of a claim's
    /// lease, after a failure's backoff, or at the end of the lease under
    /// which a fresh row is handed to this worker's dispatcher in memory.
    pub next_attempt_at: Ts,
    /// Failed dispatch attempts so far.
    pub attempts: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboxKind {
    Event,
    Email,
    Report,
}

impl OutboxKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxKind::Event => "event",
            OutboxKind::Email => "email",
            OutboxKind::Report => "report",
        }
    }

    pub fn parse(text: &str) -> Option<OutboxKind> {
        [OutboxKind::Event, OutboxKind::Email, OutboxKind::Report]
            .into_iter()
            .find(|k| k.as_str() == text)
    }
}

/// Everything a batch writes, in the same transaction as its loads.
#[derive(Clone, Debug, Default)]
pub struct Writes {
    /// Changed accounts: their row only when `row_dirty`, their owners only
    /// when `owners_dirty`, of their lots only those marked dirty.
    pub accounts: Vec<Account>,
    pub requests: Vec<Redemption>,
    pub journal: Vec<(JournalEntry, String)>,
    pub audit: Vec<(AuditEntry, String)>,
    pub processed: Vec<(EventKey, String, &'static str)>,
    pub attempts: Vec<(Id, Ts)>,
    pub outbox: Vec<OutboxRow>,
    /// Reminder stages, to index each written lot by its next reminder.
    pub reminder_stages: Vec<u32>,
    pub now: Option<Ts>,
}

/// The ledger's storage. Implemented for SQLite and PostgreSQL by the same
/// code; the test suite runs against both.
pub trait Store: Clone + Send + Sync + 'static {
    /// Creates or upgrades the schema.
    fn migrate(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// One batch in one transaction: lock and load `wanted`, run `work` on it,
    /// write what it returns, commit. `work` runs once per call; a failed
    /// commit returns the error and nothing is written.
    fn transact<T, F>(
        &self,
        wanted: &Wanted,
        work: F,
    ) -> impl Future<Output = Result<T, StoreError>> + Send
    where
        T: Send,
        F: FnOnce(Loaded) -> (T, Writes) + Send;

    /// Loads without locking or writing, for read-only commands.
    fn snapshot(&self, wanted: &Wanted) -> impl Future<Output = Result<Ledger, StoreError>> + Send;

    /// Accounts with work for the scheduled jobs at `at`: lots to expire or to
    /// remind of, and requests pending since before `pending_before`.
    fn sweep_candidates(
        &self,
        at: Ts,
        pending_before: Ts,
    ) -> impl Future<Output = Result<Vec<Id>, StoreError>> + Send;

    /// Recomputes every lot from the journal and checks the invariants of
    /// SPEC §6; returns one sentence per problem found.
    fn verify(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Claims up to `limit` outbox rows of `kinds` that are due at `now`,
    /// oldest first, by moving their next attempt to `lease_until`: another
    /// worker will not take them meanwhile, and if this one dies they fall due
    /// again then.
    fn claim_outbox(
        &self,
        kinds: &[OutboxKind],
        now: Ts,
        lease_until: Ts,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<OutboxRow>, StoreError>> + Send;

    /// Gives back the rows still held by the claim that leased them until
    /// `lease_until` (one dispatcher's claim, lost to a database error before
    /// they were settled): due again at `now` instead of when the lease ends.
    fn outbox_release(
        &self,
        lease_until: Ts,
        now: Ts,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Marks rows as dispatched: they are never dispatched again.
    fn outbox_done(
        &self,
        ids: &[String],
        now: Ts,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Marks a row dispatched and adds the rows it led to (the event that
    /// announces a sent report), in one transaction.
    fn outbox_complete(
        &self,
        id: &str,
        follow_up: &[OutboxRow],
        now: Ts,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records a failed attempt and when to try again.
    fn outbox_failed(
        &self,
        id: &str,
        next_attempt_at: Ts,
        error: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Outbox rows not dispatched yet, per kind.
    fn outbox_backlog(
        &self,
    ) -> impl Future<Output = Result<Vec<(OutboxKind, i64)>, StoreError>> + Send;

    /// The rows of a report, streamed in report order, each with every
    /// column of its kind in SPEC order.
    fn report_rows<'a>(
        &'a self,
        query: &'a crate::report::ReportQuery,
    ) -> futures_util::stream::BoxStream<'a, Result<Vec<crate::report::Cell>, StoreError>>;

    /// Claims one firing of a scheduled job: `true` for the one caller that
    /// gets it, `false` for every other (another worker ran it, or runs it
    /// within its [`FIRING_LEASE`]). A `baseline` claim marks where the job's
    /// schedule starts and is done at once.
    fn claim_firing(
        &self,
        job: &str,
        fire_at: Ts,
        now: Ts,
        baseline: bool,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Gives a claimed firing back after its job failed, so the next tick
    /// runs it again.
    fn release_firing(
        &self,
        job: &str,
        fire_at: Ts,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Marks a claimed firing done: it is never run again.
    fn firing_done(
        &self,
        job: &str,
        fire_at: Ts,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The latest firing of a job that is done or still within its lease.
    fn last_firing(
        &self,
        job: &str,
        now: Ts,
    ) -> impl Future<Output = Result<Option<Ts>, StoreError>> + Send;

    /// Adds outbox rows outside any batch (scheduled statements); a row whose
    /// id is already there is left as it is.
    fn enqueue_outbox(
        &self,
        rows: &[OutboxRow],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every account id, in order, `limit` at a time after `after`.
    fn account_ids(
        &self,
        after: Option<&Id>,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<Id>, StoreError>> + Send;

    /// Whether the database answers.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The outbox rows not yet dispatched, oldest first (for tests and the
    /// dispatcher).
    fn pending_outbox(
        &self,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<OutboxRow>, StoreError>> + Send;
}
