//! The JSON Schemas of `schemas/`, compiled once at start and shared by every
//! message. They are built into the binary, so a deployed worker can never
//! validate against other schemas than the ones it was tested with.

use std::collections::HashMap;

use jsonschema::Validator;
use serde_json::Value;

use crate::domain::command::InboundType;

/// A schema file that is not valid JSON or not a valid schema: a build defect.
#[derive(Debug, thiserror::Error)]
#[error("schema `{name}` is broken: {detail}")]
pub struct SchemaError {
    name: String,
    detail: String,
}

macro_rules! schema_files {
    ($dir:literal: $($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/", $dir, "/", $name, ".json")))),*]
    };
}

const INBOUND: &[(&str, &str)] = schema_files!("in":
    "credits.account.opened",
    "credits.account.updated",
    "credits.account.owner_added",
    "credits.account.owner_removed",
    "credits.account.code_rotated",
    "credits.account.closed",
    "credits.purchase.completed",
    "credits.purchase.refunded",
    "credits.lot.extended",
    "credits.redemption.requested",
    "credits.redemption.approved",
    "credits.redemption.denied",
    "credits.redemption.cancelled",
    "credits.enrollment.unenrolled",
    "credits.report.requested",
);

const OUTBOUND: &[(&str, &str)] = schema_files!("out":
    "training-credits.account.opened",
    "training-credits.account.updated",
    "training-credits.purchase.recorded",
    "training-credits.purchase.refunded",
    "training-credits.lot.extended",
    "training-credits.redemption.pending",
    "training-credits.redemption.approved",
    "training-credits.redemption.denied",
    "training-credits.redemption.rejected",
    "training-credits.redemption.cancelled",
    "training-credits.redemption.expired",
    "training-credits.redemption.refunded",
    "training-credits.redemption.unenrolled",
    "training-credits.lot.expiring",
    "training-credits.lot.expired",
    "training-credits.balance.low",
    "training-credits.report.generated",
    "training-credits.command.refused",
);

const ENVELOPE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/schemas/cloudevent.json"
));
const OUTBOUND_ENVELOPE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/schemas/outbound-cloudevent.json"
));

pub struct Schemas {
    envelope: Validator,
    outbound_envelope: Validator,
    inbound: HashMap<InboundType, Validator>,
    outbound: HashMap<&'static str, Validator>,
}

fn compile(name: &str, text: &str) -> Result<Validator, SchemaError> {
    let broken = |detail: String| SchemaError {
        name: name.to_owned(),
        detail,
    };
    let schema: Value = serde_json::from_str(text).map_err(|e| broken(e.to_string()))?;
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .map_err(|e| broken(e.to_string()))
}

fn compile_all(
    files: &'static [(&'static str, &'static str)],
) -> Result<HashMap<&'static str, Validator>, SchemaError> {
    files
        .iter()
        .map(|(name, text)| Ok((*name, compile(name, text)?)))
        .collect()
}

impl Schemas {
    pub fn load() -> Result<Schemas, SchemaError> {
        Ok(Schemas {
            envelope: compile("cloudevent", ENVELOPE)?,
            outbound_envelope: compile("outbound-cloudevent", OUTBOUND_ENVELOPE)?,
            inbound: InboundType::ALL
                .iter()
                .map(|kind| {
                    let name = kind.as_str();
                    let text = INBOUND
                        .iter()
                        .find_map(|(file, text)| (*file == name).then_some(*text))
                        .ok_or_else(|| SchemaError {
                            name: name.to_owned(),
                            detail: "no schema file".to_owned(),
                        })?;
                    Ok((*kind, compile(name, text)?))
                })
                .collect::<Result<_, SchemaError>>()?,
            outbound: compile_all(OUTBOUND)?,
        })
    }

    pub fn envelope(&self) -> &Validator {
        &self.envelope
    }

    pub fn inbound(&self, kind: InboundType) -> &Validator {
        &self.inbound[&kind]
    }

    /// Checks an outbound CloudEvent against its envelope and `data` schema;
    /// the tests hold every event the code produces to this.
    pub fn check_outbound(&self, event: &Value) -> Result<(), String> {
        self.outbound_envelope
            .validate(event)
            .map_err(|e| format!("envelope: {e} at `{}`", e.instance_path()))?;
        let type_name = event["type"].as_str().unwrap_or_default();
        let validator = self
            .outbound
            .get(type_name)
            .ok_or_else(|| format!("no schema for `{type_name}`"))?;
        validator
            .validate(&event["data"])
            .map_err(|e| format!("{type_name}: {e} at `{}`", e.instance_path()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted<'a>(names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
        let mut names: Vec<&str> = names.collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn every_inbound_type_has_a_schema_and_every_schema_a_type() {
        assert_eq!(
            sorted(INBOUND.iter().map(|(name, _)| *name)),
            sorted(InboundType::ALL.iter().map(|kind| kind.as_str()))
        );
        Schemas::load().expect("the schemas compile");
    }
}
