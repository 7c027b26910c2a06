//! The tracer provider: always present (so trace context propagates and logs carry trace ids),
//! exporting over OTLP only when the standard `OTEL_*` variables ask for it.

use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;

use crate::TelemetryError;

/// How spans leave the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Export {
    /// No endpoint configured (or `OTEL_SDK_DISABLED=true`): spans are created and sampled,
    /// and their context propagates, but nothing is sent anywhere.
    None,
    Otlp(Protocol),
}

/// Reads the standard variables: an endpoint (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_ENDPOINT`) turns export on; the protocol comes from
/// `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL` (default `grpc`).
pub(crate) fn export_from_env() -> Result<Export, TelemetryError> {
    let var = |name: &str| std::env::var(name).ok().map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(Export::None);
    }
    if var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT")).is_none() {
        return Ok(Export::None);
    }
    let protocol = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"));
    match protocol.as_deref().unwrap_or("grpc") {
        "grpc" => Ok(Export::Otlp(Protocol::Grpc)),
        "http/protobuf" => Ok(Export::Otlp(Protocol::HttpBinary)),
        other => Err(TelemetryError::Exporter(format!(
            "unsupported OTEL_EXPORTER_OTLP_PROTOCOL `{other}` (expected `grpc` or `http/protobuf`)"
        ))),
    }
}

/// Builds the provider. Sampling follows `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`
/// (the SDK's default configuration reads them; unset means parent-based always-on, so an
/// unsampled incoming parent stays unsampled). Batching follows `OTEL_BSP_*`.
pub(crate) fn tracer_provider(service_name: &str, export: &Export) -> Result<SdkTracerProvider, TelemetryError> {
    let resource = Resource::builder().with_service_name(service_name.to_owned()).build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let builder = match export {
        Export::None => builder,
        Export::Otlp(protocol) => builder.with_batch_exporter(span_exporter(*protocol)?),
    };
    Ok(builder.build())
}

fn span_exporter(protocol: Protocol) -> Result<opentelemetry_otlp::SpanExporter, TelemetryError> {
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let built = match protocol {
        Protocol::Grpc => {
            // tonic's channel spawns its connection task on the current tokio runtime when it
            // is built (and would panic without one); the batch processor's own thread then
            // sends through that task, so the runtime must outlive `Telemetry::shutdown`.
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(TelemetryError::Exporter(
                    "OTLP over grpc needs a tokio runtime: call telemetry::init inside one".to_owned(),
                ));
            }
            builder.with_tonic().with_protocol(protocol).build()
        }
        // The blocking reqwest client runs on the batch processor's own thread, which has no
        // tokio runtime; an async client would fail there.
        _ => builder.with_http().with_protocol(protocol).build(),
    };
    built.map_err(|e| TelemetryError::Exporter(e.to_string()))
}
