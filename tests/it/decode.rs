//! Every way an inbound message can be refused (SPEC §5), as the typed
//! outcomes the worker acts on: the dead-letter reasons of `decode`
//! (`too_large`, `invalid_json`, `invalid_envelope`, `unknown_type`,
//! `schema_violation`), the ones the ledger finds (`id_conflict`, amount
//! ranges, report columns), the retries (`unknown_account`,
//! `unknown_request`), and what must survive untouched: hostile text and the
//! good messages of a batch that also holds bad ones.

use crate::support as common;

use std::sync::LazyLock;

use common::{STAFF, World};
use proptest::prelude::*;
use serde_json::{Value, json};
use training_credits::decode::{MESSAGE_BYTES_MAX, Malformed, Schemas, decode};
use training_credits::domain::{DeadReason, InboundType, Outcome, Rejection, RetryReason};
use training_credits::store::Store;

static SCHEMAS: LazyLock<Schemas> = LazyLock::new(|| Schemas::load().expect("the schemas compile"));

/// The reasons `decode` itself may give; the others need the ledger.
const DECODE_REASONS: [DeadReason; 5] = [
    DeadReason::TooLarge,
    DeadReason::InvalidJson,
    DeadReason::InvalidEnvelope,
    DeadReason::UnknownType,
    DeadReason::SchemaViolation,
];

/// Every inbound type of SPEC §5.1 with the fields it requires there.
const INBOUND: [(&str, &[&str]); 15] = [
    (
        "credits.account.opened",
        &["account_id", "owners", "approval_mode"],
    ),
    ("credits.account.updated", &["account_id", "actor"]),
    (
        "credits.account.owner_added",
        &["account_id", "actor", "owner"],
    ),
    (
        "credits.account.owner_removed",
        &["account_id", "actor", "email"],
    ),
    ("credits.account.code_rotated", &["account_id", "actor"]),
    ("credits.account.closed", &["account_id", "actor"]),
    (
        "credits.purchase.completed",
        &["account_id", "purchase_id", "credits", "purchased_at"],
    ),
    (
        "credits.purchase.refunded",
        &["account_id", "purchase_id", "refund_id", "refunded_at"],
    ),
    (
        "credits.lot.extended",
        &["account_id", "purchase_id", "expires_at", "actor"],
    ),
    (
        "credits.redemption.requested",
        &[
            "request_id",
            "code",
            "learner",
            "item",
            "cost",
            "requested_at",
        ],
    ),
    ("credits.redemption.approved", &["request_id", "approver"]),
    ("credits.redemption.denied", &["request_id", "approver"]),
    (
        "credits.redemption.cancelled",
        &["request_id", "learner_id"],
    ),
    (
        "credits.enrollment.unenrolled",
        &["request_id", "unenrolled_at"],
    ),
    (
        "credits.report.requested",
        &["report", "format", "recipient"],
    ),
];

/// A valid `data` of each inbound type.
fn valid_data(type_name: &str) -> Value {
    match type_name {
        "credits.account.opened" => json!({
            "account_id": "acme",
            "owners": [{"email": "boss@acme.test", "name": "Boss"}],
            "approval_mode": "manual",
        }),
        "credits.account.updated" => {
            json!({"account_id": "acme", "actor": "boss@acme.test", "name": "Acme Ltd"})
        }
        "credits.account.owner_added" => json!({
            "account_id": "acme",
            "actor": "boss@acme.test",
            "owner": {"email": "ann@acme.test", "name": "Ann"},
        }),
        "credits.account.owner_removed" => {
            json!({"account_id": "acme", "actor": "boss@acme.test", "email": "ann@acme.test"})
        }
        "credits.account.code_rotated" => json!({"account_id": "acme", "actor": "boss@acme.test"}),
        "credits.account.closed" => json!({"account_id": "acme", "actor": "staff@training.test"}),
        "credits.purchase.completed" => json!({
            "account_id": "acme",
            "purchase_id": "p1",
            "credits": "100",
            "purchased_at": "2026-01-01T09:00:00Z",
        }),
        "credits.purchase.refunded" => json!({
            "account_id": "acme",
            "purchase_id": "p1",
            "refund_id": "rf1",
            "refunded_at": "2026-01-02T00:00:00Z",
        }),
        "credits.lot.extended" => json!({
            "account_id": "acme",
            "purchase_id": "p1",
            "expires_at": "2028-01-01T00:00:00Z",
            "actor": "staff@training.test",
        }),
        "credits.redemption.requested" => json!({
            "request_id": "r1",
            "code": "ACME-1234",
            "learner": {"id": "l1", "email": "l1@learners.test", "name": "Lee"},
            "item": {"id": "c1", "kind": "course", "title": "Rust 101"},
            "cost": "30",
            "requested_at": "2026-01-01T09:00:00Z",
        }),
        "credits.redemption.approved" | "credits.redemption.denied" => {
            json!({"request_id": "r1", "approver": "boss@acme.test"})
        }
        "credits.redemption.cancelled" => json!({"request_id": "r1", "learner_id": "l1"}),
        "credits.enrollment.unenrolled" => {
            json!({"request_id": "r1", "unenrolled_at": "2026-01-02T09:00:00Z"})
        }
        "credits.report.requested" => json!({
            "report": "transactions",
            "format": "csv",
            "recipient": "boss@acme.test",
            "account_id": "acme",
        }),
        other => panic!("no example of {other}"),
    }
}

fn envelope(type_name: &str, data: Value) -> Value {
    json!({
        "specversion": "1.0",
        "id": "ev-1",
        "source": "portal",
        "type": type_name,
        "time": "2026-01-01T09:00:00Z",
        "datacontenttype": "application/json",
        "data": data,
    })
}

/// A valid event of `type_name` with `data[pointer]` set to `value`.
fn with(type_name: &str, pointer: &str, value: Value) -> Value {
    let mut data = valid_data(type_name);
    set(&mut data, pointer, value);
    envelope(type_name, data)
}

/// A valid event of `type_name` without `data[pointer]`.
fn without(type_name: &str, pointer: &str) -> Value {
    let mut data = valid_data(type_name);
    let (parent, last) = pointer.rsplit_once('/').expect("a pointer");
    data.pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .unwrap_or_else(|| panic!("{type_name} has {parent}"))
        .remove(last)
        .unwrap_or_else(|| panic!("{type_name} has {pointer}"));
    envelope(type_name, data)
}

/// Sets `value[pointer]`, creating the objects on the way.
fn set(value: &mut Value, pointer: &str, new: Value) {
    let mut at = value;
    let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            match at {
                Value::Array(items) => items[part.parse::<usize>().expect("an index")] = new,
                _ => {
                    at.as_object_mut()
                        .expect("an object on the way")
                        .insert((*part).to_owned(), new);
                }
            }
            return;
        }
        at = match at {
            Value::Array(items) => &mut items[part.parse::<usize>().expect("an index")],
            _ => at
                .as_object_mut()
                .expect("an object on the way")
                .entry(*part)
                .or_insert_with(|| json!({})),
        };
    }
}

fn bytes(event: &Value) -> Vec<u8> {
    event.to_string().into_bytes()
}

fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.chars().take(200).collect()
}

/// A detail is what an operator reads in `dlq list`: one line, a few words
/// at least, and short enough for an AMQP header.
fn assert_useful(detail: &str, context: &str) {
    let trimmed = detail.trim();
    assert!(
        trimmed.chars().count() >= 10 && trimmed.contains(' '),
        "{context}: the detail {detail:?} does not say what is wrong"
    );
    assert!(
        !detail.contains('\n') && !detail.contains('\r'),
        "{context}: the detail {detail:?} is not one line"
    );
    assert!(
        detail.len() <= 1024,
        "{context}: the detail is {} bytes long",
        detail.len()
    );
}

/// Decodes `bytes`, which must be refused for `reason` with a useful detail.
fn refused(bytes: &[u8], reason: DeadReason) -> Malformed {
    match decode(&SCHEMAS, bytes) {
        Ok(decoded) => panic!(
            "{} was decoded into {:?}, but should be {reason}",
            shown(bytes),
            decoded.command
        ),
        Err(malformed) => {
            assert_eq!(
                malformed.reason,
                reason,
                "{}: {}",
                shown(bytes),
                malformed.detail
            );
            assert_useful(&malformed.detail, &shown(bytes));
            malformed
        }
    }
}

fn refused_event(event: &Value, reason: DeadReason) -> Malformed {
    refused(&bytes(event), reason)
}

fn accepted(event: &Value) {
    if let Err(malformed) = decode(&SCHEMAS, &bytes(event)) {
        panic!("{event} was refused: {malformed:?}");
    }
}

/// Whether the message ends in the dead-letter queue at once for `reason`,
/// whichever of decode or the ledger finds it; returns the detail.
fn dead_at_once(result: Result<Outcome, Malformed>, reason: DeadReason, context: &str) -> String {
    let (got, detail) = match result {
        Err(malformed) => (malformed.reason, malformed.detail),
        Ok(Outcome::Dead { reason, detail }) => (reason, detail),
        Ok(other) => panic!("{context}: expected a dead letter {reason}, got {other:?}"),
    };
    assert_eq!(got, reason, "{context}: {detail}");
    assert_useful(&detail, context);
    detail
}

// ---------------------------------------------------------------------------
// Valid messages decode.

#[test]
fn the_examples_cover_every_inbound_type_and_all_decode() {
    let mut known: Vec<&str> = InboundType::ALL.iter().map(|k| k.as_str()).collect();
    known.sort_unstable();
    let mut listed: Vec<&str> = INBOUND.iter().map(|(t, _)| *t).collect();
    listed.sort_unstable();
    assert_eq!(known, listed);
    for (type_name, _) in INBOUND {
        let decoded = decode(
            &SCHEMAS,
            &bytes(&envelope(type_name, valid_data(type_name))),
        )
        .unwrap_or_else(|m| panic!("{type_name}: {m:?}"));
        assert_eq!(decoded.kind.as_str(), type_name);
        assert_eq!(decoded.command.type_name(), type_name);
        assert_eq!(decoded.key.source, "portal");
        assert_eq!(decoded.key.id, "ev-1");
    }
}

#[test]
fn optional_attributes_and_unknown_extra_fields_do_not_stop_a_message() {
    let mut event = envelope(
        "credits.purchase.completed",
        valid_data("credits.purchase.completed"),
    );
    let object = event.as_object_mut().unwrap();
    object.remove("time");
    object.remove("datacontenttype");
    object.insert("subject".into(), json!("acme"));
    object.insert("traceparent".into(), json!("00-abc-def-01"));
    event["data"]["coupon"] = json!("SUMMER");
    accepted(&event);
}

// ---------------------------------------------------------------------------
// too_large

#[test]
fn a_message_over_256_kib_is_too_large_and_one_of_exactly_256_kib_is_not() {
    assert_eq!(MESSAGE_BYTES_MAX, 256 * 1024);
    let event = bytes(&envelope(
        "credits.account.opened",
        valid_data("credits.account.opened"),
    ));
    // Trailing whitespace keeps the JSON valid at any size.
    let mut exact = event.clone();
    exact.resize(256 * 1024, b' ');
    assert!(
        decode(&SCHEMAS, &exact).is_ok(),
        "256 KiB exactly is allowed"
    );

    let mut over = exact.clone();
    over.push(b' ');
    let malformed = refused(&over, DeadReason::TooLarge);
    assert!(
        malformed.detail.contains("262145"),
        "the detail names the size: {}",
        malformed.detail
    );

    // Size is judged before anything else: a huge non-JSON body is too large.
    let garbage = vec![b'x'; 300 * 1024];
    refused(&garbage, DeadReason::TooLarge);
    let mut huge = envelope(
        "credits.account.opened",
        valid_data("credits.account.opened"),
    );
    huge["data"]["padding"] = json!("z".repeat(1024 * 1024));
    refused_event(&huge, DeadReason::TooLarge);
}

// ---------------------------------------------------------------------------
// invalid_json

#[test]
fn bodies_that_are_not_json_are_invalid_json() {
    let valid = bytes(&envelope(
        "credits.purchase.completed",
        valid_data("credits.purchase.completed"),
    ));
    let mut latin1 = String::from_utf8(valid.clone())
        .unwrap()
        .replace("acme", "ac\u{e9}me")
        .into_bytes();
    // Replace the UTF-8 "é" (C3 A9) by its Latin-1 byte (E9).
    let at = latin1.windows(2).position(|w| w == [0xC3, 0xA9]).unwrap();
    latin1.splice(at..at + 2, [0xE9]);
    let utf16: Vec<u8> = String::from_utf8(valid.clone())
        .unwrap()
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let mut two = valid.clone();
    two.push(b'\n');
    two.extend_from_slice(&valid);

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("plain text", b"not json at all".to_vec()),
        ("an empty body", Vec::new()),
        ("only whitespace", b"  \n\t ".to_vec()),
        ("truncated JSON", valid[..valid.len() / 2].to_vec()),
        (
            "JSON cut before its last brace",
            valid[..valid.len() - 1].to_vec(),
        ),
        ("non-UTF-8 bytes", vec![0xFF, 0xFE, 0x00, 0x7B, 0x80, 0x81]),
        ("a Latin-1 byte inside a string", latin1),
        ("UTF-16", utf16),
        ("two events in one body (JSON Lines)", two),
        ("trailing garbage", [valid.as_slice(), b" x"].concat()),
        ("a lone surrogate", br#"{"id": "\ud800"}"#.to_vec()),
        ("NaN", b"NaN".to_vec()),
        ("single quotes", b"{'id': 'ev-1'}".to_vec()),
        ("XML", b"<event id=\"ev-1\"/>".to_vec()),
        (
            "nesting far too deep",
            [vec![b'['; 100_000], vec![b']'; 100_000]].concat(),
        ),
    ];
    for (what, body) in cases {
        let malformed = match decode(&SCHEMAS, &body) {
            Ok(_) => panic!("{what} was decoded"),
            Err(m) => m,
        };
        assert_eq!(
            malformed.reason,
            DeadReason::InvalidJson,
            "{what}: {}",
            malformed.detail
        );
        assert_useful(&malformed.detail, what);
        assert_eq!(malformed.key, None, "{what} has no key to speak of");
    }
}

// ---------------------------------------------------------------------------
// invalid_envelope

#[test]
fn a_cloud_event_without_id_source_type_specversion_or_data_is_an_invalid_envelope() {
    for attribute in ["id", "source", "type", "specversion", "data"] {
        let mut event = envelope(
            "credits.purchase.completed",
            valid_data("credits.purchase.completed"),
        );
        event.as_object_mut().unwrap().remove(attribute);
        let malformed = refused_event(&event, DeadReason::InvalidEnvelope);
        assert!(
            malformed.detail.contains(attribute),
            "the detail names `{attribute}`: {}",
            malformed.detail
        );
    }
}

#[test]
fn a_cloud_event_with_bad_attributes_is_an_invalid_envelope() {
    let base = || {
        envelope(
            "credits.purchase.completed",
            valid_data("credits.purchase.completed"),
        )
    };
    let cases: Vec<(&str, &str, Value)> = vec![
        ("specversion 0.3", "specversion", json!("0.3")),
        ("specversion as a number", "specversion", json!(1.0)),
        ("data null", "data", Value::Null),
        ("data an array", "data", json!([{"account_id": "acme"}])),
        ("data a string", "data", json!("{\"account_id\": \"acme\"}")),
        ("data a number", "data", json!(42)),
        ("an id with a space", "id", json!("ev 1")),
        ("an id over 128 characters", "id", json!("e".repeat(129))),
        ("an empty id", "id", json!("")),
        ("an id that is a number", "id", json!(17)),
        (
            "an id with SQL in it",
            "id",
            json!("1'; DROP TABLE processed; --"),
        ),
        ("an empty source", "source", json!("")),
        (
            "a source that is an object",
            "source",
            json!({"name": "shop"}),
        ),
        ("a type that is a number", "type", json!(7)),
        ("an empty type", "type", json!("")),
        (
            "a time without offset",
            "time",
            json!("2026-01-01T09:00:00"),
        ),
        ("a time that is no time", "time", json!("yesterday")),
        (
            "data that is not JSON",
            "datacontenttype",
            json!("application/xml"),
        ),
    ];
    for (what, attribute, value) in cases {
        let mut event = base();
        event[attribute] = value;
        let malformed = refused_event(&event, DeadReason::InvalidEnvelope);
        assert!(
            malformed.detail.contains(attribute),
            "{what}: the detail names `{attribute}`: {}",
            malformed.detail
        );
    }
    let mut longest = base();
    longest["id"] = json!("e".repeat(128));
    accepted(&longest);
}

#[test]
fn json_that_is_not_an_object_is_an_invalid_envelope() {
    for body in [
        "[]",
        "[{\"id\": \"ev-1\"}]",
        "\"event\"",
        "42",
        "null",
        "true",
        "{}",
    ] {
        let malformed = refused(body.as_bytes(), DeadReason::InvalidEnvelope);
        assert_eq!(malformed.key, None, "{body}");
    }
}

#[test]
fn an_invalid_envelope_keeps_the_key_and_type_it_has_for_the_dead_letter_queue() {
    let mut event = envelope(
        "credits.purchase.completed",
        valid_data("credits.purchase.completed"),
    );
    event["specversion"] = json!("0.3");
    let malformed = refused_event(&event, DeadReason::InvalidEnvelope);
    let key = malformed.key.expect("the key is known");
    assert_eq!((key.source.as_str(), key.id.as_str()), ("portal", "ev-1"));
    assert_eq!(
        malformed.type_name.as_deref(),
        Some("credits.purchase.completed")
    );
}

// ---------------------------------------------------------------------------
// unknown_type

#[test]
fn a_type_that_is_not_an_inbound_type_is_unknown() {
    for type_name in [
        "credits.purchase.cancelled",
        "training-credits.purchase.recorded",
        "CREDITS.PURCHASE.COMPLETED",
        "credits.purchase.completed ",
        "com.example.something",
        "credits",
    ] {
        let event = envelope(type_name, valid_data("credits.purchase.completed"));
        let malformed = refused_event(&event, DeadReason::UnknownType);
        assert!(
            malformed.detail.contains(type_name.trim()),
            "the detail names the type: {}",
            malformed.detail
        );
        assert_eq!(malformed.type_name.as_deref(), Some(type_name));
        assert!(malformed.key.is_some());
    }
}

// ---------------------------------------------------------------------------
// schema_violation, type by type

#[test]
fn a_missing_required_field_of_every_inbound_type_is_a_schema_violation() {
    for (type_name, required) in INBOUND {
        for field in required {
            let malformed = refused_event(
                &without(type_name, &format!("/{field}")),
                DeadReason::SchemaViolation,
            );
            assert!(
                malformed.detail.contains(field),
                "{type_name} without {field}: the detail names it: {}",
                malformed.detail
            );
            assert_eq!(malformed.type_name.as_deref(), Some(type_name));
            let key = malformed.key.expect("the key is known");
            assert_eq!((key.source.as_str(), key.id.as_str()), ("portal", "ev-1"));
        }
    }
}

#[test]
fn a_missing_required_nested_field_is_a_schema_violation() {
    for (type_name, pointer) in [
        ("credits.account.opened", "/owners/0/email"),
        ("credits.account.opened", "/owners/0/name"),
        ("credits.account.owner_added", "/owner/email"),
        ("credits.account.owner_added", "/owner/name"),
        ("credits.redemption.requested", "/learner/id"),
        ("credits.redemption.requested", "/learner/email"),
        ("credits.redemption.requested", "/learner/name"),
        ("credits.redemption.requested", "/item/id"),
        ("credits.redemption.requested", "/item/kind"),
        ("credits.redemption.requested", "/item/title"),
    ] {
        let malformed = refused_event(&without(type_name, pointer), DeadReason::SchemaViolation);
        let field = pointer.rsplit('/').next().unwrap();
        assert!(
            malformed.detail.contains(field),
            "{type_name} without {pointer}: {}",
            malformed.detail
        );
    }
    let no_currency = with(
        "credits.purchase.completed",
        "/price_paid",
        json!({"amount": "100"}),
    );
    refused_event(&no_currency, DeadReason::SchemaViolation);
}

#[test]
fn a_wrongly_typed_field_of_every_inbound_type_is_a_schema_violation() {
    for (type_name, _) in INBOUND {
        let data = valid_data(type_name);
        for (field, value) in data.as_object().unwrap() {
            // An array where a string or amount is expected, a boolean where
            // an object or array is.
            let wrong = if value.is_object() || value.is_array() {
                json!(true)
            } else {
                json!([value])
            };
            let malformed = refused_event(
                &with(type_name, &format!("/{field}"), wrong),
                DeadReason::SchemaViolation,
            );
            assert!(
                malformed.detail.contains(field.as_str()),
                "{type_name} with a wrong {field}: the detail names it: {}",
                malformed.detail
            );
        }
    }
}

#[test]
fn values_outside_the_enumerations_are_a_schema_violation() {
    for (type_name, pointer, value) in [
        (
            "credits.account.opened",
            "/approval_mode",
            json!("sometimes"),
        ),
        (
            "credits.account.opened",
            "/scope",
            json!({"kind": "everything"}),
        ),
        ("credits.account.opened", "/scope", json!({"kind": "group"})),
        (
            "credits.account.opened",
            "/scope",
            json!({"kind": "group", "ids": []}),
        ),
        ("credits.account.opened", "/owners", json!([])),
        ("credits.account.updated", "/status", json!("closed")),
        ("credits.account.updated", "/approval_mode", json!("Manual")),
        ("credits.purchase.completed", "/channel", json!("cash")),
        (
            "credits.purchase.completed",
            "/price_paid",
            json!({"amount": "10", "currency": "usd"}),
        ),
        ("credits.redemption.requested", "/item/kind", json!("book")),
        ("credits.report.requested", "/report", json!("everything")),
        ("credits.report.requested", "/format", json!("pdf")),
    ] {
        refused_event(
            &with(type_name, pointer, value),
            DeadReason::SchemaViolation,
        );
    }
}

#[test]
fn an_account_update_that_changes_nothing_is_a_schema_violation() {
    let event = envelope(
        "credits.account.updated",
        json!({"account_id": "acme", "actor": "boss@acme.test"}),
    );
    refused_event(&event, DeadReason::SchemaViolation);
}

/// Every amount field, with the data around it that makes it valid.
const AMOUNTS: [(&str, &str); 8] = [
    ("credits.purchase.completed", "/credits"),
    ("credits.purchase.refunded", "/credits"),
    ("credits.account.opened", "/learner_limit"),
    ("credits.account.updated", "/learner_limit"),
    ("credits.purchase.completed", "/price_paid/amount"),
    ("credits.redemption.requested", "/cost"),
    ("credits.account.opened", "/low_balance_threshold"),
    ("credits.account.updated", "/low_balance_threshold"),
];

fn with_amount(type_name: &str, pointer: &str, amount: Value) -> Value {
    let mut event = with(type_name, pointer, amount);
    if pointer == "/price_paid/amount" {
        event["data"]["price_paid"]["currency"] = json!("USD");
    }
    event
}

#[test]
fn amounts_with_three_decimals_are_a_schema_violation_as_strings_and_as_numbers() {
    for (type_name, pointer) in AMOUNTS {
        for amount in [
            json!("19.505"),
            json!(19.505),
            json!("0.001"),
            json!(0.001),
            json!("20.000"),
        ] {
            let malformed = refused_event(
                &with_amount(type_name, pointer, amount.clone()),
                DeadReason::SchemaViolation,
            );
            assert!(
                malformed
                    .detail
                    .contains(pointer.rsplit('/').next().unwrap())
                    || malformed.detail.contains("decimals"),
                "{type_name} {pointer} = {amount}: {}",
                malformed.detail
            );
        }
    }
}

#[test]
fn amounts_that_are_not_plain_decimals_are_a_schema_violation() {
    for (type_name, pointer) in AMOUNTS {
        for amount in [
            json!("-5"),
            json!(-5),
            json!(-0.5),
            json!("1e3"),
            json!("1,000"),
            json!("20."),
            json!(".5"),
            json!(" 20"),
            json!("twenty"),
            json!(""),
            json!("NaN"),
            json!(1e300),
            json!(true),
            json!(null),
        ] {
            if amount.is_null() && type_name == "credits.account.updated" {
                continue; // null clears the threshold
            }
            refused_event(
                &with_amount(type_name, pointer, amount),
                DeadReason::SchemaViolation,
            );
        }
    }
}

#[test]
fn amounts_as_strings_or_plain_numbers_with_up_to_two_decimals_decode() {
    for (type_name, pointer) in AMOUNTS {
        for amount in [
            json!("20"),
            json!("19.5"),
            json!("19.50"),
            json!("0.01"),
            json!(20),
            json!(19.5),
            json!(0.1),
        ] {
            accepted(&with_amount(type_name, pointer, amount));
        }
    }
}

/// Every instant field of the inbound types.
const INSTANTS: [(&str, &str); 8] = [
    ("credits.purchase.completed", "/purchased_at"),
    ("credits.purchase.refunded", "/refunded_at"),
    ("credits.purchase.completed", "/expires_at"),
    ("credits.lot.extended", "/expires_at"),
    ("credits.redemption.requested", "/requested_at"),
    ("credits.enrollment.unenrolled", "/unenrolled_at"),
    ("credits.report.requested", "/from"),
    ("credits.report.requested", "/to"),
];

#[test]
fn a_time_without_an_offset_or_not_rfc_3339_is_a_schema_violation() {
    for (type_name, pointer) in INSTANTS {
        for time in [
            "2026-01-01T10:00:00",
            "2026-01-01T10:00:00.123",
            "2026-01-01",
            "10:00:00Z",
            "2026-13-01T10:00:00Z",
            "2026-02-30T10:00:00Z",
            "2026-01-01T25:00:00Z",
            "1 January 2026",
            "1767258000",
            "",
        ] {
            let malformed = refused_event(
                &with(type_name, pointer, json!(time)),
                DeadReason::SchemaViolation,
            );
            assert!(
                malformed.detail.contains(pointer.trim_start_matches('/')),
                "{type_name} {pointer} = {time:?}: {}",
                malformed.detail
            );
        }
        for time in [
            "2027-01-01T10:00:00Z",
            "2027-01-01T10:00:00+02:00",
            "2027-01-01T10:00:00.123456-05:30",
        ] {
            accepted(&with(type_name, pointer, json!(time)));
        }
    }
}

/// Every email field of the inbound types.
const EMAILS: [(&str, &str); 8] = [
    ("credits.account.opened", "/owners/0/email"),
    ("credits.account.updated", "/actor"),
    ("credits.account.owner_added", "/owner/email"),
    ("credits.account.owner_removed", "/email"),
    ("credits.redemption.approved", "/approver"),
    ("credits.redemption.denied", "/approver"),
    ("credits.redemption.requested", "/learner/email"),
    ("credits.report.requested", "/recipient"),
];

#[test]
fn a_bad_email_is_a_schema_violation() {
    for (type_name, pointer) in EMAILS {
        for email in [
            "not-an-email",
            "ann@",
            "@acme.test",
            "ann@@acme.test",
            "ann smith@acme.test",
            "ann@acme.test\r\nBcc: all@acme.test",
            "ann@acme.test>, <eve@evil.test",
            "",
        ] {
            let malformed = refused_event(
                &with(type_name, pointer, json!(email)),
                DeadReason::SchemaViolation,
            );
            assert!(
                malformed
                    .detail
                    .contains(pointer.rsplit('/').next().unwrap())
                    || malformed.detail.contains("email"),
                "{type_name} {pointer} = {email:?}: {}",
                malformed.detail
            );
        }
        accepted(&with(
            type_name,
            pointer,
            json!("Ann.Smith+credits@Acme.Example.com"),
        ));
    }
}

/// Every identifier field of the inbound types.
const IDENTIFIERS: [(&str, &str); 12] = [
    ("credits.account.opened", "/account_id"),
    ("credits.account.opened", "/scope/ids/0"),
    ("credits.account.updated", "/scope_ids/0"),
    ("credits.purchase.completed", "/account_id"),
    ("credits.purchase.completed", "/purchase_id"),
    ("credits.lot.extended", "/purchase_id"),
    ("credits.redemption.requested", "/request_id"),
    ("credits.redemption.requested", "/learner/id"),
    ("credits.redemption.requested", "/item/id"),
    ("credits.redemption.requested", "/item/group_ids/0"),
    ("credits.redemption.cancelled", "/learner_id"),
    ("credits.report.requested", "/account_id"),
];

fn with_identifier(type_name: &str, pointer: &str, id: &str) -> Value {
    let mut event = envelope(type_name, valid_data(type_name));
    match pointer {
        "/scope/ids/0" => event["data"]["scope"] = json!({"kind": "activity", "ids": [id]}),
        "/scope_ids/0" => event["data"]["scope_ids"] = json!([id]),
        "/item/group_ids/0" => event["data"]["item"]["group_ids"] = json!([id]),
        _ => set(&mut event["data"], pointer, json!(id)),
    }
    event
}

#[test]
fn an_identifier_with_bad_characters_or_length_is_a_schema_violation() {
    let too_long = "i".repeat(129);
    for (type_name, pointer) in IDENTIFIERS {
        for id in [
            "",
            "acme 1",
            "acme/1",
            "acme#1",
            "'); DROP TABLE accounts; --",
            "ácme",
            "acme\n",
            "acme\u{0}",
            too_long.as_str(),
        ] {
            refused_event(
                &with_identifier(type_name, pointer, id),
                DeadReason::SchemaViolation,
            );
        }
        accepted(&with_identifier(type_name, pointer, "Acme-1.x_y:z"));
        accepted(&with_identifier(type_name, pointer, &"i".repeat(128)));
    }
}

#[test]
fn a_code_with_bad_characters_is_a_schema_violation() {
    for (type_name, pointer) in [
        ("credits.account.opened", "/code"),
        ("credits.account.code_rotated", "/code"),
        ("credits.redemption.requested", "/code"),
    ] {
        for code in ["ACME/1234", "ACME'--", "", "ÄCME-1234"] {
            refused_event(
                &with(type_name, pointer, json!(code)),
                DeadReason::SchemaViolation,
            );
        }
        accepted(&with(type_name, pointer, json!("acme 1234-xy")));
    }
}

#[test]
fn a_badly_formed_report_column_is_a_schema_violation() {
    for columns in [
        json!([]),
        json!(["At"]),
        json!(["at; DROP"]),
        json!("at,account_id"),
    ] {
        refused_event(
            &with("credits.report.requested", "/columns", columns),
            DeadReason::SchemaViolation,
        );
    }
}

#[test]
fn a_nul_character_anywhere_in_a_message_is_refused() {
    for (pointer, reason) in [
        ("/data/owners/0/name", DeadReason::SchemaViolation),
        ("/data/notes", DeadReason::SchemaViolation),
        ("/data/extra", DeadReason::SchemaViolation),
        ("/source", DeadReason::InvalidEnvelope),
        ("/subject", DeadReason::InvalidEnvelope),
    ] {
        let mut event = envelope(
            "credits.account.opened",
            valid_data("credits.account.opened"),
        );
        set(&mut event, pointer, json!("before\u{0}after"));
        let malformed = refused_event(&event, reason);
        assert!(
            malformed.detail.contains(pointer),
            "{pointer}: {}",
            malformed.detail
        );
    }
    // The escape written out, not the character, is ordinary text.
    accepted(&with("credits.account.opened", "/notes", json!("\\u0000")));
}

#[test]
fn a_purchase_expiring_before_it_was_bought_is_a_schema_violation() {
    for expires_at in [
        "2026-01-01T09:00:00Z",
        "2025-12-31T23:59:59Z",
        "2026-01-01T10:00:00+02:00",
    ] {
        let malformed = refused_event(
            &with(
                "credits.purchase.completed",
                "/expires_at",
                json!(expires_at),
            ),
            DeadReason::SchemaViolation,
        );
        assert!(
            malformed.detail.contains("expires_at"),
            "{}",
            malformed.detail
        );
    }
    accepted(&with(
        "credits.purchase.completed",
        "/expires_at",
        json!("2026-01-01T09:00:00.000001Z"),
    ));
}

#[test]
fn the_detail_of_a_huge_offending_value_stays_short_and_still_says_where() {
    let huge = "9".repeat(200_000);
    for (event, reason, place) in [
        (
            with("credits.purchase.completed", "/credits", json!(huge)),
            DeadReason::SchemaViolation,
            "/data/credits",
        ),
        (
            with("credits.purchase.completed", "/purchase_id", json!(huge)),
            DeadReason::SchemaViolation,
            "/data/purchase_id",
        ),
        (
            with("credits.purchase.completed", "/purchased_at", json!(huge)),
            DeadReason::SchemaViolation,
            "/data/purchased_at",
        ),
        (
            with(
                "credits.redemption.requested",
                "/learner/email",
                json!(huge),
            ),
            DeadReason::SchemaViolation,
            "/data/learner/email",
        ),
        (
            envelope(&huge, valid_data("credits.purchase.completed")),
            DeadReason::InvalidEnvelope,
            "/type",
        ),
    ] {
        let malformed = refused_event(&event, reason);
        assert!(
            malformed.detail.contains(place),
            "{place}: {}",
            malformed.detail
        );
    }
}

#[test]
fn the_same_data_written_another_way_has_the_same_digest() {
    let digest = |text: &str| {
        let data: Value = serde_json::from_str(text).unwrap();
        training_credits::decode::digest("credits.purchase.completed", &data)
    };
    let original = digest(
        r#"{"account_id": "acme", "credits": 100.0, "price_paid": {"amount": 19.50, "currency": "USD"}}"#,
    );
    for same in [
        r#"{"price_paid":{"currency":"USD","amount":19.5},"credits":100,"account_id":"acme"}"#,
        r#"{"account_id":"acme","credits":1e2,"price_paid":{"amount":1.95e1,"currency":"USD"}}"#,
        r#"{ "account_id" : "\u0061cme", "credits" : 100.00, "price_paid" : { "amount" : 19.500, "currency" : "USD" } }"#,
    ] {
        assert_eq!(digest(same), original, "{same}");
    }
    for other in [
        r#"{"account_id": "acme", "credits": "100", "price_paid": {"amount": 19.50, "currency": "USD"}}"#,
        r#"{"account_id": "acme", "credits": 100.01, "price_paid": {"amount": 19.50, "currency": "USD"}}"#,
        r#"{"account_id": "acme", "credits": 100, "price_paid": {"amount": 19.50, "currency": "EUR"}}"#,
        r#"{"account_id": "acme", "credits": 100, "price_paid": {"amount": 19.50, "currency": "USD"}, "note": null}"#,
    ] {
        assert_ne!(digest(other), original, "{other}");
    }
}

// ---------------------------------------------------------------------------
// Property tests: decode never panics and only ever gives its own reasons.

fn check_decode_total(bytes: &[u8]) -> Result<(), TestCaseError> {
    match decode(&SCHEMAS, bytes) {
        Ok(decoded) => {
            prop_assert_eq!(decoded.command.kind(), Some(decoded.kind));
            prop_assert_eq!(decoded.digest.len(), 64);
        }
        Err(malformed) => {
            prop_assert!(
                DECODE_REASONS.contains(&malformed.reason),
                "decode gave {}",
                malformed.reason
            );
            prop_assert!(!malformed.detail.trim().is_empty());
        }
    }
    Ok(())
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(vec![
            "",
            "20",
            "19.50",
            "19.505",
            "-1",
            "0",
            "10000000.01",
            "acme",
            "p1",
            "boss@acme.test",
            "not an email",
            "2026-01-01T09:00:00Z",
            "2026-01-01",
            "manual",
            "automatic",
            "course",
            "csv",
            "all",
            "group",
            "1.0",
            "\u{0}",
            "'); DROP TABLE accounts; --",
        ])
        .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
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

#[derive(Clone, Debug)]
enum Mutation {
    Replace(prop::sample::Index, Value),
    Remove(prop::sample::Index),
    Insert(prop::sample::Index, String, Value),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), arb_json()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        any::<prop::sample::Index>().prop_map(Mutation::Remove),
        (
            any::<prop::sample::Index>(),
            prop::sample::select(vec![
                "id",
                "source",
                "type",
                "specversion",
                "data",
                "account_id",
                "credits",
                "cost",
                "owners",
                "code",
                "extra",
            ]),
            arb_json()
        )
            .prop_map(|(i, k, v)| Mutation::Insert(i, k.to_owned(), v)),
    ]
}

fn mutate(event: &mut Value, mutation: &Mutation) {
    let mut all = Vec::new();
    pointers(event, String::new(), &mut all);
    match mutation {
        Mutation::Replace(i, v) => {
            if let Some(slot) = event.pointer_mut(i.get(&all).as_str()) {
                *slot = v.clone();
            }
        }
        Mutation::Remove(i) => {
            let pointer = i.get(&all);
            if let Some((parent, last)) = pointer.rsplit_once('/') {
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
            if let Some(Value::Object(map)) = event.pointer_mut(i.get(&all).as_str()) {
                map.insert(k.clone(), v.clone());
            }
        }
    }
}

/// How the serialised text is then damaged, if at all.
#[derive(Clone, Debug)]
enum Damage {
    None,
    Truncate(prop::sample::Index),
    Flip(prop::sample::Index, u8),
    Splice(prop::sample::Index, Vec<u8>),
}

fn arb_damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        3 => Just(Damage::None),
        1 => any::<prop::sample::Index>().prop_map(Damage::Truncate),
        1 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Damage::Flip(i, b)),
        1 => (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Damage::Splice(i, b)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decode_never_panics_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..4096)) {
        check_decode_total(&body)?;
    }

    #[test]
    fn decode_never_panics_on_arbitrary_json(value in arb_json()) {
        check_decode_total(&bytes(&value))?;
    }

    #[test]
    fn decode_never_panics_on_mutations_of_a_valid_event(
        which in 0..INBOUND.len(),
        mutations in prop::collection::vec(arb_mutation(), 1..4),
        damage in arb_damage(),
    ) {
        let type_name = INBOUND[which].0;
        let mut event = envelope(type_name, valid_data(type_name));
        for mutation in &mutations {
            mutate(&mut event, mutation);
        }
        let mut body = bytes(&event);
        match damage {
            Damage::None => {}
            Damage::Truncate(i) => body.truncate(i.index(body.len() + 1)),
            Damage::Flip(i, b) => {
                let at = i.index(body.len());
                body[at] = b;
            }
            Damage::Splice(i, extra) => {
                let at = i.index(body.len() + 1);
                body.splice(at..at, extra);
            }
        }
        check_decode_total(&body)?;
    }
}

// ---------------------------------------------------------------------------
// Checked by the ledger, on both backends: amount ranges, report columns.

async fn credits_of_zero_or_over_ten_million_are_a_schema_violation<S: Store>(mut w: World<S>) {
    assert_eq!(
        w.open("acme", "automatic", "boss@acme.test", "ACME-1234")
            .await,
        Outcome::Applied
    );
    for (i, credits) in [
        json!("0"),
        json!("0.00"),
        json!(0),
        json!("10000000.01"),
        json!(10_000_001),
        json!("9999999999"),
    ]
    .into_iter()
    .enumerate()
    {
        let event = w.event(
            "shop",
            "credits.purchase.completed",
            json!({"account_id": "acme", "purchase_id": format!("bad-{i}"), "credits": credits, "purchased_at": w.now}),
        );
        let result = w.deliver(&bytes(&event)).await;
        let detail = dead_at_once(
            result,
            DeadReason::SchemaViolation,
            &format!("credits {credits}"),
        );
        assert!(detail.contains("credits"), "{detail}");
    }
    assert!(
        w.events_of("training-credits.purchase.recorded")
            .await
            .is_empty()
    );
    assert_eq!(w.purchase("acme", "min", "0.01").await, Outcome::Applied);
    assert_eq!(
        w.purchase("acme", "max", "10000000").await,
        Outcome::Applied
    );
    assert_eq!(w.available("acme").await, "10000000.01");
    w.verify_ok().await;
}

async fn credits_out_of_range_for_an_account_not_known_yet_are_dead_at_once_not_retried<
    S: Store,
>(
    mut w: World<S>,
) {
    let event = w.event(
        "shop",
        "credits.purchase.completed",
        json!({"account_id": "later", "purchase_id": "p1", "credits": "0", "purchased_at": w.now}),
    );
    let result = w.deliver(&bytes(&event)).await;
    dead_at_once(
        result,
        DeadReason::SchemaViolation,
        "credits 0 for an unknown account",
    );
}

async fn a_cost_of_zero_or_over_a_million_is_a_schema_violation<S: Store>(mut w: World<S>) {
    assert_eq!(
        w.open("acme", "automatic", "boss@acme.test", "ACME-1234")
            .await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("acme", "p1", "10000000").await, Outcome::Applied);
    for (i, cost) in ["0", "0.00", "1000000.01", "5000000"]
        .into_iter()
        .enumerate()
    {
        let result = decode_and_apply_request(&mut w, &format!("bad-{i}"), json!(cost)).await;
        let detail = dead_at_once(result, DeadReason::SchemaViolation, &format!("cost {cost}"));
        assert!(detail.contains("cost"), "{detail}");
    }
    assert_eq!(w.available("acme").await, "10000000.00");
    assert_eq!(
        decode_and_apply_request(&mut w, "max", json!("1000000")).await,
        Ok(Outcome::Applied)
    );
    assert_eq!(
        decode_and_apply_request(&mut w, "min", json!(0.01)).await,
        Ok(Outcome::Applied)
    );
    assert_eq!(w.available("acme").await, "8999999.99");
    w.verify_ok().await;
}

async fn decode_and_apply_request<S: Store>(
    w: &mut World<S>,
    request_id: &str,
    cost: Value,
) -> Result<Outcome, Malformed> {
    let event = w.event(
        "lms",
        "credits.redemption.requested",
        json!({
            "request_id": request_id,
            "code": "ACME-1234",
            "learner": {"id": format!("l-{request_id}"), "email": "lee@learners.test", "name": "Lee"},
            "item": {"id": format!("c-{request_id}"), "kind": "course", "title": "Rust 101"},
            "cost": cost,
            "requested_at": w.now,
        }),
    );
    w.deliver(&bytes(&event)).await
}

async fn an_unknown_report_column_is_a_schema_violation<S: Store>(mut w: World<S>) {
    assert_eq!(
        w.open("acme", "automatic", "boss@acme.test", "ACME-1234")
            .await,
        Outcome::Applied
    );
    for (report, column) in [
        ("transactions", "nope"),
        ("balances", "cost"),
        ("redemptions", "balance"),
        ("audit", "amount"),
        ("credits", "request_id"),
    ] {
        let event = w.event(
            "portal",
            "credits.report.requested",
            json!({
                "report": report,
                "format": "csv",
                "recipient": "boss@acme.test",
                "account_id": "acme",
                "columns": ["account_id", column],
            }),
        );
        let result = w.deliver(&bytes(&event)).await;
        let detail = dead_at_once(
            result,
            DeadReason::SchemaViolation,
            &format!("{report} {column}"),
        );
        assert!(
            detail.contains(column),
            "the detail names the column: {detail}"
        );
    }
    let good = w
        .send(
            "credits.report.requested",
            json!({
                "report": "balances",
                "format": "csv",
                "recipient": "boss@acme.test",
                "account_id": "acme",
                "columns": ["available", "account_id"],
            }),
        )
        .await;
    assert_eq!(good, Outcome::Applied);
}

async fn plain_json_numbers_are_accepted_for_amounts<S: Store>(mut w: World<S>) {
    let opened = w
        .send(
            "credits.account.opened",
            json!({
                "account_id": "acme",
                "owners": [{"email": "boss@acme.test", "name": "Boss"}],
                "approval_mode": "automatic",
                "code": "ACME-1234",
                "low_balance_threshold": 5,
            }),
        )
        .await;
    assert_eq!(opened, Outcome::Applied);
    let purchased_at = w.now;
    let purchase = w
        .send_from(
            "shop",
            "credits.purchase.completed",
            json!({
                "account_id": "acme",
                "purchase_id": "p1",
                "credits": 19.5,
                "price_paid": {"amount": 18, "currency": "USD"},
                "purchased_at": purchased_at,
            }),
        )
        .await;
    assert_eq!(purchase, Outcome::Applied);
    let recorded = w.last_event("training-credits.purchase.recorded").await;
    assert_eq!(recorded["credits"], "19.50");
    assert_eq!(recorded["available"], "19.50");
    let account = w.account("acme").await;
    assert_eq!(account.lots[0].credits.to_string(), "19.50");
    assert_eq!(
        account.lots[0]
            .price_paid
            .as_ref()
            .unwrap()
            .amount
            .to_string(),
        "18.00"
    );
    assert_eq!(account.low_balance_threshold.unwrap().to_string(), "5.00");

    let requested_at = w.now;
    let request = w
        .send_from(
            "lms",
            "credits.redemption.requested",
            json!({
                "request_id": "r1",
                "code": "ACME-1234",
                "learner": {"id": "l1", "email": "l1@learners.test", "name": "Lee"},
                "item": {"id": "c1", "kind": "course", "title": "Rust 101"},
                "cost": 0.1,
                "requested_at": requested_at,
            }),
        )
        .await;
    assert_eq!(request, Outcome::Applied);
    let approved = w.last_event("training-credits.redemption.approved").await;
    assert_eq!(approved["cost"], "0.10");
    assert_eq!(approved["available"], "19.40");
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// id_conflict and duplicates.

async fn the_same_source_and_id_with_another_body_is_an_id_conflict<S: Store>(mut w: World<S>) {
    assert_eq!(
        w.open("acme", "automatic", "boss@acme.test", "ACME-1234")
            .await,
        Outcome::Applied
    );
    let first = w.event(
        "shop",
        "credits.purchase.completed",
        json!({"account_id": "acme", "purchase_id": "p1", "credits": "100", "purchased_at": w.now}),
    );
    assert_eq!(w.deliver(&bytes(&first)).await, Ok(Outcome::Applied));
    let events = w.events().await.len();

    let mut other = first.clone();
    other["data"]["credits"] = json!("200");
    other["data"]["purchase_id"] = json!("p2");
    match w.deliver(&bytes(&other)).await {
        Ok(Outcome::Dead {
            reason: DeadReason::IdConflict,
            detail,
        }) => {
            assert_useful(&detail, "id conflict");
            assert!(detail.contains(first["id"].as_str().unwrap()), "{detail}");
        }
        other => panic!("expected an id conflict, got {other:?}"),
    }
    // Even another type under the same key conflicts.
    let mut retyped = first.clone();
    retyped["type"] = json!("credits.account.code_rotated");
    retyped["data"] = json!({"account_id": "acme", "actor": "boss@acme.test"});
    assert!(matches!(
        w.deliver(&bytes(&retyped)).await,
        Ok(Outcome::Dead {
            reason: DeadReason::IdConflict,
            ..
        })
    ));
    assert_eq!(w.events().await.len(), events, "nothing more was announced");
    assert_eq!(w.available("acme").await, "100.00");
    assert_eq!(w.account("acme").await.lots.len(), 1);
    w.verify_ok().await;
}

/// The event with its object keys in reverse order, pretty-printed: another
/// serialisation of the same event.
fn reserialised(value: &Value, indent: usize) -> String {
    let pad = "  ".repeat(indent + 1);
    match value {
        Value::Object(map) => {
            let fields: Vec<String> = map
                .iter()
                .rev()
                .map(|(k, v)| format!("{pad}{} :  {}", json!(k), reserialised(v, indent + 1)))
                .collect();
            format!("{{\n{}\n{}}}", fields.join(",\n"), "  ".repeat(indent))
        }
        Value::Array(items) => format!(
            "[ {} ]",
            items
                .iter()
                .map(|v| reserialised(v, indent + 1))
                .collect::<Vec<_>>()
                .join(" , ")
        ),
        other => other.to_string(),
    }
}

async fn the_same_event_redelivered_even_reserialised_is_a_duplicate_that_changes_nothing<
    S: Store,
>(
    mut w: World<S>,
) {
    assert_eq!(
        w.open("acme", "manual", "boss@acme.test", "ACME-1234")
            .await,
        Outcome::Applied
    );
    let purchase = w.event(
        "shop",
        "credits.purchase.completed",
        json!({
            "account_id": "acme",
            "purchase_id": "p1",
            "credits": 100.5,
            "price_paid": {"amount": "90", "currency": "USD"},
            "channel": "card",
            "purchased_at": w.now,
        }),
    );
    assert_eq!(w.deliver(&bytes(&purchase)).await, Ok(Outcome::Applied));
    let request = w.event(
        "lms",
        "credits.redemption.requested",
        json!({
            "request_id": "r1",
            "code": "ACME-1234",
            "learner": {"id": "l1", "email": "l1@learners.test", "name": "Lee"},
            "item": {"id": "c1", "kind": "course", "title": "Rust 101", "group_ids": ["g1", "g2"]},
            "cost": "30",
            "requested_at": w.now,
        }),
    );
    assert_eq!(w.deliver(&bytes(&request)).await, Ok(Outcome::Applied));
    let events = w.events().await;
    let emails = w.emails().await;
    assert!(
        !emails.is_empty(),
        "the purchase and the request were mailed"
    );

    for event in [&purchase, &request] {
        let pretty = reserialised(event, 0);
        assert_ne!(pretty.as_bytes(), bytes(event).as_slice());
        let trailing_zero = pretty.replace("100.5", "100.50");
        let later = {
            let mut e = event.clone();
            e["time"] = json!("2026-01-01T09:30:00Z");
            e
        };
        for body in [
            bytes(event),
            pretty.into_bytes(),
            trailing_zero.into_bytes(),
            bytes(&later),
        ] {
            assert_eq!(
                w.deliver(&body).await,
                Ok(Outcome::Duplicate),
                "{}",
                shown(&body)
            );
        }
    }
    assert_eq!(w.events().await, events, "no second outbound event");
    assert_eq!(w.emails().await, emails, "no second email");
    assert_eq!(w.available("acme").await, "70.50");
    w.verify_ok().await;
}

async fn the_same_id_from_another_source_is_another_event<S: Store>(mut w: World<S>) {
    assert_eq!(
        w.open("acme", "automatic", "boss@acme.test", "ACME-1234")
            .await,
        Outcome::Applied
    );
    let mut first = w.event(
        "shop",
        "credits.purchase.completed",
        json!({"account_id": "acme", "purchase_id": "p1", "credits": "100", "purchased_at": w.now}),
    );
    first["id"] = json!("order-1");
    let mut second = first.clone();
    second["source"] = json!("shop-eu");
    second["data"]["purchase_id"] = json!("p2");
    second["data"]["credits"] = json!("50");
    assert_eq!(w.deliver(&bytes(&first)).await, Ok(Outcome::Applied));
    assert_eq!(w.deliver(&bytes(&second)).await, Ok(Outcome::Applied));
    assert_eq!(w.available("acme").await, "150.00");
    assert_eq!(
        w.events_of("training-credits.purchase.recorded")
            .await
            .len(),
        2
    );
    // Same body, same id, other source: a different event, recognised by
    // its purchase id.
    let mut third = second.clone();
    third["source"] = json!("shop-us");
    assert_eq!(w.deliver(&bytes(&third)).await, Ok(Outcome::Duplicate));
    assert_eq!(w.available("acme").await, "150.00");
    w.verify_ok().await;
}

async fn a_purchase_repeated_under_a_new_event_id_is_a_duplicate_and_with_other_credits_an_id_conflict<
    S: Store,
>(
    mut w: World<S>,
) {
    assert_eq!(
        w.open("acme", "automatic", "boss@acme.test", "ACME-1234")
            .await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    p1_is_not_recorded_again(&mut w).await;
    assert_eq!(w.available("acme").await, "100.00");
    // The same purchase id on another account is another purchase.
    assert_eq!(
        w.open("other", "automatic", "own@other.test", "OTHER-1234")
            .await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("other", "p1", "100").await, Outcome::Applied);
    w.verify_ok().await;
}

/// `acme`'s purchase `p1` of 100 credits sent again under a new event id: the
/// same body is a duplicate, other credits an id conflict, and neither
/// records anything.
async fn p1_is_not_recorded_again<S: Store>(w: &mut World<S>) {
    let events = w.events().await.len();
    let emails = w.emails().await.len();
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Duplicate);
    match w.purchase("acme", "p1", "150").await {
        Outcome::Dead {
            reason: DeadReason::IdConflict,
            detail,
        } => {
            assert_useful(&detail, "purchase id conflict");
            assert!(detail.contains("p1"), "{detail}");
        }
        other => panic!("expected an id conflict, got {other:?}"),
    }
    assert_eq!(
        w.events().await.len(),
        events,
        "no second purchase.recorded"
    );
    assert_eq!(w.emails().await.len(), emails, "no second email");
}

/// A batch leaves an account's spent lots unread unless it names them: a
/// repeated purchase must still find its lot once every credit of it is gone.
async fn a_purchase_repeated_after_its_lot_is_spent_is_still_a_duplicate_or_an_id_conflict<
    S: Store,
>(
    mut w: World<S>,
) {
    assert_eq!(
        w.open("acme", "automatic", "boss@acme.test", "ACME-1234")
            .await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    assert_eq!(
        w.request("r1", "ACME-1234", "l1", "c1", "100").await,
        Outcome::Applied
    );
    assert_eq!(w.lot("acme", "p1").await, ("0.00".into(), "0.00".into()));
    p1_is_not_recorded_again(&mut w).await;
    assert_eq!(w.lot("acme", "p1").await, ("0.00".into(), "0.00".into()));
    assert_eq!(w.available("acme").await, "0.00");
    w.verify_ok().await;
}

async fn a_request_repeated_under_a_new_event_id_is_a_duplicate_and_with_another_cost_an_id_conflict<
    S: Store,
>(
    mut w: World<S>,
) {
    assert_eq!(
        w.open("acme", "automatic", "boss@acme.test", "ACME-1234")
            .await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    assert_eq!(
        w.request("r1", "ACME-1234", "l1", "c1", "30").await,
        Outcome::Applied
    );
    let events = w.events().await.len();
    let emails = w.emails().await.len();
    assert_eq!(
        w.request("r1", "ACME-1234", "l1", "c1", "30").await,
        Outcome::Duplicate
    );
    match w.request("r1", "ACME-1234", "l1", "c1", "40").await {
        Outcome::Dead {
            reason: DeadReason::IdConflict,
            detail,
        } => {
            assert_useful(&detail, "request id conflict");
            assert!(detail.contains("r1"), "{detail}");
        }
        other => panic!("expected an id conflict, got {other:?}"),
    }
    // Another learner reusing the request id is a conflict too, not a
    // second redemption.
    assert!(matches!(
        w.request("r1", "ACME-1234", "l2", "c1", "30").await,
        Outcome::Dead {
            reason: DeadReason::IdConflict,
            ..
        }
    ));
    assert_eq!(w.events().await.len(), events);
    assert_eq!(w.emails().await.len(), emails);
    assert_eq!(w.available("acme").await, "70.00");

    // A rejected request is remembered by its id too.
    assert_eq!(
        w.request("r2", "WRONG-0000", "l3", "c1", "30").await,
        Outcome::Rejected(Rejection::InvalidCode)
    );
    let events = w.events().await.len();
    assert_eq!(
        w.request("r2", "WRONG-0000", "l3", "c1", "30").await,
        Outcome::Duplicate
    );
    assert!(matches!(
        w.request("r2", "ACME-1234", "l3", "c1", "30").await,
        Outcome::Dead {
            reason: DeadReason::IdConflict,
            ..
        }
    ));
    assert_eq!(w.events().await.len(), events);
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// Retries.

async fn a_purchase_for_an_account_not_known_yet_is_retried_and_applies_once_the_account_is_opened<
    S: Store,
>(
    mut w: World<S>,
) {
    let purchase = w.event(
        "shop",
        "credits.purchase.completed",
        json!({"account_id": "late", "purchase_id": "p1", "credits": "100", "purchased_at": w.now}),
    );
    for _ in 0..3 {
        match w.deliver(&bytes(&purchase)).await {
            Ok(Outcome::Retry {
                reason: RetryReason::UnknownAccount,
                detail,
            }) => {
                assert_useful(&detail, "unknown account");
                assert!(detail.contains("late"), "{detail}");
            }
            other => panic!("expected a retry, got {other:?}"),
        }
    }
    assert_eq!(
        RetryReason::UnknownAccount.exhausted(),
        DeadReason::UnknownAccount
    );
    assert!(
        w.events().await.is_empty(),
        "a retried message announces nothing"
    );
    assert!(w.find_account("late").await.is_none());

    assert_eq!(
        w.open("late", "automatic", "boss@late.test", "LATE-1234")
            .await,
        Outcome::Applied
    );
    assert_eq!(w.deliver(&bytes(&purchase)).await, Ok(Outcome::Applied));
    assert_eq!(w.available("late").await, "100.00");
    assert_eq!(w.deliver(&bytes(&purchase)).await, Ok(Outcome::Duplicate));
    assert_eq!(w.available("late").await, "100.00");
    w.verify_ok().await;
}

async fn every_command_on_an_account_not_known_yet_is_retried_as_unknown_account<S: Store>(
    mut w: World<S>,
) {
    let commands: Vec<(&str, &str, Value)> = vec![
        (
            "portal",
            "credits.account.updated",
            json!({"account_id": "ghost", "actor": "boss@ghost.test", "name": "Ghost"}),
        ),
        (
            "portal",
            "credits.account.owner_added",
            json!({"account_id": "ghost", "actor": "boss@ghost.test", "owner": {"email": "ann@ghost.test", "name": "Ann"}}),
        ),
        (
            "portal",
            "credits.account.owner_removed",
            json!({"account_id": "ghost", "actor": "boss@ghost.test", "email": "ann@ghost.test"}),
        ),
        (
            "portal",
            "credits.account.code_rotated",
            json!({"account_id": "ghost", "actor": "boss@ghost.test"}),
        ),
        (
            STAFF,
            "credits.account.closed",
            json!({"account_id": "ghost", "actor": "staff@training.test"}),
        ),
        (
            STAFF,
            "credits.lot.extended",
            json!({"account_id": "ghost", "purchase_id": "p1", "expires_at": "2030-01-01T00:00:00Z", "actor": "staff@training.test"}),
        ),
        (
            "portal",
            "credits.report.requested",
            json!({"report": "balances", "format": "csv", "recipient": "boss@ghost.test", "account_id": "ghost"}),
        ),
    ];
    for (source, type_name, data) in commands {
        match w.send_from(source, type_name, data).await {
            Outcome::Retry {
                reason: RetryReason::UnknownAccount,
                detail,
            } => assert_useful(&detail, type_name),
            other => panic!("{type_name}: expected a retry for the unknown account, got {other:?}"),
        }
    }
    assert!(w.events().await.is_empty());
}

async fn a_decision_on_a_request_not_known_yet_is_retried_and_applies_once_the_request_arrives<
    S: Store,
>(
    mut w: World<S>,
) {
    let approval = w.event(
        "portal",
        "credits.redemption.approved",
        json!({"request_id": "r1", "approver": "boss@acme.test"}),
    );
    for message in [
        approval.clone(),
        w.event(
            "portal",
            "credits.redemption.denied",
            json!({"request_id": "r1", "approver": "boss@acme.test"}),
        ),
        w.event(
            "lms",
            "credits.redemption.cancelled",
            json!({"request_id": "r1", "learner_id": "l1"}),
        ),
        w.event(
            "lms",
            "credits.enrollment.unenrolled",
            json!({"request_id": "r1", "unenrolled_at": w.now}),
        ),
    ] {
        match w.deliver(&bytes(&message)).await {
            Ok(Outcome::Retry {
                reason: RetryReason::UnknownRequest,
                detail,
            }) => {
                assert_useful(&detail, "unknown request");
                assert!(detail.contains("r1"), "{detail}");
            }
            other => panic!("{}: expected a retry, got {other:?}", message["type"]),
        }
    }
    assert_eq!(
        RetryReason::UnknownRequest.exhausted(),
        DeadReason::UnknownRequest
    );
    assert!(w.events().await.is_empty());

    assert_eq!(
        w.open("acme", "manual", "boss@acme.test", "ACME-1234")
            .await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    assert_eq!(
        w.request("r1", "ACME-1234", "l1", "c1", "30").await,
        Outcome::Applied
    );
    assert_eq!(w.deliver(&bytes(&approval)).await, Ok(Outcome::Applied));
    let approved = w.last_event("training-credits.redemption.approved").await;
    assert_eq!(approved["decided_by"], "boss@acme.test");
    assert_eq!(w.available("acme").await, "70.00");
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// Hostile text is stored and echoed verbatim.

/// About 10 KB of Unicode of every width: accents, CJK, emoji with joiners
/// and skin tones, combining marks, right-to-left text, the last code point.
fn ten_kb_of_unicode() -> String {
    let pieces = [
        "Zoë ",
        "Łódź ",
        "Straße ",
        "日本語の研修 ",
        "한국어 ",
        "👩🏽‍🏫 ",
        "🎓 ",
        "e\u{301}\u{302} ",
        "עברית ",
        "العربية ",
        "\u{10FFFF}",
        "\u{FEFF}",
        "ﷺ ",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ",
        "∑∞≠ ",
    ];
    let mut text = String::new();
    let mut i = 0;
    while text.len() < 10 * 1024 {
        text.push_str(pieces[i % pieces.len()]);
        i += 1;
    }
    text
}

fn hostile_texts() -> Vec<String> {
    vec![
        r#"O'Brien "the \"quoted\" one" `tick` \back\slash \n \u0041"#.to_owned(),
        "'); DROP TABLE accounts; --".to_owned(),
        "Robert'); DELETE FROM lots WHERE ('1'='1".to_owned(),
        "ctl \u{1}\u{7}\u{8}\t\r\n\u{b}\u{c}\u{1b}[31mred\u{1b}[0m \u{7f} \u{85} \u{2028}\u{2029} \u{202e}desrever \u{200b}end".to_owned(),
        "<script>alert('x')</script> {{ portal_url }} {% if true %}x{% endif %} ${HOME} %s %n".to_owned(),
        ten_kb_of_unicode(),
    ]
}

async fn hostile_names_titles_and_notes_are_stored_and_echoed_verbatim<S: Store>(mut w: World<S>) {
    for (i, text) in hostile_texts().into_iter().enumerate() {
        let account_id = format!("acct-{i}");
        let owner = format!("boss{i}@acme.test");
        let code = format!("CODE-{i:04}");
        let opened = w
            .send(
                "credits.account.opened",
                json!({
                    "account_id": account_id,
                    "name": text,
                    "owners": [{"email": owner, "name": text}],
                    "approval_mode": "automatic",
                    "code": code,
                    "notes": text,
                }),
            )
            .await;
        assert_eq!(opened, Outcome::Applied, "text {i}");
        let event = w.last_event("training-credits.account.opened").await;
        assert_eq!(event["name"], text.as_str(), "text {i} in account.opened");
        assert_eq!(event["owners"][0]["name"], text.as_str());

        let account = w.account(&account_id).await;
        assert_eq!(account.name, text, "text {i} as stored");
        assert_eq!(account.notes.as_deref(), Some(text.as_str()));
        assert_eq!(account.owners[0].name, text);

        assert_eq!(w.purchase(&account_id, "p1", "100").await, Outcome::Applied);
        let requested_at = w.now;
        let request = w
            .send_from(
                "lms",
                "credits.redemption.requested",
                json!({
                    "request_id": format!("r-{i}"),
                    "code": code,
                    "learner": {"id": format!("l-{i}"), "email": format!("l{i}@learners.test"), "name": text},
                    "item": {"id": "c1", "kind": "course", "title": text},
                    "cost": "5",
                    "requested_at": requested_at,
                }),
            )
            .await;
        assert_eq!(request, Outcome::Applied, "text {i}");
        let approved = w.emails_to(&format!("l{i}@learners.test")).await;
        assert_eq!(approved.len(), 1);
        assert!(
            approved[0].text.contains(&format!(
                "Hello {text}, Your request to redeem 5.00 training credits for {text} has been approved."
            )),
            "text {i} in the approval email:\n{}",
            approved[0].text.chars().take(400).collect::<String>()
        );
        assert_eq!(approved[0].to_name.as_deref(), Some(text.as_str()));
        assert!(!approved[0].html.contains("<script>"), "HTML is escaped");
        assert!(
            !approved[0].subject.contains('\n') && !approved[0].subject.contains('\r'),
            "no line break reaches a subject"
        );

        // An update echoes old and new values; a denial echoes its reason.
        let renamed = format!("{text} (renamed)");
        let updated = w
            .send(
                "credits.account.updated",
                json!({"account_id": account_id, "actor": owner, "name": renamed, "approval_mode": "manual", "notes": null}),
            )
            .await;
        assert_eq!(updated, Outcome::Applied);
        let changes = w.last_event("training-credits.account.updated").await["changes"].clone();
        let name_change = changes
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["field"] == "name")
            .expect("the name changed");
        assert_eq!(name_change["old"], text.as_str());
        assert_eq!(name_change["new"], renamed.as_str());
        let account = w.account(&account_id).await;
        assert_eq!(account.name, renamed);
        assert_eq!(account.notes, None);

        assert_eq!(
            w.request(&format!("r2-{i}"), &code, &format!("m-{i}"), "c2", "5")
                .await,
            Outcome::Applied
        );
        let denied = w
            .send(
                "credits.redemption.denied",
                json!({"request_id": format!("r2-{i}"), "approver": owner, "reason": text}),
            )
            .await;
        assert_eq!(denied, Outcome::Applied);
        assert_eq!(
            w.last_event("training-credits.redemption.denied").await["reason"],
            text.as_str()
        );
        let mails = w.emails_to(&format!("m-{i}@learners.test")).await;
        assert!(
            mails.iter().any(|m| m.text.contains(&text)),
            "text {i} in the denial email"
        );
    }
    w.verify_ok().await;
}

async fn a_nul_character_is_dead_at_once_and_spoils_nothing_else_in_its_batch<S: Store>(
    mut w: World<S>,
) {
    // PostgreSQL cannot keep U+0000 in text: a message holding one could
    // never be stored as sent, and a database failure would fail its whole
    // batch. It is refused at once, on both backends alike.
    let event = w.event(
        "portal",
        "credits.account.opened",
        json!({
            "account_id": "acme",
            "name": "Acme\u{0}Ltd",
            "owners": [{"email": "boss@acme.test", "name": "Boss"}],
            "approval_mode": "automatic",
        }),
    );
    let good = w.event(
        "portal",
        "credits.account.opened",
        json!({
            "account_id": "good",
            "owners": [{"email": "boss@good.test", "name": "Boss"}],
            "approval_mode": "automatic",
        }),
    );
    let results = w.deliver_batch(&[event, good]).await;
    let detail = dead_at_once(
        results[0].clone(),
        DeadReason::SchemaViolation,
        "a NUL character",
    );
    assert!(detail.contains("/data/name"), "{detail}");
    assert_eq!(results[1], Ok(Outcome::Applied));
    assert!(w.find_account("acme").await.is_none());
    assert!(w.find_account("good").await.is_some());
}

// ---------------------------------------------------------------------------
// Batches: one bad message never spoils the others.

async fn a_batch_reports_each_bad_message_and_applies_every_good_one<S: Store>(mut w: World<S>) {
    let now = w.now;
    let open = w.event(
        "portal",
        "credits.account.opened",
        json!({"account_id": "acme", "owners": [{"email": "boss@acme.test", "name": "Boss"}], "approval_mode": "automatic", "code": "ACME-1234"}),
    );
    let purchase = w.event(
        "shop",
        "credits.purchase.completed",
        json!({"account_id": "acme", "purchase_id": "p1", "credits": "100", "purchased_at": now}),
    );
    let mut old_spec = w.event(
        "shop",
        "credits.purchase.completed",
        json!({"account_id": "acme", "purchase_id": "p9", "credits": "1", "purchased_at": now}),
    );
    old_spec["specversion"] = json!("0.3");
    let unknown_type = w.event(
        "shop",
        "credits.purchase.cancelled",
        json!({"account_id": "acme"}),
    );
    let bad_credits_text = w.event(
        "shop",
        "credits.purchase.completed",
        json!({"account_id": "acme", "purchase_id": "p8", "credits": "lots", "purchased_at": now}),
    );
    let zero_credits = w.event(
        "shop",
        "credits.purchase.completed",
        json!({"account_id": "acme", "purchase_id": "p7", "credits": "0", "purchased_at": now}),
    );
    let ghost_purchase = w.event(
        "shop",
        "credits.purchase.completed",
        json!({"account_id": "ghost", "purchase_id": "p1", "credits": "5", "purchased_at": now}),
    );
    let wrong_code = w.event(
        "lms",
        "credits.redemption.requested",
        json!({"request_id": "r-bad", "code": "NOPE-0000", "learner": {"id": "l2", "email": "l2@learners.test", "name": "Lou"}, "item": {"id": "c1", "kind": "course", "title": "Rust 101"}, "cost": "10", "requested_at": now}),
    );
    let good_request = w.event(
        "lms",
        "credits.redemption.requested",
        json!({"request_id": "r1", "code": "acme 1234", "learner": {"id": "l1", "email": "l1@learners.test", "name": "Lee"}, "item": {"id": "c1", "kind": "course", "title": "Rust 101"}, "cost": "30", "requested_at": now}),
    );
    let mut conflicting = purchase.clone();
    conflicting["data"]["credits"] = json!("999");
    let unknown_request = w.event(
        "portal",
        "credits.redemption.approved",
        json!({"request_id": "r-none", "approver": "boss@acme.test"}),
    );
    let second_purchase = w.event(
        "shop",
        "credits.purchase.completed",
        json!({"account_id": "acme", "purchase_id": "p2", "credits": "50", "purchased_at": now}),
    );

    let batch = [
        open.clone(),     // 0 applied
        old_spec,         // 1 invalid_envelope
        purchase.clone(), // 2 applied (after the open in the same batch)
        unknown_type,     // 3 unknown_type
        bad_credits_text, // 4 schema_violation (decode)
        zero_credits,     // 5 schema_violation (ledger)
        ghost_purchase,   // 6 retry: unknown account
        wrong_code,       // 7 refused: invalid_code
        good_request,     // 8 applied
        conflicting,      // 9 id_conflict with 2
        open,             // 10 duplicate of 0
        unknown_request,  // 11 retry: unknown request
        second_purchase,  // 12 applied
    ];
    let results = w.deliver_batch(&batch).await;
    assert_eq!(results.len(), batch.len());
    let reason_of = |i: usize| match &results[i] {
        Err(m) => Some(m.reason),
        Ok(Outcome::Dead { reason, .. }) => Some(*reason),
        _ => None,
    };
    assert_eq!(results[0], Ok(Outcome::Applied));
    assert_eq!(reason_of(1), Some(DeadReason::InvalidEnvelope));
    assert_eq!(results[2], Ok(Outcome::Applied));
    assert_eq!(reason_of(3), Some(DeadReason::UnknownType));
    assert_eq!(reason_of(4), Some(DeadReason::SchemaViolation));
    assert_eq!(reason_of(5), Some(DeadReason::SchemaViolation));
    assert!(
        matches!(
            &results[6],
            Ok(Outcome::Retry {
                reason: RetryReason::UnknownAccount,
                ..
            })
        ),
        "{:?}",
        results[6]
    );
    assert_eq!(results[7], Ok(Outcome::Rejected(Rejection::InvalidCode)));
    assert_eq!(results[8], Ok(Outcome::Applied));
    assert_eq!(reason_of(9), Some(DeadReason::IdConflict));
    assert_eq!(results[10], Ok(Outcome::Duplicate));
    assert!(
        matches!(
            &results[11],
            Ok(Outcome::Retry {
                reason: RetryReason::UnknownRequest,
                ..
            })
        ),
        "{:?}",
        results[11]
    );
    assert_eq!(results[12], Ok(Outcome::Applied));
    for result in &results {
        match result {
            Err(m) => assert_useful(&m.detail, m.reason.as_str()),
            Ok(Outcome::Dead { reason, detail }) => assert_useful(detail, reason.as_str()),
            Ok(Outcome::Retry { detail, .. }) => assert_useful(detail, "retry"),
            _ => {}
        }
    }

    assert_eq!(w.available("acme").await, "120.00");
    let account = w.account("acme").await;
    assert_eq!(account.lots.len(), 2);
    assert_eq!(
        w.events_of("training-credits.account.opened").await.len(),
        1
    );
    assert_eq!(
        w.events_of("training-credits.purchase.recorded")
            .await
            .len(),
        2
    );
    assert_eq!(
        w.events_of("training-credits.redemption.approved")
            .await
            .len(),
        1
    );
    let rejected = w.last_event("training-credits.redemption.rejected").await;
    assert_eq!(rejected["reason"], "invalid_code");
    assert_eq!(w.emails_to("l1@learners.test").await.len(), 1);
    assert!(w.find_account("ghost").await.is_none());
    w.verify_ok().await;

    // The retried messages apply once what they wait for exists.
    let ghost = w.event(
        "portal",
        "credits.account.opened",
        json!({"account_id": "ghost", "owners": [{"email": "boss@ghost.test", "name": "G"}], "approval_mode": "automatic"}),
    );
    let retry = w.deliver_batch(&[ghost, batch[6].clone()]).await;
    assert_eq!(retry, vec![Ok(Outcome::Applied), Ok(Outcome::Applied)]);
    assert_eq!(w.available("ghost").await, "5.00");
    w.verify_ok().await;
}

async fn a_batch_of_only_bad_messages_changes_nothing<S: Store>(mut w: World<S>) {
    let now = w.now;
    let batch = [
        w.event("shop", "credits.purchase.completed", json!({"account_id": "ghost", "purchase_id": "p1", "credits": "5", "purchased_at": now})),
        w.event("shop", "credits.nothing", json!({})),
        w.event("portal", "credits.redemption.denied", json!({"request_id": "nope", "approver": "x@y.test"})),
    ];
    let results = w.deliver_batch(&batch).await;
    assert!(
        results.iter().all(|r| !matches!(r, Ok(Outcome::Applied))),
        "{results:?}"
    );
    assert!(w.events().await.is_empty());
    assert!(w.emails().await.is_empty());
    w.verify_ok().await;
}

on_both_backends!(
    credits_of_zero_or_over_ten_million_are_a_schema_violation,
    credits_out_of_range_for_an_account_not_known_yet_are_dead_at_once_not_retried,
    a_cost_of_zero_or_over_a_million_is_a_schema_violation,
    an_unknown_report_column_is_a_schema_violation,
    plain_json_numbers_are_accepted_for_amounts,
    the_same_source_and_id_with_another_body_is_an_id_conflict,
    the_same_event_redelivered_even_reserialised_is_a_duplicate_that_changes_nothing,
    the_same_id_from_another_source_is_another_event,
    a_purchase_repeated_under_a_new_event_id_is_a_duplicate_and_with_other_credits_an_id_conflict,
    a_purchase_repeated_after_its_lot_is_spent_is_still_a_duplicate_or_an_id_conflict,
    a_request_repeated_under_a_new_event_id_is_a_duplicate_and_with_another_cost_an_id_conflict,
    a_purchase_for_an_account_not_known_yet_is_retried_and_applies_once_the_account_is_opened,
    every_command_on_an_account_not_known_yet_is_retried_as_unknown_account,
    a_decision_on_a_request_not_known_yet_is_retried_and_applies_once_the_request_arrives,
    hostile_names_titles_and_notes_are_stored_and_echoed_verbatim,
    a_nul_character_is_dead_at_once_and_spoils_nothing_else_in_its_batch,
    a_batch_reports_each_bad_message_and_applies_every_good_one,
    a_batch_of_only_bad_messages_changes_nothing,
);
