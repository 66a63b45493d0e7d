//! Storage: one trait per role ([`Books`], [`Outbox`], [`Firings`],
//! [`Reports`]), [`Store`] for all of them, and one implementation,
//! [`SqlStore`], written once over the SQL the two backends share
//! (`sql.rs`) and instantiated for SQLite ([`SqliteStore`]) and PostgreSQL
//! ([`PgStore`]).
//!
//! A batch is one call to [`Books::transact`]: lock and load what the batch
//! names ([`ToLoad`]), let the caller apply its messages to that [`Ledger`],
//! write what changed ([`Writes`]) and commit, all in one transaction.

mod postgres;
mod rows;
mod sql;
mod sqlite;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

pub use postgres::PgStore;
pub use sql::SqlStore;
pub use sqlite::SqliteStore;

use crate::decode::EventKey;
use crate::domain::ledger::{AuditEntry, JournalEntry, Ledger, PurchaseRefund};
use crate::domain::model::{Account, Lot, Redemption, RedemptionStatus};
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

/// What one transaction loads (and, in a batch, locks): everything a batch
/// or a read-only command refers to, fetched at once.
#[derive(Clone, Debug, Default)]
pub struct ToLoad {
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
    /// The pending and approved requests made after this instant by the
    /// learners of `learner_items`, on accounts with a learner limit (SPEC
    /// §6 rule 12).
    pub limited_since: Option<Ts>,
    /// Purchase refunds already applied, by account and `refund_id`.
    pub refund_ids: Vec<(Id, Id)>,
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
    /// The worker holding the row's lease, if a worker holds it.
    pub leased_by: Option<HolderId>,
}

impl OutboxRow {
    /// A fresh row produced as of `at`, due at once: what a command or a
    /// scheduled job produces is sent now, whatever instant it ran as of
    /// (`sweep --at` a future instant), and a catch-up's rows are already due.
    pub fn new(id: String, kind: OutboxKind, payload: String, at: Ts) -> OutboxRow {
        let due = at.min(Ts::now());
        OutboxRow {
            id,
            kind,
            payload,
            created_at: due,
            next_attempt_at: due,
            attempts: 0,
            leased_by: None,
        }
    }
}

/// Who holds outbox leases: one running worker. Ids are drawn at random in
/// a range of their own (the high half is a tag of their own), and on
/// PostgreSQL each is also the key of the session-level advisory lock its
/// worker holds while it runs, so the database itself knows which holders
/// are alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HolderId(i64);

impl HolderId {
    /// The high 32 bits of every holder id ("tc\0\x01"): keeps our
    /// advisory locks apart from any other application's on the database.
    const TAG: i64 = 0x7463_0001;

    /// A new id, at random.
    pub fn random() -> HolderId {
        HolderId((HolderId::TAG << 32) | i64::from(rand::random::<u32>()))
    }

    pub const fn from_stored(value: i64) -> HolderId {
        HolderId(value)
    }

    pub const fn get(self) -> i64 {
        self.0
    }
}

/// A worker's identity as a lease holder, alive for the database as long as
/// this value lives (on PostgreSQL, a connection of its own holds the
/// holder's advisory lock and is kept up by a task that ends with this).
#[derive(Debug)]
pub struct Holder {
    pub id: HolderId,
    _alive: Option<tokio_util::task::AbortOnDropHandle<()>>,
}

impl Holder {
    pub(crate) fn new(
        id: HolderId,
        alive: Option<tokio_util::task::AbortOnDropHandle<()>>,
    ) -> Holder {
        Holder { id, _alive: alive }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboxKind {
    Event,
    Email,
    Report,
}

impl OutboxKind {
    pub const ALL: [OutboxKind; 3] = [OutboxKind::Event, OutboxKind::Email, OutboxKind::Report];

    pub fn as_str(self) -> &'static str {
        match self {
            OutboxKind::Event => "event",
            OutboxKind::Email => "email",
            OutboxKind::Report => "report",
        }
    }

    pub fn parse(text: &str) -> Option<OutboxKind> {
        OutboxKind::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// The outbox rows of one kind not dispatched yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backlog {
    pub kind: OutboxKind,
    pub rows: i64,
    /// When the oldest of them was written.
    pub oldest: Ts,
}

/// Everything a batch writes, in the same transaction as its loads.
#[derive(Clone, Debug, Default)]
pub struct Writes {
    /// The accounts the batch changed, each with how it was loaded: their
    /// row and their owners are written only where they differ.
    pub accounts: Vec<AccountWrite>,
    /// The lots of `accounts` that differ from how they were loaded
    /// ([`AccountWrite::changed_lots`]).
    pub lots: Vec<LotWrite>,
    pub requests: Vec<Redemption>,
    pub journal: Vec<(JournalEntry, String)>,
    pub audit: Vec<(AuditEntry, String)>,
    pub processed: Vec<(EventKey, String, &'static str)>,
    pub attempts: Vec<(Id, Ts)>,
    /// Purchase refunds applied, with the cause of each.
    pub refunds: Vec<(PurchaseRefund, String)>,
    /// Attempts at or before this instant are deleted: they never count
    /// again.
    pub forget_attempts_until: Option<Ts>,
    pub outbox: Vec<OutboxRow>,
    pub now: Option<Ts>,
}

/// An account a batch changed, as the batch loaded it and as it leaves it:
/// what is written of it is what differs. A batch that changes an account
/// more than once compares its last state with the one loaded.
#[derive(Clone, Debug)]
pub struct AccountWrite {
    /// `None` for an account the batch opened.
    pub before: Option<Account>,
    pub after: Account,
}

impl AccountWrite {
    /// Whether its `accounts` row is written: the account is new or one of
    /// its own fields changed.
    pub fn row_changed(&self) -> bool {
        self.before
            .as_ref()
            .is_none_or(|before| !before.same_row(&self.after))
    }

    /// Whether its owners are written (all of them, in place of those stored).
    pub fn owners_changed(&self) -> bool {
        self.before
            .as_ref()
            .is_none_or(|before| before.owners != self.after.owners)
    }

    /// Its lots that are new or differ from the lot loaded for the same
    /// purchase.
    pub fn changed_lots(&self) -> impl Iterator<Item = &Lot> {
        self.after.lots.iter().filter(|lot| {
            let loaded = self.before.as_ref().and_then(|before| {
                before
                    .lot(&lot.purchase_id)
                    .map(|index| &before.lots[index])
            });
            loaded != Some(*lot)
        })
    }
}

/// One lot to write, with when its next expiry reminder falls due: the
/// sweep finds the lots to remind of by that instant.
#[derive(Clone, Debug)]
pub struct LotWrite {
    pub account_id: Id,
    pub lot: Lot,
    pub remind_at: Option<Ts>,
}

/// Outbox rows sent (confirmed by the broker, taken by the SMTP server) but
/// not yet marked sent, shared by a store's clones: the next batch's
/// transaction marks them with its own writes, so under load they cost no
/// commit of their own (on SQLite, no wait for the write gate either); the
/// dispatcher marks those still waiting once the oldest has waited its mark
/// delay. A worker killed meanwhile sends them again, with the same ids.
#[derive(Clone, Debug, Default)]
pub struct SentMarks(Arc<Mutex<Waiting>>);

#[derive(Debug, Default)]
struct Waiting {
    ids: Vec<String>,
    /// Since when the oldest of `ids` has waited.
    since: Option<tokio::time::Instant>,
}

impl SentMarks {
    fn waiting(&self) -> MutexGuard<'_, Waiting> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `ids` were sent: they wait to be marked.
    pub fn add(&self, ids: impl IntoIterator<Item = String>) {
        let mut waiting = self.waiting();
        waiting.ids.extend(ids);
        if !waiting.ids.is_empty() {
            waiting.since.get_or_insert_with(tokio::time::Instant::now);
        }
    }

    /// Takes every id waiting, to be marked by the caller; those it fails to
    /// mark must be given back.
    pub fn take(&self) -> MarksInTransaction<'_> {
        let mut waiting = self.waiting();
        waiting.since = None;
        MarksInTransaction {
            marks: self,
            ids: std::mem::take(&mut waiting.ids),
        }
    }

    /// Since when the oldest id has waited, if any waits.
    pub fn since(&self) -> Option<tokio::time::Instant> {
        self.waiting().since
    }

    pub fn len(&self) -> usize {
        self.waiting().ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The sent marks taken from [`SentMarks`] into one transaction, to be
/// written with it: given back when dropped before
/// [`MarksInTransaction::marked`] (the write failed or was abandoned), and
/// then they wait as if they had just been sent.
#[derive(Debug)]
pub struct MarksInTransaction<'a> {
    marks: &'a SentMarks,
    pub ids: Vec<String>,
}

impl MarksInTransaction<'_> {
    /// Their marks are written (committed).
    pub fn marked(mut self) {
        self.ids.clear();
    }
}

impl Drop for MarksInTransaction<'_> {
    fn drop(&mut self) {
        if !self.ids.is_empty() {
            self.marks.add(std::mem::take(&mut self.ids));
        }
    }
}

/// The ledger's storage, every role at once: what the worker, the CLI and
/// the tests hold. Implemented for SQLite and PostgreSQL by the same code
/// ([`SqlStore`]); the test suite runs against both. Code that needs one role
/// only asks for that one.
pub trait Store: Books + Outbox + Firings + Reports + Clone + Send + Sync + 'static {}

impl<S> Store for S where S: Books + Outbox + Firings + Reports + Clone + Send + Sync + 'static {}

/// The books: accounts, lots, requests, the journal and the idempotency
/// records, read and written a batch at a time.
pub trait Books: Send + Sync {
    /// One batch in one transaction: lock and load `wanted`, run `work` on it,
    /// write what it returns and the [`SentMarks`] waiting, commit. `work`
    /// runs once per call; a failed commit returns the error and nothing is
    /// written (the marks wait again).
    fn transact<T, F>(
        &self,
        wanted: &ToLoad,
        work: F,
    ) -> impl Future<Output = Result<T, StoreError>> + Send
    where
        T: Send,
        F: FnOnce(Loaded) -> (T, Writes) + Send;

    /// Loads without locking or writing, for read-only commands.
    fn snapshot(&self, wanted: &ToLoad) -> impl Future<Output = Result<Ledger, StoreError>> + Send;

    /// Accounts with work for the scheduled jobs at `at`: lots to expire or to
    /// remind of, and requests pending since before `pending_before`.
    fn sweep_candidates(
        &self,
        at: Ts,
        pending_before: Ts,
    ) -> impl Future<Output = Result<Vec<Id>, StoreError>> + Send;

    /// Every account id, in order, `limit` at a time after `after`.
    fn account_ids(
        &self,
        after: Option<&Id>,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<Id>, StoreError>> + Send;

    /// Recomputes every lot from the journal and checks the invariants of
    /// SPEC §6; returns one sentence per problem found.
    fn verify(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Whether the database answers.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The outbox: rows a batch produced, claimed under a lease by a worker's
/// dispatcher, marked sent once they are out.
pub trait Outbox: Send + Sync {
    /// The outbox rows sent and waiting to be marked, which the next
    /// [`Books::transact`] marks with its batch.
    fn sent_marks(&self) -> &SentMarks;

    /// Claims up to `limit` outbox rows of `kinds` that are due at `now`,
    /// oldest first, for `holder`, by moving their next attempt to
    /// `lease_until`: another worker will not take them meanwhile, and if
    /// this one dies they fall due again then, or as soon as a worker finds
    /// the holder dead ([`Outbox::release_dead_holders`]).
    fn claim_outbox(
        &self,
        kinds: &[OutboxKind],
        now: Ts,
        lease_until: Ts,
        limit: i64,
        holder: HolderId,
    ) -> impl Future<Output = Result<Vec<OutboxRow>, StoreError>> + Send;

    /// Registers a running worker as a lease holder. On PostgreSQL, where
    /// several workers share the outbox, it stays alive for the others as
    /// long as the returned value lives; on SQLite, whose file one worker
    /// owns, every other holder is a worker that is gone.
    fn register_holder(&self) -> impl Future<Output = Result<Holder, StoreError>> + Send;

    /// Makes the unsent rows leased to holders that are no longer alive
    /// (other than `me`) due at `now`: a worker that restarts after a crash
    /// sends what the dead one left within seconds, not after its lease.
    /// Returns how many rows it gave back.
    fn release_dead_holders(
        &self,
        me: HolderId,
        now: Ts,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Gives back the rows still held by the claim that leased them until
    /// `lease_until` (one dispatcher's claim, lost to a database error before
    /// they were settled): due again at `now` instead of when the lease ends.
    fn outbox_release(
        &self,
        lease_until: Ts,
        now: Ts,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Marks the rows [`Outbox::sent_marks`] holds as dispatched (they are
    /// never dispatched again), in a write of its own; none, no write.
    fn outbox_mark_sent(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

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

    /// Outbox rows not dispatched yet, per kind that has any.
    fn outbox_backlog(&self) -> impl Future<Output = Result<Vec<Backlog>, StoreError>> + Send;

    /// Adds outbox rows outside any batch (scheduled statements); a row whose
    /// id is already there is left as it is.
    fn enqueue_outbox(
        &self,
        rows: &[OutboxRow],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The outbox rows not yet dispatched, oldest first (for tests and the
    /// dispatcher).
    fn pending_outbox(
        &self,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<OutboxRow>, StoreError>> + Send;
}

/// The firings of the scheduled jobs: each runs once, on one worker.
pub trait Firings: Send + Sync {
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

    /// The latest firing of a job that is done: run to success, or the
    /// baseline where its schedule began.
    fn last_done_firing(
        &self,
        job: &str,
    ) -> impl Future<Output = Result<Option<Ts>, StoreError>> + Send;

    /// The latest firing of a job that is done or still within its lease.
    fn last_firing(
        &self,
        job: &str,
        now: Ts,
    ) -> impl Future<Output = Result<Option<Ts>, StoreError>> + Send;
}

/// The reports' reads.
pub trait Reports: Send + Sync {
    /// The rows of a report, streamed in report order, each with every
    /// column of its kind in SPEC order.
    fn report_rows<'a>(
        &'a self,
        query: &'a crate::domain::report::ReportQuery,
    ) -> futures_util::stream::BoxStream<'a, Result<Vec<crate::domain::report::Cell>, StoreError>>;

    /// Up to `limit` of `account`'s redemption requests (of `status`, if
    /// given) written after position `after`, in the order they were
    /// written, each with its position.
    fn requests_page(
        &self,
        account: &Id,
        status: Option<RedemptionStatus>,
        after: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<(i64, Redemption)>, StoreError>> + Send;

    /// Up to `limit` of `account`'s journal entries at instants in
    /// `[from, to)` that come after the entry at position `after` (from the
    /// start for 0), oldest first (by instant, then in the order written),
    /// each with its position and the `transactions` report's columns.
    fn journal_page(
        &self,
        account: &Id,
        from: Option<Ts>,
        to: Option<Ts>,
        after: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<(i64, Vec<crate::domain::report::Cell>)>, StoreError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::{AccountWrite, SentMarks};
    use crate::domain::model::{Account, AccountStatus, ApprovalMode, Lot, Scope};
    use crate::domain::{Code, Credits, Ts};

    fn account(id: &str) -> Account {
        Account {
            id: id.parse().expect("an id"),
            name: "Team".to_owned(),
            status: AccountStatus::Active,
            approval_mode: ApprovalMode::Automatic,
            owners: Vec::new(),
            code: Code::generate(),
            scope: Scope::All,
            low_balance_threshold: None,
            learner_limit: None,
            notes: None,
            created_at: Ts::now(),
            lots: Vec::new(),
        }
    }

    fn lot(purchase_id: &str, at: Ts) -> Lot {
        Lot {
            purchase_id: purchase_id.parse().expect("an id"),
            credits: Credits::from_cents(100),
            remaining: Credits::from_cents(50),
            held: Credits::ZERO,
            expired: Credits::ZERO,
            purchased_at: at,
            expires_at: at,
            price_paid: None,
            channel: None,
            refunded: Credits::ZERO,
            reminded_stage: None,
            fingerprint: String::new(),
        }
    }

    #[test]
    fn an_account_row_is_written_only_when_new_or_changed() {
        let mut loaded = account("acct-1");
        loaded.lots.push(lot("p-0", loaded.created_at));
        let write = |after: &Account| AccountWrite {
            before: Some(loaded.clone()),
            after: after.clone(),
        };

        let mut spent = loaded.clone();
        spent.lots.push(lot("p-1", loaded.created_at));
        let only_a_lot = write(&spent);
        assert!(!only_a_lot.row_changed(), "only a lot changed");
        assert!(!only_a_lot.owners_changed());
        assert_eq!(
            only_a_lot.changed_lots().collect::<Vec<_>>(),
            [&spent.lots[1]],
            "the new lot is written, the unchanged one not"
        );

        let mut renamed = spent.clone();
        renamed.name = "Team B".to_owned();
        assert!(write(&renamed).row_changed(), "its name changed");

        // Compared with the account as loaded, not as an earlier message of
        // the batch left it: once changed, later changes of its lots keep
        // it written.
        let mut again = renamed.clone();
        again.lots[0].remaining = Credits::from_cents(40);
        let again = write(&again);
        assert!(again.row_changed());
        assert_eq!(again.changed_lots().count(), 2, "both lots changed");

        let new = AccountWrite {
            before: None,
            after: account("acct-2"),
        };
        assert!(new.row_changed(), "a new account");
        assert!(new.owners_changed(), "and its owners");
    }

    #[test]
    fn the_mark_delay_starts_with_the_first_id_waiting_and_ends_once_none_waits() {
        let marks = SentMarks::default();
        assert_eq!(marks.since(), None, "nothing waits");
        marks.add(Vec::new());
        assert_eq!(marks.since(), None, "still nothing");
        marks.add(["a".to_owned()]);
        let since = marks.since().expect("the first id starts it");
        marks.clone().add(["b".to_owned()]);
        assert_eq!(marks.since(), Some(since), "the oldest sets it");
        assert_eq!(marks.len(), 2, "clones share what waits");
        marks.take().marked();
        assert!(marks.is_empty());
        assert_eq!(marks.since(), None, "all marked");
    }

    #[test]
    fn ids_taken_but_not_marked_wait_again() {
        let marks = SentMarks::default();
        marks.add(["a".to_owned(), "b".to_owned()]);
        let taken = marks.take();
        assert_eq!(taken.ids, ["a", "b"]);
        assert!(marks.is_empty() && marks.since().is_none());
        marks.add(["c".to_owned()]);
        drop(taken);
        assert_eq!(marks.len(), 3, "the failed write's ids are back");
        assert!(marks.since().is_some(), "and their delay runs again");
    }
}
