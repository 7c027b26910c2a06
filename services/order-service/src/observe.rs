//! Per-request middleware: the server span (OpenTelemetry HTTP semantic conventions, joined
//! to the caller's trace), request metrics, and for API routes the readiness gate and timeout.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use crate::app::AppState;
use crate::error::ApiError;

/// Route label of requests that matched no route, so paths never become labels.
const UNMATCHED: &str = "unmatched";

pub async fn trace_and_measure(State(state): State<AppState>, req: Request, next: Next) -> Response {
    // A bounded label: any token is a valid method, and each would be a new series.
    let method = service_kit::http::method_label(req.method());
    // The semantic conventions' name for a method outside the standard set.
    let span_method = if method == "other" { "_OTHER" } else { method };
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let name = match &route {
        Some(route) => format!("{span_method} {route}"),
        None => span_method.to_owned(),
    };
    let route = route.unwrap_or_else(|| UNMATCHED.to_owned());
    let headers = req.headers();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    // `server.address` and `.port`: the host the client asked for (the Host header).
    let (server_address, server_port) = match req.uri().authority().map(|a| a.as_str()).or(header("host")) {
        Some(host) => match host.rsplit_once(':').and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?))) {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (host.to_owned(), None),
        },
        None => (String::new(), None),
    };
    let protocol_version = match req.version() {
        axum::http::Version::HTTP_10 => "1.0",
        axum::http::Version::HTTP_2 => "2",
        _ => "1.1",
    };
    // Probes and scrapes would otherwise start a trace each, burying the orders in Jaeger.
    let span = if matches!(route.as_str(), "/healthz" | "/readyz" | "/metrics") {
        tracing::Span::none()
    } else {
        tracing::info_span!(
        "HTTP request",
        otel.name = %name,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        http.request.method = %span_method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        url.scheme = "http",
        url.path = %req.uri().path(),
        server.address = %server_address,
        server.port = server_port,
        network.protocol.name = "http",
        network.protocol.version = protocol_version,
        user_agent.original = header("user-agent"),
        )
    };
    telemetry::propagation::set_remote_parent(&span, header("traceparent"), header("tracestate"));

    let started = Instant::now();
    let response = next.run(req).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
        // The conventions' error type of a server error: its status code.
        span.record("error.type", status.as_str());
    }
    state.metrics.observe_request(method, &route, status.as_u16(), elapsed);
    if let Some(class) = response.extensions().get::<service_kit::FailureClass>() {
        state.metrics.failure(*class);
    }
    tracing::debug!(parent: &span, status = status.as_u16(), elapsed_ms = elapsed.as_secs_f64() * 1e3, "request served");
    response
}

/// API requests wait for the schema and are bounded in time. A request past its deadline is
/// dropped, which rolls its transaction back, and answered with 503.
pub async fn guard_api(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if !state.migrated.load(Ordering::Acquire) {
        return ApiError::NotReady.into_response();
    }
    match tokio::time::timeout(state.request_timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout(state.request_timeout).into_response(),
    }
}
