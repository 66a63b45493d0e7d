//! Spans over OTLP (HTTP/protobuf), when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set. The SDK reads the standard
//! variables itself (the endpoint, `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_TRACES_SAMPLER`, `OTEL_BSP_SCHEDULE_DELAY`…) and batches the
//! spans on a thread of its own; unset, nothing is installed and a span
//! costs what any `tracing` span costs.

use opentelemetry::trace::TracerProvider;
use opentelemetry_otlp::{ExporterBuildError, Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;

/// The variables that turn exporting on (either endpoint) and name the
/// service.
pub const VARIABLES: [&str; 3] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
];

/// `service.name` when neither `OTEL_SERVICE_NAME` nor
/// `OTEL_RESOURCE_ATTRIBUTES` names one.
pub const SERVICE_NAME: &str = "training-credits";

/// The OTLP pipeline, from start until [`Exporting::shutdown`].
pub struct Exporting {
    provider: SdkTracerProvider,
}

impl Exporting {
    /// The pipeline, if an endpoint is set in the environment (which the
    /// SDK reads for the rest).
    pub fn from_env() -> Result<Option<Exporting>, ExporterBuildError> {
        let set = |name: &str| std::env::var_os(name).is_some_and(|value| !value.is_empty());
        if !set(VARIABLES[0]) && !set(VARIABLES[1]) {
            return Ok(None);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build()?;
        let detected = Resource::builder().build();
        let named = detected
            .get(&opentelemetry::Key::new("service.name"))
            .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
        let resource = if named {
            detected
        } else {
            Resource::builder().with_service_name(SERVICE_NAME).build()
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        Ok(Some(Exporting { provider }))
    }

    /// The layer that turns this crate's spans into OpenTelemetry spans,
    /// whatever `RUST_LOG` lets the log show. Their attributes are their
    /// fields; the source location and thread are left out.
    pub fn layer<S>(&self) -> impl Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer(SERVICE_NAME))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(Targets::new().with_target(env!("CARGO_CRATE_NAME"), Level::INFO))
    }

    /// Sends the spans not sent yet and stops the pipeline. Blocks: call it
    /// once the runtime has finished.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "Not every span could be exported.");
        }
    }
}
