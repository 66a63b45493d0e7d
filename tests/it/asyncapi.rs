//! `asyncapi.yaml` (SPEC §10) held to the crate's own tables. The AsyncAPI
//! parser run by `.ci/asyncapi` says whether the document is valid; this says
//! whether it is complete: every inbound type of [`InboundType::ALL`] and
//! every outbound type is a message whose payload is its schema, a routing
//! key of its exchange and an operation; the dead-letter queue names every
//! [`DeadReason`]; and every schema file under `schemas/` is referenced.
//!
//! The outbound types are the files of `schemas/out/`: the outbox's unit test
//! (`src/outbox/mod.rs`) already holds them to one `Event` of each type, a
//! list the crate keeps to its tests.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;
use training_credits::domain::{DeadReason, InboundType};

const CONTENT_TYPE: &str = "application/cloudevents+json";
const SCHEMA_FORMAT: &str = "application/schema+json;version=draft-07";

/// One side of the contract: where its events go and what wraps them.
struct Direction {
    exchange: &'static str,
    envelope: &'static str,
    schema_dir: &'static str,
    action: &'static str,
}

const INBOUND: Direction = Direction {
    exchange: "training-credits.in",
    envelope: "schemas/cloudevent.json",
    schema_dir: "schemas/in",
    action: "send",
};

const OUTBOUND: Direction = Direction {
    exchange: "training-credits.out",
    envelope: "schemas/outbound-cloudevent.json",
    schema_dir: "schemas/out",
    action: "receive",
};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn document() -> Value {
    let text = std::fs::read_to_string(root().join("asyncapi.yaml")).expect("asyncapi.yaml");
    serde_saphyr::from_str(&text).expect("asyncapi.yaml is YAML")
}

fn inbound_types() -> Vec<&'static str> {
    InboundType::ALL.iter().map(|kind| kind.as_str()).collect()
}

/// The outbound types: the names of the files of `schemas/out/`.
fn outbound_types() -> Vec<String> {
    let mut types: Vec<String> = std::fs::read_dir(root().join(OUTBOUND.schema_dir))
        .expect("schemas/out")
        .map(|entry| {
            let path = entry.expect("a schema file").path();
            let name = path.file_stem().expect("a file name").to_string_lossy();
            name.into_owned()
        })
        .collect();
    types.sort_unstable();
    types
}

/// What a local `$ref` (`#/components/…`) names; any other value is itself.
fn resolve<'a>(document: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("`{reference}` is not a reference inside the document"));
            document
                .pointer(pointer)
                .unwrap_or_else(|| panic!("`{reference}` names nothing"))
        }
        None => value,
    }
}

fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no text at {pointer} in {value:#}"))
}

fn entries(value: &Value) -> impl Iterator<Item = (&String, &Value)> {
    value.as_object().into_iter().flatten()
}

/// The one channel whose address is `address`, with its id.
fn channel_at<'a>(document: &'a Value, address: &str) -> (&'a str, &'a Value) {
    let found: Vec<_> = entries(&document["channels"])
        .filter(|(_, channel)| channel["address"].as_str() == Some(address))
        .collect();
    assert_eq!(found.len(), 1, "one channel at the address `{address}`");
    (found[0].0.as_str(), found[0].1)
}

/// Every `$ref` of `value` that names a file, not a place in the document.
fn file_refs(value: &Value, refs: &mut BTreeSet<String>) {
    match value {
        Value::Object(object) => {
            for (key, inner) in object {
                match inner.as_str() {
                    Some(reference) if key == "$ref" && !reference.starts_with('#') => {
                        refs.insert(reference.to_owned());
                    }
                    _ => file_refs(inner, refs),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|inner| file_refs(inner, refs)),
        _ => {}
    }
}

/// `dir`'s files, recursively, as paths relative to the repository root.
fn files_under(dir: &Path, files: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).expect("a directory of schemas") {
        let path: PathBuf = entry.expect("an entry").path();
        if path.is_dir() {
            files_under(&path, files);
        } else {
            let relative = path.strip_prefix(root()).expect("under the root");
            files.insert(relative.to_string_lossy().replace('\\', "/"));
        }
    }
}

/// Checks that `kind` is a message of `direction` with its schema as
/// payload, the address of a channel on its exchange, and the message of an
/// operation of the integrating application's side.
fn assert_described(document: &Value, kind: &str, direction: &Direction) {
    let message = &document["components"]["messages"][kind];
    assert!(message.is_object(), "`{kind}` is a message of the document");
    assert_eq!(text(message, "/name"), kind);
    assert_eq!(text(message, "/contentType"), CONTENT_TYPE, "{kind}");
    let payload = &message["payload"];
    assert_eq!(text(payload, "/schemaFormat"), SCHEMA_FORMAT, "{kind}");
    assert_eq!(
        text(payload, "/schema/allOf/0/$ref"),
        direction.envelope,
        "{kind} is wrapped in its envelope"
    );
    let typed = &payload["schema"]["allOf"][1]["properties"];
    assert_eq!(text(typed, "/type/const"), kind);
    assert_eq!(
        text(typed, "/data/$ref"),
        format!("{}/{kind}.json", direction.schema_dir),
        "the data of {kind} is its schema"
    );

    let (channel_id, channel) = channel_at(document, kind);
    let binding = &resolve(document, &channel["bindings"])["amqp"];
    assert_eq!(text(binding, "/is"), "routingKey", "{kind}");
    assert_eq!(
        text(binding, "/exchange/name"),
        direction.exchange,
        "{kind}"
    );
    assert_eq!(text(binding, "/exchange/type"), "topic", "{kind}");
    assert_eq!(binding["exchange"]["durable"], true, "{kind}");
    let message_ref = format!("#/components/messages/{kind}");
    let carries_it = entries(&channel["messages"])
        .any(|(_, message)| message["$ref"].as_str() == Some(message_ref.as_str()));
    assert!(carries_it, "the channel `{channel_id}` carries `{kind}`");

    let channel_ref = format!("#/channels/{channel_id}");
    let operations: Vec<_> = entries(&document["operations"])
        .map(|(_, operation)| operation)
        .filter(|operation| operation["channel"]["$ref"].as_str() == Some(channel_ref.as_str()))
        .collect();
    assert_eq!(
        operations.len(),
        1,
        "one operation on the channel of {kind}"
    );
    let operation = operations[0];
    assert_eq!(text(operation, "/action"), direction.action, "{kind}");
    let binding = &resolve(document, &operation["bindings"])["amqp"];
    assert_eq!(binding["deliveryMode"], 2, "{kind} is persistent");
}

#[test]
fn every_inbound_type_is_a_message_a_routing_key_of_the_inbound_exchange_and_a_send() {
    let document = document();
    for kind in inbound_types() {
        assert_described(&document, kind, &INBOUND);
    }
}

#[test]
fn every_outbound_type_is_a_message_a_routing_key_of_the_outbound_exchange_and_a_receive() {
    let document = document();
    let outbound = outbound_types();
    assert!(!outbound.is_empty(), "schemas/out has the outbound types");
    for kind in &outbound {
        assert_described(&document, kind, &OUTBOUND);
        // The worker sets the AMQP `type` of what it publishes (SPEC §5).
        let message = &document["components"]["messages"][kind.as_str()];
        assert_eq!(message["bindings"]["amqp"]["messageType"], kind.as_str());
    }
}

#[test]
fn the_document_describes_no_other_event_type() {
    let document = document();
    let mut expected: BTreeSet<String> = inbound_types().into_iter().map(str::to_owned).collect();
    expected.extend(outbound_types());
    expected.insert("deadLetter".to_owned());
    let messages: BTreeSet<String> = entries(&document["components"]["messages"])
        .map(|(name, _)| name.clone())
        .collect();
    assert_eq!(messages, expected);
}

#[test]
fn every_schema_file_is_referenced_and_every_file_reference_exists() {
    let mut referenced = BTreeSet::new();
    file_refs(&document(), &mut referenced);
    let mut files = BTreeSet::new();
    files_under(&root().join("schemas"), &mut files);
    let unreferenced: Vec<_> = files.difference(&referenced).collect();
    let missing: Vec<_> = referenced.difference(&files).collect();
    assert!(unreferenced.is_empty(), "not referenced: {unreferenced:?}");
    assert!(
        missing.is_empty(),
        "referenced but no such file: {missing:?}"
    );
}

#[test]
fn the_dead_letter_queue_names_every_dead_letter_reason_in_its_headers() {
    let document = document();
    let (_, channel) = channel_at(&document, "training-credits.dead");
    let binding = &resolve(&document, &channel["bindings"])["amqp"];
    assert_eq!(text(binding, "/is"), "queue");
    assert_eq!(text(binding, "/queue/name"), "training-credits.dead");
    assert_eq!(binding["queue"]["durable"], true);
    let messages: Vec<&Value> = entries(&channel["messages"])
        .map(|(_, message)| resolve(&document, message))
        .collect();
    assert_eq!(
        messages.len(),
        1,
        "the dead-letter queue holds dead letters"
    );
    let headers = &messages[0]["headers"]["properties"];
    assert_eq!(text(headers, "/x-error-detail/type"), "string");
    let reasons: BTreeSet<&str> = headers["x-error-reason"]["enum"]
        .as_array()
        .expect("the reasons of x-error-reason")
        .iter()
        .map(|reason| reason.as_str().expect("a reason"))
        .collect();
    let expected: BTreeSet<&str> = DeadReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(reasons, expected);
}

#[test]
fn the_worker_queue_carries_every_inbound_type() {
    let document = document();
    let (_, channel) = channel_at(&document, "training-credits.worker");
    let binding = &resolve(&document, &channel["bindings"])["amqp"];
    assert_eq!(text(binding, "/is"), "queue");
    assert_eq!(text(binding, "/queue/name"), "training-credits.worker");
    assert_eq!(binding["queue"]["durable"], true);
    let carried: BTreeSet<&str> = entries(&channel["messages"])
        .map(|(_, message)| text(resolve(&document, message), "/name"))
        .collect();
    let expected: BTreeSet<&str> = inbound_types().into_iter().collect();
    assert_eq!(carried, expected);
}
