//! Stream entries into the [`History`]: decoded, each new one sent to the clients under its
//! `process <stream>` span.

use std::sync::Arc;

use broker::tail::{Entry, Reader};
use domain::StreamEntry;
use service_kit::messaging::MessagingPeer;

use crate::history::{Appended, History};
use crate::metrics::Metrics;

pub struct Intake {
    /// Redis and this replica, as its spans name them.
    pub peer: MessagingPeer,
    pub history: Arc<History>,
    pub metrics: Metrics,
}

impl Intake {
    /// An entry as an event the feed can send; `None` (counted) for anything else.
    pub fn decode(&self, entry: &Entry) -> Option<StreamEntry> {
        let fields = entry.fields.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
        let decoded = match StreamEntry::from_fields(fields) {
            // A line break would end the `event:` line of the message early.
            Ok(e) if e.event_type.contains(['\r', '\n']) => Err("event_type holds a line break".to_owned()),
            Ok(e) => Ok(e),
            Err(e) => Err(e.to_string()),
        };
        match decoded {
            Ok(e) => Some(e),
            Err(why) => {
                self.metrics.entries_skipped.inc();
                tracing::debug!(entry_id = entry.id, error = why, "not an event; skipped");
                None
            }
        }
    }

    /// Adds an entry read as the replica starts to the history, not sent: history, not news.
    pub fn load(&self, entry: &Entry) {
        if let Some(decoded) = self.decode(entry) {
            self.history.load(decoded);
        }
    }

    /// Counts the events kept, after loading.
    pub fn loaded(&self) {
        self.metrics.history_events.set(i64::try_from(self.history.len()).unwrap_or(i64::MAX));
    }

    /// Adds a new entry of `stream` to the history, which sends it to the clients.
    pub fn take(&self, entry: &Entry, stream: &str) {
        if let Some(decoded) = self.decode(entry) {
            self.take_decoded(decoded, stream);
        }
    }

    /// [`Intake::take`] of a decoded entry.
    fn take_decoded(&self, decoded: StreamEntry, stream: &str) {
        // `process <stream>`: the feed's handling of the event (to every client following it),
        // a child of its publication.
        let peer = &self.peer;
        let span = tracing::info_span!(
            "process",
            otel.name = %format_args!("process {stream}"),
            otel.kind = "consumer",
            messaging.system = peer.system,
            messaging.operation.name = "process",
            messaging.operation.type = "process",
            messaging.destination.name = %stream,
            messaging.message.id = %decoded.event_id,
            messaging.client.id = %peer.client_id,
            server.address = %peer.server_address,
            server.port = peer.server_port,
            aggregate_id = %decoded.aggregate_id,
            seq = decoded.seq,
        );
        telemetry::propagation::set_remote_parent(&span, decoded.traceparent.as_deref(), decoded.tracestate.as_deref());
        let _entered = span.enter();
        match self.history.push(decoded) {
            Appended::New => {
                self.metrics.events_read.inc();
                self.metrics.history_events.set(i64::try_from(self.history.len()).unwrap_or(i64::MAX));
            }
            Appended::Duplicate | Appended::Stale => {
                self.metrics.duplicates.inc();
            }
        }
    }
}

impl Reader for Intake {
    fn load(&self, entry: &Entry) {
        Intake::load(self, entry);
    }

    fn loaded(&self) {
        Intake::loaded(self);
    }

    fn take(&self, entry: &Entry, destination: &str) {
        Intake::take(self, entry, destination);
    }

    /// What the history holds is no longer whole: it is forgotten, and every client, its
    /// cursor unknown, is told to reload.
    fn gap(&self) {
        self.metrics.gaps.inc();
        tracing::warn!("the history is not whole (entries were removed unread): every client is told to reload");
        self.history.reset();
    }
}
