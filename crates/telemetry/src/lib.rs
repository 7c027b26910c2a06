//! Telemetry shared by the services: a `tracing` subscriber (text or JSON logs, `RUST_LOG`
//! filter), an OpenTelemetry layer exporting over OTLP when the standard `OTEL_*` variables
//! ask for it, and W3C trace-context propagation for HTTP headers and stream entries.

mod export;
mod json;
pub mod propagation;
mod setup;

pub use setup::{init, LogFormat, Telemetry, TelemetryError};
