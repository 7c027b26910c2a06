use std::str::FromStr;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::export::{export_from_env, tracer_provider, Export};
use crate::json::{DispatchCell, JsonWithTraceIds};

/// `LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format `{other}` (expected `text` or `json`)")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Keeps the tracer provider alive; [`Telemetry::shutdown`] flushes spans still buffered.
#[must_use = "dropping the guard without `shutdown` may lose buffered spans"]
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl Telemetry {
    /// Whether spans are exported (an OTLP endpoint is configured).
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// Exports the spans still buffered and stops the exporter. Blocks until done (bounded by
    /// the export timeout, `OTEL_EXPORTER_OTLP_TIMEOUT`, default 10 s).
    ///
    /// Safe to call from async code on a multi-thread tokio runtime: the wait is moved off
    /// the runtime's workers, which the grpc exporter needs to make progress.
    pub fn shutdown(self) {
        let provider = self.provider;
        let flush = move || {
            if let Err(e) = provider.shutdown() {
                eprintln!("telemetry: flushing spans failed: {e}");
            }
        };
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(flush),
            _ => flush(),
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` filter (default `info`), logs on stdout in
/// `format` (JSON lines carry `trace_id`/`span_id`), and an OpenTelemetry layer.
///
/// Spans are exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, with `OTEL_EXPORTER_OTLP_PROTOCOL` `grpc`
/// (default; then `init` must run inside a tokio runtime) or `http/protobuf`, in batches.
/// Without an endpoint nothing is exported, but trace context still propagates.
/// `OTEL_SERVICE_NAME` overrides `default_service_name`.
pub fn init(default_service_name: &str, format: LogFormat) -> Result<Telemetry, TelemetryError> {
    let export = export_from_env()?;
    let provider = tracer_provider(&service_name(default_service_name), &export)?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person watching; files and log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let subscriber = subscriber(&provider, format, std::io::stdout, ansi).with(filter);
    if subscriber.try_init().is_err() {
        let _ = provider.shutdown();
        return Err(TelemetryError::AlreadyInstalled);
    }
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Ok(Telemetry { provider, exporting: export != Export::None })
}

/// The layers without a filter, logging to `writer`; `init` installs them globally, tests
/// use them with `tracing::subscriber::with_default`.
pub(crate) fn subscriber<W>(
    provider: &SdkTracerProvider,
    format: LogFormat,
    writer: W,
    ansi: bool,
) -> impl tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("telemetry")).with_tracked_inactivity(false);
    let dispatch = DispatchCell::default();
    let fmt: Box<dyn Layer<_> + Send + Sync> = match format {
        LogFormat::Text => {
            tracing_subscriber::fmt::layer().with_target(false).with_ansi(ansi).with_writer(writer).boxed()
        }
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .event_format(JsonWithTraceIds::new(dispatch.clone()))
            .with_writer(writer)
            .boxed(),
    };
    Registry::default().with(otel).with(fmt).with(dispatch)
}

fn service_name(default: &str) -> String {
    std::env::var("OTEL_SERVICE_NAME").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| default.to_owned())
}
