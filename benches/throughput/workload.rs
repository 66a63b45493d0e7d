//! The workload: inbound events in publishing order, written by a
//! simulation of the ledger so that every valid one applies, and what they
//! must produce.

use std::collections::{BTreeMap, HashSet};

use serde_json::{Value, json};

use crate::*;

#[derive(Clone, Debug)]
pub struct Message {
    pub id: String,
    pub routing_key: String,
    pub body: Vec<u8>,
}

/// Inbound messages in publishing order, and what they must produce.
#[derive(Default)]
pub struct Workload {
    pub messages: Vec<Message>,
    /// Ids of the messages that must each produce exactly one outbound event.
    pub expected: HashSet<String>,
    pub expected_types: BTreeMap<&'static str, usize>,
    pub inbound_types: BTreeMap<String, usize>,
    pub duplicates: usize,
    pub malformed: usize,
    /// Indices of valid messages (candidates for duplicates).
    pub valid: Vec<usize>,
}

pub struct Account {
    pub id: String,
    pub code: String,
    pub owner: String,
    pub manual: bool,
    pub available: i64,
    pub funded: bool,
}

pub struct Pending {
    pub request: String,
    pub account: usize,
    pub learner: String,
    pub cost: i64,
}

pub struct Spent {
    pub request: String,
    pub account: usize,
    pub cost: i64,
}

#[derive(Clone, Copy)]
pub enum Op {
    Open,
    Purchase,
    Automatic,
    Manual,
    Approve,
    Deny,
    Cancel,
    Unenroll,
    Duplicate,
    Malformed,
}

/// The mix of inbound events, in parts per 910.
pub const MIX: [(Op, usize); 10] = [
    (Op::Open, 20),
    (Op::Purchase, 100),
    (Op::Automatic, 380),
    (Op::Manual, 180),
    (Op::Approve, 110),
    (Op::Deny, 35),
    (Op::Cancel, 25),
    (Op::Unenroll, 45),
    (Op::Duplicate, 10),
    (Op::Malformed, 5),
];

/// Simulates the ledger while it writes messages, so that every valid
/// message applies (no refusal, no rejection, no `balance.low`: the accounts
/// have no threshold and always enough credits) and produces exactly one
/// outbound event.
pub struct Generator {
    pub rng: Rng,
    pub time: String,
    pub seq: u64,
    pub names: u64,
    pub accounts: Vec<Account>,
    pub unfunded: std::collections::VecDeque<usize>,
    pub pending: Vec<Pending>,
    pub spent: Vec<Spent>,
    pub opened: usize,
}

impl Generator {
    /// `accounts` pre-existing accounts `acct-0…`, 30 % of them in manual
    /// mode, each funded with one lot (see [`seed_sql`]).
    pub fn new(accounts: usize) -> Generator {
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        Generator {
            rng: Rng(0x5eed_2026),
            time,
            seq: 0,
            names: 0,
            accounts: (0..accounts)
                .map(|a| Account {
                    id: format!("acct-{a}"),
                    code: format!("BENCH-{a}"),
                    owner: format!("owner-{a}@example.com"),
                    manual: a % 10 < 3,
                    available: SEED_CREDITS_CENTS,
                    funded: true,
                })
                .collect(),
            unfunded: std::collections::VecDeque::new(),
            pending: Vec::new(),
            spent: Vec::new(),
            opened: 0,
        }
    }

    pub fn workload(&mut self, events: usize) -> Workload {
        let mut workload = Workload::default();
        let total: usize = MIX.iter().map(|(_, parts)| parts).sum();
        while workload.messages.len() < events {
            let mut pick = self.rng.index(total);
            let mut op = Op::Automatic;
            for (candidate, parts) in MIX {
                if pick < parts {
                    op = candidate;
                    break;
                }
                pick -= parts;
            }
            self.step(&mut workload, op);
        }
        workload
    }

    /// `count` automatic redemptions (or, where credits run short, purchases).
    pub fn steady(&mut self, count: usize) -> Workload {
        let mut workload = Workload::default();
        while workload.messages.len() < count {
            self.request(&mut workload, false);
        }
        workload
    }

    pub fn step(&mut self, w: &mut Workload, op: Op) {
        match op {
            Op::Open => self.open(w),
            Op::Purchase => self.purchase(w),
            Op::Automatic => self.request(w, false),
            Op::Manual => self.request(w, true),
            Op::Approve | Op::Deny | Op::Cancel if self.pending.is_empty() => {
                self.request(w, false)
            }
            Op::Approve => self.decide(w, true),
            Op::Deny => self.decide(w, false),
            Op::Cancel => self.cancel(w),
            Op::Unenroll if self.spent.is_empty() => self.request(w, false),
            Op::Unenroll => self.unenroll(w),
            Op::Duplicate if w.valid.is_empty() => self.request(w, false),
            Op::Duplicate => {
                let index = w.valid[self.rng.index(w.valid.len())];
                let copy = w.messages[index].clone();
                w.messages.push(copy);
                w.duplicates += 1;
            }
            Op::Malformed => self.malformed(w),
        }
    }

    pub fn name(&mut self, prefix: &str) -> String {
        self.names += 1;
        format!("{prefix}-{}", self.names)
    }

    pub fn emit(
        &mut self,
        w: &mut Workload,
        source: &str,
        type_name: &str,
        data: Value,
        outbound: &'static str,
    ) {
        self.seq += 1;
        let id = format!("bench-{}", self.seq);
        let event = json!({
            "specversion": "1.0",
            "id": id,
            "source": source,
            "type": type_name,
            "time": self.time,
            "datacontenttype": "application/json",
            "data": data,
        });
        w.valid.push(w.messages.len());
        w.messages.push(Message {
            id: id.clone(),
            routing_key: type_name.to_owned(),
            body: event.to_string().into_bytes(),
        });
        w.expected.insert(id);
        *w.expected_types.entry(outbound).or_default() += 1;
        *w.inbound_types.entry(type_name.to_owned()).or_default() += 1;
    }

    pub fn open(&mut self, w: &mut Workload) {
        let k = self.opened;
        self.opened += 1;
        let manual = self.rng.chance(30);
        let account = Account {
            id: format!("new-{k}"),
            code: format!("NEWACCT-{k}"),
            owner: format!("owner-new-{k}@example.com"),
            manual,
            available: 0,
            funded: false,
        };
        let data = json!({
            "account_id": account.id,
            "name": format!("New account {k}"),
            "owners": [{"email": account.owner, "name": format!("Owner of new account {k}")}],
            "approval_mode": if manual { "manual" } else { "automatic" },
            "code": account.code,
            "notes": "opened during the benchmark",
        });
        self.unfunded.push_back(self.accounts.len());
        self.accounts.push(account);
        self.emit(
            w,
            "portal",
            "credits.account.opened",
            data,
            "training-credits.account.opened",
        );
    }

    pub fn purchase(&mut self, w: &mut Workload) {
        let (index, credits) = match self.unfunded.pop_front() {
            Some(index) => (index, 5_000_000),
            None => loop {
                let index = self.rng.index(self.accounts.len());
                if self.accounts[index].funded {
                    break (index, (100 + self.rng.index(4_901) as i64) * 100);
                }
            },
        };
        let purchase_id = self.name("buy");
        let account = &mut self.accounts[index];
        account.available += credits;
        account.funded = true;
        let data = json!({
            "account_id": account.id,
            "purchase_id": purchase_id,
            "credits": cents(credits),
            "price_paid": {"amount": cents(credits), "currency": "USD"},
            "channel": "card",
            "purchased_at": self.time,
        });
        self.emit(
            w,
            "shop",
            "credits.purchase.completed",
            data,
            "training-credits.purchase.recorded",
        );
    }

    pub fn request(&mut self, w: &mut Workload, manual: bool) {
        let cost = 500 + self.rng.index(196) as i64 * 100;
        let mut chosen = None;
        for _ in 0..64 {
            let index = self.rng.index(self.accounts.len());
            let account = &self.accounts[index];
            if account.funded && account.manual == manual && account.available >= cost {
                chosen = Some(index);
                break;
            }
        }
        let Some(index) = chosen else {
            return self.purchase(w);
        };
        let learner_number = self.rng.index(WORKLOAD_LEARNERS);
        let learner = format!("learner-{learner_number}");
        let request = self.name("req");
        let item = self.name("course");
        let account = &mut self.accounts[index];
        account.available -= cost;
        let data = json!({
            "request_id": request,
            "code": account.code,
            "learner": {
                "id": learner,
                "email": format!("{learner}@learners.example"),
                "name": format!("Learner {learner_number}"),
            },
            "item": {"id": item, "kind": "course", "title": format!("Course {item}")},
            "cost": cents(cost),
            "requested_at": self.time,
        });
        if manual {
            self.pending.push(Pending {
                request,
                account: index,
                learner,
                cost,
            });
            self.emit(
                w,
                "lms",
                "credits.redemption.requested",
                data,
                "training-credits.redemption.pending",
            );
        } else {
            self.spent.push(Spent {
                request,
                account: index,
                cost,
            });
            self.emit(
                w,
                "lms",
                "credits.redemption.requested",
                data,
                "training-credits.redemption.approved",
            );
        }
    }

    pub fn decide(&mut self, w: &mut Workload, approve: bool) {
        let pending = self.pending.swap_remove(self.rng.index(self.pending.len()));
        let owner = self.accounts[pending.account].owner.clone();
        if approve {
            self.spent.push(Spent {
                request: pending.request.clone(),
                account: pending.account,
                cost: pending.cost,
            });
            self.emit(
                w,
                "portal",
                "credits.redemption.approved",
                json!({"request_id": pending.request, "approver": owner, "note": "approved for the team plan"}),
                "training-credits.redemption.approved",
            );
        } else {
            self.accounts[pending.account].available += pending.cost;
            self.emit(
                w,
                "portal",
                "credits.redemption.denied",
                json!({"request_id": pending.request, "approver": owner, "reason": "not in this quarter's plan"}),
                "training-credits.redemption.denied",
            );
        }
    }

    pub fn cancel(&mut self, w: &mut Workload) {
        let pending = self.pending.swap_remove(self.rng.index(self.pending.len()));
        self.accounts[pending.account].available += pending.cost;
        self.emit(
            w,
            "lms",
            "credits.redemption.cancelled",
            json!({"request_id": pending.request, "learner_id": pending.learner}),
            "training-credits.redemption.cancelled",
        );
    }

    pub fn unenroll(&mut self, w: &mut Workload) {
        let spent = self.spent.swap_remove(self.rng.index(self.spent.len()));
        self.accounts[spent.account].available += spent.cost;
        let time = self.time.clone();
        self.emit(
            w,
            "lms",
            "credits.enrollment.unenrolled",
            json!({"request_id": spent.request, "unenrolled_at": time, "reason": "changed course"}),
            "training-credits.redemption.refunded",
        );
    }

    /// One of four kinds of broken message, in turn: not JSON, an unknown
    /// type, a `data` that breaks its schema, an envelope without
    /// `specversion`. Each is dead-lettered and produces no outbound event.
    pub fn malformed(&mut self, w: &mut Workload) {
        self.seq += 1;
        let id = format!("bench-{}", self.seq);
        let time = &self.time;
        let (routing_key, body) = match w.malformed % 4 {
            0 => (
                "credits.purchase.completed",
                format!(
                    "{{\"specversion\":\"1.0\",\"id\":\"{id}\",\"source\":\"shop\",\"type\":\"credits.purchase.comp"
                ),
            ),
            1 => (
                "credits.bonus.granted",
                json!({"specversion": "1.0", "id": id, "source": "shop", "type": "credits.bonus.granted",
                       "time": time, "datacontenttype": "application/json", "data": {"account_id": "acct-1"}})
                .to_string(),
            ),
            2 => (
                "credits.purchase.completed",
                json!({"specversion": "1.0", "id": id, "source": "shop", "type": "credits.purchase.completed",
                       "time": time, "datacontenttype": "application/json",
                       "data": {"account_id": "acct-1", "purchase_id": "broken", "credits": "a lot", "purchased_at": time}})
                .to_string(),
            ),
            _ => (
                "credits.redemption.requested",
                json!({"id": id, "source": "lms", "type": "credits.redemption.requested", "data": {}})
                    .to_string(),
            ),
        };
        w.malformed += 1;
        w.messages.push(Message {
            id,
            routing_key: routing_key.to_owned(),
            body: body.into_bytes(),
        });
    }
}
