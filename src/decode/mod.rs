//! Decoding: bytes → CloudEvent envelope → JSON Schema of the `type` → typed
//! [`Command`]. Each way a message can be malformed ends as a [`Malformed`]
//! with its dead-letter reason; nothing here panics on any input.

mod schemas;

pub use schemas::{SchemaError, Schemas};

use opentelemetry::trace::SpanContext;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::domain::DeadReason;
use crate::domain::command::{Command, InboundType, PurchaseRefunded};
use crate::domain::rules::{
    PURCHASE_CREDITS_MAX, PURCHASE_CREDITS_MIN, REDEMPTION_COST_MAX, REDEMPTION_COST_MIN,
};
use crate::trace;

/// SPEC §5: a larger message is dead-lettered `too_large`.
pub const MESSAGE_BYTES_MAX: usize = 256 * 1024;

/// The idempotency key of an inbound event.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventKey {
    pub source: String,
    pub id: String,
}

/// A well-formed inbound event.
#[derive(Clone, Debug)]
pub struct Decoded {
    pub key: EventKey,
    pub kind: InboundType,
    /// SHA-256 of the event's `type` and canonical `data`: the same key with
    /// another digest is an `id_conflict`.
    pub digest: String,
    pub command: Command,
    /// Its `traceparent` and `tracestate`, where valid: the parent of the
    /// worker's span for it.
    pub traceparent: Option<SpanContext>,
}

/// A message that can never be applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed {
    pub reason: DeadReason,
    pub detail: String,
    /// The event key, where the envelope got far enough to have one.
    pub key: Option<EventKey>,
    pub type_name: Option<String>,
    /// Its trace context, where it got far enough to have a valid one
    /// (boxed: most messages have none, and every refusal would carry its
    /// room).
    pub traceparent: Option<Box<SpanContext>>,
}

impl Malformed {
    fn new(reason: DeadReason, detail: impl Into<String>) -> Malformed {
        Malformed {
            reason,
            detail: detail.into(),
            key: None,
            type_name: None,
            traceparent: None,
        }
    }
}

#[derive(Deserialize)]
struct Envelope {
    id: String,
    source: String,
    #[serde(rename = "type")]
    type_name: String,
}

/// Longest `detail` kept, in characters: it travels in the `x-error-detail`
/// header of the dead letter and is what an operator reads in `dlq list`, so
/// it must stay one short line however large the offending value is.
pub const DETAIL_CHARS_MAX: usize = 300;

/// Turns the bytes of one message into a command, or says why it cannot be.
pub fn decode(schemas: &Schemas, bytes: &[u8]) -> Result<Decoded, Malformed> {
    if bytes.len() > MESSAGE_BYTES_MAX {
        return Err(Malformed::new(
            DeadReason::TooLarge,
            format!("{} bytes, more than {MESSAGE_BYTES_MAX}", bytes.len()),
        ));
    }
    let mut value: Value = serde_json::from_slice(bytes)
        .map_err(|e| Malformed::new(DeadReason::InvalidJson, short(e.to_string())))?;
    let key = peek_key(&value);
    let traceparent = trace::parent_of(&value);
    // The type, as far as the message has one, is copied only into a
    // refusal.
    let with_key = |reason, detail: String, type_name: Option<&str>| Malformed {
        reason,
        detail: short(detail),
        key: key.clone(),
        type_name: type_name.map(str::to_owned),
        traceparent: traceparent.clone().map(Box::new),
    };
    fn type_of(value: &Value) -> Option<&str> {
        value.get("type").and_then(Value::as_str)
    }
    if let Err(error) = schemas.envelope().validate(&value) {
        return Err(with_key(
            DeadReason::InvalidEnvelope,
            format!("{error}{}", at(&error.instance_path().to_string())),
            type_of(&value),
        ));
    }
    if let Some(path) = value
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(name, _)| *name != "data")
        .find(|(_, attribute)| holds_nul(attribute))
        .and_then(|(name, attribute)| nul_in(attribute, format!("/{name}")))
    {
        return Err(with_key(
            DeadReason::InvalidEnvelope,
            nul_detail(&path),
            type_of(&value),
        ));
    }
    let envelope = Envelope::deserialize(&value)
        .map_err(|e| with_key(DeadReason::InvalidEnvelope, e.to_string(), type_of(&value)))?;
    // Taken out of the event rather than copied; the envelope's schema
    // requires it.
    let data = value.get_mut("data").map(Value::take).unwrap_or_default();
    let Some(kind) = InboundType::parse(&envelope.type_name) else {
        return Err(with_key(
            DeadReason::UnknownType,
            format!("`{}` is not an inbound type", envelope.type_name),
            Some(&envelope.type_name),
        ));
    };
    if let Err(error) = schemas.inbound(kind).validate(&data) {
        return Err(with_key(
            DeadReason::SchemaViolation,
            format!("{error}{}", at(&format!("/data{}", error.instance_path()))),
            Some(kind.as_str()),
        ));
    }
    if let Some(path) = nul_in(&data, "/data".to_owned()) {
        return Err(with_key(
            DeadReason::SchemaViolation,
            nul_detail(&path),
            Some(kind.as_str()),
        ));
    }
    let digest = digest(kind.as_str(), &data);
    let command = Command::decode(kind, data).map_err(|e| {
        with_key(
            DeadReason::SchemaViolation,
            e.to_string(),
            Some(kind.as_str()),
        )
    })?;
    if let Err(detail) = check_ranges(&command) {
        return Err(with_key(
            DeadReason::SchemaViolation,
            detail,
            Some(kind.as_str()),
        ));
    }
    Ok(Decoded {
        key: EventKey {
            source: envelope.source,
            id: envelope.id,
        },
        digest,
        kind,
        command,
        traceparent,
    })
}

fn at(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!(" at `{path}`")
    }
}

/// One line of at most [`DETAIL_CHARS_MAX`] characters. A long detail is
/// mostly the offending value quoted at its start; its end says what is wrong
/// and where, so the middle is what goes.
fn short(detail: String) -> String {
    let chars: Vec<char> = detail
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if chars.len() <= DETAIL_CHARS_MAX {
        return chars.into_iter().collect();
    }
    let head = DETAIL_CHARS_MAX / 3;
    let tail = DETAIL_CHARS_MAX - head - 1;
    chars[..head]
        .iter()
        .chain(std::iter::once(&'…'))
        .chain(&chars[chars.len() - tail..])
        .collect()
}

/// Where in `value` a string or key holds U+0000, which PostgreSQL cannot
/// keep in text: such a message could never be stored as sent, and failing
/// in the database would spoil the other messages of its batch. The path is
/// written only down to the offending value.
fn nul_in(value: &Value, path: String) -> Option<String> {
    match value {
        Value::String(text) => text.contains('\0').then_some(path),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find(|(_, item)| holds_nul(item))
            .and_then(|(i, item)| nul_in(item, format!("{path}/{i}"))),
        Value::Object(map) => map
            .iter()
            .find(|(key, item)| key.contains('\0') || holds_nul(item))
            .and_then(|(key, item)| {
                let path = format!("{path}/{key}");
                if key.contains('\0') {
                    Some(path)
                } else {
                    nul_in(item, path)
                }
            }),
        _ => None,
    }
}

/// Whether a string or key anywhere in `value` holds U+0000.
fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map
            .iter()
            .any(|(key, item)| key.contains('\0') || holds_nul(item)),
        _ => false,
    }
}

fn nul_detail(path: &str) -> String {
    format!("a NUL character (U+0000) cannot be stored, at `{path}`")
}

/// SPEC §5 ranges and orderings that need the typed values. They are data
/// errors whatever the ledger holds, so they go to the dead-letter queue at
/// once, even when the account they name is not known yet.
fn check_ranges(command: &Command) -> Result<(), String> {
    match command {
        Command::PurchaseCompleted(c) => {
            if !(PURCHASE_CREDITS_MIN..=PURCHASE_CREDITS_MAX).contains(&c.credits) {
                return Err(format!(
                    "credits {} outside {PURCHASE_CREDITS_MIN} … {PURCHASE_CREDITS_MAX} at `/data/credits`",
                    c.credits
                ));
            }
            match c.expires_at {
                Some(expires_at) if expires_at <= c.purchased_at => Err(format!(
                    "expires_at {expires_at} is not after purchased_at {} at `/data/expires_at`",
                    c.purchased_at
                )),
                // The default expiry must be an instant outbound events can carry.
                None if !c.purchased_at.plus_one_year().is_rfc3339() => Err(format!(
                    "the default expiry, a year after purchased_at {}, is past the year 9999 at `/data/purchased_at`",
                    c.purchased_at
                )),
                _ => Ok(()),
            }
        }
        Command::PurchaseRefunded(PurchaseRefunded {
            credits: Some(asked),
            ..
        }) if !(PURCHASE_CREDITS_MIN..=PURCHASE_CREDITS_MAX).contains(asked) => Err(format!(
            "credits {asked} outside {PURCHASE_CREDITS_MIN} … {PURCHASE_CREDITS_MAX} at `/data/credits`"
        )),
        Command::RedemptionRequested(c)
            if !(REDEMPTION_COST_MIN..=REDEMPTION_COST_MAX).contains(&c.cost) =>
        {
            Err(format!(
                "cost {} outside {REDEMPTION_COST_MIN} … {REDEMPTION_COST_MAX} at `/data/cost`",
                c.cost
            ))
        }
        _ => Ok(()),
    }
}

fn peek_key(value: &Value) -> Option<EventKey> {
    let field = |name| value.get(name).and_then(Value::as_str).map(str::to_owned);
    Some(EventKey {
        source: field("source")?,
        id: field("id")?,
    })
}

/// SHA-256 of `type` and `data` with object keys sorted, so that the same
/// event re-serialised by a publisher has the same digest.
pub fn digest(type_name: &str, data: &Value) -> String {
    let mut hasher = Sha256::new();
    hasher.update(type_name.as_bytes());
    hasher.update(b"\n");
    hash_canonical(&mut hasher, data);
    hex::encode(hasher.finalize())
}

fn hash_canonical(hasher: &mut Sha256, value: &Value) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            hasher.update(b"{");
            for key in keys {
                hasher.update(Value::String(key.clone()).to_string().as_bytes());
                hasher.update(b":");
                hash_canonical(hasher, &map[key]);
                hasher.update(b",");
            }
            hasher.update(b"}");
        }
        Value::Array(items) => {
            hasher.update(b"[");
            for item in items {
                hash_canonical(hasher, item);
                hasher.update(b",");
            }
            hasher.update(b"]");
        }
        Value::Number(number) => hasher.update(canonical_number(number).as_bytes()),
        scalar => hasher.update(scalar.to_string().as_bytes()),
    }
}

/// A number as a publisher may re-serialise it: `100`, `100.0` and `1e2`
/// are one number (JavaScript writes all three as `100`), and `19.50` was
/// already read as `19.5`.
fn canonical_number(number: &serde_json::Number) -> String {
    const EXACT_INTEGER_MAX: f64 = 9_007_199_254_740_992.0; // 2^53
    match number.as_f64() {
        Some(float)
            if number.is_f64() && float.fract() == 0.0 && float.abs() <= EXACT_INTEGER_MAX =>
        {
            // Exact: an integer of at most 2^53 fits in an i64.
            format!("{}", float as i64)
        }
        _ => number.to_string(),
    }
}
