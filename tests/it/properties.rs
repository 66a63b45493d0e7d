//! Properties of the ledger over random histories, on both backends:
//!
//! - after every step the invariants of SPEC §6 hold, checked here
//!   independently of the code under test, and `verify` agrees;
//! - delivering every message twice, in batches of any size, leaves the same
//!   ledger and the same outbox as delivering each once.

use crate::support as common;

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{Value, json};
use training_credits::apply::Input;
use training_credits::decode::decode;
use training_credits::domain::model::{AccountStatus, RedemptionStatus};
use training_credits::domain::{Credits, Ts};
use training_credits::store::{Store, ToLoad};

use common::{World, id};

const ACCOUNTS: usize = 3;
const REQUESTS: usize = 12;

#[derive(Clone, Debug)]
enum Op {
    Open {
        account: usize,
        manual: bool,
        threshold: Option<u32>,
        limit: Option<u32>,
    },
    /// Sets (or lifts) the account's learner limit.
    Limit {
        account: usize,
        limit: Option<u32>,
    },
    RefundPurchase {
        account: usize,
        lot: usize,
        refund: usize,
        credits: Option<u32>,
    },
    Purchase {
        account: usize,
        lot: usize,
        credits: u32,
        days: i64,
    },
    Request {
        request: usize,
        account: usize,
        learner: usize,
        item: usize,
        cost: u32,
    },
    Approve {
        request: usize,
        stranger: bool,
    },
    Deny {
        request: usize,
    },
    Cancel {
        request: usize,
        other_learner: bool,
    },
    Unenroll {
        request: usize,
    },
    Extend {
        account: usize,
        lot: usize,
        days: i64,
    },
    Close {
        account: usize,
    },
    Advance {
        days: i64,
    },
    Sweep,
    /// Delivers an earlier message again.
    Redeliver {
        back: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let account = 0..ACCOUNTS;
    let request = 0..REQUESTS;
    prop_oneof![
        2 => (account.clone(), any::<bool>(), proptest::option::of(1..300_u32), proptest::option::of(1..40_000_u32))
            .prop_map(|(account, manual, threshold, limit)| Op::Open { account, manual, threshold, limit }),
        1 => (account.clone(), proptest::option::of(1..40_000_u32))
            .prop_map(|(account, limit)| Op::Limit { account, limit }),
        1 => (account.clone(), 0..4_usize, 0..4_usize, proptest::option::of(1..50_000_u32))
            .prop_map(|(account, lot, refund, credits)| Op::RefundPurchase { account, lot, refund, credits }),
        3 => (account.clone(), 0..4_usize, 1..50_000_u32, 1..400_i64)
            .prop_map(|(account, lot, credits, days)| Op::Purchase { account, lot, credits, days }),
        5 => (request.clone(), account.clone(), 0..4_usize, 0..3_usize, 1..20_000_u32)
            .prop_map(|(request, account, learner, item, cost)| Op::Request { request, account, learner, item, cost }),
        3 => (request.clone(), prop::bool::weighted(0.1)).prop_map(|(request, stranger)| Op::Approve { request, stranger }),
        1 => request.clone().prop_map(|request| Op::Deny { request }),
        1 => (request.clone(), prop::bool::weighted(0.2)).prop_map(|(request, other_learner)| Op::Cancel { request, other_learner }),
        2 => request.prop_map(|request| Op::Unenroll { request }),
        1 => (account.clone(), 0..4_usize, -30..400_i64).prop_map(|(account, lot, days)| Op::Extend { account, lot, days }),
        1 => account.prop_map(|account| Op::Close { account }),
        2 => (0..120_i64).prop_map(|days| Op::Advance { days }),
        1 => Just(Op::Sweep),
        2 => (1..10_usize).prop_map(|back| Op::Redeliver { back }),
    ]
}

fn owner(account: usize) -> String {
    format!("owner{account}@org.test")
}

fn code(account: usize) -> String {
    format!("CODE-{account}000")
}

/// One step of a history: a message, a sweep, or the clock moving.
#[derive(Clone, Debug)]
enum Step {
    Message(Value),
    Sweep,
    Advance(i64),
}

/// Turns operations into concrete steps with deterministic event ids.
fn script(ops: &[Op], start: Ts) -> Vec<Step> {
    let mut now = start;
    let mut messages: Vec<Value> = Vec::new();
    let mut steps = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let event = |source: &str, type_name: &str, data: Value| {
            json!({
                "specversion": "1.0", "id": format!("op-{i}"), "source": source,
                "type": type_name, "data": data,
            })
        };
        let learner = |n: usize| json!({"id": format!("l{n}"), "email": format!("l{n}@x.test"), "name": format!("L {n}")});
        let message = match op {
            Op::Open {
                account,
                manual,
                threshold,
                limit,
            } => {
                let mut data = json!({
                    "account_id": format!("a{account}"),
                    "owners": [{"email": owner(*account), "name": "O"}],
                    "approval_mode": if *manual { "manual" } else { "automatic" },
                    "code": code(*account),
                });
                if let Some(t) = threshold {
                    data["low_balance_threshold"] = json!(t.to_string());
                }
                if let Some(limit) = limit {
                    data["learner_limit"] = json!(Credits::from_cents(i64::from(*limit)));
                }
                Some(event("portal", "credits.account.opened", data))
            }
            Op::Limit { account, limit } => Some(event(
                "portal",
                "credits.account.updated",
                json!({
                    "account_id": format!("a{account}"), "actor": owner(*account),
                    "learner_limit": limit.map(|l| Credits::from_cents(i64::from(l))),
                }),
            )),
            Op::RefundPurchase {
                account,
                lot,
                refund,
                credits,
            } => {
                let mut data = json!({
                    "account_id": format!("a{account}"), "purchase_id": format!("p{account}-{lot}"),
                    "refund_id": format!("rf{refund}"), "refunded_at": now,
                });
                if let Some(credits) = credits {
                    data["credits"] = json!(Credits::from_cents(i64::from(*credits)));
                }
                Some(event("shop", "credits.purchase.refunded", data))
            }
            Op::Purchase {
                account,
                lot,
                credits,
                days,
            } => Some(event(
                "shop",
                "credits.purchase.completed",
                json!({
                    "account_id": format!("a{account}"), "purchase_id": format!("p{account}-{lot}"),
                    "credits": Credits::from_cents(i64::from(*credits)), "purchased_at": now,
                    "expires_at": now.plus_days(*days),
                }),
            )),
            Op::Request {
                request,
                account,
                learner: l,
                item,
                cost,
            } => Some(event(
                "lms",
                "credits.redemption.requested",
                json!({
                    "request_id": format!("r{request}"), "code": code(*account), "learner": learner(*l),
                    "item": {"id": format!("i{item}"), "kind": "course", "title": "T"},
                    "cost": Credits::from_cents(i64::from(*cost)), "requested_at": now,
                }),
            )),
            Op::Approve { request, stranger } => Some(event(
                "portal",
                "credits.redemption.approved",
                json!({"request_id": format!("r{request}"), "approver": if *stranger { "stranger@x.test".to_owned() } else { owner(0) }}),
            )),
            Op::Deny { request } => Some(event(
                "admin",
                "credits.redemption.denied",
                json!({"request_id": format!("r{request}"), "approver": "staff@x.test"}),
            )),
            Op::Cancel {
                request,
                other_learner,
            } => Some(event(
                "lms",
                "credits.redemption.cancelled",
                json!({"request_id": format!("r{request}"), "learner_id": if *other_learner { "nobody" } else { "l0" }}),
            )),
            Op::Unenroll { request } => Some(event(
                "lms",
                "credits.enrollment.unenrolled",
                json!({"request_id": format!("r{request}"), "unenrolled_at": now}),
            )),
            Op::Extend { account, lot, days } => Some(event(
                "admin",
                "credits.lot.extended",
                json!({
                    "account_id": format!("a{account}"), "purchase_id": format!("p{account}-{lot}"),
                    "expires_at": now.plus_days(*days), "actor": "staff@x.test",
                }),
            )),
            Op::Close { account } => Some(event(
                "admin",
                "credits.account.closed",
                json!({"account_id": format!("a{account}"), "actor": "staff@x.test"}),
            )),
            Op::Advance { days } => {
                now = now.plus_days(*days);
                steps.push(Step::Advance(*days));
                None
            }
            Op::Sweep => {
                steps.push(Step::Sweep);
                None
            }
            Op::Redeliver { back } => messages
                .len()
                .checked_sub(*back)
                .map(|i| messages[i].clone()),
        };
        if let Some(message) = message {
            messages.push(message.clone());
            steps.push(Step::Message(message));
        }
    }
    steps
}

/// Checks SPEC §6 on everything the history could have touched, by its own
/// arithmetic, and that `verify` agrees.
async fn check_invariants<S: Store>(w: &World<S>) {
    let ledger = w.store().snapshot(&everything()).await.expect("a snapshot");
    for account in ledger.accounts.values() {
        let balances = account.balances_at(w.now);
        assert!(balances.balance >= Credits::ZERO && balances.held >= Credits::ZERO);
        assert!(
            balances.available >= Credits::ZERO,
            "{} overdrawn",
            account.id
        );
        let mut pending_holds: BTreeMap<String, Credits> = BTreeMap::new();
        let mut spent = Credits::ZERO;
        for request in ledger
            .requests
            .values()
            .filter(|r| r.account_id.as_ref() == Some(&account.id))
        {
            let allocated = request.allocated();
            match request.status {
                RedemptionStatus::Pending => {
                    assert_eq!(allocated, request.cost, "no partial hold");
                    for a in &request.allocations {
                        *pending_holds.entry(a.purchase_id.to_string()).or_default() += a.amount;
                    }
                }
                RedemptionStatus::Approved | RedemptionStatus::Unenrolled => {
                    assert_eq!(allocated, request.cost, "no partial payment");
                    spent += request.cost;
                }
                RedemptionStatus::Refunded => assert_eq!(request.refunded, request.cost),
                _ => {}
            }
        }
        let mut purchased = Credits::ZERO;
        let mut left = Credits::ZERO;
        let mut expired = Credits::ZERO;
        let mut refunded = Credits::ZERO;
        for lot in &account.lots {
            assert!(
                lot.refunded <= lot.credits,
                "lot {lot:?} refunded more than bought"
            );
            assert!(lot.is_consistent(), "lot {:?}", lot);
            assert_eq!(
                lot.held,
                pending_holds
                    .get(lot.purchase_id.as_str())
                    .copied()
                    .unwrap_or_default()
            );
            purchased += lot.credits;
            left += lot.remaining;
            expired += lot.expired;
            refunded += lot.refunded;
        }
        if account.status == AccountStatus::Closed {
            assert_eq!(left, Credits::ZERO, "a closed account keeps nothing");
        } else {
            // Conservation: what was bought is still there, was spent,
            // expired or taken back by a purchase refund.
            assert_eq!(
                purchased,
                left + spent + expired + refunded,
                "credits of {} leaked",
                account.id
            );
        }
    }
    w.verify_ok().await;
}

fn everything() -> ToLoad {
    ToLoad {
        account_ids: (0..ACCOUNTS).map(|a| id(&format!("a{a}"))).collect(),
        request_ids: (0..REQUESTS).map(|r| id(&format!("r{r}"))).collect(),
        ..ToLoad::default()
    }
}

/// Applies the steps, each message `copies` times, grouping the messages
/// between two clock moves into batches of `batch` messages.
async fn play<S: Store>(
    w: &mut World<S>,
    steps: &[Step],
    copies: usize,
    batch: usize,
    check: bool,
) {
    let mut pending: Vec<Input> = Vec::new();
    for step in steps {
        match step {
            Step::Message(event) => {
                for _ in 0..copies {
                    let decoded =
                        decode(&w.schemas, event.to_string().as_bytes()).expect("well-formed");
                    pending.push(Input::from(decoded));
                }
                if pending.len() >= batch {
                    flush(w, &mut pending).await;
                }
            }
            Step::Sweep => {
                flush(w, &mut pending).await;
                w.sweep().await;
            }
            Step::Advance(days) => {
                flush(w, &mut pending).await;
                w.advance_days(*days);
            }
        }
        if check && pending.is_empty() {
            check_invariants(w).await;
        }
    }
    flush(w, &mut pending).await;
}

async fn flush<S: Store>(w: &mut World<S>, pending: &mut Vec<Input>) {
    if !pending.is_empty() {
        w.applier
            .apply(pending, w.now)
            .await
            .expect("the database answers");
        pending.clear();
    }
}

/// The ledger and outbox as comparable text.
async fn state<S: Store>(w: &World<S>) -> String {
    let ledger = w.store().snapshot(&everything()).await.expect("a snapshot");
    let accounts: BTreeMap<_, _> = ledger
        .accounts
        .iter()
        .map(|(k, v)| (k.to_string(), format!("{v:?}")))
        .collect();
    let requests: BTreeMap<_, _> = ledger
        .requests
        .iter()
        .map(|(k, v)| (k.to_string(), format!("{v:?}")))
        .collect();
    let outbox: Vec<String> = w
        .store()
        .pending_outbox(1_000_000)
        .await
        .expect("the outbox")
        .into_iter()
        .map(|row| format!("{} {:?} {}", row.id, row.kind, row.payload))
        .collect();
    format!("{accounts:#?}\n{requests:#?}\n{outbox:#?}")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(12)
}

macro_rules! properties_on {
    ($backend:ident, $make:path) => {
        mod $backend {
            use super::*;

            proptest! {
                #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

                #[test]
                fn invariants_hold_after_every_step(ops in prop::collection::vec(op(), 1..40)) {
                    runtime().block_on(async {
                        let mut w = $make().await;
                        let steps = script(&ops, w.now);
                        play(&mut w, &steps, 1, 1, true).await;
                    });
                }

                #[test]
                fn every_message_twice_in_any_batches_changes_nothing(
                    ops in prop::collection::vec(op(), 1..40),
                    batch in 1..12_usize,
                ) {
                    runtime().block_on(async {
                        let mut once = $make().await;
                        let mut twice = $make().await;
                        let steps = script(&ops, once.now);
                        play(&mut once, &steps, 1, 1, false).await;
                        play(&mut twice, &steps, 2, batch, false).await;
                        assert_eq!(state(&once).await, state(&twice).await);
                        twice.verify_ok().await;
                    });
                }
            }
        }
    };
}

properties_on!(sqlite, common::sqlite_world);
properties_on!(postgres, common::pg_world);
