//! An in-memory ledger for the rules' unit tests: commands run through
//! [`handle`] and what they change is absorbed as `apply` would, with no
//! database, broker or SMTP server.

use super::{Ctx, Policy, handle};
use crate::domain::command::*;
use crate::domain::event::Event;
use crate::domain::ledger::{Changes, Effect, Ledger};
use crate::domain::model::*;
use crate::domain::notice::Notice;
use crate::domain::{Code, Credits, Email, Id, Outcome, Ts};

pub const CODE: &str = "TEAM-CODE-1";
pub const OWNER: &str = "ann@example.com";
pub const STRANGER: &str = "eve@example.com";

pub fn id(text: &str) -> Id {
    text.parse().expect("an id")
}

pub fn email(text: &str) -> Email {
    text.parse().expect("an email")
}

pub fn credits(text: &str) -> Credits {
    text.parse().expect("an amount")
}

pub struct Book {
    pub ledger: Ledger,
    pub now: Ts,
    pub policy: Policy,
    /// Whether the next commands come from a staff source.
    pub staff: bool,
    /// Every journal entry kept so far.
    pub journal: Vec<crate::domain::ledger::JournalEntry>,
}

/// What one command did.
pub struct Ran {
    pub outcome: Outcome,
    pub changes: Changes,
}

impl Ran {
    pub fn events(&self) -> Vec<&Event> {
        self.changes
            .effects
            .iter()
            .filter_map(|effect| match effect {
                Effect::Event { event, .. } => Some(event),
                _ => None,
            })
            .collect()
    }

    /// Each email with the addresses it goes to.
    pub fn emails(&self) -> Vec<(&Notice, Vec<&str>)> {
        self.changes
            .effects
            .iter()
            .filter_map(|effect| match effect {
                Effect::Email { to, notice } => {
                    Some((notice, to.iter().map(|r| r.email.as_str()).collect()))
                }
                _ => None,
            })
            .collect()
    }
}

impl Book {
    pub fn new() -> Book {
        Book {
            ledger: Ledger::default(),
            now: Ts::parse("2026-03-01T09:00:00Z").expect("an instant"),
            policy: Policy::default(),
            staff: false,
            journal: Vec::new(),
        }
    }

    /// Runs `command` now and keeps what it changed, as `apply` does.
    pub fn run(&mut self, command: Command) -> Ran {
        let fingerprint = format!("{command:?}");
        let ctx = Ctx {
            now: self.now,
            staff: self.staff,
            event_id: "ev-1",
            fingerprint: &fingerprint,
            policy: &self.policy,
            fresh_code: Code::generate(),
        };
        let (outcome, changes) = handle(&self.ledger, &command, &ctx);
        if !matches!(outcome, Outcome::Retry { .. } | Outcome::Dead { .. }) {
            self.ledger.absorb(&changes);
            self.journal.extend(changes.journal.iter().cloned());
        }
        Ran { outcome, changes }
    }

    pub fn account(&self, account: &str) -> &Account {
        &self.ledger.accounts[&id(account)]
    }

    pub fn request(&self, request: &str) -> &Redemption {
        &self.ledger.requests[&id(request)]
    }

    pub fn available(&self, account: &str) -> Credits {
        self.account(account).available_at(self.now)
    }

    /// Opens `account` with code [`CODE`], owned by [`OWNER`].
    pub fn open(&mut self, account: &str, approval_mode: ApprovalMode) -> Ran {
        self.run(Command::AccountOpened(AccountOpened {
            account_id: id(account),
            name: Some("Team".to_owned()),
            owners: vec![Owner {
                email: email(OWNER),
                name: "Ann".to_owned(),
            }],
            approval_mode,
            code: Some(CODE.parse().expect("a code")),
            scope: None,
            low_balance_threshold: None,
            learner_limit: None,
            notes: None,
        }))
    }

    /// Buys `amount` credits for `account`, expiring in `days` days.
    pub fn buy(&mut self, account: &str, purchase: &str, amount: &str, days: i64) -> Ran {
        self.run(Command::PurchaseCompleted(PurchaseCompleted {
            account_id: id(account),
            purchase_id: id(purchase),
            credits: credits(amount),
            price_paid: None,
            channel: None,
            purchased_at: self.now,
            expires_at: Some(self.now.plus_days(days)),
        }))
    }

    /// Learner `learner` asks for item `item` with `code`.
    pub fn ask(&mut self, request: &str, code: &str, learner: &str, item: &str, cost: &str) -> Ran {
        self.run(Command::RedemptionRequested(RedemptionRequested {
            request_id: id(request),
            code: code.to_owned(),
            learner: Learner {
                id: id(learner),
                email: email(&format!("{learner}@example.com")),
                name: format!("Learner {learner}"),
            },
            item: Item {
                id: id(item),
                kind: ItemKind::Course,
                title: format!("Course {item}"),
                group_ids: Vec::new(),
            },
            cost: credits(cost),
            requested_at: self.now,
        }))
    }

    pub fn sweep(&mut self, account: &str) -> Ran {
        self.run(Command::Sweep {
            account_id: id(account),
        })
    }
}
