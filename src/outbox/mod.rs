//! The outbox between the ledger and the world: what a committed batch
//! leaves to be sent. Outbound events as CloudEvents, the ids derived from
//! their cause (the same cause always yields the same ids, so a repeated
//! send is recognised downstream), and the hand-off of fresh rows from
//! [`apply`](crate::apply) to this worker's dispatcher lanes.

pub mod handoff;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::decode::EventKey;
use crate::domain::event::Event;
use crate::domain::{Id, Ts};
use crate::trace::Trace;

/// Namespace of the ids derived for outbound events and emails: the same
/// cause always yields the same ids.
const OUTBOX_NAMESPACE: Uuid = Uuid::from_u128(0x6c1e_5d0a_7b2f_4e8e_9a43_1d2c_3b4a_5f60);

/// An outbound event with what its envelope needs, before it becomes a
/// CloudEvent.
pub struct OutboundEvent<'a> {
    pub id: &'a str,
    pub event: &'a Event,
    pub account_id: Option<&'a Id>,
    pub causation_id: &'a str,
    /// The trace of its cause, continued in its `traceparent`.
    pub trace: Option<&'a Trace>,
    pub time: Ts,
}

impl OutboundEvent<'_> {
    /// The complete CloudEvent of SPEC §5.2: `subject` is the account,
    /// `data` carries `account_id` and `causation_id`; `traceparent` and
    /// `tracestate` (SPEC §5) continue the trace of its cause, if any.
    pub fn to_cloud_event(&self, source: &str) -> Value {
        let mut data = serde_json::to_value(self.event).expect("an event serialises");
        data["account_id"] = json!(self.account_id);
        data["causation_id"] = json!(self.causation_id);
        let mut event = json!({
            "specversion": "1.0",
            "id": self.id,
            "source": source,
            "type": self.event.type_name(),
            "time": self.time,
            "datacontenttype": "application/json",
            "data": data,
        });
        if let Some(account_id) = self.account_id {
            event["subject"] = json!(account_id);
        }
        if let Some(trace) = self.trace {
            trace.write(event.as_object_mut().expect("a CloudEvent is an object"));
        }
        event
    }
}

/// An id derived from `name`: the same cause always yields the same id.
pub fn derived_uuid(name: &str) -> String {
    Uuid::new_v5(&OUTBOX_NAMESPACE, name.as_bytes()).to_string()
}

pub fn derived_id(key: &EventKey, index: usize) -> String {
    derived_uuid(&format!("{}\n{}\n{index}", key.source, key.id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Schemas;
    use crate::domain::event::one_of_each;
    use crate::trace::parent_of;

    #[test]
    fn every_outbound_event_is_a_cloud_event_its_schema_accepts() {
        let schemas = Schemas::load().expect("the schemas compile");
        let account: Id = "acct-1".parse().expect("an id");
        let traced = parent_of(&json!({
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "tracestate": "congo=t61rcWkgMzE",
        }));
        let trace = Trace::start(&tracing::Span::none(), traced);
        assert!(trace.is_some());
        let events = one_of_each();
        for event in &events {
            for trace in [None, trace.as_ref()] {
                let cloud_event = OutboundEvent {
                    id: &derived_uuid("ev-1"),
                    event,
                    account_id: Some(&account),
                    causation_id: "ev-1",
                    trace,
                    time: Ts::now(),
                }
                .to_cloud_event("training-credits");
                assert_eq!(
                    cloud_event.get("tracestate").is_some(),
                    trace.is_some(),
                    "{cloud_event:#}"
                );
                schemas
                    .check_outbound(&cloud_event)
                    .unwrap_or_else(|e| panic!("{e}: {cloud_event:#}"));
            }
        }
        let mut sampled: Vec<String> = events.iter().map(|e| e.type_name().to_owned()).collect();
        sampled.sort_unstable();
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/out");
        let mut schema_files: Vec<String> = std::fs::read_dir(dir)
            .expect("the outbound schemas")
            .map(|entry| {
                let name = entry.expect("a schema file").file_name();
                let name = name.to_string_lossy();
                name.strip_suffix(".json").unwrap_or(&name).to_owned()
            })
            .collect();
        schema_files.sort_unstable();
        assert_eq!(
            sampled, schema_files,
            "one event of each type, one of each schema"
        );
    }
}
