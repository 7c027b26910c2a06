//! Prometheus metrics of the feed.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// How a client's cursor was met.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ResumeResult {
    /// Found: the client got every later event.
    resumed,
    /// Too old or never seen here: the client was told to reload its state.
    unknown,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: ResumeResult,
}

#[derive(Clone, Default)]
pub struct Metrics {
    pub clients: Gauge,
    pub events_sent: Counter,
    resumes: Family<ResultLabel, Counter>,
    pub slow_clients: Counter,
    pub rejected_clients: Counter,
    pub events_read: Counter,
    pub duplicates: Counter,
    pub entries_skipped: Counter,
    pub history_events: Gauge,
    pub gaps: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        for result in [ResumeResult::resumed, ResumeResult::unknown] {
            let _ = m.resumes.get_or_create(&ResultLabel { result });
        }
        registry.register("feed_clients", "Clients connected to /events", m.clients.clone());
        registry.register("feed_events_sent", "Events sent to clients", m.events_sent.clone());
        registry.register(
            "feed_resumes",
            "Clients that came with a cursor: resumed, or unknown (too old: told to reload)",
            m.resumes.clone(),
        );
        registry.register(
            "feed_slow_clients",
            "Clients disconnected for falling FEED_CLIENT_LAG events behind",
            m.slow_clients.clone(),
        );
        registry.register("feed_rejected_clients", "Clients refused past FEED_MAX_CLIENTS", m.rejected_clients.clone());
        registry.register("feed_events_read", "Events read from the stream", m.events_read.clone());
        registry.register(
            "feed_duplicates",
            "Stream entries of an event read already (published twice), not sent again",
            m.duplicates.clone(),
        );
        registry.register("feed_entries_skipped", "Stream entries that are not events", m.entries_skipped.clone());
        registry.register("feed_history_events", "Events kept for clients that resume", m.history_events.clone());
        registry.register(
            "feed_stream_gaps",
            "Times entries were trimmed before this replica read them (every client told to reload)",
            m.gaps.clone(),
        );
        m
    }

    pub fn resumed(&self, result: ResumeResult) {
        self.resumes.get_or_create(&ResultLabel { result }).inc();
    }
}
