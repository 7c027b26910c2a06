use std::io;
use std::sync::{Arc, Mutex};

use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::fmt::MakeWriter;

use crate::propagation::{set_remote_parent, trace_ids};
use crate::setup::subscriber;
use crate::LogFormat;

/// Log output kept in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    fn json_lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().expect("capture lock").clone();
        String::from_utf8(bytes)
            .expect("utf-8 logs")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

#[test]
fn json_lines_carry_the_ids_of_the_span_they_are_logged_in() {
    let provider = SdkTracerProvider::builder().build();
    let out = Captured::default();
    let (outer_ids, inner_ids) =
        tracing::subscriber::with_default(subscriber(&provider, LogFormat::Json, out.clone(), false), || {
            tracing::info!(step = "outside");
            let outer = tracing::info_span!("handle", order_id = "o-1");
            set_remote_parent(&outer, Some(&format!("00-{TRACE}-{PARENT}-01")), None);
            let outer_ids = outer.in_scope(|| {
                tracing::info!(step = "outer", "in the request span");
                trace_ids(&tracing::Span::current())
            });
            let inner = tracing::info_span!(parent: &outer, "store");
            let inner_ids = inner.in_scope(|| {
                tracing::warn!(step = "inner");
                trace_ids(&tracing::Span::current())
            });
            tracing::info!(parent: &outer, step = "explicit parent");
            (outer_ids.expect("outer span ids"), inner_ids.expect("inner span ids"))
        });
    let lines = out.json_lines();
    let by_step =
        |step: &str| lines.iter().find(|l| l["step"] == step).unwrap_or_else(|| panic!("no `{step}` line: {lines:?}"));

    let outside = by_step("outside");
    assert!(outside.get("trace_id").is_none() && outside.get("span_id").is_none(), "{outside}");

    let outer = by_step("outer");
    assert_eq!(outer["trace_id"], TRACE, "{outer}");
    assert_eq!(outer["span_id"], outer_ids.1.as_str(), "{outer}");
    assert_ne!(outer["span_id"], PARENT, "the span's own id, not the remote parent's");
    assert_eq!(outer["message"], "in the request span");
    assert_eq!(outer["level"], "INFO");
    assert_eq!(outer["span"]["order_id"], "o-1", "current span fields are kept: {outer}");

    let inner = by_step("inner");
    assert_eq!(inner["trace_id"], TRACE);
    assert_eq!(inner["span_id"], inner_ids.1.as_str());
    assert_ne!(inner_ids.1, outer_ids.1);

    let explicit = by_step("explicit parent");
    assert_eq!(explicit["span_id"], outer_ids.1.as_str(), "an explicit parent wins over the current span");
}

#[test]
fn a_root_span_gets_a_fresh_trace_id_in_its_log_lines() {
    let provider = SdkTracerProvider::builder().build();
    let out = Captured::default();
    let ids = tracing::subscriber::with_default(subscriber(&provider, LogFormat::Json, out.clone(), false), || {
        let span = tracing::info_span!("job");
        span.in_scope(|| {
            tracing::info!("working");
            trace_ids(&tracing::Span::current())
        })
    })
    .expect("a root span has a valid trace");
    let lines = out.json_lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["trace_id"], ids.0.as_str());
    assert_eq!(lines[0]["span_id"], ids.1.as_str());
    assert_eq!(ids.0.len(), 32);
}

#[test]
fn text_logs_are_not_json() {
    let provider = SdkTracerProvider::builder().build();
    let out = Captured::default();
    tracing::subscriber::with_default(subscriber(&provider, LogFormat::Text, out.clone(), false), || {
        tracing::info!(order_id = "o-1", "created");
    });
    let text = String::from_utf8(out.0.lock().expect("capture lock").clone()).expect("utf-8");
    assert!(text.contains("created") && text.contains("order_id=\"o-1\"") && !text.starts_with('{'), "{text}");
}

#[test]
fn add_link_links_a_batch_span_to_each_item_span() {
    use opentelemetry_sdk::trace::InMemorySpanExporter;

    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let (items, batch_ids) =
        tracing::subscriber::with_default(subscriber(&provider, LogFormat::Json, Captured::default(), false), || {
            let items: Vec<tracing::Span> = (0..2).map(|i| tracing::info_span!("item", i)).collect();
            let batch = tracing::info_span!("batch");
            for item in &items {
                crate::propagation::add_link(&batch, item);
            }
            let ids: Vec<_> = items.iter().map(|s| trace_ids(s).expect("item ids")).collect();
            let batch_ids = trace_ids(&batch).expect("batch ids");
            batch.in_scope(|| {});
            (ids, batch_ids)
        });
    let _ = provider.force_flush();
    let spans = exporter.get_finished_spans().expect("finished spans");
    let batch = spans.iter().find(|s| s.name == "batch").expect("batch span exported");
    assert_eq!(batch.span_context.span_id().to_string(), batch_ids.1);
    let linked: Vec<(String, String)> = batch
        .links
        .iter()
        .map(|l| (l.span_context.trace_id().to_string(), l.span_context.span_id().to_string()))
        .collect();
    assert_eq!(linked, items);
}
