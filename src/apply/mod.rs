//! Apply: one batch of messages in one database transaction. For each
//! message, in order: its idempotency key is checked, the ledger rules run on
//! the loaded ledger, and what they change is kept only if they succeed; the
//! journal entries, outbox rows (complete outbound CloudEvents and rendered
//! emails) and idempotency records of every message are then written and
//! committed together. Nothing may be acknowledged before this returns.

use std::collections::{BTreeMap, BTreeSet};

use chrono::Duration;
use tracing::Span;

use crate::config::Settings;
use crate::decode::{Decoded, EventKey};
use crate::domain::command::{Command, RedemptionRequested};
use crate::domain::ledger::Effect;
use crate::domain::model::{Account, ApprovalMode};
use crate::domain::rules::{self, Ctx, INVALID_CODE_WINDOW_MINUTES, LEARNER_LIMIT_DAYS};
use crate::domain::{Code, CodeKey, Credits, DeadReason, Id, Outcome, Rejection, Ts};
use crate::notify::Renderer;
use crate::outbox::handoff::{Handoff, Reservation};
use crate::outbox::{OutboundEvent, derived_id};
use crate::report::ReportJob;
use crate::store::{
    AccountWrite, Loaded, LotWrite, OutboxKind, OutboxRow, Store, StoreError, ToLoad, Writes,
};
use crate::trace::Trace;

/// One unit of work for the ledger: an inbound event or a scheduled job.
#[derive(Clone, Debug)]
pub struct Input {
    pub key: EventKey,
    pub digest: String,
    /// `causation_id` of what it produces: the inbound event id, or
    /// `schedule:JOB:INSTANT`.
    pub causation_id: String,
    pub command: Command,
    /// The worker's span for it, entered while its rules run.
    pub span: Span,
    /// The trace its outbound events continue, if any.
    pub trace: Option<Trace>,
}

impl Input {
    /// `decoded`, with `span` as the worker's span for it: a child of the
    /// message's `traceparent`, if it has one (see [`Trace::start`]).
    pub fn within(decoded: Decoded, span: Span) -> Input {
        let trace = Trace::start(&span, decoded.traceparent);
        Input {
            causation_id: decoded.key.id.clone(),
            key: decoded.key,
            digest: decoded.digest,
            command: decoded.command,
            span,
            trace,
        }
    }
}

impl From<Decoded> for Input {
    /// Without a span of its own: outside the worker (tests, benches).
    fn from(decoded: Decoded) -> Input {
        Input::within(decoded, Span::none())
    }
}

pub struct Applier<S> {
    store: S,
    renderer: Renderer,
    settings: Settings,
    handoff: Option<Handoff>,
}

impl<S: Store> Applier<S> {
    pub fn new(store: S, settings: Settings) -> Applier<S> {
        Applier {
            renderer: Renderer::new(&settings.portal_url),
            store,
            settings,
            handoff: None,
        }
    }

    /// Hands the events and emails of every committed batch to `handoff`
    /// (leased to this worker until its lanes send them).
    pub fn handing_off_to(self, handoff: Handoff) -> Applier<S> {
        Applier {
            handoff: Some(handoff),
            ..self
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Applies `batch` as of `now` in one transaction and returns one outcome
    /// per input, in order. An error means nothing was written: the whole
    /// batch is to be tried again.
    pub async fn apply(&self, batch: &[Input], now: Ts) -> Result<Vec<Outcome>, StoreError> {
        let wanted = wanted(batch, now);
        let reservation = self
            .handoff
            .as_ref()
            .map_or_else(Reservation::none, Handoff::reserve);
        let mut leases = BTreeSet::new();
        let committed = self
            .store
            .transact(&wanted, |loaded| {
                let (outcomes, mut writes) = self.run(batch, loaded, now);
                let fresh = reservation.lease(&mut writes.outbox);
                leases.extend(fresh.iter().map(|row| row.next_attempt_at));
                ((outcomes, fresh), writes)
            })
            .await;
        match committed {
            Ok((outcomes, fresh)) => {
                reservation.hand_over(fresh);
                Ok(outcomes)
            }
            Err(error) => {
                if !leases.is_empty() {
                    give_back_once_possible(self.store.clone(), leases);
                }
                Err(error)
            }
        }
    }

    fn run(&self, batch: &[Input], loaded: Loaded, now: Ts) -> (Vec<Outcome>, Writes) {
        let Loaded {
            mut ledger,
            mut seen,
        } = loaded;
        let mut writes = Writes {
            now: Some(now),
            ..Writes::default()
        };
        // Each account the batch changes as it was loaded (`None` if the
        // batch opens it), kept at its first change: what is written of it
        // is what differs from that.
        let mut loaded_accounts: BTreeMap<Id, Option<Account>> = BTreeMap::new();
        let mut requests: BTreeSet<Id> = BTreeSet::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        for input in batch {
            let _entered = input.span.enter();
            if let Some(digest) = seen.get(&input.key) {
                outcomes.push(if *digest == input.digest {
                    Outcome::Duplicate
                } else {
                    Outcome::dead(
                        DeadReason::IdConflict,
                        format!(
                            "event `{}` from `{}` was seen before with another body",
                            input.key.id, input.key.source
                        ),
                    )
                });
                continue;
            }
            let ctx = Ctx {
                now,
                staff: self.settings.admin_sources.contains(&input.key.source),
                event_id: &input.key.id,
                fingerprint: &input.digest,
                policy: &self.settings.policy,
                fresh_code: Code::generate(),
            };
            let (outcome, changes) = rules::handle(&ledger, &input.command, &ctx);
            if matches!(outcome, Outcome::Retry { .. } | Outcome::Dead { .. }) {
                outcomes.push(outcome);
                continue;
            }
            for id in changes.accounts.keys() {
                loaded_accounts
                    .entry(id.clone())
                    .or_insert_with(|| ledger.accounts.get(id).cloned());
            }
            ledger.absorb(&changes);
            requests.extend(changes.requests.into_keys());
            let cause = &input.causation_id;
            writes
                .journal
                .extend(changes.journal.into_iter().map(|e| (e, cause.clone())));
            writes
                .audit
                .extend(changes.audit.into_iter().map(|e| (e, cause.clone())));
            writes.attempts.extend(changes.attempts);
            writes.refunds.extend(
                changes
                    .refunds
                    .into_iter()
                    .map(|refund| (refund, cause.clone())),
            );
            writes
                .outbox
                .extend(self.outbox_rows(input, &changes.effects, now));
            writes
                .processed
                .push((input.key.clone(), input.digest.clone(), outcome.label()));
            seen.insert(input.key.clone(), input.digest.clone());
            outcomes.push(outcome);
        }
        writes.accounts = loaded_accounts
            .into_iter()
            .filter_map(|(id, before)| {
                let after = ledger.accounts.remove(&id)?;
                Some(AccountWrite { before, after })
            })
            .collect();
        let stages = &self.settings.policy.reminder_stages;
        writes.lots = writes
            .accounts
            .iter()
            .flat_map(|write| {
                write.changed_lots().map(|lot| LotWrite {
                    account_id: write.after.id.clone(),
                    lot: lot.clone(),
                    remind_at: lot.next_reminder_at(stages),
                })
            })
            .collect();
        if !writes.attempts.is_empty() {
            // Old attempts are swept only by a batch that adds some: the
            // table stays small without a delete in every batch.
            writes.forget_attempts_until = Some(code_window_start(now));
        }
        writes.requests = requests
            .iter()
            .filter_map(|id| ledger.requests.get(id).cloned())
            .collect();
        // Those that stop being pending or approved are written first: a
        // learner may cancel a request and ask for the same item again in
        // one batch, and the database checks one active request per
        // (learner, item) row by row.
        writes.requests.sort_by_key(|r| r.status.is_active());
        (outcomes, writes)
    }

    /// The outbox rows of one input's effects, with ids derived from the
    /// input's key so that they are the same however often it is applied.
    fn outbox_rows(&self, input: &Input, effects: &[Effect], now: Ts) -> Vec<OutboxRow> {
        let mut rows = Vec::new();
        for effect in effects {
            match effect {
                Effect::Event { account_id, event } => {
                    let id = derived_id(&input.key, rows.len());
                    let event = OutboundEvent {
                        id: &id,
                        event,
                        account_id: account_id.as_ref(),
                        causation_id: &input.causation_id,
                        trace: input.trace.as_ref(),
                        time: now,
                    }
                    .to_cloud_event(&self.settings.event_source);
                    rows.push(OutboxRow::new(
                        id,
                        OutboxKind::Event,
                        event.to_string(),
                        now,
                    ));
                }
                Effect::Email { to, notice } => {
                    for recipient in to {
                        let id = derived_id(&input.key, rows.len());
                        let email = self
                            .renderer
                            .render(
                                notice,
                                recipient,
                                format!("<{id}@training-credits>"),
                                &input.causation_id,
                            )
                            .expect("every template renders with the variables the rules give it");
                        rows.push(OutboxRow::new(
                            id,
                            OutboxKind::Email,
                            serde_json::to_string(&email).expect("an email serialises"),
                            now,
                        ));
                    }
                }
                Effect::Report(report) => {
                    let id = derived_id(&input.key, rows.len());
                    let job = ReportJob {
                        title: format!("Your {:?} report", report.report).to_lowercase(),
                        request: report.clone(),
                        causation_id: input.causation_id.clone(),
                        trace: input.trace.clone(),
                        announce: true,
                    };
                    rows.push(OutboxRow::new(
                        id,
                        OutboxKind::Report,
                        serde_json::to_string(&job).expect("a report job serialises"),
                        now,
                    ));
                }
            }
        }
        rows
    }
}

/// What a redemption request would meet now (SPEC §9 quotes).
#[derive(Clone, Debug, PartialEq)]
pub struct Quote {
    /// `None`: it would be accepted.
    pub rejection: Option<Rejection>,
    /// Of the account whose code it names, where the code is valid.
    pub approval_mode: Option<ApprovalMode>,
    pub available: Option<Credits>,
}

impl<S: Store> Applier<S> {
    /// Runs the rules of `request` on the ledger as committed, as the
    /// request itself would run, and keeps nothing of it but an
    /// `invalid_code` attempt, recorded as the request's would be: quotes
    /// are no way to guess codes. A request applied while a quote runs is
    /// ordered before it if it committed before the quote loaded the
    /// ledger, after it otherwise.
    pub async fn quote(&self, request: RedemptionRequested, now: Ts) -> Result<Quote, StoreError> {
        let code = CodeKey::of(&request.code);
        let input = Input {
            key: EventKey {
                source: "quote".to_owned(),
                id: uuid::Uuid::new_v4().to_string(),
            },
            digest: String::new(),
            causation_id: String::new(),
            command: Command::RedemptionRequested(request),
            span: Span::none(),
            trace: None,
        };
        let ledger = self
            .store
            .snapshot(&wanted(std::slice::from_ref(&input), now))
            .await?;
        let ctx = Ctx {
            now,
            staff: false,
            event_id: &input.key.id,
            fingerprint: "",
            policy: &self.settings.policy,
            fresh_code: Code::generate(),
        };
        let (outcome, changes) = rules::handle(&ledger, &input.command, &ctx);
        if !changes.attempts.is_empty() {
            let writes = Writes {
                attempts: changes.attempts,
                forget_attempts_until: Some(code_window_start(now)),
                now: Some(now),
                ..Writes::default()
            };
            self.store
                .transact(&ToLoad::default(), |_| ((), writes))
                .await?;
        }
        let rejection = match outcome {
            Outcome::Applied => None,
            Outcome::Rejected(reason) => Some(reason),
            other => unreachable!("a new request is applied or rejected, not {other:?}"),
        };
        let account = ledger
            .codes
            .get(&code)
            .and_then(|id| ledger.accounts.get(id))
            .filter(|account| account.code.key() == code);
        Ok(Quote {
            rejection,
            approval_mode: account.map(|a| a.approval_mode),
            available: account.map(|a| a.available_at(now)),
        })
    }
}

/// How often the leases of a batch whose commit failed are offered back.
const GIVE_BACK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A batch whose commit failed may have been committed all the same (the
/// answer was lost with the connection): its rows, leased to this worker's
/// lanes but never handed to them, are given back as soon as the database
/// answers, instead of waiting out their lease. If the commit did fail there
/// is nothing to give back, and once a lease has ended its rows are due
/// anyway.
fn give_back_once_possible<S: Store>(store: S, leases: BTreeSet<Ts>) {
    tokio::spawn(async move {
        for lease_until in leases {
            while Ts::now() < lease_until {
                match store.outbox_release(lease_until, Ts::now()).await {
                    Ok(()) => break,
                    Err(_) => tokio::time::sleep(GIVE_BACK_INTERVAL).await,
                }
            }
        }
    });
}

/// Everything `batch` refers to, for one load.
fn wanted(batch: &[Input], now: Ts) -> ToLoad {
    let mut wanted = ToLoad {
        live_lots: true,
        ..ToLoad::default()
    };
    for input in batch {
        wanted.keys.push(input.key.clone());
        let command = &input.command;
        wanted.account_ids.extend(command.account_id().cloned());
        wanted.request_ids.extend(command.request_id().cloned());
        match command {
            Command::AccountOpened(c) => {
                wanted
                    .owner_emails
                    .extend(c.owners.iter().map(|o| o.email.clone()));
                wanted.code_keys.extend(c.code.as_ref().map(Code::key));
            }
            Command::OwnerAdded(c) => wanted.owner_emails.push(c.owner.email.clone()),
            Command::PurchaseCompleted(c) => wanted.purchase_ids.push(c.purchase_id.clone()),
            Command::LotExtended(c) => wanted.purchase_ids.push(c.purchase_id.clone()),
            Command::PurchaseRefunded(c) => {
                wanted.purchase_ids.push(c.purchase_id.clone());
                wanted
                    .refund_ids
                    .push((c.account_id.clone(), c.refund_id.clone()));
            }
            Command::CodeRotated(c) => wanted.code_keys.extend(c.code.as_ref().map(Code::key)),
            Command::AccountClosed(c) => wanted.pending_of.push(c.account_id.clone()),
            Command::Sweep { account_id } => wanted.pending_of.push(account_id.clone()),
            Command::RedemptionRequested(c) => {
                wanted.code_keys.push(CodeKey::of(&c.code));
                wanted
                    .learner_items
                    .push((c.learner.id.clone(), c.item.id.clone()));
                wanted.attempts_since = Some(code_window_start(now));
                wanted.limited_since = Some(now.plus_days(-LEARNER_LIMIT_DAYS));
            }
            _ => {}
        }
    }
    wanted
}

/// Where the window of invalid-code attempts that count at `now` starts:
/// those at or before it no longer count.
fn code_window_start(now: Ts) -> Ts {
    now.plus(-Duration::minutes(INVALID_CODE_WINDOW_MINUTES))
}
