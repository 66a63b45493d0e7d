//! The outbox between the ledger and the world: what a committed batch
//! leaves to be sent. Outbound events as CloudEvents, the ids derived from
//! their cause (the same cause always yields the same ids, so a repeated
//! send is recognised downstream), and the hand-off of fresh rows from
//! [`apply`](crate::apply) to this worker's dispatcher lanes.

pub mod handoff;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::decode::EventKey;
use crate::domain::{Id, Ts};

/// Namespace of the ids derived for outbound events and emails: the same
/// cause always yields the same ids.
const OUTBOX_NAMESPACE: Uuid = Uuid::from_u128(0x6c1e_5d0a_7b2f_4e8e_9a43_1d2c_3b4a_5f60);

/// What an outbound event is made of, before it becomes a CloudEvent.
pub struct OutboundEvent<'a> {
    pub id: &'a str,
    pub kind: &'a str,
    pub account_id: Option<&'a Id>,
    pub data: &'a Value,
    pub causation_id: &'a str,
    pub time: Ts,
}

impl OutboundEvent<'_> {
    /// The complete CloudEvent of SPEC §5.2: `subject` is the account,
    /// `data` carries `account_id` and `causation_id`.
    pub fn to_cloud_event(&self, source: &str) -> Value {
        let mut data = self.data.clone();
        data["account_id"] = json!(self.account_id);
        data["causation_id"] = json!(self.causation_id);
        let mut event = json!({
            "specversion": "1.0",
            "id": self.id,
            "source": source,
            "type": self.kind,
            "time": self.time,
            "datacontenttype": "application/json",
            "data": data,
        });
        if let Some(account_id) = self.account_id {
            event["subject"] = json!(account_id);
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
