//! Trace context (SPEC §5): an inbound `traceparent` continues in every
//! outbound event its message causes and shows in the worker's log lines
//! for that message; with `OTEL_EXPORTER_OTLP_ENDPOINT` set, the worker's
//! span for each message reaches an OTLP receiver, as a child of the
//! inbound span. The worker runs in this process for the events, as the
//! real binary for its logs and its spans.

use crate::support as common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{Value, json};
use training_credits::domain::Outcome;
use training_credits::store::Store;

use common::broker::{Client, TestWorker, Vhost, config, eventually};
use common::child::Site;
use common::events::{event, opened, purchase};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
const OTHER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const OTHER_PARENT: &str = "b7ad6b7169203331";

/// `event` as sent with `traceparent` (and `tracestate`, if given).
fn traced(mut event: Value, traceparent: &str, tracestate: Option<&str>) -> Value {
    event["traceparent"] = json!(traceparent);
    if let Some(tracestate) = tracestate {
        event["tracestate"] = json!(tracestate);
    }
    event
}

/// The fields of an outbound event's `traceparent`: version, trace id,
/// parent id, flags.
/// Opens `acme` with a sampled `traceparent` of [`TRACE`] and [`PARENT`].
async fn open_acme_traced(client: &Client) {
    client
        .publish(&traced(
            opened("open", "acme", &["boss@acme.test"]),
            &format!("00-{TRACE}-{PARENT}-01"),
            None,
        ))
        .await;
}

fn traceparent_of(event: &Value) -> [String; 4] {
    let traceparent = event["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("no traceparent: {event:#}"));
    let fields: Vec<String> = traceparent.split('-').map(str::to_owned).collect();
    fields
        .try_into()
        .unwrap_or_else(|_| panic!("not a traceparent: {traceparent}"))
}

/// The one outbound event of `type_name` caused by the event `causation_id`.
fn caused_by(client: &Client, type_name: &str, causation_id: &str) -> Value {
    let mut caused: Vec<Value> = client
        .outbound_of(type_name)
        .into_iter()
        .filter(|event| event["data"]["causation_id"] == causation_id)
        .collect();
    assert_eq!(
        caused.len(),
        1,
        "{type_name} of {causation_id}: {caused:#?}"
    );
    caused.remove(0)
}

async fn an_inbound_traceparent_continues_in_every_event_its_message_causes<S: Store>(
    store: S,
    url: String,
) {
    let vhost = Vhost::new();
    let mail_dir = tempfile::tempdir().expect("a folder");
    let reports_dir = tempfile::tempdir().expect("a folder");
    let client = Client::new(&vhost).await;
    let mut settings = config(&vhost, &url, None, mail_dir.path());
    settings.reports_dir = reports_dir.path().to_owned();
    let worker = TestWorker::start(store, settings).await;

    let sampled = format!("00-{TRACE}-{PARENT}-01");
    let unsampled = format!("00-{OTHER_TRACE}-{OTHER_PARENT}-00");
    for message in [
        traced(
            opened("open", "acme", &["boss@acme.test"]),
            &sampled,
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
        ),
        traced(purchase("buy-1", "acme", "p1", "10"), &unsampled, None),
        // A report is announced once it is sent, by the dispatcher: its
        // event still continues the trace of the request.
        traced(
            event(
                "ask",
                "portal",
                "credits.report.requested",
                json!({"report": "credits", "format": "csv", "recipient": "boss@acme.test", "account_id": "acme"}),
            ),
            &sampled,
            None,
        ),
        purchase("buy-2", "acme", "p2", "10"),
        // Not a valid traceparent (the fields are too short): ignored.
        traced(purchase("buy-3", "acme", "p3", "10"), "00-abc-def-01", None),
    ] {
        client.publish(&message).await;
    }
    client
        .await_outbound("training-credits.purchase.recorded", 3)
        .await;
    client
        .await_outbound("training-credits.report.generated", 1)
        .await;

    let opened = caused_by(&client, "training-credits.account.opened", "open");
    let [version, trace_id, span_id, flags] = traceparent_of(&opened);
    assert_eq!((version.as_str(), trace_id.as_str()), ("00", TRACE));
    assert_eq!(span_id.len(), 16);
    assert_ne!(span_id, PARENT, "the parent id is the worker's span's");
    assert_eq!(flags, "01");
    assert_eq!(
        opened["tracestate"],
        "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    );

    let bought = caused_by(&client, "training-credits.purchase.recorded", "buy-1");
    let [_, trace_id, span_id, flags] = traceparent_of(&bought);
    assert_eq!(trace_id, OTHER_TRACE);
    assert_ne!(span_id, OTHER_PARENT);
    assert_eq!(flags, "00", "not sampled, as it came");
    assert!(bought.get("tracestate").is_none(), "{bought:#}");

    let announced = caused_by(&client, "training-credits.report.generated", "ask");
    let [_, trace_id, span_id, flags] = traceparent_of(&announced);
    assert_eq!((trace_id.as_str(), flags.as_str()), (TRACE, "01"));
    assert_ne!(span_id, PARENT);
    assert_ne!(
        announced["traceparent"], opened["traceparent"],
        "each message has a span of its own"
    );

    // Without a valid traceparent, and without exporting, there is no trace.
    for causation_id in ["buy-2", "buy-3"] {
        let bought = caused_by(&client, "training-credits.purchase.recorded", causation_id);
        assert!(bought.get("traceparent").is_none(), "{bought:#}");
    }
    worker.stop().await;
}

on_both_stores!(an_inbound_traceparent_continues_in_every_event_its_message_causes);

/// The JSON log lines of a worker: (message, span of the line).
fn log_lines(log: &str) -> Vec<(String, Value)> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .map(|line| {
            let message = line["fields"]["message"].as_str().unwrap_or("").to_owned();
            (message, line["span"].clone())
        })
        .collect()
}

/// The span of the line `message` logged for the event `event_id`, once
/// it is in the log.
async fn span_of_line(site_log: impl Fn() -> String, message: &str, event_id: &str) -> Value {
    let find = || {
        log_lines(&site_log())
            .into_iter()
            .find(|(text, span)| text == message && span["event_id"] == event_id)
            .map(|(_, span)| span)
    };
    eventually(
        Duration::from_secs(30),
        &format!("`{message}` for {event_id}"),
        || async { find().is_some() },
    )
    .await;
    find().expect("the line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_lines_of_a_message_carry_its_trace_id() {
    let (_store, url, _keep) = common::sqlite_store().await;
    let vhost = Vhost::new();
    let client = Client::new(&vhost).await;
    let site = Site::new(&url, &vhost);
    let mut worker = site.start_worker_with(
        "the worker",
        &[
            ("LOG_FORMAT", "json"),
            ("RUST_LOG", "info,training_credits::consume=debug"),
        ],
    );
    worker.await_ready().await;

    open_acme_traced(&client).await;
    // Credits out of range: dead-lettered, which is logged at the default
    // level, `warn`.
    client
        .publish(&traced(
            purchase("buy-nothing", "acme", "p0", "0"),
            &format!("00-{OTHER_TRACE}-{OTHER_PARENT}-01"),
            None,
        ))
        .await;
    client.publish(&purchase("buy-1", "acme", "p1", "10")).await;

    let log = || worker.log();
    let applied = span_of_line(log, "Applied.", "open").await;
    assert_eq!(applied["trace_id"], TRACE, "{applied}");
    assert_eq!(applied["type"], "credits.account.opened");
    assert_eq!(applied["account"], "acme");
    assert_eq!(applied["source"], "portal");
    let dead = span_of_line(log, "Dead-lettered a message.", "buy-nothing").await;
    assert_eq!(dead["trace_id"], OTHER_TRACE, "{dead}");
    let untraced = span_of_line(log, "Applied.", "buy-1").await;
    assert!(untraced.get("trace_id").is_none(), "{untraced}");
    worker.stop_with("TERM").await;
}

/// Every span an OTLP receiver was sent, with the `service.name` of its
/// resource.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// An OTLP/HTTP receiver on a local port.
struct Receiver {
    endpoint: String,
    spans: Received,
}

/// `POST /v1/traces`: an `ExportTraceServiceRequest` in protobuf.
async fn receive(State(spans): State<Received>, body: Bytes) -> impl IntoResponse {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP export");
    let mut spans = spans.lock().expect("the spans");
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .map(|resource| text_attribute(&resource.attributes, "service.name"))
            .unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            spans.extend(scope_spans.spans.into_iter().map(|s| (service.clone(), s)));
        }
    }
    // An empty ExportTraceServiceResponse.
    ([("content-type", "application/x-protobuf")], Vec::new())
}

impl Receiver {
    async fn start() -> Receiver {
        let spans = Received::default();
        let app = axum::Router::new()
            .route("/v1/traces", post(receive))
            .with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a local port");
        let endpoint = format!("http://{}", listener.local_addr().expect("an address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { endpoint, spans }
    }

    /// The span named `message` of the event `event_id`, with its service.
    fn message_span(&self, event_id: &str) -> (String, Span) {
        let spans = self.spans.lock().expect("the spans");
        let mine: Vec<&(String, Span)> = spans
            .iter()
            .filter(|(_, span)| {
                span.name == "message" && text_attribute(&span.attributes, "event_id") == event_id
            })
            .collect();
        assert_eq!(mine.len(), 1, "one span for {event_id} among {spans:#?}");
        mine[0].clone()
    }
}

fn text_attribute(
    attributes: &[opentelemetry_proto::tonic::common::v1::KeyValue],
    key: &str,
) -> String {
    attributes
        .iter()
        .find(|attribute| attribute.key == key)
        .and_then(|attribute| attribute.value.as_ref()?.value.as_ref())
        .map(|value| match value {
            any_value::Value::StringValue(text) => text.clone(),
            other => format!("{other:?}"),
        })
        .unwrap_or_default()
}

/// With a batch delay of a minute, the spans can only have come with the
/// clean stop: they are flushed before the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_s_span_reaches_the_otlp_receiver_as_a_child_of_its_traceparent() {
    let receiver = Receiver::start().await;
    let (_store, url, _keep) = common::sqlite_store().await;
    let vhost = Vhost::new();
    let client = Client::new(&vhost).await;
    let site = Site::new(&url, &vhost)
        .with_env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)
        .with_env("OTEL_BSP_SCHEDULE_DELAY", "60000");
    let mut worker = site.start_worker("the exporting worker");
    worker.await_ready().await;

    open_acme_traced(&client).await;
    client.publish(&purchase("buy-1", "acme", "p1", "10")).await;
    client
        .await_outbound("training-credits.purchase.recorded", 1)
        .await;
    let opened = caused_by(&client, "training-credits.account.opened", "open");
    let bought = caused_by(&client, "training-credits.purchase.recorded", "buy-1");
    worker.stop_with("TERM").await;

    let (service, span) = receiver.message_span("open");
    assert_eq!(service, "training-credits");
    assert_eq!(hex::encode(&span.trace_id), TRACE);
    assert_eq!(
        hex::encode(&span.parent_span_id),
        PARENT,
        "the inbound span"
    );
    assert_eq!(
        text_attribute(&span.attributes, "type"),
        "credits.account.opened"
    );
    assert_eq!(text_attribute(&span.attributes, "account"), "acme");
    assert_eq!(text_attribute(&span.attributes, "source"), "portal");
    assert_eq!(
        opened["traceparent"],
        format!("00-{TRACE}-{}-01", hex::encode(&span.span_id)),
        "the event's parent is the exported span"
    );

    // No traceparent: the root of a trace of its own, which its event
    // continues.
    let (_, root) = receiver.message_span("buy-1");
    assert!(root.parent_span_id.is_empty(), "{root:?}");
    assert_eq!(
        bought["traceparent"],
        format!(
            "00-{}-{}-01",
            hex::encode(&root.trace_id),
            hex::encode(&root.span_id)
        )
    );
}

/// A scheduled job has no inbound trace. Without exporting, its events
/// carry none; with spans exported (here by `sweep`, whose spans are sent
/// as it exits), the job's span is the root of a trace that they continue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_job_s_events_continue_its_own_trace_when_spans_are_exported() {
    let mut w = common::sqlite_world().await;
    assert_eq!(
        w.open("acme", "automatic", "boss@acme.test", "ACME-1234")
            .await,
        Outcome::Applied
    );
    for (purchase_id, days) in [("p1", 1), ("p2", 3)] {
        let expires_at = w.now.plus_days(days);
        assert_eq!(
            w.purchase_expiring("acme", purchase_id, "10", expires_at)
                .await,
            Outcome::Applied
        );
    }
    w.advance_days(2);
    w.sweep().await;
    let expired = |events: Vec<Value>, purchase_id: &str| {
        events
            .into_iter()
            .find(|e| {
                e["type"] == "training-credits.lot.expired"
                    && e["data"]["purchase_id"] == purchase_id
            })
            .unwrap_or_else(|| panic!("{purchase_id} expired"))
    };
    let untraced = expired(w.events().await, "p1");
    assert!(untraced.get("traceparent").is_none(), "{untraced:#}");

    let receiver = Receiver::start().await;
    let site = Site::with_amqp_url(&w.url, "amqp://127.0.0.1:5672/%2f")
        .with_env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)
        .with_env("OTEL_BSP_SCHEDULE_DELAY", "60000");
    let at = w.now.plus_days(2).to_string();
    let swept = site
        .output(&["sweep", "--at", &at], Duration::from_secs(60))
        .await;
    assert_eq!(swept.code(), Some(0), "{}", swept.stderr);
    let traced = expired(w.events().await, "p2");
    let jobs: Vec<Span> = receiver
        .spans
        .lock()
        .expect("the spans")
        .iter()
        .filter(|(_, span)| span.name == "job")
        .map(|(_, span)| span.clone())
        .collect();
    assert_eq!(jobs.len(), 1, "{jobs:#?}\n{}", swept.stderr);
    let job = &jobs[0];
    assert_eq!(text_attribute(&job.attributes, "job"), "sweep");
    assert!(job.parent_span_id.is_empty(), "a root: {job:?}");
    assert_eq!(
        traced["traceparent"],
        format!(
            "00-{}-{}-01",
            hex::encode(&job.trace_id),
            hex::encode(&job.span_id)
        )
    );
}
