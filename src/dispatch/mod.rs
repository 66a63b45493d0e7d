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
//! handed to the dispatcher in memory ([`Handoff`]). Claiming is left for
//! what a hand-off could not take: rows whose send failed, rows of a worker
//! that died, report jobs, and rows handed over while the lane was full.

pub mod mail;

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{Either, join_all};
use lapin::options::BasicPublishOptions;
use lapin::{Channel, Confirmation, Connection, PublisherConfirm};
use lettre::message::Mailbox;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use std::path::PathBuf;

use serde_json::json;

use crate::apply::{OutboundEvent, derived_uuid};
use crate::config::redact;
use crate::consume::topology::OUTBOUND_EXCHANGE;
use crate::consume::{connect, persistent_cloudevent};
use crate::domain::Ts;
use crate::domain::command::ReportFormat;
use crate::domain::ledger::Recipient;
use crate::notify::Email;
use crate::notify::{Attachment, Renderer};
use crate::ops::metric;
use crate::report::{self, ReportJob, ReportQuery, choose_columns};
use crate::store::{HolderId, OutboxKind, OutboxRow, SentMarks, Store, StoreError};
use mail::Mailer;

/// Outbound events claimed per round.
pub const CLAIM_ROWS_MAX: i64 = 500;
/// Emails and reports claimed (or taken from a hand-off) per round.
pub const EMAILS_PER_ROUND: usize = 25;
/// How long claimed emails and reports are this worker's before others may
/// take them (a worker that dies leaves its claim to wait this long).
pub const LEASE: Duration = Duration::from_secs(60);
/// The same for outbound events, which are published in well under a second.
pub const EVENT_LEASE: Duration = Duration::from_secs(30);
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
/// How often a lane waiting for confirms checks that the channel they are
/// owed on is still open (lapin fails them when it closes; this is the
/// guard should an answer never come).
const CHANNEL_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// How often the outbox is looked at for rows no hand-off brought.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Committed batches a lane may hold in memory before further rows are left
/// to wait out their lease and be claimed.
pub const HANDOFF_BATCHES: usize = 4;
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

/// An outbound event published, with the broker's answer once it comes.
type Answer = (OutboxRow, Result<Confirmation, lapin::Error>);

/// What a round left unsettled beyond the [`SentMarks`]: events waiting for
/// the broker's confirm, and what the database failed under.
#[derive(Default)]
struct Unsettled {
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

impl Unsettled {
    /// The broker's answer for the oldest event awaiting one.
    async fn next_confirm(&mut self) -> Option<Answer> {
        let (_, confirm) = self.confirming.front_mut()?;
        let answer = confirm.await;
        let (row, _) = self.confirming.pop_front()?;
        Some((row, answer))
    }

    /// The answers already in, without waiting.
    fn ready_confirms(&mut self) -> Vec<Answer> {
        std::iter::from_fn(|| self.next_confirm().now_or_never().flatten()).collect()
    }
}

/// Whether a lane's connection and channel are still open.
fn is_open((_, channel): &(Connection, Channel)) -> bool {
    channel.status().connected()
}

/// Publishes `events`, their confirms joining `confirming` (taken by
/// [`Dispatcher::confirmed`]): the broker works through them all at once, and
/// the lane does not wait for them. On a failure, the events that did not go
/// out.
///
/// The publishes are started together: lapin finishes one only once its
/// I/O thread has written it, and awaiting them one by one cost two thread
/// wake-ups per event. Each takes its confirm's number and queues its frames
/// in one step of its first poll, and `join_all` first polls them in order,
/// so the events still leave in outbox order.
async fn publish(
    channel: &Channel,
    events: &[OutboxRow],
    confirming: &mut VecDeque<(OutboxRow, PublisherConfirm)>,
) -> Result<(), (Vec<OutboxRow>, DispatchError)> {
    let publishes = events.iter().map(|row| {
        let routing_key = serde_json::from_str::<EventType>(&row.payload)
            .map(|event| event.kind)
            .unwrap_or_default();
        async move {
            channel
                .basic_publish(
                    OUTBOUND_EXCHANGE.into(),
                    routing_key.as_ref().into(),
                    BasicPublishOptions::default(),
                    row.payload.as_bytes(),
                    persistent_cloudevent(&row.id),
                )
                .await
        }
    });
    let mut unsent = Vec::new();
    let mut failure = None;
    for (row, published) in events.iter().zip(join_all(publishes).await) {
        match published {
            Ok(confirm) => confirming.push_back((row.clone(), confirm)),
            Err(error) => {
                unsent.push(row.clone());
                failure.get_or_insert(error);
            }
        }
    }
    match failure {
        None => Ok(()),
        Some(error) => Err((unsent, error.into())),
    }
}

/// The `type` of an outbound CloudEvent, its routing key; read without
/// building the rest of the event.
#[derive(serde::Deserialize)]
struct EventType<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
}

/// When to try a row again after `attempts` failures: doubling from one
/// second up to [`RETRY_BACKOFF_MAX`].
pub fn backoff(attempts: i64) -> Duration {
    let exponent = u32::try_from(attempts.clamp(0, 16)).unwrap_or(16);
    Duration::from_secs(2_u64.pow(exponent)).min(RETRY_BACKOFF_MAX)
}

/// The two lanes of the outbox, each dispatched by a task of its own, so that
/// a slow SMTP server never holds up the outbound events, nor the reverse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Outbound events: their latency counts.
    Events,
    /// Emails and reports.
    Mail,
}

impl Lane {
    fn kinds(self) -> &'static [OutboxKind] {
        match self {
            Lane::Events => &[OutboxKind::Event],
            Lane::Mail => &[OutboxKind::Email, OutboxKind::Report],
        }
    }

    fn claim_max(self) -> i64 {
        match self {
            Lane::Events => CLAIM_ROWS_MAX,
            Lane::Mail => EMAILS_PER_ROUND as i64,
        }
    }

    /// What to send next of what the hand-off brought: every event at hand,
    /// or the next [`EMAILS_PER_ROUND`] emails (as many as a claim takes).
    fn take(self, handed: &mut Vec<OutboxRow>) -> Vec<OutboxRow> {
        match self {
            Lane::Events => std::mem::take(handed),
            Lane::Mail => {
                let rest = handed.split_off(handed.len().min(EMAILS_PER_ROUND));
                std::mem::replace(handed, rest)
            }
        }
    }

    /// The lane a fresh row of `kind` is handed to; report jobs, long to
    /// build, are always claimed.
    fn of(kind: OutboxKind) -> Option<Lane> {
        match kind {
            OutboxKind::Event => Some(Lane::Events),
            OutboxKind::Email => Some(Lane::Mail),
            OutboxKind::Report => None,
        }
    }

    fn lease(self) -> chrono::Duration {
        let lease = match self {
            Lane::Events => EVENT_LEASE,
            Lane::Mail => LEASE,
        };
        chrono::Duration::from_std(lease).expect("a short lease")
    }
}

/// Fresh rows on their way from the transaction that wrote them to this
/// worker's dispatcher. Such a row is written leased to this worker
/// ([`Reservation::lease`]), so no other dispatcher claims it while it waits
/// in memory; one that never goes out (the worker died, the lease ran out
/// before its turn) is claimed when that lease ends.
#[derive(Clone, Debug)]
pub struct Handoff {
    events: Outlet,
    mail: Outlet,
    /// This worker, which the rows handed over are leased to.
    holder: HolderId,
}

/// A hand-off's way into one lane.
#[derive(Clone, Debug)]
struct Outlet {
    rows: mpsc::Sender<Vec<OutboxRow>>,
    /// Told when a batch committed rows of the lane while it was full.
    left: Arc<Notify>,
}

impl Outlet {
    fn reserve(&self) -> Room<'_> {
        match self.rows.try_reserve() {
            Ok(permit) => Room::Free(permit),
            Err(_) => Room::Full(&self.left),
        }
    }
}

/// What a lane receives from a [`Handoff`]: batches of fresh rows, and word
/// when a batch's rows were left to be claimed because the lane was full,
/// so that it claims them as soon as it has sent what it holds instead of
/// at its next poll.
pub struct Inbox {
    rows: mpsc::Receiver<Vec<OutboxRow>>,
    left: Arc<Notify>,
}

/// A lane's room for one batch.
enum Room<'a> {
    Free(mpsc::Permit<'a, Vec<OutboxRow>>),
    /// None: the batch's rows are claimed, the lane told once they are
    /// committed.
    Full(&'a Notify),
    /// No hand-off at all: the rows are claimed when the lane polls.
    Off,
}

impl Room<'_> {
    fn free(&self) -> bool {
        matches!(self, Room::Free(_))
    }

    /// Hands over the lane's committed `rows`, or tells a full lane to
    /// claim (whether or not the batch left it any rows: a claim that finds
    /// none costs one query, and only while the lane is busy).
    fn hand_over(self, rows: Vec<OutboxRow>) {
        match self {
            Room::Free(permit) if !rows.is_empty() => permit.send(rows),
            Room::Full(left) => left.notify_one(),
            Room::Free(_) | Room::Off => {}
        }
    }
}

/// Moves what `inbox` holds into `handed` once `handed` is all sent,
/// without waiting: a lane holds at most twice [`HANDOFF_BATCHES`] batches,
/// and a lane that lags leaves the rest to be claimed.
fn receive(inbox: &mut Option<Inbox>, handed: &mut Vec<OutboxRow>) {
    if !handed.is_empty() {
        return;
    }
    if let Some(open) = inbox.as_mut() {
        while let Ok(rows) = open.rows.try_recv() {
            handed.extend(rows);
        }
    }
}

impl Handoff {
    /// A hand-off to the lanes of `holder` (this worker), and the inboxes
    /// of its events lane and of its mail lane.
    pub fn new(holder: HolderId) -> (Handoff, Inbox, Inbox) {
        let lane = || {
            let (rows, inbox) = mpsc::channel(HANDOFF_BATCHES);
            let left = Arc::new(Notify::new());
            (
                Outlet {
                    rows,
                    left: left.clone(),
                },
                Inbox { rows: inbox, left },
            )
        };
        let (events, events_inbox) = lane();
        let (mail, mail_inbox) = lane();
        (
            Handoff {
                events,
                mail,
                holder,
            },
            events_inbox,
            mail_inbox,
        )
    }

    /// Room in each lane for one more batch, taken before the batch's
    /// transaction so that only rows a lane will take are leased to it.
    pub fn reserve(&self) -> Reservation<'_> {
        Reservation {
            events: self.events.reserve(),
            mail: self.mail.reserve(),
            holder: Some(self.holder),
        }
    }
}

/// Room in the lanes for one batch's events and emails (none when a lane is
/// full: that batch's rows of the lane are then claimed as usual).
pub struct Reservation<'a> {
    events: Room<'a>,
    mail: Room<'a>,
    /// Whom the rows there is room for are leased to; none without a
    /// hand-off.
    holder: Option<HolderId>,
}

impl Reservation<'_> {
    /// No room anywhere: every row is left to be claimed.
    pub fn none<'a>() -> Reservation<'a> {
        Reservation {
            events: Room::Off,
            mail: Room::Off,
            holder: None,
        }
    }

    /// Leases the rows there is room for to this worker's lanes (until the
    /// lane's lease after the row is due ends) and returns them, to be
    /// handed over once they are committed.
    pub fn lease(&self, rows: &mut [OutboxRow]) -> Vec<OutboxRow> {
        rows.iter_mut()
            .filter_map(|row| {
                let lane = Lane::of(row.kind)?;
                let room = match lane {
                    Lane::Events => self.events.free(),
                    Lane::Mail => self.mail.free(),
                };
                room.then(|| {
                    row.next_attempt_at = row.next_attempt_at.plus(lane.lease());
                    row.leased_by = self.holder;
                    row.clone()
                })
            })
            .collect()
    }

    /// Hands the committed `rows` (from [`Reservation::lease`]) to their
    /// lanes.
    pub fn hand_over(self, rows: Vec<OutboxRow>) {
        let (events, mail): (Vec<OutboxRow>, Vec<OutboxRow>) = rows
            .into_iter()
            .partition(|row| row.kind == OutboxKind::Event);
        self.events.hand_over(events);
        self.mail.hand_over(mail);
    }
}

impl<S: Store> Dispatcher<S> {
    /// Dispatches `lane` until `cancel`: what `inbox` brings at once, the
    /// rest as it falls due. Then it keeps sending until the lane is drained
    /// (or [`FLUSH_TIME_MAX`] has passed, as other workers may keep adding
    /// rows), so a clean stop leaves nothing behind that could go.
    pub async fn run(&self, lane: Lane, mut inbox: Option<Inbox>, cancel: CancellationToken) {
        let mut channel: Option<(Connection, Channel)> = None;
        let mut unsettled = Unsettled::default();
        let mut handed: Vec<OutboxRow> = Vec::new();
        let mut poll_at = tokio::time::Instant::now();
        while !cancel.is_cancelled() {
            receive(&mut inbox, &mut handed);
            let polling = handed.is_empty();
            if !polling || tokio::time::Instant::now() >= poll_at {
                match self
                    .round(lane, &mut handed, &mut channel, &mut unsettled)
                    .await
                {
                    Ok(count) if count > 0 => continue,
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "Dispatching failed; trying again.");
                        if matches!(error, DispatchError::Broker(_)) {
                            channel = None;
                            if let Err(error) = self.abandon_confirms(&mut unsettled).await {
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
                Some(Inbox { rows, left }) => (
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
            let confirming = !unsettled.confirming.is_empty();
            tokio::select! {
                _ = cancel.cancelled() => {}
                Some(answer) = unsettled.next_confirm(), if confirming => {
                    if let Err(error) = self.confirmed(&mut unsettled, answer).await {
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
                    if let Err(error) = self.settle(&mut unsettled, false).await {
                        tracing::warn!(%error, "Marking sent rows failed; trying again.");
                    }
                }
            }
        }
        let deadline = tokio::time::Instant::now() + FLUSH_TIME_MAX;
        while tokio::time::Instant::now() < deadline {
            receive(&mut inbox, &mut handed);
            match self
                .round(lane, &mut handed, &mut channel, &mut unsettled)
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
            self.take_confirms(&mut unsettled, &channel).await?;
            self.settle(&mut unsettled, true).await
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

    /// Settles what an earlier round left unsettled, then sends the next of
    /// the `handed` rows, or if there are none claims due rows of `lane` and
    /// sends them. Returns how many rows it sent or claimed.
    async fn round(
        &self,
        lane: Lane,
        handed: &mut Vec<OutboxRow>,
        channel: &mut Option<(Connection, Channel)>,
        unsettled: &mut Unsettled,
    ) -> Result<usize, DispatchError> {
        // A claim round, or a hand-off when many events are unmarked, takes
        // every confirm and marks everything first; otherwise the hand-off
        // is sent first and the marks wait until they are due.
        let everything = handed.is_empty()
            || unsettled.confirming.len() + self.store.sent_marks().len() >= UNMARKED_MAX;
        if everything {
            self.take_confirms(unsettled, channel).await?;
        }
        self.settle(unsettled, everything).await?;
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
                unsettled.leases.insert(lease_until);
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
            unsettled
                .leases
                .extend(stale.iter().map(|row| row.next_attempt_at));
            let leases = rows.iter().map(|row| row.next_attempt_at).collect();
            (rows, leases)
        };
        let count = rows.len();
        match self.send(rows, channel, unsettled).await {
            Err(DispatchError::Store(error)) => {
                unsettled.leases.extend(leases);
                Err(DispatchError::Store(error))
            }
            other => other.map(|()| count),
        }
    }

    /// Marks what was sent but not marked (`everything`, or only once the
    /// marks are due), and gives back the rows of lost claims, so they are
    /// neither sent again nor left waiting out their lease.
    async fn settle(&self, unsettled: &mut Unsettled, everything: bool) -> Result<(), StoreError> {
        let due =
            mark_at(self.store.sent_marks()).is_some_and(|at| at <= tokio::time::Instant::now());
        // A lease given back makes its rows due at once, those sent but not
        // marked among them too: they are marked first.
        if everything || due || !unsettled.leases.is_empty() {
            self.store.outbox_mark_sent().await?;
        }
        while let Some(&lease_until) = unsettled.leases.last() {
            self.store.outbox_release(lease_until, Ts::now()).await?;
            unsettled.leases.remove(&lease_until);
        }
        Ok(())
    }

    /// Sends `rows`: events to the broker, emails, reports.
    async fn send(
        &self,
        rows: Vec<OutboxRow>,
        channel: &mut Option<(Connection, Channel)>,
        unsettled: &mut Unsettled,
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
            let result = match self.open_channel(channel, unsettled).await {
                Ok(open) => publish(open, &events, &mut unsettled.confirming).await,
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

    /// The lane's channel, opened anew if it is not open (the confirms the
    /// old one owes are settled first).
    async fn open_channel<'c>(
        &self,
        channel: &'c mut Option<(Connection, Channel)>,
        unsettled: &mut Unsettled,
    ) -> Result<&'c Channel, DispatchError> {
        let pair = match channel.take().filter(is_open) {
            Some(pair) => pair,
            None => {
                self.abandon_confirms(unsettled).await?;
                self.connect().await?
            }
        };
        Ok(&channel.insert(pair).1)
    }

    async fn connect(&self) -> Result<(Connection, Channel), DispatchError> {
        Ok(connect(&self.amqp_url, &self.retry_delays)
            .await
            .inspect_err(|error| tracing::warn!(%error, broker = %redact(&self.amqp_url), "Cannot reach the broker to publish."))?)
    }

    /// Takes the broker's `answer` and any others already in: confirmed
    /// events wait to be marked sent, refused or lost ones are tried again
    /// later.
    async fn confirmed(&self, unsettled: &mut Unsettled, answer: Answer) -> Result<(), StoreError> {
        let mut answers = vec![answer];
        answers.extend(unsettled.ready_confirms());
        for (row, answer) in answers {
            let failure = match answer {
                Ok(confirmation) if confirmation.is_ack() => {
                    metrics::counter!(metric::PUBLISH_CONFIRMS, "result" => "ack").increment(1);
                    self.store.sent_marks().add([row.id]);
                    continue;
                }
                Ok(_) => {
                    metrics::counter!(metric::PUBLISH_CONFIRMS, "result" => "nack").increment(1);
                    "the broker refused the event".to_owned()
                }
                Err(error) => error.to_string(),
            };
            self.reschedule(std::slice::from_ref(&row), &failure)
                .await?;
        }
        Ok(())
    }

    /// Takes every confirm owed, waiting for them while their `channel` is
    /// open; once it is not, those it still owes are tried again later.
    async fn take_confirms(
        &self,
        unsettled: &mut Unsettled,
        channel: &Option<(Connection, Channel)>,
    ) -> Result<(), StoreError> {
        while !unsettled.confirming.is_empty() {
            match tokio::time::timeout(CHANNEL_CHECK_INTERVAL, unsettled.next_confirm()).await {
                Ok(Some(answer)) => self.confirmed(unsettled, answer).await?,
                Ok(None) => break,
                Err(_) if channel.as_ref().is_some_and(is_open) => {}
                Err(_) => return self.abandon_confirms(unsettled).await,
            }
        }
        Ok(())
    }

    /// Settles the confirms of a channel given up: the answers already in
    /// are taken; the events still awaiting one are tried again later (the
    /// broker may have them: at least once, with the same ids).
    async fn abandon_confirms(&self, unsettled: &mut Unsettled) -> Result<(), StoreError> {
        if let Some(answer) = unsettled.next_confirm().now_or_never().flatten() {
            self.confirmed(unsettled, answer).await?;
        }
        let owed: Vec<OutboxRow> = unsettled.confirming.drain(..).map(|(row, _)| row).collect();
        self.reschedule(
            &owed,
            "the channel closed before the broker confirmed the event",
        )
        .await
    }

    /// Sends `rows` ([`Mailer::send_round`]); the ones that went wait to be
    /// marked sent ([`SentMarks`]): a crash between a send and its mark sends
    /// that email again, with the same `Message-ID`.
    async fn send_emails(&self, rows: &[OutboxRow]) -> Result<(), DispatchError> {
        let mut readable = Vec::with_capacity(rows.len());
        let mut emails = Vec::with_capacity(rows.len());
        for row in rows {
            match serde_json::from_str::<Email>(&row.payload) {
                Ok(email) => {
                    readable.push(row);
                    emails.push(email);
                }
                Err(error) => {
                    // Written by this program; unreadable means a defect,
                    // which must not block the rows behind it.
                    tracing::error!(%error, id = %row.id, "An outbox email cannot be read.");
                    self.reschedule(std::slice::from_ref(row), &error.to_string())
                        .await?;
                }
            }
        }
        let results = self.mailer.send_round(&self.mail_from, &emails).await;
        let mut done = Vec::with_capacity(results.len());
        for ((row, email), result) in readable.into_iter().zip(&emails).zip(results) {
            match result {
                Ok(()) => {
                    metrics::counter!(metric::EMAILS, "result" => "sent").increment(1);
                    done.push(row.id.clone());
                }
                Err(error) => {
                    metrics::counter!(metric::EMAILS, "result" => "failed").increment(1);
                    tracing::warn!(%error, message_id = %email.message_id, attempts = row.attempts + 1, "An email could not be sent; it waits.");
                    self.reschedule(std::slice::from_ref(row), &error.to_string())
                        .await?;
                }
            }
        }
        self.store.sent_marks().add(done);
        Ok(())
    }

    /// Builds a report into `REPORTS_DIR`, emails it as an attachment and,
    /// for a requested report, announces it with
    /// `training-credits.report.generated` (written to the outbox in the same
    /// transaction that marks the report sent).
    async fn send_report(&self, row: &OutboxRow) -> Result<(), DispatchError> {
        match self.build_and_send_report(row).await {
            Ok(follow_up) => {
                self.store
                    .outbox_complete(&row.id, &follow_up, Ts::now())
                    .await?;
            }
            Err(error) => {
                tracing::warn!(%error, id = %row.id, attempts = row.attempts + 1, "A report could not be sent; it waits.");
                self.reschedule(std::slice::from_ref(row), &error).await?;
            }
        }
        Ok(())
    }

    async fn build_and_send_report(&self, row: &OutboxRow) -> Result<Vec<OutboxRow>, String> {
        let job: ReportJob = serde_json::from_str(&row.payload).map_err(|e| e.to_string())?;
        let now = Ts::now();
        let request = &job.request;
        let query = ReportQuery {
            kind: request.report,
            account: request.account_id.clone(),
            from: request.from,
            to: request.to,
            now,
        };
        let columns = choose_columns(request.report, request.columns.as_deref())
            .map_err(|e| e.to_string())?;
        let filename = job.filename(now);
        tokio::fs::create_dir_all(&self.reports_dir)
            .await
            .map_err(|e| e.to_string())?;
        let path = self.reports_dir.join(format!("{}-{filename}", row.id));
        let rows = report::write(&self.store, &query, request.format, &columns, &path, |_| {})
            .await
            .map_err(|e| e.to_string())?;
        let recipient = Recipient {
            email: request.recipient.clone(),
            name: None,
        };
        let mut email = self
            .renderer
            .render(
                "report_ready",
                &json!({"title": job.title, "filename": filename, "rows": rows}),
                &recipient,
                format!("<{}@training-credits>", row.id),
                &job.causation_id,
            )
            .map_err(|e| e.to_string())?;
        email.attachments.push(Attachment {
            filename,
            content_type: match request.format {
                ReportFormat::Csv => "text/csv; charset=utf-8",
                ReportFormat::Xlsx => {
                    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
                }
            }
            .to_owned(),
            path: path.display().to_string(),
        });
        self.mailer
            .send(&self.mail_from, &email)
            .await
            .map_err(|e| e.to_string())?;
        metrics::counter!(metric::EMAILS, "result" => "sent").increment(1);
        if !job.announce {
            return Ok(Vec::new());
        }
        let id = derived_uuid(&format!("{}\ngenerated", row.id));
        let event = OutboundEvent {
            id: &id,
            kind: "training-credits.report.generated",
            account_id: request.account_id.as_ref(),
            data: &json!({
                "report": request.report,
                "format": request.format,
                "rows": rows,
                "recipient": request.recipient,
            }),
            causation_id: &job.causation_id,
            time: now,
        }
        .to_cloud_event(&self.event_source);
        Ok(vec![OutboxRow::new(
            id,
            OutboxKind::Event,
            event.to_string(),
            now,
        )])
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
    use crate::store::Outbox;

    #[test]
    fn sent_rows_are_marked_once_the_oldest_has_waited_the_mark_delay() {
        let marks = SentMarks::default();
        assert_eq!(mark_at(&marks), None, "nothing to mark");
        marks.add(["a".to_owned()]);
        let since = marks.since().expect("the first id starts the delay");
        assert_eq!(mark_at(&marks), Some(since + MARK_DELAY));
    }

    fn row(n: usize, kind: OutboxKind, now: Ts) -> OutboxRow {
        OutboxRow::new(format!("row-{n}"), kind, String::new(), now)
    }

    const HOLDER: HolderId = HolderId::from_stored(7);

    fn batch(now: Ts) -> Vec<OutboxRow> {
        [OutboxKind::Event, OutboxKind::Email, OutboxKind::Report]
            .into_iter()
            .enumerate()
            .map(|(n, kind)| row(n, kind, now))
            .collect()
    }

    #[test]
    fn events_and_emails_are_leased_and_handed_over_reports_are_claimed() {
        let now = Ts::parse("2026-11-21T10:00:00Z").expect("an instant");
        let (handoff, mut events, mut mail) = Handoff::new(HOLDER);
        let mut rows = batch(now);
        let reservation = handoff.reserve();
        let fresh = reservation.lease(&mut rows);
        reservation.hand_over(fresh);
        let due: Vec<(OutboxKind, Ts)> = rows.iter().map(|r| (r.kind, r.next_attempt_at)).collect();
        assert_eq!(
            due,
            [
                (OutboxKind::Event, now.plus(Lane::Events.lease())),
                (OutboxKind::Email, now.plus(Lane::Mail.lease())),
                (OutboxKind::Report, now),
            ]
        );
        assert_eq!(events.rows.try_recv().expect("the event"), rows[..1]);
        assert_eq!(mail.rows.try_recv().expect("the email"), rows[1..2]);
        assert!(events.rows.try_recv().is_err() && mail.rows.try_recv().is_err());
    }

    #[test]
    fn a_full_lane_leaves_its_rows_due_at_once_for_a_claim_and_is_told_to_claim() {
        let now = Ts::parse("2026-11-21T10:00:00Z").expect("an instant");
        let (handoff, mut events, mail) = Handoff::new(HOLDER);
        for _ in 0..HANDOFF_BATCHES {
            handoff
                .reserve()
                .hand_over(vec![row(0, OutboxKind::Event, now)]);
        }
        let mut rows = batch(now);
        let reservation = handoff.reserve();
        let fresh = reservation.lease(&mut rows);
        reservation.hand_over(fresh);
        assert_eq!(rows[0].next_attempt_at, now, "no room: claimed as usual");
        assert_eq!(rows[1].next_attempt_at, now.plus(Lane::Mail.lease()));
        assert!(
            events.left.notified().now_or_never().is_some(),
            "the full lane is told to claim"
        );
        assert!(
            mail.left.notified().now_or_never().is_none(),
            "the lane with room is not"
        );
        let mut queued = 0;
        while events.rows.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, HANDOFF_BATCHES);
    }

    #[test]
    fn an_unused_reservation_gives_its_room_back() {
        let (handoff, _events, _mail) = Handoff::new(HOLDER);
        for _ in 0..2 * HANDOFF_BATCHES {
            drop(handoff.reserve());
        }
        let reservation = handoff.reserve();
        assert!(reservation.events.free() && reservation.mail.free());
    }

    #[test]
    fn the_mail_lane_takes_one_round_of_emails_at_a_time_the_events_lane_all() {
        let now = Ts::parse("2026-11-21T10:00:00Z").expect("an instant");
        let (handoff, events, mail) = Handoff::new(HOLDER);
        let emails: Vec<OutboxRow> = (0..EMAILS_PER_ROUND + 3)
            .map(|n| row(n, OutboxKind::Email, now))
            .collect();
        let events_rows: Vec<OutboxRow> = (0..3 * EMAILS_PER_ROUND)
            .map(|n| row(n, OutboxKind::Event, now))
            .collect();
        handoff.reserve().hand_over(emails.clone());
        handoff.reserve().hand_over(events_rows.clone());
        let mut held = Vec::new();
        receive(&mut Some(mail), &mut held);
        assert_eq!(Lane::Mail.take(&mut held), emails[..EMAILS_PER_ROUND]);
        assert_eq!(Lane::Mail.take(&mut held), emails[EMAILS_PER_ROUND..]);
        assert!(Lane::Mail.take(&mut held).is_empty());
        let mut held = Vec::new();
        receive(&mut Some(events), &mut held);
        assert_eq!(Lane::Events.take(&mut held), events_rows);
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
        d.settle(&mut Unsettled::default(), everything)
            .await
            .expect("settled");
        let backlog = d.store.outbox_backlog().await.expect("the backlog");
        (
            d.store.sent_marks().len(),
            backlog.iter().map(|(_, count)| count).sum(),
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
        let mut unsettled = Unsettled {
            leases: BTreeSet::from([lease_until]),
            ..Unsettled::default()
        };
        d.settle(&mut unsettled, false).await.expect("settled");
        assert!(marks.is_empty() && unsettled.leases.is_empty());
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
