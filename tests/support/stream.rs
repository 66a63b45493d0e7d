//! A stream of mixed inbound events for the fault tests (crash, broker
//! faults), built from a seed, with what it must produce worked out by a
//! model of its own: plain sums of cents per account, not the crate's rules.
//!
//! The stream comes in two parts. The setup opens the accounts that
//! learners redeem from (automatic and manual), each funded by one purchase,
//! and is applied before anything goes wrong. The stream proper buys more
//! credits, opens accounts that only buy, redeems at once (automatic mode)
//! or asks an owner (manual mode), approves, denies, cancels, unenrolls
//! within the refund window, tries codes that do not exist and costs no
//! account could ever pay, and sends some events a second time.
//!
//! What each event does must not depend on the order the worker applies
//! them in: the broker redelivers what a lost connection held, and when it
//! notices the loss only after the worker has reconnected (a half-open
//! connection, found by heartbeats) those messages are applied after later
//! ones, as they are with several workers on one queue. So requests spend
//! only the setup's funding (what denials, cancellations and refunds give
//! back is never counted on), only accounts of the setup are redeemed from,
//! and only requests approved at once are unenrolled (an unenrollment that
//! overtakes an owner's approval cancels the request instead). What does
//! depend on order — a decision or an unenrollment that overtakes its
//! request — is retried by the worker until its request is there.
//!
//! The checks that go with it ([`Stream::check_outbound`],
//! [`Stream::check_emails`], [`Stream::check_balances`]) define "lost" and
//! "doubled" for every fault test the same way:
//!
//! - an outbound event is identified by its cause: the inbound event id
//!   (`causation_id`), its `type`, its `subject` and the request or purchase
//!   it is about. Each expected cause must arrive, under exactly one CloudEvent
//!   `id`; the same `id` may arrive more than once (at-least-once delivery, a
//!   publish cut short before its confirm) but always with the same body, and
//!   consumers drop the repeats by `id`. Two ids for one cause, or a cause
//!   nobody expected, is a doubled event.
//! - an email is identified by its recipient, its subject and the purchase
//!   it names; each expected one must arrive under exactly one `Message-ID`;
//!   the same `Message-ID` received again is a repeat, which only a crash at
//!   the moment of sending may cause (SPEC §5), and the caller bounds them.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use training_credits::domain::Ts;
use training_credits::store::{Store, ToLoad};

/// A deterministic pseudo-random sequence (SplitMix64), so that a seed
/// printed by a failing test replays the same run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// An index in `0..n` (of a slice of `n`).
    pub fn index(&mut self, n: usize) -> usize {
        let n = u64::try_from(n).expect("a length fits in 64 bits");
        usize::try_from(self.below(n)).expect("below a length")
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A seed from `variable` if set (decimal or 0x-hex), else from the clock.
pub fn seed_from_env(variable: &str) -> u64 {
    match std::env::var(variable) {
        Ok(text) => {
            let text = text.trim();
            let parsed = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{variable}={text} is not a number"))
        }
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_nanos() as u64,
    }
}

/// A count from `variable` if set, else `default`.
pub fn count_from_env(variable: &str, default: usize) -> usize {
    match std::env::var(variable) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{variable}={text} is not a count")),
        Err(_) => default,
    }
}

/// What one account must show at the end, in cents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expected {
    pub balance: i64,
    pub held: i64,
    pub available: i64,
}

/// The stream and everything it must produce.
pub struct Stream {
    /// The inbound events to apply before any fault: the accounts learners
    /// redeem from, each with its funding.
    pub setup: Vec<Value>,
    /// The inbound events in publishing order, repeats included.
    pub events: Vec<Value>,
    /// Causes of the outbound events it must produce, each once.
    pub outbound: BTreeSet<Cause>,
    /// The emails it must produce, each once.
    pub emails: BTreeSet<MailCause>,
    /// The end state of every account it opens.
    pub accounts: BTreeMap<String, Expected>,
    /// How many events of each kind it holds, for the test's report.
    pub kinds: BTreeMap<&'static str, usize>,
}

/// What an outbound event is about: `causation_id`, `type`, `subject`, and
/// the request or purchase named in its `data`.
pub type Cause = (String, String, String, String);

/// What an email is about: recipient, subject, and the purchase it names.
pub type MailCause = (String, String, String);

/// The cause of a captured outbound event.
pub fn cause_of(event: &Value) -> Cause {
    let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
    let data = &event["data"];
    let about = if data["request_id"].is_string() {
        text(&data["request_id"])
    } else {
        text(&data["purchase_id"])
    };
    (
        text(&data["causation_id"]),
        text(&event["type"]),
        text(&event["subject"]),
        about,
    )
}

/// The cause of a received email.
pub fn mail_cause_of(mail: &super::broker::Mail) -> MailCause {
    (
        mail.to.clone(),
        mail.subject.clone(),
        purchase_named_in(&mail.text),
    )
}

/// The purchase id in "… (purchase ID) …", or "".
fn purchase_named_in(text: &str) -> String {
    text.split_once("(purchase ")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(id, _)| id.to_owned())
        .unwrap_or_default()
}

/// What the outbound check found.
#[derive(Debug, Default)]
pub struct OutboundFigures {
    /// Distinct causes (= distinct event ids).
    pub events: usize,
    /// Deliveries of an id already received.
    pub repeats: usize,
}

/// What the email check found.
#[derive(Debug, Default)]
pub struct MailFigures {
    pub emails: usize,
    /// Sends of a `Message-ID` already received.
    pub repeats: usize,
}

struct Account {
    id: String,
    name: String,
    code: String,
    owner: String,
    manual: bool,
    /// Whether learners redeem from it (opened by the setup).
    redeemable: bool,
    /// Cents of the setup's funding not yet spent by any request, whatever
    /// became of it: what a request may still count on in any order.
    budget: i64,
    /// Cents that can be spent now.
    available: i64,
    /// Cents held by pending requests.
    held: i64,
}

struct Request {
    request_id: String,
    account: usize,
    learner: String,
    learner_email: String,
    cost: i64,
    title: String,
}

/// Kinds of inbound event, with their share of the stream in parts per
/// thousand.
const MIX: [(&str, u64); 11] = [
    ("open", 15),
    ("purchase", 125),
    ("automatic", 340),
    ("manual", 175),
    ("approve", 110),
    ("deny", 40),
    ("cancel", 30),
    ("unenroll", 60),
    ("invalid_code", 15),
    ("insufficient", 15),
    ("duplicate", 75),
];

/// No account ever buys this much in a stream: a request of this cost is
/// rejected `insufficient_balance` wherever it falls.
const UNAFFORDABLE_CENTS: i64 = 100_000_000;
/// The setup's funding of each account learners redeem from.
const FUNDING_CENTS: i64 = 2_000_000;
/// Credits per purchase, in cents.
const PURCHASE_CENTS: (u64, u64) = (5_000, 200_000);
/// Cost per request, in cents.
const COST_CENTS: (u64, u64) = (500, 15_000);

pub fn cents(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

struct Builder {
    rng: Rng,
    prefix: String,
    now: Ts,
    seq: u64,
    accounts: Vec<Account>,
    pending: Vec<Request>,
    /// Requests approved at once (automatic mode): those may be unenrolled.
    approved: Vec<Request>,
    accounts_max: usize,
    /// Whether the setup is being written.
    setting_up: bool,
    stream: Stream,
}

impl Stream {
    /// A setup and a stream of `count` events (at least 20) from `seed`;
    /// event ids begin with `prefix`.
    pub fn mixed(seed: u64, count: usize, prefix: &str) -> Stream {
        assert!(count >= 20, "a stream of at least 20 events");
        let mut builder = Builder {
            rng: Rng(seed),
            prefix: prefix.to_owned(),
            now: Ts::now(),
            seq: 0,
            accounts: Vec::new(),
            pending: Vec::new(),
            approved: Vec::new(),
            accounts_max: (count / 50).max(8),
            setting_up: true,
            stream: Stream {
                setup: Vec::new(),
                events: Vec::with_capacity(count),
                outbound: BTreeSet::new(),
                emails: BTreeSet::new(),
                accounts: BTreeMap::new(),
                kinds: BTreeMap::new(),
            },
        };
        // The accounts learners redeem from, about 60 % automatic, funded.
        for k in 0..(count / 100).max(6) {
            builder.open(k % 5 >= 3, true);
            builder.purchase_of(builder.accounts.len() - 1, FUNDING_CENTS);
        }
        builder.stream.setup = std::mem::take(&mut builder.stream.events);
        builder.setting_up = false;
        let total: u64 = MIX.iter().map(|(_, parts)| parts).sum();
        while builder.stream.events.len() < count {
            let mut pick = builder.rng.below(total);
            let mut kind = "automatic";
            for (candidate, parts) in MIX {
                if pick < parts {
                    kind = candidate;
                    break;
                }
                pick -= parts;
            }
            builder.step(kind);
        }
        for account in &builder.accounts {
            builder.stream.accounts.insert(
                account.id.clone(),
                Expected {
                    balance: account.available + account.held,
                    held: account.held,
                    available: account.available,
                },
            );
        }
        builder.stream
    }

    /// Checks the outbound events captured (every delivery, repeats
    /// included) against what the stream must produce; panics on anything
    /// lost or doubled (see the module's definition).
    pub fn check_outbound(&self, captured: &[Value]) -> OutboundFigures {
        let mut ids_by_cause: BTreeMap<Cause, BTreeSet<String>> = BTreeMap::new();
        let mut bodies: BTreeMap<String, &Value> = BTreeMap::new();
        let mut repeats = 0;
        for event in captured {
            let id = event["id"]
                .as_str()
                .unwrap_or_else(|| panic!("an outbound event without an id: {event}"))
                .to_owned();
            match bodies.get(&id) {
                Some(first) => {
                    assert_eq!(
                        *first, event,
                        "the event id {id} was delivered with two different bodies"
                    );
                    repeats += 1;
                }
                None => {
                    bodies.insert(id.clone(), event);
                }
            }
            ids_by_cause.entry(cause_of(event)).or_default().insert(id);
        }
        assert_each_once(
            &ids_by_cause,
            &self.outbound,
            "causes produced several events",
            "outbound events",
        );
        OutboundFigures {
            events: bodies.len(),
            repeats,
        }
    }

    /// Checks the emails received (every send, repeats included) against
    /// what the stream must produce; panics on anything lost or doubled.
    pub fn check_emails(&self, received: &[super::broker::Mail]) -> MailFigures {
        let mut ids_by_cause: BTreeMap<MailCause, BTreeSet<String>> = BTreeMap::new();
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut repeats = 0;
        for mail in received {
            assert!(!mail.message_id.is_empty(), "an email without a Message-ID");
            if !seen.insert(&mail.message_id) {
                repeats += 1;
            }
            ids_by_cause
                .entry(mail_cause_of(mail))
                .or_default()
                .insert(mail.message_id.clone());
        }
        assert_each_once(
            &ids_by_cause,
            &self.emails,
            "emails were produced under several Message-IDs",
            "emails",
        );
        MailFigures {
            emails: seen.len(),
            repeats,
        }
    }

    /// Checks every account's balance, held and available, as the ledger
    /// keeps them, against the model's sums.
    pub async fn check_balances<S: Store>(&self, store: &S) {
        let wanted = ToLoad {
            account_ids: self
                .accounts
                .keys()
                .map(|id| id.parse().expect("an account id"))
                .collect(),
            ..ToLoad::default()
        };
        let ledger = store.snapshot(&wanted).await.expect("a snapshot");
        let now = Ts::now();
        let mut wrong = Vec::new();
        for (id, expected) in &self.accounts {
            let key: training_credits::domain::Id = id.parse().expect("an account id");
            let Some(account) = ledger.accounts.get(&key) else {
                wrong.push(format!("{id}: missing"));
                continue;
            };
            let shown = account.balances_at(now);
            let actual = (
                shown.balance.to_string(),
                shown.held.to_string(),
                shown.available.to_string(),
            );
            let wanted = (
                cents(expected.balance),
                cents(expected.held),
                cents(expected.available),
            );
            if actual != wanted {
                wrong.push(format!(
                    "{id}: (balance, held, available) is {actual:?}, the events give {wanted:?}"
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} of {} accounts are wrong:\n{}",
            wrong.len(),
            self.accounts.len(),
            wrong.join("\n")
        );
    }

    /// Publishes the setup and waits until a worker has applied all of it.
    pub async fn apply_setup(&self, client: &super::broker::Client, vhost: &super::broker::Vhost) {
        for window in self.setup.chunks(100) {
            super::broker::publish_confirmed(&client.channel, window).await;
        }
        super::broker::eventually(
            std::time::Duration::from_secs(60),
            "the setup to be applied",
            || async {
                vhost.queue_messages(training_credits::broker::topology::WORKER_QUEUE) == Some(0)
            },
        )
        .await;
    }

    /// The `account_id`s the stream opens.
    pub fn account_ids(&self) -> Vec<String> {
        self.accounts.keys().cloned().collect()
    }
}

impl Builder {
    fn step(&mut self, kind: &'static str) {
        match kind {
            "open" if self.accounts.len() < self.accounts_max => {
                let manual = self.rng.chance(40);
                self.open(manual, false);
            }
            "open" | "purchase" => self.purchase(),
            "automatic" => self.request(false),
            "manual" => self.request(true),
            "approve" | "deny" | "cancel" if self.pending.is_empty() => self.request(true),
            "approve" => self.decide(true),
            "deny" => self.decide(false),
            "cancel" => self.cancel(),
            "unenroll" if self.approved.is_empty() => self.request(false),
            "unenroll" => self.unenroll(),
            "invalid_code" => self.invalid_code(),
            "insufficient" => self.insufficient(),
            "duplicate" => self.duplicate(),
            other => unreachable!("no kind {other}"),
        }
    }

    fn count(&mut self, kind: &'static str) {
        *self.stream.kinds.entry(kind).or_default() += 1;
    }

    /// Appends one inbound event and returns its id.
    fn emit(&mut self, source: &str, type_name: &str, data: Value) -> String {
        self.seq += 1;
        let id = format!("{}-{}", self.prefix, self.seq);
        self.stream.events.push(json!({
            "specversion": "1.0",
            "id": id,
            "source": source,
            "type": type_name,
            "time": self.now,
            "datacontenttype": "application/json",
            "data": data,
        }));
        id
    }

    fn expect(&mut self, cause: &str, type_name: &str, account: Option<usize>, about: &str) {
        let subject = account.map_or(String::new(), |a| self.accounts[a].id.clone());
        let inserted = self.stream.outbound.insert((
            cause.to_owned(),
            format!("training-credits.{type_name}"),
            subject,
            about.to_owned(),
        ));
        assert!(inserted, "one outbound event per cause and type");
    }

    fn expect_email(&mut self, to: &str, subject: String, purchase: &str) {
        let inserted = self
            .stream
            .emails
            .insert((to.to_owned(), subject, purchase.to_owned()));
        assert!(inserted, "one email per cause");
    }

    fn open(&mut self, manual: bool, redeemable: bool) {
        self.count("open");
        let k = self.accounts.len();
        let account = Account {
            id: format!("acct-{k}"),
            name: format!("Team {k}"),
            code: format!("CODE-{k}-{}", self.rng.below(1_000_000)),
            owner: format!("owner-{k}@teams.test"),
            manual,
            redeemable,
            budget: 0,
            available: 0,
            held: 0,
        };
        let data = json!({
            "account_id": account.id,
            "name": account.name,
            "owners": [{"email": account.owner, "name": format!("Owner {k}")}],
            "approval_mode": if manual { "manual" } else { "automatic" },
            "code": account.code,
        });
        self.accounts.push(account);
        let id = self.emit("portal", "credits.account.opened", data);
        self.expect(&id, "account.opened", Some(k), "");
    }

    /// A purchase on a random account.
    fn purchase(&mut self) {
        let index = self.rng.below(self.accounts.len() as u64) as usize;
        let credits = self.rng.between(PURCHASE_CENTS.0, PURCHASE_CENTS.1) as i64;
        self.purchase_of(index, credits);
    }

    /// A purchase of `credits` cents on `index`; the setup's counts as the
    /// account's budget.
    fn purchase_of(&mut self, index: usize, credits: i64) {
        self.count("purchase");
        let purchase_id = format!("buy-{}", self.seq + 1);
        let setting_up = self.setting_up;
        let account = &mut self.accounts[index];
        account.available += credits;
        if setting_up {
            account.budget += credits;
        }
        let (account_id, owner, name) = (
            account.id.clone(),
            account.owner.clone(),
            account.name.clone(),
        );
        let id = self.emit(
            "shop",
            "credits.purchase.completed",
            json!({
                "account_id": account_id,
                "purchase_id": purchase_id,
                "credits": cents(credits),
                "price_paid": {"amount": cents(credits), "currency": "USD"},
                "channel": "card",
                "purchased_at": self.now,
            }),
        );
        self.expect(&id, "purchase.recorded", Some(index), &purchase_id);
        self.expect_email(
            &owner,
            format!("{} training credits added to {name}", cents(credits)),
            &purchase_id,
        );
    }

    fn learner(&mut self) -> (String, String, String) {
        let n = self.rng.below(400);
        (
            format!("learner-{n}"),
            format!("learner-{n}@learners.test"),
            format!("Learner {n}"),
        )
    }

    fn request_data(&self, request: &Request, code: &str, learner_name: &str) -> Value {
        json!({
            "request_id": request.request_id,
            "code": code,
            "learner": {"id": request.learner, "email": request.learner_email, "name": learner_name},
            "item": {"id": format!("item-{}", request.request_id), "kind": "course", "title": request.title},
            "cost": cents(request.cost),
            "requested_at": self.now,
        })
    }

    /// A redemption the account can pay, in any order: approved at once in
    /// automatic mode, held for an owner in manual mode.
    fn request(&mut self, manual: bool) {
        let cost = self.rng.between(COST_CENTS.0, COST_CENTS.1) as i64;
        let candidates: Vec<usize> = (0..self.accounts.len())
            .filter(|&a| {
                let account = &self.accounts[a];
                account.redeemable && account.manual == manual && account.budget >= cost
            })
            .collect();
        if candidates.is_empty() {
            return self.purchase();
        }
        let index = candidates[self.rng.below(candidates.len() as u64) as usize];
        self.count(if manual { "manual" } else { "automatic" });
        let (learner, learner_email, learner_name) = self.learner();
        let request_id = format!("req-{}", self.seq + 1);
        let request = Request {
            title: format!("Course for {request_id}"),
            request_id,
            account: index,
            learner,
            learner_email,
            cost,
        };
        let code = self.accounts[index].code.clone();
        let data = self.request_data(&request, &code, &learner_name);
        let id = self.emit("lms", "credits.redemption.requested", data);
        let account = &mut self.accounts[index];
        account.available -= cost;
        account.budget -= cost;
        if manual {
            account.held += cost;
            let owner = account.owner.clone();
            self.expect(&id, "redemption.pending", Some(index), &request.request_id);
            self.expect_email(
                &owner,
                format!("Approval needed: {learner_name} asks for {}", request.title),
                "",
            );
            self.pending.push(request);
        } else {
            self.expect(&id, "redemption.approved", Some(index), &request.request_id);
            self.expect_email(
                &request.learner_email,
                format!("Approved: {}", request.title),
                "",
            );
            self.approved.push(request);
        }
    }

    fn take_pending(&mut self) -> Request {
        let at = self.rng.below(self.pending.len() as u64) as usize;
        self.pending.swap_remove(at)
    }

    fn decide(&mut self, approve: bool) {
        self.count(if approve { "approve" } else { "deny" });
        let request = self.take_pending();
        let account = &mut self.accounts[request.account];
        account.held -= request.cost;
        let approver = account.owner.clone();
        if approve {
            let id = self.emit(
                "portal",
                "credits.redemption.approved",
                json!({"request_id": request.request_id, "approver": approver}),
            );
            self.expect(
                &id,
                "redemption.approved",
                Some(request.account),
                &request.request_id,
            );
            self.expect_email(
                &request.learner_email,
                format!("Approved: {}", request.title),
                "",
            );
        } else {
            account.available += request.cost;
            let id = self.emit(
                "portal",
                "credits.redemption.denied",
                json!({"request_id": request.request_id, "approver": approver, "reason": "not this quarter"}),
            );
            self.expect(
                &id,
                "redemption.denied",
                Some(request.account),
                &request.request_id,
            );
            self.expect_email(
                &request.learner_email,
                format!("Not approved: {}", request.title),
                "",
            );
        }
    }

    fn cancel(&mut self) {
        self.count("cancel");
        let request = self.take_pending();
        let account = &mut self.accounts[request.account];
        account.held -= request.cost;
        account.available += request.cost;
        let id = self.emit(
            "lms",
            "credits.redemption.cancelled",
            json!({"request_id": request.request_id, "learner_id": request.learner}),
        );
        self.expect(
            &id,
            "redemption.cancelled",
            Some(request.account),
            &request.request_id,
        );
    }

    /// An unenrollment of a request approved at once, within the refund
    /// window: the whole cost comes back.
    fn unenroll(&mut self) {
        self.count("unenroll");
        let at = self.rng.below(self.approved.len() as u64) as usize;
        let request = self.approved.swap_remove(at);
        self.accounts[request.account].available += request.cost;
        let id = self.emit(
            "lms",
            "credits.enrollment.unenrolled",
            json!({"request_id": request.request_id, "unenrolled_at": self.now, "reason": "changed course"}),
        );
        self.expect(
            &id,
            "redemption.refunded",
            Some(request.account),
            &request.request_id,
        );
    }

    /// A code no account has, by a learner of its own (so that no learner
    /// reaches `too_many_attempts`): rejected `invalid_code`.
    fn invalid_code(&mut self) {
        self.count("invalid_code");
        let n = self.seq + 1;
        let request = Request {
            request_id: format!("req-{n}"),
            account: 0,
            learner: format!("stranger-{n}"),
            learner_email: format!("stranger-{n}@learners.test"),
            cost: 1_000,
            title: format!("Course for req-{n}"),
        };
        let data = self.request_data(&request, &format!("NO-SUCH-CODE-{n}"), "A Stranger");
        let id = self.emit("lms", "credits.redemption.requested", data);
        self.expect(&id, "redemption.rejected", None, &request.request_id);
        self.expect_email(
            &request.learner_email,
            format!("Request not accepted: {}", request.title),
            "",
        );
    }

    /// A cost beyond anything the account ever bought: rejected
    /// `insufficient_balance`, in either mode.
    fn insufficient(&mut self) {
        self.count("insufficient");
        let redeemable: Vec<usize> = (0..self.accounts.len())
            .filter(|&a| self.accounts[a].redeemable)
            .collect();
        let index = redeemable[self.rng.below(redeemable.len() as u64) as usize];
        let (learner, learner_email, learner_name) = self.learner();
        let n = self.seq + 1;
        let request = Request {
            request_id: format!("req-{n}"),
            account: index,
            learner,
            learner_email,
            cost: UNAFFORDABLE_CENTS,
            title: format!("Course for req-{n}"),
        };
        let code = self.accounts[index].code.clone();
        let data = self.request_data(&request, &code, &learner_name);
        let id = self.emit("lms", "credits.redemption.requested", data);
        self.expect(&id, "redemption.rejected", Some(index), &request.request_id);
        self.expect_email(
            &request.learner_email,
            format!("Request not accepted: {}", request.title),
            "",
        );
    }

    /// An event sent again, whole (one of the setup's or of the stream's):
    /// acknowledged, changing nothing.
    fn duplicate(&mut self) {
        self.count("duplicate");
        let (setup, events) = (self.stream.setup.len(), self.stream.events.len());
        let at = self.rng.below((setup + events) as u64) as usize;
        let copy = if at < setup {
            self.stream.setup[at].clone()
        } else {
            self.stream.events[at - setup].clone()
        };
        self.stream.events.push(copy);
    }
}

/// Asserts that no cause came under several ids (`doubled` says what that
/// is) and that the causes that came are exactly the `expected` ones
/// (`what` names them).
fn assert_each_once<C: Ord + Clone + std::fmt::Debug>(
    ids_by_cause: &BTreeMap<C, BTreeSet<String>>,
    expected: &BTreeSet<C>,
    doubled_are: &str,
    what: &str,
) {
    let doubled: Vec<_> = ids_by_cause
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .collect();
    assert!(
        doubled.is_empty(),
        "{} {doubled_are}: {:?}",
        doubled.len(),
        &doubled[..doubled.len().min(10)]
    );
    let produced: BTreeSet<C> = ids_by_cause.keys().cloned().collect();
    let lost: Vec<_> = expected.difference(&produced).collect();
    let unexpected: Vec<_> = produced.difference(expected).collect();
    assert!(
        lost.is_empty() && unexpected.is_empty(),
        "{} expected {what} never arrived, e.g. {:?}; {} arrived unexpected, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)],
        unexpected.len(),
        &unexpected[..unexpected.len().min(10)],
    );
}
