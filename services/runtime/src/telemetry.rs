//! Logs and traces.
//!
//! Logs: one JSON object per line on stderr, level from `RUST_LOG` (default `info`); the
//! fields of the current span, `trace_id` among them, go into every line. Memory content and
//! connection strings are never logged at info.
//!
//! Traces: every span gets an OpenTelemetry context (so W3C `traceparent` propagation works
//! whether or not anything is exported); when `telemetry.otlp_endpoint` is set, spans are
//! exported there over OTLP/HTTP in batches. [`current_traceparent`] gives the header to put
//! on a Kafka record, [`set_remote_parent`] continues a trace from one.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{OtlpProtocol, TelemetryConfig};

/// Flushes and stops the trace exporter when dropped (end of `main`).
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("trace exporter shutdown: {e}");
        }
    }
}

fn traces_url(endpoint: &str) -> String {
    let endpoint = endpoint.trim_end_matches('/');
    if endpoint.ends_with("/v1/traces") {
        endpoint.to_owned()
    } else {
        format!("{endpoint}/v1/traces")
    }
}

/// Installs logging and tracing for the process. Call once, inside the tokio runtime.
pub fn init(config: &TelemetryConfig, role: &str) -> anyhow::Result<TelemetryGuard> {
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new("memos.role", role.to_owned()))
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = &config.otlp_endpoint {
        let protocol = match config.otlp_protocol {
            OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
            OtlpProtocol::HttpJson => Protocol::HttpJson,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(protocol)
            .with_endpoint(traces_url(endpoint))
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let tracer = provider.tracer("memos");

    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,sqlx=warn,opentelemetry=warn"));
    let logs = tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(std::io::stderr);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .try_init();
    Ok(TelemetryGuard { provider })
}

struct MapCarrier<'a>(&'a mut HashMap<String, String>);

impl Injector for MapCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct PairCarrier<'a>(&'a [(&'a str, &'a str)]);

impl Extractor for PairCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| *v)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| *k).collect()
    }
}

/// The W3C `traceparent` (and `tracestate`, if any) of the current span.
pub fn current_traceparent() -> Option<(String, Option<String>)> {
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut map = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut MapCarrier(&mut map));
    let traceparent = map.remove("traceparent")?;
    Some((traceparent, map.remove("tracestate").filter(|s| !s.is_empty())))
}

/// Makes `span` a child of the remote span named by `traceparent`, and records its trace id
/// in the span's `trace_id` field (declare it `trace_id = tracing::field::Empty`).
pub fn set_remote_parent(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    if let Some(traceparent) = traceparent {
        let mut pairs = vec![("traceparent", traceparent)];
        if let Some(state) = tracestate {
            pairs.push(("tracestate", state));
        }
        let parent = TraceContextPropagator::new().extract(&PairCarrier(&pairs));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    record_trace_id(span);
}

/// Records the span's trace id in its `trace_id` field, so log lines carry it.
pub fn record_trace_id(span: &tracing::Span) {
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}

/// The trace id inside a `traceparent` value (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1).filter(|id| id.len() == 32)
}
