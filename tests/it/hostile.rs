//! Hostile input (issue 6): what a publisher, by mistake or on purpose, can
//! put in a message, and what must come of it.
//!
//! - A fuzz target, as proptest over raw bytes: arbitrary bytes, JSON-ish
//!   bytes, and structure-aware mutations of valid envelopes of every inbound
//!   type (random JSON in any field, deep nesting, huge and malformed number
//!   literals, wrong types, truncation, invalid UTF-8, bodies at and over the
//!   256 KiB limit), every one through the full path (`World::deliver`: decode,
//!   then apply in a transaction) on SQLite and on PostgreSQL. Each input ends
//!   processed (applied, duplicate, refused, retried) or refused as malformed
//!   with a reason and a one-line detail; never a panic; the ledger still
//!   verifies, every outbound event still matches its schema, and an input
//!   applied once is a duplicate when it comes again.
//! - Every string field of every inbound type: free text is stored and echoed
//!   verbatim (outbound events, emails, `account show`, reports), whatever
//!   quotes, SQL, control characters or 10 KB of Unicode it holds; NUL is
//!   refused; restricted fields (ids, codes, emails, instants, enums) refuse
//!   all of it; the schemas' `maxLength` holds exactly at its limit.
//!   A hostile `source` is kept verbatim in the idempotency key, and only an
//!   exact `ADMIN_SOURCES` value is staff.
//! - Instants outside the years 0000–9999 (which RFC 3339 cannot write) are
//!   refused rather than echoed as `+10000-…`.
//! - Email header injection through names and titles is impossible.
//!
//! The fuzz runs `FUZZ_CASES` inputs per backend (default 1500: about 10 s
//! per backend in a debug build on an idle machine, up to a minute on a busy
//! one). A longer soak:
//!
//! ```sh
//! FUZZ_CASES=50000 cargo test --release --test it hostile::fuzz -- --nocapture
//! ```
//!
//! (`--nocapture` shows the tally of outcomes per backend.)

use crate::support as common;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::LazyLock;

use common::{STAFF, World};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use serde_json::{Value, json};
use training_credits::decode::{DETAIL_CHARS_MAX, MESSAGE_BYTES_MAX, Malformed, Schemas};
use training_credits::domain::{DeadReason, InboundType, Outcome, Refusal, RetryReason};
use training_credits::store::Store;

// ---------------------------------------------------------------------------
// The fuzz target.

/// Inputs per backend: `FUZZ_CASES`, or a default sized for CI.
fn fuzz_cases() -> u32 {
    const DEFAULT: u32 = 1500;
    match std::env::var("FUZZ_CASES") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("FUZZ_CASES={text:?} is not a whole number")),
        Err(_) => DEFAULT,
    }
}

static SCHEMAS: LazyLock<Schemas> = LazyLock::new(|| Schemas::load().expect("the schemas compile"));

/// Every inbound type the crate knows, in a fixed order (a fuzz input names
/// one by its index).
static INBOUND_TYPES: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    let mut types: Vec<&'static str> = InboundType::ALL.iter().map(|k| k.as_str()).collect();
    types.sort_unstable();
    types
});

const NOW: &str = "2026-01-01T09:00:00Z";

/// A valid event of `type_name` for case `n`, naming what the seeded ledger
/// holds (`acme`, `solo`, lot `p1`, request `r1`), or, when `fresh`, new ids
/// so that it can apply instead of being a duplicate.
fn base_event(type_name: &str, n: u64, fresh: bool) -> Value {
    let pick = |stem: &str, fixed: &str| {
        if fresh {
            format!("{stem}{n}")
        } else {
            fixed.to_owned()
        }
    };
    let previous = |stem: &str, fixed: &str| {
        if fresh {
            format!("{stem}{}", n.saturating_sub(1))
        } else {
            fixed.to_owned()
        }
    };
    let (source, data) = match type_name {
        "credits.account.opened" => (
            "portal",
            json!({
                "account_id": pick("acct-", "acme"),
                "owners": [{"email": pick("owner", "boss") + "@owners.test", "name": "Owner"}],
                "approval_mode": if n.is_multiple_of(2) { "manual" } else { "automatic" },
                "code": pick("CODE-", "ACME-1234"),
                "notes": "notes",
            }),
        ),
        "credits.account.updated" => (
            "portal",
            json!({"account_id": "acme", "actor": "boss@acme.test", "notes": format!("note {n}")}),
        ),
        "credits.account.owner_added" => (
            "portal",
            json!({
                "account_id": "acme",
                "actor": "boss@acme.test",
                "owner": {"email": pick("ann", "ann") + "@acme.test", "name": "Ann"},
            }),
        ),
        "credits.account.owner_removed" => (
            "portal",
            json!({"account_id": "acme", "actor": "boss@acme.test", "email": previous("ann", "ann") + "@acme.test"}),
        ),
        "credits.account.code_rotated" => (
            "portal",
            json!({"account_id": "solo", "actor": "solo@solo.test", "code": pick("SOLO-", "SOLO-0001")}),
        ),
        "credits.account.closed" => (
            STAFF,
            json!({"account_id": previous("acct-", "solo"), "actor": "staff@training.test", "reason": "r"}),
        ),
        "credits.purchase.completed" => (
            "shop",
            json!({
                "account_id": "acme",
                "purchase_id": pick("p", "p1"),
                "credits": "100",
                "purchased_at": NOW,
            }),
        ),
        "credits.purchase.refunded" => (
            "shop",
            json!({
                "account_id": "acme",
                "purchase_id": "p1",
                "refund_id": pick("rf", "rf1"),
                "credits": "1",
                "refunded_at": NOW,
            }),
        ),
        "credits.lot.extended" => (
            STAFF,
            json!({
                "account_id": "acme",
                "purchase_id": previous("p", "p1"),
                "expires_at": "2030-01-01T00:00:00Z",
                "actor": "staff@training.test",
            }),
        ),
        "credits.redemption.requested" => (
            "lms",
            json!({
                "request_id": pick("r", "r1"),
                "code": "ACME-1234",
                "learner": {"id": pick("l", "l1"), "email": pick("l", "l1") + "@learners.test", "name": "Lee"},
                "item": {"id": pick("c", "c1"), "kind": "course", "title": "Rust 101"},
                "cost": "1",
                "requested_at": NOW,
            }),
        ),
        "credits.redemption.approved" | "credits.redemption.denied" => (
            "portal",
            json!({"request_id": previous("r", "r1"), "approver": "boss@acme.test"}),
        ),
        "credits.redemption.cancelled" => (
            "lms",
            json!({"request_id": previous("r", "r1"), "learner_id": previous("l", "l1")}),
        ),
        "credits.enrollment.unenrolled" => (
            "lms",
            json!({"request_id": previous("r", "r1"), "unenrolled_at": NOW}),
        ),
        "credits.report.requested" => (
            "portal",
            json!({
                "report": "transactions",
                "format": "csv",
                "recipient": "boss@acme.test",
                "account_id": "acme",
            }),
        ),
        other => panic!("no base event for {other}"),
    };
    json!({
        "specversion": "1.0",
        "id": format!("fz-{n}"),
        "source": source,
        "type": type_name,
        "time": NOW,
        "datacontenttype": "application/json",
        "data": data,
    })
}

/// Strings a field may hold: the ledger's own ids, edge values of every
/// format (instants at the ends of the calendar, amounts at their limits),
/// and hostile text.
const STRINGS: &[&str] = &[
    "",
    " ",
    "acme",
    "solo",
    "p1",
    "r1",
    "l1",
    "c1",
    "ACME-1234",
    "acme 1234",
    "SOLO-0001",
    "boss@acme.test",
    "BOSS@ACME.TEST",
    "solo@solo.test",
    "staff@training.test",
    "not an email",
    "a@b",
    "2026-01-01T09:00:00Z",
    "2026-01-01T09:00:00",
    "2026-02-30T00:00:00Z",
    "9999-12-31T23:59:59Z",
    "9999-12-31T23:59:59-23:59",
    "0000-01-01T00:00:00Z",
    "0000-01-01T00:00:00+23:59",
    "1970-01-01T00:00:00.999999999Z",
    "20",
    "19.50",
    "0",
    "0.00",
    "0.01",
    "-1",
    "1e3",
    "10000000",
    "10000000.01",
    "1000000",
    "1000000.01",
    "9999999999.99",
    "0.001",
    "manual",
    "automatic",
    "course",
    "csv",
    "xlsx",
    "transactions",
    "all",
    "group",
    "activity",
    "active",
    "inactive",
    "closed",
    "USD",
    "credits.account.opened",
    "credits.account.closed",
    "1.0",
    STAFF,
    "portal",
    "\u{0}",
    "a\u{0}b",
    "'; DROP TABLE journal; --",
    "Robert'); DROP TABLE accounts;--",
    "\" OR 1=1 --",
    "\r\nBcc: thief@evil.test",
    "\u{2028}\u{2029}\u{85}",
    "\u{feff}\u{202e}\u{200b}",
    "=1+1",
    "{{ portal_url }}{% for x in range(99999999) %}x{% endfor %}",
    "%s%n%x",
    "../../etc/passwd",
    "\\u0000",
];

/// Number literals (and broken JSON) that no `serde_json::Value` can hold,
/// spliced into the text after serialisation.
const RAW_LITERALS: &[&str] = &[
    "1e400",
    "-1e400",
    "1e308",
    "1.7976931348623157e308",
    "5e-324",
    "1e-400",
    "123456789012345678901234567890",
    "18446744073709551616",
    "-9223372036854775809",
    "92233720368547758.07",
    "0.1e1",
    "1E2",
    "-0",
    "-0.0",
    "0.000000000000000000000000000001",
    "1.0000000000000000000000001",
    "19.999999999999999999999",
    "00",
    "01",
    ".5",
    "5.",
    "NaN",
    "Infinity",
    "-",
    "+1",
    "0x10",
    "1_000",
    "\"\\ud800\"",
    "\"\\udc00\\ud800\"",
    "\"\\u0000\"",
    "\"unterminated",
    "[[[[[[[[[[]]]]]]]]]]",
    "{\"a\":1,\"a\":2}",
];

/// What a mutation puts in a field.
#[derive(Clone, Debug)]
enum Hostile {
    Json(Value),
    /// A literal from [`RAW_LITERALS`], spliced in as text.
    Raw(&'static str),
    /// A value nested this deep in arrays or objects.
    Nested {
        depth: usize,
        object: bool,
    },
    /// A string of `chars` characters made of `piece`.
    Long {
        chars: usize,
        piece: &'static str,
    },
}

/// Placeholder of the `k`-th raw literal in the serialised text.
fn placeholder(k: usize) -> String {
    format!("\u{E000}raw{k}\u{E000}")
}

impl Hostile {
    fn to_value(&self, raws: &mut Vec<&'static str>) -> Value {
        match self {
            Hostile::Json(value) => value.clone(),
            Hostile::Raw(literal) => {
                raws.push(literal);
                Value::from(placeholder(raws.len() - 1))
            }
            Hostile::Nested { depth, object } => {
                let mut value = json!("deep");
                for _ in 0..*depth {
                    value = if *object {
                        json!({ "a": value })
                    } else {
                        json!([value])
                    };
                }
                value
            }
            Hostile::Long { chars, piece } => {
                Value::from(piece.chars().cycle().take(*chars).collect::<String>())
            }
        }
    }
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "\\PC{0,24}".prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn arb_hostile() -> impl Strategy<Value = Hostile> {
    prop_oneof![
        8 => prop::sample::select(STRINGS).prop_map(|s| Hostile::Json(Value::from(s))),
        4 => arb_json().prop_map(Hostile::Json),
        1 => prop::sample::select(RAW_LITERALS).prop_map(Hostile::Raw),
        1 => (1usize..200, any::<bool>())
            .prop_map(|(depth, object)| Hostile::Nested { depth, object }),
        1 => (
            prop::sample::select(&[254usize, 255, 256, 257, 10_240, 65_536, 65_537, 140_000][..]),
            prop::sample::select(&["x", "é", "日本", "👩🏽‍🏫", "'; --", "\r\n"][..]),
        )
            .prop_map(|(chars, piece)| Hostile::Long { chars, piece }),
    ]
}

const KEYS: &[&str] = &[
    "id",
    "source",
    "type",
    "specversion",
    "data",
    "time",
    "subject",
    "account_id",
    "actor",
    "owners",
    "name",
    "notes",
    "code",
    "credits",
    "cost",
    "price_paid",
    "expires_at",
    "low_balance_threshold",
    "scope",
    "columns",
    "reason",
    "extra",
];

#[derive(Clone, Debug)]
enum Mutation {
    Replace(prop::sample::Index, Hostile),
    Remove(prop::sample::Index),
    Insert(prop::sample::Index, &'static str, Hostile),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<prop::sample::Index>(), arb_hostile()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        1 => any::<prop::sample::Index>().prop_map(Mutation::Remove),
        2 => (any::<prop::sample::Index>(), prop::sample::select(KEYS), arb_hostile())
            .prop_map(|(i, k, v)| Mutation::Insert(i, k, v)),
    ]
}

/// Every JSON pointer inside `value`, the root included.
fn pointers(value: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                pointers(v, format!("{at}/{k}"), out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                pointers(v, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn mutate(event: &mut Value, mutation: &Mutation, raws: &mut Vec<&'static str>) {
    let mut all = Vec::new();
    pointers(event, String::new(), &mut all);
    match mutation {
        Mutation::Replace(i, v) => {
            // Not the root: a whole event replaced by a scalar is what the
            // arbitrary bytes already cover.
            let pointer = i.get(&all[1..]);
            let value = v.to_value(raws);
            if let Some(slot) = event.pointer_mut(pointer) {
                *slot = value;
            }
        }
        Mutation::Remove(i) => {
            if let Some((parent, last)) = i.get(&all).rsplit_once('/') {
                match event.pointer_mut(parent) {
                    Some(Value::Object(map)) => {
                        map.remove(last);
                    }
                    Some(Value::Array(items)) => {
                        if let Ok(n) = last.parse::<usize>()
                            && n < items.len()
                        {
                            items.remove(n);
                        }
                    }
                    _ => {}
                }
            }
        }
        Mutation::Insert(i, k, v) => {
            let value = v.to_value(raws);
            if let Some(Value::Object(map)) = event.pointer_mut(i.get(&all).as_str()) {
                map.insert((*k).to_owned(), value);
            }
        }
    }
}

const INVALID_UTF8: &[&[u8]] = &[
    &[0xff],
    &[0xc3],
    &[0xc0, 0xaf],
    &[0xed, 0xa0, 0x80],
    &[0xf4, 0x90, 0x80, 0x80],
    &[0xe2, 0x82],
    &[0x80],
];

/// How the serialised text is damaged, if at all.
#[derive(Clone, Debug)]
enum Damage {
    None,
    Truncate(prop::sample::Index),
    Flip(prop::sample::Index, u8),
    Splice(prop::sample::Index, Vec<u8>),
    /// Invalid UTF-8 right after one of the text's quotes: inside a string.
    InvalidUtf8(prop::sample::Index, &'static [u8]),
    ByteOrderMark,
    /// Trailing spaces up to `MESSAGE_BYTES_MAX + over` bytes.
    PadToLimit {
        over: bool,
    },
}

fn arb_damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        36 => Just(Damage::None),
        1 => any::<prop::sample::Index>().prop_map(Damage::Truncate),
        1 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Damage::Flip(i, b)),
        1 => (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Damage::Splice(i, b)),
        1 => (any::<prop::sample::Index>(), prop::sample::select(INVALID_UTF8))
            .prop_map(|(i, b)| Damage::InvalidUtf8(i, b)),
        1 => Just(Damage::ByteOrderMark),
        1 => any::<bool>().prop_map(|over| Damage::PadToLimit { over }),
    ]
}

fn damage(body: &mut Vec<u8>, damage: &Damage) {
    match damage {
        Damage::None => {}
        Damage::Truncate(i) => body.truncate(i.index(body.len() + 1)),
        Damage::Flip(i, b) => {
            if !body.is_empty() {
                let at = i.index(body.len());
                body[at] = *b;
            }
        }
        Damage::Splice(i, extra) => {
            let at = i.index(body.len() + 1);
            body.splice(at..at, extra.iter().copied());
        }
        Damage::InvalidUtf8(i, bytes) => {
            let quotes: Vec<usize> = (0..body.len()).filter(|&p| body[p] == b'"').collect();
            if !quotes.is_empty() {
                let at = quotes[i.index(quotes.len())] + 1;
                body.splice(at..at, bytes.iter().copied());
            }
        }
        Damage::ByteOrderMark => {
            body.splice(0..0, [0xef, 0xbb, 0xbf]);
        }
        Damage::PadToLimit { over } => {
            let target = MESSAGE_BYTES_MAX + usize::from(*over);
            if body.len() < target {
                body.resize(target, b' ');
            }
        }
    }
}

/// One fuzz input.
#[derive(Clone, Debug)]
enum FuzzInput {
    Bytes(Vec<u8>),
    /// A valid event of `INBOUND_TYPES[kind]`, mutated, serialised, damaged.
    Event {
        kind: usize,
        fresh: bool,
        mutations: Vec<Mutation>,
        damage: Damage,
    },
}

fn arb_input() -> impl Strategy<Value = FuzzInput> {
    let jsonish: Vec<u8> = b"{}[]\":,.-+eE0123456789tfnrul\\ ".to_vec();
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..1024).prop_map(FuzzInput::Bytes),
        1 => prop::collection::vec(prop::sample::select(jsonish), 0..256).prop_map(FuzzInput::Bytes),
        12 => (
            0..INBOUND_TYPES.len(),
            any::<bool>(),
            prop::collection::vec(arb_mutation(), 0..4),
            arb_damage(),
        )
            .prop_map(|(kind, fresh, mutations, damage)| FuzzInput::Event {
                kind,
                fresh,
                mutations,
                damage,
            }),
    ]
}

/// The bytes of input `n`.
fn bytes_of(input: &FuzzInput, n: u64) -> Vec<u8> {
    match input {
        FuzzInput::Bytes(bytes) => bytes.clone(),
        FuzzInput::Event {
            kind,
            fresh,
            mutations,
            damage: how,
        } => {
            let mut event = base_event(INBOUND_TYPES[*kind], n, *fresh);
            let mut raws = Vec::new();
            for mutation in mutations {
                mutate(&mut event, mutation, &mut raws);
            }
            let mut text = event.to_string();
            for (k, literal) in raws.iter().enumerate() {
                text = text.replace(&format!("\"{}\"", placeholder(k)), literal);
            }
            let mut body = text.into_bytes();
            damage(&mut body, how);
            body
        }
    }
}

const DECODE_REASONS: [DeadReason; 5] = [
    DeadReason::TooLarge,
    DeadReason::InvalidJson,
    DeadReason::InvalidEnvelope,
    DeadReason::UnknownType,
    DeadReason::SchemaViolation,
];

/// A detail travels in the `x-error-detail` header: one short line.
fn check_detail(detail: &str, what: &str) -> Result<(), TestCaseError> {
    prop_assert!(!detail.trim().is_empty(), "{what}: an empty detail");
    prop_assert!(
        !detail.chars().any(char::is_control),
        "{what}: the detail {detail:?} is not one line"
    );
    prop_assert!(
        detail.chars().count() <= DETAIL_CHARS_MAX,
        "{what}: the detail has {} characters",
        detail.chars().count()
    );
    Ok(())
}

/// Checks what became of one input and names it for the tally.
fn judge(result: &Result<Outcome, Malformed>) -> Result<String, TestCaseError> {
    Ok(match result {
        Err(malformed) => {
            prop_assert!(
                DECODE_REASONS.contains(&malformed.reason),
                "decode gave {}",
                malformed.reason
            );
            check_detail(&malformed.detail, "malformed")?;
            format!("malformed: {}", malformed.reason)
        }
        Ok(Outcome::Dead { reason, detail }) => {
            prop_assert!(
                matches!(reason, DeadReason::IdConflict | DeadReason::SchemaViolation),
                "the ledger dead-lettered for {reason}"
            );
            check_detail(detail, "dead letter")?;
            format!("dead letter: {reason}")
        }
        Ok(Outcome::Retry { reason, detail }) => {
            prop_assert!(
                matches!(
                    reason,
                    RetryReason::UnknownAccount
                        | RetryReason::UnknownRequest
                        | RetryReason::UnknownPurchase
                ),
                "retried for {reason:?}: {detail}"
            );
            check_detail(detail, "retry")?;
            format!("retry: {reason:?}")
        }
        Ok(Outcome::Rejected(reason)) => format!("refused: {}", reason.as_str()),
        Ok(Outcome::Refused(reason)) => format!("refused: {}", reason.as_str()),
        Ok(Outcome::Applied) => "applied".to_owned(),
        Ok(Outcome::Duplicate) => "duplicate".to_owned(),
    })
}

/// The ledger the fuzz starts from: two accounts with lots and a pending
/// request, so that mutated commands meet real owners, codes and requests.
async fn seed<S: Store>(w: &mut World<S>) {
    assert_eq!(
        w.open("acme", "manual", "boss@acme.test", "ACME-1234")
            .await,
        Outcome::Applied
    );
    assert_eq!(
        w.open("solo", "automatic", "solo@solo.test", "SOLO-0001")
            .await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    assert_eq!(w.purchase("solo", "s1", "100").await, Outcome::Applied);
    assert_eq!(
        w.request("r1", "ACME-1234", "l1", "c1", "30").await,
        Outcome::Applied
    );
}

/// Runs the fuzz on one backend's world.
fn fuzz<S: Store>(make: impl AsyncFnOnce() -> World<S>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut world = runtime.block_on(make());
    runtime.block_on(seed(&mut world));
    let world = RefCell::new(world);
    let case = Cell::new(0_u64);
    let tally: RefCell<BTreeMap<String, u64>> = RefCell::new(BTreeMap::new());
    let cases = fuzz_cases();
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    });
    let started = std::time::Instant::now();
    let result = runner.run(&arb_input(), |input| {
        let n = case.get() + 1;
        case.set(n);
        let body = bytes_of(&input, n);
        let mut w = world.borrow_mut();
        let result = runtime.block_on(w.deliver(&body));
        let label = judge(&result)?;
        // Applied or refused, it is recorded: the same bytes again change
        // nothing, however hostile they are.
        if matches!(
            result,
            Ok(Outcome::Applied | Outcome::Rejected(_) | Outcome::Refused(_))
        ) {
            let again = runtime.block_on(w.deliver(&body));
            prop_assert_eq!(again, Ok(Outcome::Duplicate), "redelivered: {}", label);
        }
        *tally.borrow_mut().entry(label).or_default() += 1;
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    let w = world.into_inner();
    runtime.block_on(async {
        w.verify_ok().await;
        // Every outbound event the fuzz caused still matches its schema
        // (`events` checks each), and every email still has a one-line subject.
        let events = w.events().await;
        let emails = w.emails().await;
        for email in &emails {
            assert!(
                !email.subject.chars().any(char::is_control),
                "subject {:?}",
                email.subject
            );
        }
        let tally = tally.into_inner();
        let total: u64 = tally.values().sum();
        let through_apply: u64 = tally
            .iter()
            .filter(|(label, _)| !label.starts_with("malformed"))
            .map(|(_, n)| n)
            .sum();
        eprintln!(
            "{total} inputs fuzzed in {:.1} s: {through_apply} decoded and applied, \
             {} outbound events, {} emails",
            started.elapsed().as_secs_f64(),
            events.len(),
            emails.len()
        );
        for (label, n) in &tally {
            eprintln!("  {n:>7}  {label}");
        }
        assert_eq!(total, u64::from(cases), "every case was judged");
        // The mutations must not all be refused at the door: a good share of
        // the inputs has to reach the ledger for the full path to be fuzzed.
        assert!(
            through_apply * 5 >= total,
            "only {through_apply} of {total} inputs reached the ledger"
        );
        assert!(tally.contains_key("applied"), "nothing applied: {tally:?}");
    });
}

#[test]
fn fuzz_any_bytes_end_processed_or_malformed_on_sqlite() {
    fuzz(common::sqlite_world);
}

#[test]
fn fuzz_any_bytes_end_processed_or_malformed_on_postgres() {
    fuzz(common::pg_world);
}

// ---------------------------------------------------------------------------
// Instants at the ends of the calendar.

/// RFC 3339 years have four digits: an instant the ledger would derive from
/// a message (a default expiry a year on, a time converted to UTC) outside
/// the years 0000–9999 is refused at the door, and one just inside is kept
/// and echoed as RFC 3339.
async fn instants_at_the_ends_of_the_calendar_are_refused_or_echoed_as_rfc_3339<S: Store>(
    mut w: World<S>,
) {
    assert_eq!(
        w.open("acme", "automatic", "boss@acme.test", "ACME-1234")
            .await,
        Outcome::Applied
    );
    let purchase = |id: &str, purchased_at: &str, expires_at: Option<&str>| {
        let mut data = json!({"account_id": "acme", "purchase_id": id, "credits": "10",
                              "purchased_at": purchased_at});
        if let Some(expires_at) = expires_at {
            data["expires_at"] = json!(expires_at);
        }
        data
    };
    for data in [
        // No expiry given: the default, a year on, falls in year 10000.
        purchase("late-1", "9999-12-31T23:59:59Z", None),
        purchase("late-2", "9999-01-01T00:00:00Z", None),
        // An offset that takes the instant into year 10000 in UTC.
        purchase("late-3", NOW, Some("9999-12-31T23:59:59-23:59")),
        // And into year -1.
        purchase(
            "early-1",
            "0000-01-01T00:00:00+23:59",
            Some("0000-01-02T00:00:00Z"),
        ),
    ] {
        let event = w.event("shop", "credits.purchase.completed", data.clone());
        let malformed = w
            .deliver(event.to_string().as_bytes())
            .await
            .expect_err("an instant RFC 3339 cannot write is refused");
        assert_eq!(malformed.reason, DeadReason::SchemaViolation, "{data}");
        assert!(
            malformed.detail.contains("9999") || malformed.detail.contains("0000"),
            "{data}: {}",
            malformed.detail
        );
    }
    assert!(w.account("acme").await.lots.is_empty(), "nothing was kept");
    // Just inside the range: kept, and echoed as RFC 3339.
    for (data, expires_at) in [
        (
            purchase("last", "9998-12-31T23:59:59Z", None),
            "9999-12-31T23:59:59Z",
        ),
        (
            purchase(
                "first",
                "0000-01-01T00:00:00Z",
                Some("0000-01-02T00:00:00Z"),
            ),
            "0000-01-02T00:00:00Z",
        ),
    ] {
        let event = w.event("shop", "credits.purchase.completed", data.clone());
        assert_eq!(
            w.deliver(event.to_string().as_bytes()).await,
            Ok(Outcome::Applied),
            "{data}"
        );
        let recorded = w.last_event("training-credits.purchase.recorded").await;
        assert_eq!(recorded["expires_at"], expires_at);
    }
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// Every string field of every inbound type.

/// About 10 KB of Unicode of every width: accents, CJK, emoji with joiners
/// and skin tones, combining marks, right-to-left text and overrides, the
/// byte-order mark, the last code point.
fn ten_kb_of_unicode() -> String {
    let pieces = [
        "Zoë ",
        "Łódź ",
        "Straße ",
        "日本語の研修 ",
        "한국어 ",
        "👩🏽‍🏫 ",
        "🏳️‍🌈 ",
        "e\u{301}\u{302}\u{303} ",
        "Z\u{335}\u{30d}\u{31a}a\u{334}\u{34a}\u{35d}l\u{337}g\u{336}o ",
        "עברית ",
        "العربية ",
        "\u{202e}txet desrever\u{202c} ",
        "\u{10FFFF}",
        "\u{FEFF}",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ",
    ];
    let mut text = String::new();
    let mut i = 0;
    while text.len() < 10 * 1024 {
        text.push_str(pieces[i % pieces.len()]);
        i += 1;
    }
    text
}

/// The payloads every string field is tried with. NUL is not among them:
/// it is refused by design (PostgreSQL cannot store it in text; see
/// `a_nul_character_in_any_free_text_field_is_refused`).
fn payloads() -> Vec<(&'static str, String)> {
    vec![
        (
            "quotes",
            r#"O'Brien "the \"quoted\" one" `tick` \back\slash \n \u0041 ''"#.to_owned(),
        ),
        ("sql", "'; DROP TABLE journal; --".to_owned()),
        (
            "sql in parentheses",
            "Robert'); DELETE FROM lots WHERE ('1'='1".to_owned(),
        ),
        (
            "control characters",
            "tab\there CR\rLF\nCRLF\r\n ESC\u{1b}[31mred\u{1b}[0m BEL\u{7} BS\u{8} VT\u{b} FF\u{c} \
             DEL\u{7f} NEL\u{85} LS\u{2028} PS\u{2029} end"
                .to_owned(),
        ),
        ("10 KB of Unicode", ten_kb_of_unicode()),
    ]
}

/// A valid `data` of each inbound type with every optional field present,
/// so that every string field of its schema has a place.
fn full_data(type_name: &str) -> Value {
    match type_name {
        "credits.account.opened" => json!({
            "account_id": "acme",
            "name": "Acme",
            "owners": [{"email": "boss@acme.test", "name": "Boss"}],
            "approval_mode": "manual",
            "code": "ACME-1234",
            "scope": {"kind": "group", "ids": ["g1"]},
            "low_balance_threshold": "10",
            "learner_limit": "500",
            "notes": "notes",
        }),
        "credits.account.updated" => json!({
            "account_id": "acme",
            "actor": "boss@acme.test",
            "name": "Acme Ltd",
            "approval_mode": "automatic",
            "scope_ids": ["g2"],
            "status": "active",
            "low_balance_threshold": "5",
            "learner_limit": "400",
            "notes": "more notes",
        }),
        "credits.account.owner_added" => json!({
            "account_id": "acme",
            "actor": "boss@acme.test",
            "owner": {"email": "ann@acme.test", "name": "Ann"},
        }),
        "credits.account.owner_removed" => {
            json!({"account_id": "acme", "actor": "boss@acme.test", "email": "ann@acme.test"})
        }
        "credits.account.code_rotated" => {
            json!({"account_id": "acme", "actor": "boss@acme.test", "code": "ACME-5678"})
        }
        "credits.account.closed" => {
            json!({"account_id": "acme", "actor": "staff@training.test", "reason": "why"})
        }
        "credits.purchase.completed" => json!({
            "account_id": "acme",
            "purchase_id": "p1",
            "credits": "100",
            "price_paid": {"amount": "95", "currency": "USD"},
            "channel": "card",
            "purchased_at": NOW,
            "expires_at": "2027-01-01T00:00:00Z",
        }),
        "credits.purchase.refunded" => json!({
            "account_id": "acme",
            "purchase_id": "p1",
            "refund_id": "rf1",
            "credits": "1",
            "reason": "chargeback",
            "refunded_at": NOW,
        }),
        "credits.lot.extended" => json!({
            "account_id": "acme",
            "purchase_id": "p1",
            "expires_at": "2028-01-01T00:00:00Z",
            "actor": "staff@training.test",
            "reason": "why",
        }),
        "credits.redemption.requested" => json!({
            "request_id": "r1",
            "code": "ACME-1234",
            "learner": {"id": "l1", "email": "l1@learners.test", "name": "Lee"},
            "item": {"id": "c1", "kind": "course", "title": "Rust 101", "group_ids": ["g1"]},
            "cost": "30",
            "requested_at": NOW,
        }),
        "credits.redemption.approved" => {
            json!({"request_id": "r1", "approver": "boss@acme.test", "note": "ok"})
        }
        "credits.redemption.denied" => {
            json!({"request_id": "r1", "approver": "boss@acme.test", "reason": "no"})
        }
        "credits.redemption.cancelled" => json!({"request_id": "r1", "learner_id": "l1"}),
        "credits.enrollment.unenrolled" => {
            json!({"request_id": "r1", "unenrolled_at": NOW, "reason": "left"})
        }
        "credits.report.requested" => json!({
            "report": "transactions",
            "format": "csv",
            "recipient": "boss@acme.test",
            "account_id": "acme",
            "from": "2026-01-01T00:00:00Z",
            "to": "2026-02-01T00:00:00Z",
            "columns": ["at", "amount"],
        }),
        other => panic!("no full example of {other}"),
    }
}

/// The free-text fields: any text up to 65,536 characters, kept as sent.
/// Every other string field of the inbound schemas is an identifier, code,
/// email, instant, amount, currency, enumeration or column name, and has a
/// pattern or format that refuses every payload.
const FREE_TEXT: &[(&str, &str)] = &[
    ("credits.account.opened", "/name"),
    ("credits.account.opened", "/owners/0/name"),
    ("credits.account.opened", "/notes"),
    ("credits.account.updated", "/name"),
    ("credits.account.updated", "/notes"),
    ("credits.account.owner_added", "/owner/name"),
    ("credits.account.closed", "/reason"),
    ("credits.lot.extended", "/reason"),
    ("credits.purchase.refunded", "/reason"),
    ("credits.redemption.requested", "/learner/name"),
    ("credits.redemption.requested", "/item/title"),
    ("credits.redemption.approved", "/note"),
    ("credits.redemption.denied", "/reason"),
    ("credits.enrollment.unenrolled", "/reason"),
];

/// The schemas' own limit on every free-text field, in characters.
const FREE_TEXT_CHARS_MAX: usize = 65_536;

/// Every pointer of `schema` whose value may be a string.
fn string_fields(schema: &Value, root: &Value, at: String, out: &mut Vec<String>) {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let target = root
            .pointer(reference.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("{reference} resolves"));
        string_fields(target, root, at.clone(), out);
    }
    if schema.get("type") == Some(&json!("string")) && !out.contains(&at) {
        out.push(at.clone());
    }
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        for (name, property) in properties {
            string_fields(property, root, format!("{at}/{name}"), out);
        }
    }
    if let Some(items) = schema.get("items") {
        string_fields(items, root, format!("{at}/0"), out);
    }
    for combinator in ["anyOf", "oneOf"] {
        for branch in schema
            .get(combinator)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            string_fields(branch, root, at.clone(), out);
        }
    }
}

fn inbound_schema(type_name: &str) -> Value {
    let path = format!("{}/schemas/in/{type_name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("the schema file"))
        .expect("the schema is JSON")
}

/// Sets `data[pointer]` (its parents exist in [`full_data`]).
fn set_at(data: &mut Value, pointer: &str, value: Value) {
    *data
        .pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{pointer} exists in the full example")) = value;
}

fn envelope(type_name: &str, data: Value) -> Value {
    json!({
        "specversion": "1.0",
        "id": "ev-1",
        "source": "portal",
        "type": type_name,
        "time": NOW,
        "datacontenttype": "application/json",
        "data": data,
    })
}

fn decode_event(event: &Value) -> Result<training_credits::decode::Decoded, Malformed> {
    training_credits::decode::decode(&SCHEMAS, event.to_string().as_bytes())
}

#[test]
fn every_string_field_is_free_text_that_takes_every_payload_or_a_restricted_one_that_refuses_it() {
    let payloads = payloads();
    let mut free = Vec::new();
    let mut tried = 0;
    for &type_name in INBOUND_TYPES.iter() {
        let schema = inbound_schema(type_name);
        let mut fields = Vec::new();
        string_fields(&schema, &schema, String::new(), &mut fields);
        assert!(!fields.is_empty(), "{type_name} has string fields");
        for pointer in fields {
            let mut accepted = 0;
            for (label, payload) in &payloads {
                let mut data = full_data(type_name);
                set_at(&mut data, &pointer, json!(payload));
                tried += 1;
                match decode_event(&envelope(type_name, data)) {
                    Ok(_) => accepted += 1,
                    Err(malformed) => {
                        assert_eq!(
                            malformed.reason,
                            DeadReason::SchemaViolation,
                            "{type_name} {pointer} {label}: {}",
                            malformed.detail
                        );
                        // Where: the field, or the object around it when a
                        // `oneOf` of the schema is what failed.
                        let top = pointer.split('/').nth(1).unwrap_or_default();
                        assert!(
                            malformed.detail.contains(&format!("/data/{top}")),
                            "{type_name} {pointer} {label}: the detail says where: {}",
                            malformed.detail
                        );
                    }
                }
            }
            // All or nothing: a field is free text or it is not.
            match accepted {
                0 => {}
                n if n == payloads.len() => free.push((type_name, pointer)),
                n => panic!(
                    "{type_name} {pointer} took {n} of the {} payloads",
                    payloads.len()
                ),
            }
        }
    }
    let mut expected: Vec<(&str, String)> = FREE_TEXT
        .iter()
        .map(|(t, p)| (*t, (*p).to_owned()))
        .collect();
    expected.sort();
    free.sort();
    assert_eq!(free, expected, "the free-text fields");
    eprintln!(
        "{tried} field × payload combinations decoded; {} free-text fields",
        free.len()
    );
}

#[test]
fn the_envelope_s_free_text_attributes_take_every_payload_and_its_restricted_ones_refuse_it() {
    for (label, payload) in payloads() {
        let data = full_data("credits.account.opened");
        // `subject`, `dataschema` and extension attributes are not used by the
        // ledger and have no limit but the message's.
        for attribute in ["subject", "dataschema", "x-extension"] {
            let mut event = envelope("credits.account.opened", data.clone());
            event[attribute] = json!(payload);
            assert!(
                decode_event(&event).is_ok(),
                "{attribute} {label} is accepted"
            );
        }
        // `source` is free text of 1–256 characters (see the limit test).
        let mut event = envelope("credits.account.opened", data.clone());
        event["source"] = json!(payload);
        let decoded = decode_event(&event);
        if payload.chars().count() <= 256 {
            let decoded = decoded.unwrap_or_else(|m| panic!("source {label}: {m:?}"));
            assert_eq!(decoded.key.source, payload, "source {label} kept as sent");
        } else {
            let malformed = decoded.expect_err("a source over 256 characters");
            assert_eq!(malformed.reason, DeadReason::InvalidEnvelope, "{label}");
        }
        // `id` is an identifier; `time` an instant; `type` names a type.
        for (attribute, reason) in [
            ("id", DeadReason::InvalidEnvelope),
            ("time", DeadReason::InvalidEnvelope),
            ("specversion", DeadReason::InvalidEnvelope),
            ("datacontenttype", DeadReason::InvalidEnvelope),
        ] {
            let mut event = envelope("credits.account.opened", data.clone());
            event[attribute] = json!(payload);
            let malformed = decode_event(&event).expect_err("refused");
            assert_eq!(malformed.reason, reason, "{attribute} {label}");
        }
        let mut event = envelope("credits.account.opened", data.clone());
        event["type"] = json!(payload);
        let malformed = decode_event(&event).expect_err("refused");
        assert!(
            matches!(
                malformed.reason,
                DeadReason::UnknownType | DeadReason::InvalidEnvelope
            ),
            "type {label}: {}",
            malformed.reason
        );
    }
}

#[test]
fn a_nul_character_in_any_free_text_field_is_refused() {
    // README, decisions: PostgreSQL cannot keep U+0000 in text, so a message
    // holding one could never be stored as sent; decode refuses it at once.
    for (type_name, pointer) in FREE_TEXT {
        for text in [
            "\u{0}",
            "before\u{0}after",
            "'; DROP TABLE journal; --\u{0}",
        ] {
            let mut data = full_data(type_name);
            set_at(&mut data, pointer, json!(text));
            let malformed = decode_event(&envelope(type_name, data)).expect_err("NUL refused");
            assert_eq!(
                malformed.reason,
                DeadReason::SchemaViolation,
                "{type_name} {pointer}"
            );
            assert!(
                malformed.detail.contains(&format!("/data{pointer}"))
                    && malformed.detail.contains("U+0000"),
                "{type_name} {pointer}: {}",
                malformed.detail
            );
        }
    }
    for attribute in ["source", "subject", "dataschema", "x-extension"] {
        let mut event = envelope(
            "credits.account.opened",
            full_data("credits.account.opened"),
        );
        event[attribute] = json!("admin\u{0}");
        let malformed = decode_event(&event).expect_err("NUL refused");
        assert_eq!(malformed.reason, DeadReason::InvalidEnvelope, "{attribute}");
    }
}

#[test]
fn free_text_holds_exactly_65536_characters_whatever_their_width() {
    for (type_name, pointer) in FREE_TEXT {
        // Characters, not bytes: 65,536 two-byte characters are 128 KiB.
        for piece in ["x", "é"] {
            let at_limit: String = piece.repeat(FREE_TEXT_CHARS_MAX);
            let mut data = full_data(type_name);
            set_at(&mut data, pointer, json!(at_limit));
            let decoded = decode_event(&envelope(type_name, data));
            assert!(
                decoded.is_ok(),
                "{type_name} {pointer}: {FREE_TEXT_CHARS_MAX} × {piece:?}: {:?}",
                decoded.err()
            );
            let over = format!("{at_limit}{piece}");
            let mut data = full_data(type_name);
            set_at(&mut data, pointer, json!(over));
            let malformed = decode_event(&envelope(type_name, data)).expect_err("one too many");
            assert_eq!(
                malformed.reason,
                DeadReason::SchemaViolation,
                "{type_name} {pointer}"
            );
            assert!(malformed.detail.contains(&format!("/data{pointer}")));
        }
    }
    // Wider characters reach the message limit first: 65,536 four-byte
    // emoji are 256 KiB of text, more than a message may hold.
    let mut data = full_data("credits.account.opened");
    set_at(&mut data, "/notes", json!("🎓".repeat(FREE_TEXT_CHARS_MAX)));
    let malformed = decode_event(&envelope("credits.account.opened", data)).expect_err("too big");
    assert_eq!(malformed.reason, DeadReason::TooLarge);
}

#[test]
fn fields_shorter_than_ten_kilobytes_hold_exactly_their_limit() {
    // `source`: 1–256 characters of anything but NUL.
    let hostile_256: String = "'\"; DROP\t\r\n👩🏽‍🏫é\u{2028}"
        .chars()
        .cycle()
        .take(256)
        .collect();
    let mut event = envelope(
        "credits.account.opened",
        full_data("credits.account.opened"),
    );
    event["source"] = json!(hostile_256);
    let decoded = decode_event(&event).expect("256 characters of source");
    assert_eq!(decoded.key.source, hostile_256);
    event["source"] = json!(format!("{hostile_256}x"));
    assert_eq!(
        decode_event(&event).expect_err("257").reason,
        DeadReason::InvalidEnvelope
    );
    event["source"] = json!("");
    assert_eq!(
        decode_event(&event).expect_err("empty").reason,
        DeadReason::InvalidEnvelope
    );

    // Emails: at most 254 characters (and a valid address).
    let local = "a".repeat(64);
    let email_254 = format!(
        "{local}@{}.{}.{}",
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    assert_eq!(email_254.len(), 254);
    let mut data = full_data("credits.account.owner_added");
    set_at(&mut data, "/owner/email", json!(email_254));
    let decoded = decode_event(&envelope("credits.account.owner_added", data)).expect("254");
    let training_credits::domain::command::Command::OwnerAdded(added) = decoded.command else {
        panic!("an owner_added command");
    };
    assert_eq!(added.owner.email.as_str(), email_254);
    let email_255 = format!(
        "{local}@{}.{}.{}",
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(62)
    );
    let mut data = full_data("credits.account.owner_added");
    set_at(&mut data, "/owner/email", json!(email_255));
    let malformed = decode_event(&envelope("credits.account.owner_added", data)).expect_err("255");
    assert_eq!(malformed.reason, DeadReason::SchemaViolation);

    // Identifiers: 1–128 characters.
    for (id, ok) in [("a".repeat(128), true), ("a".repeat(129), false)] {
        let mut data = full_data("credits.account.opened");
        set_at(&mut data, "/account_id", json!(id));
        assert_eq!(
            decode_event(&envelope("credits.account.opened", data)).is_ok(),
            ok,
            "an id of {} characters",
            id.len()
        );
    }
}

// ---------------------------------------------------------------------------
// Stored and echoed verbatim, on both backends.

/// What one run of the binary gave.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `training-credits ARGS` on the ledger at `url`, in a folder of its
/// own, with nothing of the test's environment.
async fn binary(url: &str, args: &[String]) -> Run {
    let url = url.to_owned();
    let args = args.to_vec();
    tokio::task::spawn_blocking(move || {
        let folder = tempfile::tempdir().expect("a working folder");
        let mut command = std::process::Command::new(common::BINARY);
        command.args(&args).current_dir(folder.path());
        for variable in common::contract_variables() {
            command.env_remove(variable);
        }
        command.env("DATABASE_URL", url);
        let output = command.output().expect("the binary runs");
        Run {
            code: output.status.code(),
            stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    })
    .await
    .expect("the run finishes")
}

/// `account show ID` as JSON.
async fn account_show(url: &str, account_id: &str) -> Value {
    let run = binary(url, &["account".into(), "show".into(), account_id.into()]).await;
    assert_eq!(run.code, Some(0), "account show: {}", run.stderr);
    serde_json::from_str(&run.stdout).expect("account show prints JSON")
}

/// A report of `kind` on one account, in CSV and in XLSX: the rows of
/// each (header first), as text.
async fn report(url: &str, kind: &str, account_id: &str) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    let dir = tempfile::tempdir().expect("a folder");
    let mut sheets = Vec::new();
    for format in ["csv", "xlsx"] {
        let out = dir.path().join(format!("{kind}.{format}"));
        let args: Vec<String> = [
            "report",
            kind,
            "--format",
            format,
            "--account",
            account_id,
            "--out",
            &out.display().to_string(),
        ]
        .map(str::to_owned)
        .to_vec();
        let run = binary(url, &args).await;
        assert_eq!(run.code, Some(0), "report {kind} {format}: {}", run.stderr);
        sheets.push(if format == "csv" {
            let mut reader = csv::ReaderBuilder::new()
                .has_headers(false)
                .from_path(&out)
                .expect("the CSV opens");
            reader
                .records()
                .map(|r| r.expect("a CSV record").iter().map(str::to_owned).collect())
                .collect()
        } else {
            use calamine::Reader;
            let mut workbook: calamine::Xlsx<_> =
                calamine::open_workbook(&out).expect("the workbook opens");
            let range = workbook.worksheet_range(kind).expect("the worksheet");
            range
                .rows()
                .map(|row| row.iter().map(|cell| cell.to_string()).collect())
                .collect()
        });
    }
    let xlsx = sheets.pop().expect("xlsx");
    let csv = sheets.pop().expect("csv");
    (csv, xlsx)
}

/// The cells of `column` in `rows` (header first).
fn column(rows: &[Vec<String>], name: &str) -> Vec<String> {
    let at = rows[0]
        .iter()
        .position(|h| h == name)
        .unwrap_or_else(|| panic!("a column {name} in {:?}", rows[0]));
    rows[1..].iter().map(|row| row[at].clone()).collect()
}

fn applied(outcome: Outcome, what: &str) {
    assert_eq!(outcome, Outcome::Applied, "{what}");
}

/// Every free-text field of every inbound type, with each payload: stored as
/// sent, echoed as sent in the outbound events and emails that carry it, in
/// `account show` and in the CSV and XLSX reports (none of the payloads
/// starts with a character a spreadsheet would run, so no quote is added).
async fn every_free_text_field_is_stored_and_echoed_verbatim<S: Store>(mut w: World<S>) {
    for (i, (label, t)) in payloads().into_iter().enumerate() {
        let t = t.as_str();
        let what = |step: &str| format!("{label}: {step}");
        let account = format!("acct-{i}");
        let boss = format!("boss{i}@acme.test");
        let second = format!("second{i}@acme.test");
        let code = format!("CODE-{i:04}");

        // account.opened: name, owners[].name, notes.
        applied(
            w.send(
                "credits.account.opened",
                json!({
                    "account_id": account, "name": t, "notes": t,
                    "owners": [{"email": boss, "name": t}],
                    "approval_mode": "manual", "code": code,
                }),
            )
            .await,
            &what("opened"),
        );
        let opened = w.last_event("training-credits.account.opened").await;
        assert_eq!(opened["name"], t, "{}", what("opened event name"));
        assert_eq!(
            opened["owners"][0]["name"],
            t,
            "{}",
            what("opened event owner")
        );
        let stored = w.account(&account).await;
        assert_eq!(stored.name, t, "{}", what("stored name"));
        assert_eq!(stored.notes.as_deref(), Some(t), "{}", what("stored notes"));
        assert_eq!(stored.owners[0].name, t, "{}", what("stored owner name"));

        // account.owner_added: owner.name, stored and in the owners' email.
        applied(
            w.send(
                "credits.account.owner_added",
                json!({"account_id": account, "actor": boss, "owner": {"email": second, "name": t}}),
            )
            .await,
            &what("owner added"),
        );
        let stored = w.account(&account).await;
        assert_eq!(stored.owners[1].name, t, "{}", what("stored added owner"));
        assert!(
            w.emails_to(&boss)
                .await
                .iter()
                .any(|m| m.text.contains(&format!("added {t} <{second}>"))),
            "{}",
            what("owner_added email")
        );

        // account.updated: name and notes, old and new echoed in `changes`.
        let renamed = format!("{t} (2)");
        applied(
            w.send(
                "credits.account.updated",
                json!({"account_id": account, "actor": boss, "name": renamed, "notes": renamed}),
            )
            .await,
            &what("updated"),
        );
        let changes = w.last_event("training-credits.account.updated").await["changes"].clone();
        for field in ["name", "notes"] {
            let change = changes
                .as_array()
                .expect("changes")
                .iter()
                .find(|c| c["field"] == field)
                .unwrap_or_else(|| panic!("{}", what(field)));
            assert_eq!(change["old"], t, "{}", what(&format!("{field} old")));
            assert_eq!(
                change["new"],
                renamed.as_str(),
                "{}",
                what(&format!("{field} new"))
            );
        }

        // redemption.requested: learner.name and item.title, stored and in
        // the owners' approval email; approved with a note; unenrolled
        // with a reason.
        applied(w.purchase(&account, "p1", "100").await, &what("purchase"));
        let request = format!("r-{i}");
        let learner = format!("l-{i}");
        let learner_email = format!("{learner}@learners.test");
        let requested_at = w.now;
        applied(
            w.send_from(
                "lms",
                "credits.redemption.requested",
                json!({
                    "request_id": request, "code": code,
                    "learner": {"id": learner, "email": learner_email, "name": t},
                    "item": {"id": "c1", "kind": "course", "title": t},
                    "cost": "5", "requested_at": requested_at,
                }),
            )
            .await,
            &what("requested"),
        );
        let kept = w.find_request(&request).await.expect("the request");
        assert_eq!(kept.learner.name, t, "{}", what("stored learner name"));
        assert_eq!(kept.item.title, t, "{}", what("stored item title"));
        let pending = w.emails_to(&boss).await;
        assert!(
            pending.iter().any(|m| m.text.contains(&format!(
                "{t} <{learner_email}> asks to redeem 5.00 training credits for \"{t}\"."
            ))),
            "{}",
            what("pending email")
        );
        applied(
            w.send(
                "credits.redemption.approved",
                json!({"request_id": request, "approver": boss, "note": t}),
            )
            .await,
            &what("approved with a note"),
        );
        let approved = w.emails_to(&learner_email).await;
        assert!(
            approved.iter().any(|m| m.text.contains(&format!(
                "Hello {t}, Your request to redeem 5.00 training credits for {t} has been approved."
            ))),
            "{}",
            what("approval email")
        );
        assert!(approved.iter().all(|m| m.to_name.as_deref() == Some(t)));
        let unenrolled_at = w.now;
        applied(
            w.send_from(
                "lms",
                "credits.enrollment.unenrolled",
                json!({"request_id": request, "unenrolled_at": unenrolled_at, "reason": t}),
            )
            .await,
            &what("unenrolled with a reason"),
        );
        assert_eq!(
            w.last_event("training-credits.redemption.refunded").await["request_id"],
            request.as_str()
        );

        // redemption.denied: reason, stored and echoed in event and email.
        let denied = format!("r2-{i}");
        applied(
            w.request(&denied, &code, &format!("m-{i}"), "c2", "5")
                .await,
            &what("second request"),
        );
        applied(
            w.send(
                "credits.redemption.denied",
                json!({"request_id": denied, "approver": boss, "reason": t}),
            )
            .await,
            &what("denied"),
        );
        assert_eq!(
            w.last_event("training-credits.redemption.denied").await["reason"],
            t,
            "{}",
            what("denied event reason")
        );
        let kept = w.find_request(&denied).await.expect("the request");
        assert_eq!(kept.reason.as_deref(), Some(t), "{}", what("stored reason"));
        assert!(
            w.emails_to(&format!("m-{i}@learners.test"))
                .await
                .iter()
                .any(|m| m.text.contains(&format!("was denied: {t}."))),
            "{}",
            what("denial email")
        );

        // lot.extended: reason (accepted; the ledger keeps no reason of an
        // extension, so there is nothing to echo).
        applied(
            w.send_staff(
                "credits.lot.extended",
                json!({"account_id": account, "purchase_id": "p1",
                       "expires_at": "2030-01-01T00:00:00Z", "actor": "staff@admin.test", "reason": t}),
            )
            .await,
            &what("lot extended with a reason"),
        );

        // `account show` and the reports, before the account is closed.
        let shown = account_show(&w.url, &account).await;
        assert_eq!(
            shown["name"],
            renamed.as_str(),
            "{}",
            what("account show name")
        );
        assert_eq!(
            shown["notes"],
            renamed.as_str(),
            "{}",
            what("account show notes")
        );
        for owner in shown["owners"].as_array().expect("owners") {
            assert_eq!(owner["name"], t, "{}", what("account show owner name"));
        }
        let (csv, xlsx) = report(&w.url, "redemptions", &account).await;
        for (format, rows) in [("csv", &csv), ("xlsx", &xlsx)] {
            let titles = column(rows, "item_title");
            assert_eq!(titles.len(), 2, "{}", what(format));
            assert_eq!(titles[0], t, "{}", what(&format!("{format} item_title")));
        }
        let (csv, xlsx) = report(&w.url, "audit", &account).await;
        for (format, rows) in [("csv", &csv), ("xlsx", &xlsx)] {
            let fields = column(rows, "field");
            let olds = column(rows, "old");
            let news = column(rows, "new");
            for field in ["name", "notes"] {
                let at = fields
                    .iter()
                    .position(|f| f == field)
                    .unwrap_or_else(|| panic!("{}", what(&format!("{format} audit {field}"))));
                assert_eq!(
                    olds[at],
                    t,
                    "{}",
                    what(&format!("{format} audit {field} old"))
                );
                assert_eq!(
                    news[at],
                    renamed,
                    "{}",
                    what(&format!("{format} audit {field} new"))
                );
            }
        }
        let (csv, xlsx) = report(&w.url, "credits", &account).await;
        for (format, rows) in [("csv", &csv), ("xlsx", &xlsx)] {
            assert_eq!(
                column(rows, "account_name"),
                std::slice::from_ref(&renamed),
                "{}",
                what(format)
            );
            assert_eq!(
                column(rows, "notes"),
                std::slice::from_ref(&renamed),
                "{}",
                what(format)
            );
        }

        // account.closed: reason, in the owners' email.
        applied(
            w.send_staff(
                "credits.account.closed",
                json!({"account_id": account, "actor": "staff@admin.test", "reason": t}),
            )
            .await,
            &what("closed"),
        );
        assert!(
            w.emails_to(&second)
                .await
                .iter()
                .any(|m| m.text.contains(&format!(
                    "closed the training credit account {renamed} ({t})."
                ))),
            "{}",
            what("closing email")
        );
    }
    for email in w.emails().await {
        assert!(
            !email.subject.chars().any(char::is_control),
            "a subject is one line: {:?}",
            email.subject
        );
    }
    w.verify_ok().await;
}

/// `source` is part of the idempotency key: a hostile one is stored as sent,
/// recognised as sent, and told apart from one a character away.
async fn a_hostile_source_is_kept_verbatim_in_the_idempotency_key<S: Store>(mut w: World<S>) {
    applied(
        w.open("acme", "manual", "boss@acme.test", "ACME-1234")
            .await,
        "opened",
    );
    let mut sources: Vec<String> = payloads()
        .into_iter()
        .map(|(_, text)| text)
        .filter(|text| text.chars().count() < 256)
        .collect();
    sources.push(ten_kb_of_unicode().chars().take(256).collect());
    for (i, source) in sources.iter().enumerate() {
        let event = |source: &str, notes: &str| {
            json!({
                "specversion": "1.0", "id": format!("same-id-{i}"), "source": source,
                "type": "credits.account.updated",
                "data": {"account_id": "acme", "actor": "boss@acme.test", "notes": notes},
            })
        };
        let first = event(source, &format!("first {i}"));
        assert_eq!(
            w.deliver(first.to_string().as_bytes()).await,
            Ok(Outcome::Applied),
            "source {i}"
        );
        assert_eq!(
            w.deliver(first.to_string().as_bytes()).await,
            Ok(Outcome::Duplicate),
            "source {i} again"
        );
        let conflict = event(source, &format!("other {i}"));
        match w.deliver(conflict.to_string().as_bytes()).await {
            Ok(Outcome::Dead { reason, .. }) => assert_eq!(reason, DeadReason::IdConflict),
            other => panic!("source {i}: the same key with another body: {other:?}"),
        }
        // One character off: another publisher, another event.
        let mut near: String = source.chars().take(255).collect();
        near.push('\'');
        assert_ne!(&near, source);
        let other = event(&near, &format!("near {i}"));
        assert_eq!(
            w.deliver(other.to_string().as_bytes()).await,
            Ok(Outcome::Applied),
            "source {i} one character off"
        );
    }
    w.verify_ok().await;
}

/// Only a `source` equal to one of `ADMIN_SOURCES` is staff: no case,
/// space, invisible or control character makes another one pass.
async fn only_an_exact_admin_source_is_staff<S: Store>(mut w: World<S>) {
    applied(
        w.open("acme", "automatic", "boss@acme.test", "ACME-1234")
            .await,
        "opened",
    );
    for source in [
        "Admin",
        "ADMIN",
        " admin",
        "admin ",
        "admin\n",
        "admin\r\n",
        "admin\t",
        "admin\u{200b}",
        "\u{feff}admin",
        "аdmin", // Cyrillic а
        "admin,admin",
        "'admin'",
        "admin' OR '1'='1",
    ] {
        let outcome = w
            .send_from(
                source,
                "credits.account.closed",
                json!({"account_id": "acme", "actor": "staff@admin.test"}),
            )
            .await;
        assert_eq!(
            outcome,
            Outcome::Refused(Refusal::NotStaff),
            "source {source:?}"
        );
    }
    assert_eq!(
        w.account("acme").await.status,
        training_credits::domain::model::AccountStatus::Active
    );
    applied(w.close("acme").await, "closed by the real staff source");
}

// ---------------------------------------------------------------------------
// Email header injection.

/// Texts that would add a header, end the header block, or add a
/// recipient if a name or title reached a header unfolded or unquoted.
const HEADER_ATTACKS: &[&str] = &[
    "Ann\r\nBcc: thief@evil.test",
    "Ann\nBcc: thief@evil.test",
    "Ann\rBcc: thief@evil.test",
    "Ann\r\n\r\nInjected body",
    "Ann\r\n Bcc: folded@evil.test",
    "Ann\tBcc: thief@evil.test",
    "Ann\u{85}Bcc: thief@evil.test",
    "Ann\u{2028}Bcc: thief@evil.test",
    "Ann <thief@evil.test>, Eve <eve@evil.test>",
    "thief@evil.test",
    "\"Ann\" <thief@evil.test>",
    "=?UTF-8?Q?Ann=0D=0ABcc:_thief@evil.test?=",
    "Ann\r\nX-Injected: yes\r\nCc: thief@evil.test",
];

/// The headers an email of ours may have, in any part.
const HEADERS_ALLOWED: &[&str] = &[
    "from",
    "to",
    "subject",
    "message-id",
    "mime-version",
    "date",
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
];

/// The envelope recipients and the raw text of one message.
type Received = (Vec<String>, String);

/// An SMTP server on a local socket that records the envelope (`MAIL FROM`,
/// `RCPT TO`) and the data of every message it accepts.
struct RecordingSmtp {
    port: u16,
    /// (envelope recipients, raw message) per message.
    received: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingSmtp {
    async fn start() -> RecordingSmtp {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a local port");
        let port = listener.local_addr().expect("an address").port();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let sink = sink.clone();
                tokio::spawn(async move {
                    let (read, mut write) = socket.into_split();
                    let mut lines = BufReader::new(read);
                    let _ = write.write_all(b"220 recorder ESMTP\r\n").await;
                    let mut recipients = Vec::new();
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if lines.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let upper = line.trim_end().to_ascii_uppercase();
                        let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO")
                        {
                            b"250-recorder\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
                        } else if upper.starts_with("RCPT TO:") {
                            recipients.push(line.trim_end()[8..].trim().to_owned());
                            b"250 ok\r\n"
                        } else if upper.starts_with("DATA") {
                            let _ = write.write_all(b"354 go on\r\n").await;
                            let mut data = String::new();
                            loop {
                                line.clear();
                                if lines.read_line(&mut line).await.unwrap_or(0) == 0 {
                                    return;
                                }
                                if line == ".\r\n" {
                                    break;
                                }
                                // Undo the dot-stuffing of the transparency rule.
                                data.push_str(line.strip_prefix('.').unwrap_or(&line));
                            }
                            sink.lock()
                                .expect("the recorder lock")
                                .push((std::mem::take(&mut recipients), data));
                            b"250 kept\r\n"
                        } else if upper.starts_with("QUIT") {
                            let _ = write.write_all(b"221 bye\r\n").await;
                            return;
                        } else if upper.starts_with("RSET") {
                            recipients.clear();
                            b"250 ok\r\n"
                        } else {
                            b"250 ok\r\n"
                        };
                        if write.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        RecordingSmtp {
            port,
            received,
            task,
        }
    }

    fn url(&self) -> url::Url {
        url::Url::parse(&format!("smtp://127.0.0.1:{}", self.port)).expect("a URL")
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("the recorder lock").clone()
    }
}

impl Drop for RecordingSmtp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks one rendered email as it went out: no header but ours in any
/// part, one `To` (the intended address), one `From`, a one-line subject.
fn assert_no_injected_header(raw: &str, email: &training_credits::notify::Email, via: &str) {
    let what = format!("{via} to {}: {:?}", email.to_email, email.subject);
    let message = mail_parser::MessageParser::default()
        .parse(raw.as_bytes())
        .unwrap_or_else(|| panic!("{what}: a MIME message"));
    for (n, part) in message.parts.iter().enumerate() {
        for header in &part.headers {
            let name = header.name().to_ascii_lowercase();
            assert!(
                HEADERS_ALLOWED.contains(&name.as_str()),
                "{what}: part {n} has a header {:?}\n{raw}",
                header.name()
            );
        }
    }
    let root = &message.parts[0].headers;
    for once in ["to", "from", "subject", "message-id"] {
        assert_eq!(
            root.iter()
                .filter(|h| h.name().eq_ignore_ascii_case(once))
                .count(),
            1,
            "{what}: one {once} header"
        );
    }
    let to: Vec<&str> = message
        .to()
        .map(|to| to.iter().filter_map(|a| a.address()).collect())
        .unwrap_or_default();
    assert_eq!(to, [email.to_email.as_str()], "{what}: the one recipient");
    if let Some(name) = message
        .to()
        .and_then(|to| to.first())
        .and_then(|a| a.name())
    {
        assert!(
            !name.chars().any(|c| c == '\r' || c == '\n'),
            "{what}: the display name {name:?} is one line"
        );
    }
    let subject = message.subject().unwrap_or_default();
    assert!(
        !subject.chars().any(char::is_control),
        "{what}: the subject {subject:?} is one line"
    );
    assert_eq!(
        subject, email.subject,
        "{what}: the subject arrives as rendered"
    );
    // The raw header block: every line is a header of ours or the folded
    // continuation of one.
    let head = raw.split("\r\n\r\n").next().unwrap_or_default();
    for line in head.split("\r\n") {
        let continued = line.starts_with(' ') || line.starts_with('\t');
        let named = line
            .split_once(':')
            .is_some_and(|(name, _)| HEADERS_ALLOWED.contains(&name.to_ascii_lowercase().as_str()));
        assert!(
            continued || named,
            "{what}: a header line {line:?} that is not ours"
        );
        assert!(!line.contains('\r') && !line.contains('\n'));
    }
}

async fn names_and_titles_with_line_breaks_never_add_a_header_or_a_recipient<S: Store>(
    mut w: World<S>,
) {
    for (i, attack) in HEADER_ATTACKS.iter().enumerate() {
        let account = format!("acct-{i}");
        let boss = format!("boss{i}@acme.test");
        let code = format!("CODE-{i:04}");
        applied(
            w.send(
                "credits.account.opened",
                json!({
                    "account_id": account, "name": attack,
                    "owners": [{"email": boss, "name": attack}],
                    "approval_mode": "manual", "code": code,
                }),
            )
            .await,
            "opened",
        );
        applied(
            w.send(
                "credits.account.owner_added",
                json!({"account_id": account, "actor": boss,
                       "owner": {"email": format!("second{i}@acme.test"), "name": attack}}),
            )
            .await,
            "owner added",
        );
        applied(w.purchase(&account, "p1", "100").await, "purchase");
        for (n, decision) in ["approved", "denied"].iter().enumerate() {
            let request = format!("r{n}-{i}");
            let requested_at = w.now;
            applied(
                w.send_from(
                    "lms",
                    "credits.redemption.requested",
                    json!({
                        "request_id": request, "code": code,
                        "learner": {"id": format!("l{n}-{i}"), "email": format!("l{n}-{i}@learners.test"), "name": attack},
                        "item": {"id": format!("c{n}"), "kind": "course", "title": attack},
                        "cost": "5", "requested_at": requested_at,
                    }),
                )
                .await,
                "requested",
            );
            applied(
                w.send(
                    &format!("credits.redemption.{decision}"),
                    json!({"request_id": request, "approver": boss, "reason": attack}),
                )
                .await,
                decision,
            );
        }
        applied(
            w.send(
                "credits.account.code_rotated",
                json!({"account_id": account, "actor": boss, "code": format!("NEW-{i:04}")}),
            )
            .await,
            "code rotated",
        );
        applied(
            w.send_staff(
                "credits.account.closed",
                json!({"account_id": account, "actor": "staff@admin.test", "reason": attack}),
            )
            .await,
            "closed",
        );
    }
    let emails = w.emails().await;
    let from: lettre::message::Mailbox = "Training Credits <no-reply@localhost>"
        .parse()
        .expect("a mailbox");

    // As .eml files in MAIL_DIR.
    let dir = tempfile::tempdir().expect("a folder");
    let files = training_credits::dispatch::mail::Mailer::files(dir.path().to_owned());
    for email in &emails {
        files.send(&from, email).await.expect("the .eml is written");
    }
    let mut written = 0;
    for entry in std::fs::read_dir(dir.path()).expect("the mail folder") {
        let raw = std::fs::read_to_string(entry.expect("an entry").path()).expect("an .eml");
        let message_id = raw
            .lines()
            .find_map(|l| l.strip_prefix("Message-ID: "))
            .expect("a Message-ID")
            .to_owned();
        let email = emails
            .iter()
            .find(|e| e.message_id == message_id)
            .expect("the email of this file");
        assert_no_injected_header(&raw, email, ".eml");
        written += 1;
    }
    assert_eq!(written, emails.len(), "one .eml per email");

    // Through SMTP: the envelope names the intended recipient only.
    let smtp = RecordingSmtp::start().await;
    let mailer = training_credits::dispatch::mail::Mailer::smtp(&smtp.url()).expect("a mailer");
    for email in &emails {
        mailer
            .send(&from, email)
            .await
            .expect("the server takes it");
    }
    let received = smtp.received();
    assert_eq!(received.len(), emails.len(), "one message per email");
    for (email, (recipients, raw)) in emails.iter().zip(&received) {
        assert_eq!(
            recipients,
            &[format!("<{}>", email.to_email)],
            "the SMTP envelope of {:?}",
            email.subject
        );
        assert_no_injected_header(raw, email, "SMTP");
    }
    // Every template that carries a name or title was among them.
    let subjects: Vec<&str> = emails.iter().map(|e| e.subject.as_str()).collect();
    for start in [
        "Approval needed:",
        "Approved:",
        "Not approved:",
        "New owner of",
        "New redemption code for",
        "100.00 training credits added to",
    ] {
        assert!(
            subjects.iter().any(|s| s.starts_with(start)),
            "a {start:?} email"
        );
    }
    assert!(subjects.iter().any(|s| s.ends_with("was closed")));
    eprintln!(
        "{} emails of {} hostile names and titles checked as .eml and through SMTP",
        emails.len(),
        HEADER_ATTACKS.len()
    );
}

on_both_backends!(
    instants_at_the_ends_of_the_calendar_are_refused_or_echoed_as_rfc_3339,
    every_free_text_field_is_stored_and_echoed_verbatim,
    a_hostile_source_is_kept_verbatim_in_the_idempotency_key,
    only_an_exact_admin_source_is_staff,
    names_and_titles_with_line_breaks_never_add_a_header_or_a_recipient,
);
