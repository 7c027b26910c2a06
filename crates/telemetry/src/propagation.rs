//! W3C trace context (`traceparent`, `tracestate`) to and from tracing spans.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The current span's context as (`traceparent`, `tracestate`); `None` when there is no valid
/// trace (no OpenTelemetry layer, or no span).
pub fn current_context_headers() -> (Option<String>, Option<String>) {
    span_context_headers(&tracing::Span::current())
}

/// `span`'s context as (`traceparent`, `tracestate`).
pub fn span_context_headers(span: &tracing::Span) -> (Option<String>, Option<String>) {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return (None, None);
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    let traceparent = carrier.remove("traceparent");
    let tracestate = carrier.remove("tracestate").filter(|s| !s.is_empty());
    (traceparent, tracestate)
}

/// Makes the remote context in `traceparent`/`tracestate` the parent of `span`. An absent or
/// malformed `traceparent` leaves `span` a root.
pub fn set_remote_parent(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    let Some(traceparent) = traceparent else { return };
    let mut carrier = HashMap::new();
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    if let Some(ts) = tracestate {
        carrier.insert("tracestate".to_owned(), ts.to_owned());
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Trace and span ids of `span`, hex encoded, when it is part of a valid trace.
pub fn trace_ids(span: &tracing::Span) -> Option<(String, String)> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// Links `span` to `to` (OpenTelemetry span link), for work done once on behalf of several
/// traced items, such as one database transaction for a batch of stream entries. Call it
/// before `span` is first entered. Nothing happens when `to` has no valid context.
pub fn add_link(span: &tracing::Span, to: &tracing::Span) {
    let cx = to.context();
    let target = cx.span().span_context().clone();
    if target.is_valid() {
        span.add_link(target);
    }
}
