//! The hand-off of fresh rows from the transaction that wrote them to this
//! worker's dispatcher, and the two lanes that send them. A batch's events
//! and emails are written leased to this worker ([`Reservation::lease`]);
//! once it commits they are handed over in memory ([`Reservation::hand_over`])
//! and go out at once, without a claim. A row that never goes out (the
//! worker died, the lease ran out before its turn) is claimed once its lease
//! ends, or at once by a worker that finds its holder gone.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use crate::store::{HolderId, OutboxKind, OutboxRow};

/// Outbound events claimed per round.
pub const CLAIM_ROWS_MAX: i64 = 500;
/// Emails and reports claimed (or taken from a hand-off) per round.
pub const EMAILS_PER_ROUND: usize = 25;
/// How long claimed emails and reports are this worker's before others may
/// take them (a worker that dies leaves its claim to wait this long).
pub const LEASE: Duration = Duration::from_secs(60);
/// The same for outbound events, which are published in well under a second.
pub const EVENT_LEASE: Duration = Duration::from_secs(30);
/// Committed batches a lane may hold in memory before further rows are left
/// to wait out their lease and be claimed.
pub const HANDOFF_BATCHES: usize = 4;

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
    pub(crate) fn kinds(self) -> &'static [OutboxKind] {
        match self {
            Lane::Events => &[OutboxKind::Event],
            Lane::Mail => &[OutboxKind::Email, OutboxKind::Report],
        }
    }

    pub(crate) fn claim_max(self) -> i64 {
        match self {
            Lane::Events => CLAIM_ROWS_MAX,
            Lane::Mail => EMAILS_PER_ROUND as i64,
        }
    }

    /// What to send next of what the hand-off brought: every event at hand,
    /// or the next [`EMAILS_PER_ROUND`] emails (as many as a claim takes).
    pub(crate) fn take(self, handed: &mut Vec<OutboxRow>) -> Vec<OutboxRow> {
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

    pub(crate) fn lease(self) -> chrono::Duration {
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
    events: LaneSender,
    mail: LaneSender,
    /// This worker, which the rows handed over are leased to.
    holder: HolderId,
}

/// A hand-off's way into one lane.
#[derive(Clone, Debug)]
struct LaneSender {
    rows: mpsc::Sender<Vec<OutboxRow>>,
    /// Told when a batch committed rows of the lane while it was full.
    left: Arc<Notify>,
}

impl LaneSender {
    fn reserve(&self) -> LaneSlot<'_> {
        match self.rows.try_reserve() {
            Ok(permit) => LaneSlot::Free(permit),
            Err(_) => LaneSlot::Full(&self.left),
        }
    }
}

/// What a lane receives from a [`Handoff`]: batches of fresh rows, and word
/// when a batch's rows were left to be claimed because the lane was full,
/// so that it claims them as soon as it has sent what it holds instead of
/// at its next poll.
pub struct LaneInbox {
    pub(crate) rows: mpsc::Receiver<Vec<OutboxRow>>,
    pub(crate) left: Arc<Notify>,
}

/// A lane's room for one batch.
enum LaneSlot<'a> {
    Free(mpsc::Permit<'a, Vec<OutboxRow>>),
    /// None: the batch's rows are claimed, the lane told once they are
    /// committed.
    Full(&'a Notify),
    /// No hand-off at all: the rows are claimed when the lane polls.
    Off,
}

impl LaneSlot<'_> {
    fn free(&self) -> bool {
        matches!(self, LaneSlot::Free(_))
    }

    /// Hands over the lane's committed `rows`, or tells a full lane to
    /// claim (whether or not the batch left it any rows: a claim that finds
    /// none costs one query, and only while the lane is busy).
    fn hand_over(self, rows: Vec<OutboxRow>) {
        match self {
            LaneSlot::Free(permit) if !rows.is_empty() => permit.send(rows),
            LaneSlot::Full(left) => left.notify_one(),
            LaneSlot::Free(_) | LaneSlot::Off => {}
        }
    }
}

/// Moves what `inbox` holds into `handed` once `handed` is all sent,
/// without waiting: a lane holds at most twice [`HANDOFF_BATCHES`] batches,
/// and a lane that lags leaves the rest to be claimed.
pub(crate) fn receive(inbox: &mut Option<LaneInbox>, handed: &mut Vec<OutboxRow>) {
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
    pub fn new(holder: HolderId) -> (Handoff, LaneInbox, LaneInbox) {
        let lane = || {
            let (rows, inbox) = mpsc::channel(HANDOFF_BATCHES);
            let left = Arc::new(Notify::new());
            (
                LaneSender {
                    rows,
                    left: left.clone(),
                },
                LaneInbox { rows: inbox, left },
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

    /// LaneSlot in each lane for one more batch, taken before the batch's
    /// transaction so that only rows a lane will take are leased to it.
    pub fn reserve(&self) -> Reservation<'_> {
        Reservation {
            events: self.events.reserve(),
            mail: self.mail.reserve(),
            holder: Some(self.holder),
        }
    }
}

/// LaneSlot in the lanes for one batch's events and emails (none when a lane is
/// full: that batch's rows of the lane are then claimed as usual).
pub struct Reservation<'a> {
    events: LaneSlot<'a>,
    mail: LaneSlot<'a>,
    /// Whom the rows there is room for are leased to; none without a
    /// hand-off.
    holder: Option<HolderId>,
}

impl Reservation<'_> {
    /// No room anywhere: every row is left to be claimed.
    pub fn none<'a>() -> Reservation<'a> {
        Reservation {
            events: LaneSlot::Off,
            mail: LaneSlot::Off,
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

#[cfg(test)]
pub(crate) mod tests {
    use futures_util::FutureExt;

    use super::*;
    use crate::domain::Ts;

    /// A fresh row of `kind` produced at `now`.
    pub(crate) fn row(n: usize, kind: OutboxKind, now: Ts) -> OutboxRow {
        OutboxRow::new(format!("row-{n}"), kind, String::new(), now)
    }

    pub(crate) const HOLDER: HolderId = HolderId::from_stored(7);

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
}
