//! Dispatch: the outbox, sent. Outbound events are published to
//! `training-credits.out` (persistent, routing key = type) and marked sent only
//! once the broker confirms them; emails are marked sent once the SMTP server
//! (or the `.eml` file) took them. A failure is tried again with backoff and
//! never dropped. Rows are claimed with a lease, so several workers on one
//! PostgreSQL database never send the same row at the same time, and a
//! worker that dies mid-send leaves its rows to be sent again: at least once,
//! always with the same event id or `Message-ID`.
//!
//! Fresh events and emails do not wait to be claimed: the transaction that
//! writes them leases them to its own worker, and once it commits they are
//! handed to the dispatcher in memory ([`Handoff`](crate::outbox::handoff::Handoff)). Claiming is left for
//! what a hand-off could not take: rows whose send failed, rows of a worker
//! that died, report jobs, and rows handed over while the lane was full.

mod events;
pub mod mail;
mod reports;

use std::collections::{BTreeSet, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use futures_util::future::Either;
use lapin::{Channel, Connection, PublisherConfirm};
use lettre::message::Mailbox;
use tokio_util::sync::CancellationToken;

use crate::domain::Ts;
use crate::notify::Renderer;
use crate::outbox::handoff::{CLAIM_ROWS_MAX, Lane, LaneInbox, receive};
use crate::store::{HolderId, OutboxKind, OutboxRow, SentMarks, Store, StoreError};
use events::publish;
use mail::Mailer;

/// How long a sent event or email waits to be marked sent ([`SentMarks`])
/// before a lane marks it: under a steady stream the consumer's next batch
/// marks it first, otherwise one write marks those of many rounds (on
/// SQLite each write is a commit the consumer waits for). Ids a batch that
/// failed to commit gave back wait up to a lane's next poll
/// ([`POLL_INTERVAL`]). A worker killed meanwhile sends them again, with the
/// same ids.
pub const MARK_DELAY: Duration = Duration::from_millis(50);
/// Rows sent (or published, awaiting their confirm) but not marked sent
/// before a lane marks them all before sending more: about what a killed
/// worker sends again.
pub const UNMARKED_MAX: usize = CLAIM_ROWS_MAX as usize / 2;
/// How often the outbox is looked at for rows no hand-off brought.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long a stopping worker keeps flushing the outbox.
pub const FLUSH_TIME_MAX: Duration = Duration::from_secs(10);
/// How long a stopping lane then waits for its last confirms and marks.
const LAST_MARKS_TIME_MAX: Duration = Duration::from_secs(5);
/// The longest wait before a failed row is tried again.
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
}

pub struct Dispatcher<S> {
    pub store: S,
    /// This worker, which the rows it claims are leased to.
    pub holder: HolderId,
    pub amqp_url: String,
    pub mailer: Mailer,
    pub mail_from: Mailbox,
    pub retry_delays: Vec<Duration>,
    /// Renders the email a report travels in.
    pub renderer: Renderer,
    /// Where report files are written before they are sent.
    pub reports_dir: PathBuf,
    /// `source` of the events the dispatcher itself announces.
    pub event_source: String,
}

/// What a round left outstanding beyond the [`SentMarks`]: events waiting for
/// the broker's confirm, and what the database failed under.
#[derive(Default)]
struct Outstanding {
    /// Events published on the lane's channel, in order, whose confirms
    /// have not been taken: the lane goes on sending while the broker writes
    /// them.
    confirming: VecDeque<(OutboxRow, PublisherConfirm)>,
    /// Leases of claims (or hand-offs) whose rows may still be held.
    leases: BTreeSet<Ts>,
}

/// When the sent rows waiting in `marks` must be marked by the dispatcher:
/// [`MARK_DELAY`] after the oldest was sent, unless a batch marks them
/// first.
fn mark_at(marks: &SentMarks) -> Option<tokio::time::Instant> {
    Some(marks.since()? + MARK_DELAY)
}

/// When to try a row again after `attempts` failures: doubling from one
/// second up to [`RETRY_BACKOFF_MAX`].
pub fn backoff(attempts: i64) -> Duration {
    let exponent = u32::try_from(attempts.clamp(0, 16)).unwrap_or(16);
    Duration::from_secs(2_u64.pow(exponent)).min(RETRY_BACKOFF_MAX)
}

impl<S: Store> Dispatcher<S> {
    /// Dispatches `lane` until `cancel`: what `inbox` brings at once, the
    /// rest as it falls due. Then it keeps sending until the lane is drained
    /// (or [`FLUSH_TIME_MAX`] has passed, as other workers may keep adding
    /// rows), so a clean stop leaves nothing behind that could go.
    pub async fn run(&self, lane: Lane, mut inbox: Option<LaneInbox>, cancel: CancellationToken) {
        let mut channel: Option<(Connection, Channel)> = None;
        let mut outstanding = Outstanding::default();
        let mut handed: Vec<OutboxRow> = Vec::new();
        let mut poll_at = tokio::time::Instant::now();
        while !cancel.is_cancelled() {
            receive(&mut inbox, &mut handed);
            let polling = handed.is_empty();
            if !polling || tokio::time::Instant::now() >= poll_at {
                match self
                    .round(lane, &mut handed, &mut channel, &mut outstanding)
                    .await
                {
                    Ok(count) if count > 0 => continue,
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "Dispatching failed; trying again.");
                        if matches!(error, DispatchError::Broker(_)) {
                            channel = None;
                            if let Err(error) = self.abandon_confirms(&mut outstanding).await {
                                tracing::warn!(%error, "Events whose confirms were lost wait out their lease.");
                            }
                        }
                    }
                }
                if polling {
                    poll_at = tokio::time::Instant::now() + POLL_INTERVAL;
                }
            }
            let listening = handed.is_empty();
            let (received, left) = match inbox.as_mut() {
                Some(LaneInbox { rows, left }) => (
                    Either::Left(async move {
                        if listening {
                            rows.recv().await
                        } else {
                            std::future::pending().await
                        }
                    }),
                    Either::Left(left.notified()),
                ),
                None => (
                    Either::Right(std::future::pending()),
                    Either::Right(std::future::pending()),
                ),
            };
            let mark_at = mark_at(self.store.sent_marks());
            let confirming = !outstanding.confirming.is_empty();
            tokio::select! {
                _ = cancel.cancelled() => {}
                Some(answer) = outstanding.next_confirm(), if confirming => {
                    if let Err(error) = self.confirmed(&mut outstanding, answer).await {
                        tracing::warn!(%error, "Taking the broker's confirms failed; trying again.");
                    }
                }
                rows = received => match rows {
                    Some(rows) => handed.extend(rows),
                    None => inbox = None,
                },
                _ = tokio::time::sleep_until(poll_at) => {}
                () = left => poll_at = tokio::time::Instant::now(),
                _ = tokio::time::sleep_until(mark_at.unwrap_or(poll_at)), if mark_at.is_some() => {
                    // Those it fails to mark wait again.
                    if let Err(error) = self.settle(&mut outstanding, false).await {
                        tracing::warn!(%error, "Marking sent rows failed; trying again.");
                    }
                }
            }
        }
        let deadline = tokio::time::Instant::now() + FLUSH_TIME_MAX;
        while tokio::time::Instant::now() < deadline {
            receive(&mut inbox, &mut handed);
            match self
                .round(lane, &mut handed, &mut channel, &mut outstanding)
                .await
            {
                Ok(claimed) if claimed > 0 => {}
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "The outbox could not be flushed; the next worker sends the rest.");
                    break;
                }
            }
        }
        // What the last rounds sent is marked before the lane stops (a round
        // cut short by the deadline or a failure has not been), as far as
        // the broker's confirms and the database allow in a short while.
        let last_marks = async {
            self.take_confirms(&mut outstanding, &channel).await?;
            self.settle(&mut outstanding, true).await
        };
        match tokio::time::timeout(LAST_MARKS_TIME_MAX, last_marks).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "Rows sent could not be marked; they are sent again when their lease ends.");
            }
            Err(_) => {
                tracing::warn!(
                    "The last confirms or marks took too long; those rows are sent again when their lease ends."
                );
            }
        }
        if let Some((connection, _)) = channel {
            let _ = connection.close(200, "shutting down".into()).await;
        }
    }

    /// Settles what an earlier round left outstanding, then sends the next of
    /// the `handed` rows, or if there are none claims due rows of `lane` and
    /// sends them. Returns how many rows it sent or claimed.
    async fn round(
        &self,
        lane: Lane,
        handed: &mut Vec<OutboxRow>,
        channel: &mut Option<(Connection, Channel)>,
        outstanding: &mut Outstanding,
    ) -> Result<usize, DispatchError> {
        // A claim round, or a hand-off when many events are unmarked, takes
        // every confirm and marks everything first; otherwise the hand-off
        // is sent first and the marks wait until they are due.
        let everything = handed.is_empty()
            || outstanding.confirming.len() + self.store.sent_marks().len() >= UNMARKED_MAX;
        if everything {
            self.take_confirms(outstanding, channel).await?;
        }
        self.settle(outstanding, everything).await?;
        let now = Ts::now();
        // The leases the rows are held under: if the database fails under
        // the round, they are given back once it answers, so that nothing
        // waits them out.
        let (rows, leases) = if handed.is_empty() {
            let lease_until = now.plus(lane.lease());
            let claimed = self
                .store
                .claim_outbox(
                    lane.kinds(),
                    now,
                    lease_until,
                    lane.claim_max(),
                    self.holder,
                )
                .await;
            let rows = claimed.inspect_err(|_| {
                // The claim may have been written even if its answer was lost.
                outstanding.leases.insert(lease_until);
            })?;
            (rows, BTreeSet::from([lease_until]))
        } else {
            // A row whose lease is running out while it waited (the database
            // or the broker was away) is given back at once, lest another
            // worker claim it while this one sends it.
            let still_ours = now.plus(lane.lease() / 2);
            let (rows, stale): (Vec<OutboxRow>, Vec<OutboxRow>) = lane
                .take(handed)
                .into_iter()
                .partition(|row| row.next_attempt_at > still_ours);
            outstanding
                .leases
                .extend(stale.iter().map(|row| row.next_attempt_at));
            let leases = rows.iter().map(|row| row.next_attempt_at).collect();
            (rows, leases)
        };
        let count = rows.len();
        match self.send(rows, channel, outstanding).await {
            Err(DispatchError::Store(error)) => {
                outstanding.leases.extend(leases);
                Err(DispatchError::Store(error))
            }
            other => other.map(|()| count),
        }
    }

    /// Marks what was sent but not marked (`everything`, or only once the
    /// marks are due), and gives back the rows of lost claims, so they are
    /// neither sent again nor left waiting out their lease.
    async fn settle(
        &self,
        outstanding: &mut Outstanding,
        everything: bool,
    ) -> Result<(), StoreError> {
        let due =
            mark_at(self.store.sent_marks()).is_some_and(|at| at <= tokio::time::Instant::now());
        // A lease given back makes its rows due at once, those sent but not
        // marked among them too: they are marked first.
        if everything || due || !outstanding.leases.is_empty() {
            self.store.outbox_mark_sent().await?;
        }
        while let Some(&lease_until) = outstanding.leases.last() {
            self.store.outbox_release(lease_until, Ts::now()).await?;
            outstanding.leases.remove(&lease_until);
        }
        Ok(())
    }

    /// Sends `rows`: events to the broker, emails, reports.
    async fn send(
        &self,
        rows: Vec<OutboxRow>,
        channel: &mut Option<(Connection, Channel)>,
        outstanding: &mut Outstanding,
    ) -> Result<(), DispatchError> {
        if rows.is_empty() {
            return Ok(());
        }
        let (events, rest): (Vec<OutboxRow>, Vec<OutboxRow>) = rows
            .into_iter()
            .partition(|row| row.kind == OutboxKind::Event);
        let (emails, reports): (Vec<OutboxRow>, Vec<OutboxRow>) = rest
            .into_iter()
            .partition(|row| row.kind == OutboxKind::Email);
        let mut failed = None;
        if !events.is_empty() {
            let result = match self.open_channel(channel, outstanding).await {
                Ok(open) => publish(open, &events, &mut outstanding.confirming).await,
                Err(error) => Err((events, error)),
            };
            if let Err((unsent, error)) = result {
                // Those published are rescheduled if their confirms fail.
                self.reschedule(&unsent, &error.to_string()).await?;
                failed = Some(error);
            }
        }
        // Emails and reports do not need the broker: they go even when the
        // events could not, instead of waiting out their lease.
        self.send_emails(&emails).await?;
        for row in &reports {
            self.send_report(row).await?;
        }
        match failed {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    async fn reschedule(&self, rows: &[OutboxRow], error: &str) -> Result<(), StoreError> {
        for row in rows {
            let delay =
                chrono::Duration::from_std(backoff(row.attempts)).expect("a bounded backoff");
            self.store
                .outbox_failed(&row.id, Ts::now().plus(delay), error)
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::handoff::tests::{HOLDER, row};
    use crate::store::Outbox;

    #[test]
    fn sent_rows_are_marked_once_the_oldest_has_waited_the_mark_delay() {
        let marks = SentMarks::default();
        assert_eq!(mark_at(&marks), None, "nothing to mark");
        marks.add(["a".to_owned()]);
        let since = marks.since().expect("the first id starts the delay");
        assert_eq!(mark_at(&marks), Some(since + MARK_DELAY));
    }

    /// A dispatcher over a fresh SQLite ledger in `dir`; `settle` needs no
    /// broker and no mail server.
    async fn dispatcher(dir: &std::path::Path) -> Dispatcher<crate::store::SqliteStore> {
        let url = format!("sqlite://{}", dir.join("ledger.db").display());
        let store = crate::store::SqliteStore::connect(&url)
            .await
            .expect("SQLite opens");
        store.migrate().await.expect("SQLite migrates");
        Dispatcher {
            store,
            holder: HOLDER,
            amqp_url: "amqp://127.0.0.1:1".to_owned(),
            mailer: Mailer::files(dir.to_path_buf()),
            mail_from: "worker@test.invalid".parse().expect("a mailbox"),
            retry_delays: Vec::new(),
            renderer: Renderer::new("https://portal.test.invalid"),
            reports_dir: dir.to_path_buf(),
            event_source: "training-credits".to_owned(),
        }
    }

    /// Settles with no lease to give back; returns the rows still waiting
    /// to be marked, and those not marked sent.
    async fn settled(d: &Dispatcher<crate::store::SqliteStore>, everything: bool) -> (usize, i64) {
        d.settle(&mut Outstanding::default(), everything)
            .await
            .expect("settled");
        let backlog = d.store.outbox_backlog().await.expect("the backlog");
        (
            d.store.sent_marks().len(),
            backlog.iter().map(|b| b.rows).sum(),
        )
    }

    /// `settle` marks what waits in the [`SentMarks`] only once it is due
    /// ([`MARK_DELAY`]), when told to mark everything, or before it gives a
    /// lease back (whose rows would otherwise be due again, sent or not);
    /// the rows of a lease given back that were not sent are due at once.
    #[tokio::test]
    async fn sent_rows_are_marked_when_due_when_everything_is_settled_or_before_a_lease_is_given_back()
     {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let d = dispatcher(dir.path()).await;
        let now = Ts::now();
        let lease_until = now.plus(Lane::Mail.lease());
        let rows: Vec<OutboxRow> = (0..4).map(|n| row(n, OutboxKind::Email, now)).collect();
        d.store.enqueue_outbox(&rows).await.expect("rows added");
        let claimed = d
            .store
            .claim_outbox(&[OutboxKind::Email], now, lease_until, 10, HOLDER)
            .await
            .expect("rows claimed");
        assert_eq!(claimed.len(), 4);
        let marks = d.store.sent_marks();

        marks.add(["row-0".to_owned()]);
        assert_eq!(
            settled(&d, false).await,
            (1, 4),
            "not due yet: nothing written"
        );
        tokio::time::sleep(MARK_DELAY).await;
        assert_eq!(settled(&d, false).await, (0, 3), "due: marked");
        marks.add(["row-1".to_owned()]);
        assert_eq!(
            settled(&d, true).await,
            (0, 2),
            "everything: marked at once"
        );

        // row-2 was sent, row-3 was not, when the claim was lost.
        marks.add(["row-2".to_owned()]);
        let mut outstanding = Outstanding {
            leases: BTreeSet::from([lease_until]),
            ..Outstanding::default()
        };
        d.settle(&mut outstanding, false).await.expect("settled");
        assert!(marks.is_empty() && outstanding.leases.is_empty());
        let due = d
            .store
            .claim_outbox(&[OutboxKind::Email], Ts::now(), lease_until, 10, HOLDER)
            .await
            .expect("what is due is claimed");
        let due: Vec<&str> = due.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            due,
            ["row-3"],
            "the lease given back, only the unsent row is due"
        );
    }
}
