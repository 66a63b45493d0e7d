//! Decoding: bytes → CloudEvent envelope → JSON Schema of the `type` → typed
//! [`Command`]. Each way a message can be malformed ends as a [`Malformed`]
//! with its dead-letter reason; nothing here panics on any input.

mod schemas;

pub use schemas::{SchemaError, Schemas};

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::domain::DeadReason;
use crate::domain::command::Command;

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
    pub type_name: String,
    /// SHA-256 of the event's `type` and canonical `data`: the same key with
    /// another digest is an `id_conflict`.
    pub digest: String,
    pub command: Command,
}

/// A message that can never be applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed {
    pub reason: DeadReason,
    pub detail: String,
    /// The event key, where the envelope got far enough to have one.
    pub key: Option<EventKey>,
    pub type_name: Option<String>,
}

impl Malformed {
    fn new(reason: DeadReason, detail: impl Into<String>) -> Malformed {
        Malformed {
            reason,
            detail: detail.into(),
            key: None,
            type_name: None,
        }
    }
}

#[derive(Deserialize)]
struct Envelope {
    id: String,
    source: String,
    #[serde(rename = "type")]
    type_name: String,
    data: Value,
}

/// Turns the bytes of one message into a command, or says why it cannot be.
pub fn decode(schemas: &Schemas, bytes: &[u8]) -> Result<Decoded, Malformed> {
    if bytes.len() > MESSAGE_BYTES_MAX {
        return Err(Malformed::new(
            DeadReason::TooLarge,
            format!("{} bytes, more than {MESSAGE_BYTES_MAX}", bytes.len()),
        ));
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| Malformed::new(DeadReason::InvalidJson, e.to_string()))?;
    let key = peek_key(&value);
    let with_key = |reason, detail: String| Malformed {
        reason,
        detail,
        key: key.clone(),
        type_name: value.get("type").and_then(Value::as_str).map(str::to_owned),
    };
    if let Err(error) = schemas.envelope().validate(&value) {
        return Err(with_key(
            DeadReason::InvalidEnvelope,
            format!("{} at `{}`", error, error.instance_path()),
        ));
    }
    let envelope: Envelope = serde_json::from_value(value.clone())
        .map_err(|e| with_key(DeadReason::InvalidEnvelope, e.to_string()))?;
    let Some(validator) = schemas.inbound(&envelope.type_name) else {
        return Err(with_key(
            DeadReason::UnknownType,
            format!("`{}` is not an inbound type", envelope.type_name),
        ));
    };
    if let Err(error) = validator.validate(&envelope.data) {
        return Err(with_key(
            DeadReason::SchemaViolation,
            format!("{} at `{}`", error, error.instance_path()),
        ));
    }
    let tagged = serde_json::json!({"type": envelope.type_name, "data": envelope.data});
    let command: Command = serde_json::from_value(tagged)
        .map_err(|e| with_key(DeadReason::SchemaViolation, e.to_string()))?;
    Ok(Decoded {
        key: EventKey {
            source: envelope.source,
            id: envelope.id,
        },
        digest: digest(&envelope.type_name, &envelope.data),
        type_name: envelope.type_name,
        command,
    })
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
        scalar => hasher.update(scalar.to_string().as_bytes()),
    }
}
