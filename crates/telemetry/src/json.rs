//! JSON log lines carrying the OpenTelemetry `trace_id` and `span_id` of the span an event
//! belongs to, so a log line can be found from a trace and the other way round.

use std::fmt;
use std::sync::{Arc, OnceLock};

use opentelemetry::trace::TraceContextExt;
use tracing::dispatcher::WeakDispatch;
use tracing::{Dispatch, Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::time::SystemTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The dispatcher the subscriber was registered in. Looking up a span's OpenTelemetry context
/// needs it, and while an event is being formatted `tracing`'s own "current dispatcher" is
/// deliberately unavailable (re-entrancy guard), so it is captured at registration.
#[derive(Clone, Default)]
pub(crate) struct DispatchCell(Arc<OnceLock<WeakDispatch>>);

impl DispatchCell {
    fn get(&self) -> Option<Dispatch> {
        self.0.get().and_then(WeakDispatch::upgrade)
    }
}

impl<S: Subscriber> Layer<S> for DispatchCell {
    fn on_register_dispatch(&self, dispatch: &Dispatch) {
        // Weak: the dispatcher owns this layer.
        let _ = self.0.set(dispatch.downgrade());
    }
}

/// `tracing_subscriber`'s JSON lines (event fields flattened, current span included) with
/// `trace_id` and `span_id` added when the event is inside a span with a valid trace.
pub(crate) struct JsonWithTraceIds {
    inner: Format<Json, SystemTime>,
    dispatch: DispatchCell,
}

impl JsonWithTraceIds {
    pub(crate) fn new(dispatch: DispatchCell) -> Self {
        let inner =
            tracing_subscriber::fmt::format().json().flatten_event(true).with_current_span(true).with_span_list(false);
        Self { inner, dispatch }
    }

    fn ids<S>(&self, ctx: &FmtContext<'_, S, JsonFields>, event: &Event<'_>) -> Option<(String, String)>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let span = if event.is_root() {
            return None;
        } else if let Some(id) = event.parent() {
            ctx.span(id)?
        } else {
            ctx.lookup_current()?
        };
        let dispatch = self.dispatch.get()?;
        let cx = tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)?;
        let span_ref = cx.span();
        let sc = span_ref.span_context();
        sc.is_valid().then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
    }
}

impl<S> FormatEvent<S, JsonFields> for JsonWithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::with_capacity(256);
        <Format<Json, SystemTime> as FormatEvent<S, JsonFields>>::format_event(
            &self.inner,
            ctx,
            Writer::new(&mut line),
            event,
        )?;
        // The inner formatter always writes one JSON object (it has at least `timestamp` and
        // `level`), so the ids go just before its closing brace. Hex ids need no escaping.
        match (self.ids(ctx, event), line.rfind('}')) {
            (Some((trace_id, span_id)), Some(end)) => {
                let (object, rest) = line.split_at(end);
                write!(writer, "{object},\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"{rest}")
            }
            _ => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests;
