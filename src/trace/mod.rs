//! Trace context (SPEC §5): the W3C `traceparent` and `tracestate` that an
//! inbound CloudEvent may carry (the CloudEvents distributed-tracing
//! extension), continued by the worker's span for that message, and written
//! into every outbound event the message causes. [`export`] sends the spans
//! over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! Reading and writing the two attributes is the OpenTelemetry SDK's
//! [`TraceContextPropagator`]; this module only points it at CloudEvent
//! attributes instead of HTTP headers.

pub mod export;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TraceId};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing::Span;
use tracing::field::{DisplayValue, display};
use tracing_opentelemetry::OpenTelemetrySpanExt;

const TRACEPARENT: &str = "traceparent";

/// The trace context an inbound CloudEvent (`event`, its JSON) names, as the
/// remote parent of the worker's span for it. A `traceparent` that is not a
/// valid W3C one is ignored with its `tracestate`, as W3C asks: tracing is
/// never a reason to refuse a message.
pub fn parent_of(event: &Value) -> Option<SpanContext> {
    let parent = TraceContextPropagator::new().extract(&Attributes::Read(event));
    let span_context = parent.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

/// The `trace_id` field of the worker's span for a unit of work whose
/// inbound parent is `parent`: the parent's trace id, which the span keeps.
pub fn trace_id_field(parent: Option<&SpanContext>) -> Option<DisplayValue<TraceId>> {
    parent.map(|parent| display(parent.trace_id()))
}

/// The trace what one unit of work produces continues: the context of the
/// worker's span for it (its trace id, the span's own id, the sampling flag
/// and `tracestate` as they came in).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace(SpanContext);

impl Trace {
    /// Makes `span` the worker's span for a unit of work whose inbound
    /// parent is `parent`. When spans are exported, `span` is an
    /// OpenTelemetry span, a child of `parent` or else the root of a new
    /// trace, and the trace is its own. Otherwise the trace is `parent`'s,
    /// under a span id drawn for `span`, and there is none without a parent:
    /// a trace id that nobody records would link nothing.
    ///
    /// `span` declares a `trace_id` field, given [`trace_id_field`] of
    /// `parent` when it is created (a value recorded later costs the JSON
    /// log a second formatting of every field); a new root's is recorded
    /// here.
    pub fn start(span: &Span, parent: Option<SpanContext>) -> Option<Trace> {
        let root = parent.is_none();
        if let Some(parent) = &parent {
            // Fails only when no OpenTelemetry layer is installed (spans are
            // not exported), or the span is disabled: nothing to set then.
            let _ = span.set_parent(Context::new().with_remote_span_context(parent.clone()));
        }
        let exported = span.context().span().span_context().clone();
        let context = if exported.is_valid() {
            exported
        } else {
            let parent = parent?;
            SpanContext::new(
                parent.trace_id(),
                RandomIdGenerator::default().new_span_id(),
                parent.trace_flags(),
                false,
                parent.trace_state().clone(),
            )
        };
        if root {
            span.record("trace_id", display(context.trace_id()));
        }
        Some(Trace(context))
    }

    pub fn trace_id(&self) -> TraceId {
        self.0.trace_id()
    }

    /// Writes `traceparent`, and `tracestate` unless it is empty, into the
    /// attributes of an outbound CloudEvent.
    pub fn write(&self, attributes: &mut Map<String, Value>) {
        let context = Context::new().with_remote_span_context(self.0.clone());
        TraceContextPropagator::new().inject_context(&context, &mut Attributes::Write(attributes));
    }
}

/// As the two attributes, the way a report job keeps the trace of its cause
/// in its outbox row until the event that announces it is written.
impl Serialize for Trace {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut attributes = Map::new();
        self.write(&mut attributes);
        attributes.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Trace {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Trace, D::Error> {
        let attributes = Value::deserialize(deserializer)?;
        parent_of(&attributes)
            .map(Trace)
            .ok_or_else(|| serde::de::Error::custom("not a valid traceparent"))
    }
}

/// The attributes of a CloudEvent as the propagator's carrier.
enum Attributes<'a> {
    Read(&'a Value),
    Write(&'a mut Map<String, Value>),
}

impl Extractor for Attributes<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let Attributes::Read(event) = self else {
            return None;
        };
        let value = event.get(key)?.as_str()?;
        // The propagator reads each field of a `traceparent` as a number,
        // which takes a short one too; W3C fixes their lengths.
        if key == TRACEPARENT && !well_sized(value) {
            return None;
        }
        Some(value)
    }

    fn keys(&self) -> Vec<&str> {
        match self {
            Attributes::Read(event) => event
                .as_object()
                .map(|attributes| attributes.keys().map(String::as_str).collect())
                .unwrap_or_default(),
            Attributes::Write(_) => Vec::new(),
        }
    }
}

impl Injector for Attributes<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let Attributes::Write(attributes) = self
            && !value.is_empty()
        {
            attributes.insert(key.to_owned(), Value::String(value));
        }
    }
}

/// Whether the version, trace id, parent id and flags of `traceparent` have
/// the lengths W3C gives them (hex digits: 2, 32, 16, 2).
fn well_sized(traceparent: &str) -> bool {
    let mut fields = traceparent.split('-');
    [2, 32, 16, 2]
        .into_iter()
        .all(|length| fields.next().is_some_and(|field| field.len() == length))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TRACESTATE: &str = "tracestate";
    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT_ID: &str = "00f067aa0ba902b7";

    fn event(traceparent: &str) -> Value {
        json!({"id": "ev-1", "traceparent": traceparent, "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"})
    }

    #[test]
    fn a_valid_traceparent_is_the_parent_with_its_flags_and_tracestate() {
        for flags in ["00", "01"] {
            let parent = parent_of(&event(&format!("00-{TRACE_ID}-{PARENT_ID}-{flags}")))
                .expect("a valid traceparent");
            assert_eq!(parent.trace_id().to_string(), TRACE_ID);
            assert_eq!(parent.span_id().to_string(), PARENT_ID);
            assert_eq!(parent.is_sampled(), flags == "01");
            assert_eq!(
                parent.trace_state().header(),
                "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
            );
        }
    }

    #[test]
    fn an_invalid_traceparent_is_ignored() {
        for traceparent in [
            "00-abc-def-01",
            "",
            &format!("00-{}-{PARENT_ID}-01", "0".repeat(32)),
            &format!("00-{TRACE_ID}-{}-01", "0".repeat(16)),
            &format!("00-{}-{PARENT_ID}-01", TRACE_ID.to_uppercase()),
            &format!("ff-{TRACE_ID}-{PARENT_ID}-01"),
            &format!("00-{TRACE_ID}-{PARENT_ID}-01-extra"),
            &format!("00-{TRACE_ID}-{PARENT_ID}"),
            &format!("00-0{TRACE_ID}-{PARENT_ID}-01"),
        ] {
            assert_eq!(parent_of(&event(traceparent)), None, "{traceparent}");
        }
        assert_eq!(parent_of(&json!({"traceparent": 42})), None);
        assert_eq!(parent_of(&json!({"id": "ev-1"})), None);
    }

    #[test]
    fn without_exported_spans_the_worker_s_span_continues_the_parent_s_trace_or_none() {
        let parent = parent_of(&event(&format!("00-{TRACE_ID}-{PARENT_ID}-01")));
        let trace = Trace::start(&Span::none(), parent.clone()).expect("a trace");
        assert_eq!(trace.trace_id().to_string(), TRACE_ID);
        let mut attributes = Map::new();
        trace.write(&mut attributes);
        let traceparent = attributes[TRACEPARENT].as_str().expect("a traceparent");
        let fields: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(fields[..2], ["00", TRACE_ID]);
        assert_ne!(fields[2], PARENT_ID, "the worker's own span id");
        assert_eq!(fields[3], "01");
        assert_eq!(
            attributes[TRACESTATE],
            "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
        );
        let again = Trace::start(&Span::none(), parent).expect("a trace");
        assert_ne!(again, trace, "each span has an id of its own");
        assert_eq!(Trace::start(&Span::none(), None), None);
    }

    #[test]
    fn an_empty_tracestate_is_left_out_and_a_trace_keeps_itself_through_serde() {
        let parent = parent_of(&json!({"traceparent": format!("00-{TRACE_ID}-{PARENT_ID}-00")}));
        let trace = Trace::start(&Span::none(), parent).expect("a trace");
        let kept = serde_json::to_value(&trace).expect("a trace serialises");
        assert_eq!(
            kept.as_object().map(|o| o.keys().collect::<Vec<_>>()),
            Some(vec![&TRACEPARENT.to_owned()])
        );
        let back: Trace = serde_json::from_value(kept).expect("and deserialises");
        assert_eq!(back.0.trace_id(), trace.0.trace_id());
        assert_eq!(back.0.span_id(), trace.0.span_id());
        assert_eq!(back.0.trace_flags(), trace.0.trace_flags());
    }
}
