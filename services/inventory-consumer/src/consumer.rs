//! The read → apply → acknowledge loop of one replica.

use std::collections::HashMap;
use std::time::Duration;

use broker::group::{GroupError, Letter, Member, Note, Received};
use chrono::Utc;
use domain::{Event, StreamEntry};
use service_kit::connections::Connections;
use service_kit::messaging::MessagingPeer;
use service_kit::{Backoff, Heartbeat};
use tokio::time::Instant;
use tracing::Instrument;

use crate::apply::Outcome;
use crate::entries::{DeadLetter, Incoming};
use crate::metrics::{EventResult, Metrics};
use crate::settle::Settlement;
use crate::store::entry_failures;
use crate::{Config, Shutdown};
use broker::Delivery;

pub struct Consumer {
    pub config: Config,
    /// The partition stream (or subject) this loop reads.
    pub stream: String,
    /// Batches are applied on a connection of these (one at a time).
    pub db: Connections,
    /// The broker and this consumer, as its spans name them.
    pub peer: MessagingPeer,
    pub metrics: Metrics,
    pub shutdown: Shutdown,
    /// Beaten every time round the loop (and while waiting out an outage).
    pub heartbeat: Heartbeat,
    /// The longest one batch's transaction may take before its connection is given up on.
    pub apply_deadline: Duration,
}

/// A member that worked this long since its last failure is past that outage: the retry delay
/// after the next one starts over.
const WORKED: Duration = Duration::from_secs(10);

/// What a batch came to ([`Consumer::process`]).
pub(crate) struct Handled {
    /// Letters for the dead-letter stream (recorded in `dead_letters` already).
    pub letters: Vec<DeadLetter>,
    /// Entries to acknowledge: applied, duplicates, dead, and gone from the stream.
    pub ack: Vec<String>,
    /// Of those, the entries whose event is applied (or was already).
    pub applied: Vec<String>,
}

impl Consumer {
    /// Runs until shutdown as `member` of the group; outages of the broker or of Postgres are
    /// waited out with capped backoff.
    pub async fn run(self, mut member: Member) {
        let mut retry = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        // Once the member has worked for WORKED since its last failure, the next failure is a
        // new outage, and its retry delay starts over.
        let mut failed_at: Option<Instant> = None;
        let mut next_sample = Instant::now();
        while !self.shutdown.is_cancelled() {
            self.heartbeat.beat();
            let mut worked = Ok(());
            if Instant::now() >= next_sample {
                worked = self.sample(&mut member, &mut next_sample).await;
            }
            if worked.is_ok() {
                worked = self.round(&mut member).await;
            }
            self.note(member.take_notes());
            match worked {
                Ok(()) => {
                    if failed_at.is_some_and(|at| at.elapsed() >= WORKED) {
                        retry.reset();
                        failed_at = None;
                    }
                }
                Err(e) => {
                    failed_at = Some(Instant::now());
                    // The next session samples at once.
                    next_sample = Instant::now();
                    self.interrupted(&e, retry.next_delay()).await;
                }
            }
        }
        // Read ahead, so this replica's: handled now rather than left for a claim.
        let held = member.held();
        if let Err(e) = self.handle(&mut member, held).await {
            self.metrics.failure(e.class, e.broker.as_str());
            tracing::warn!(error = %e, failure_class = %e.class,
                "the entries read ahead were not handled; another replica will claim them");
        }
        tracing::info!(consumer = %self.config.consumer_name, stream = self.stream, "consumer stopped");
    }

    /// One batch: read, applied, dead letters and acknowledgements sent. Not raced against
    /// shutdown: entries read are this replica's until acknowledged (or claimed after
    /// `CLAIM_MIN_IDLE`); `BLOCK` bounds how long shutdown waits.
    async fn round(&self, member: &mut Member) -> Result<(), GroupError> {
        let received = member.next().await?;
        self.handle(member, received).await
    }

    /// Applies a batch handed over by `member`, then dead-letters and acknowledges what it
    /// came to.
    async fn handle(&self, member: &mut Member, received: Received) -> Result<(), GroupError> {
        let Received { deliveries, redelivered, delivery_counts } = received;
        if deliveries.is_empty() {
            return Ok(());
        }
        if redelivered {
            self.note_redeliveries(&delivery_counts);
        }
        let (handled, ahead) = member.alongside(self.process(deliveries)).await;
        let letters: Vec<Letter> = handled.letters.iter().map(DeadLetter::to_letter).collect();
        let settled = member.settle(&letters, &handled.ack).await;
        ahead.and(settled)?;
        if redelivered {
            // An entry applied on a later try may have failures counted from earlier ones.
            let done: Vec<&str> = handled.applied.iter().map(String::as_str).collect();
            self.forget_failures(&done).await;
        }
        Ok(())
    }

    /// Sets the pending-entries gauge (every 2 s).
    async fn sample(&self, member: &mut Member, next_sample: &mut Instant) -> Result<(), GroupError> {
        if let Some(pending) = member.pending().await? {
            self.metrics.pending_entries(&self.stream).set(i64::try_from(pending).unwrap_or(i64::MAX));
        }
        *next_sample = Instant::now() + Duration::from_secs(2);
        Ok(())
    }

    async fn interrupted(&self, e: &GroupError, delay: Duration) {
        self.metrics.failure(e.class, e.broker.as_str());
        tracing::warn!(error = %e, failure_class = %e.class, retry_in_ms = delay.as_millis() as u64,
            stream = self.stream, "consumer interrupted");
        tokio::select! {
            () = self.shutdown.cancelled() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }

    /// Counts and logs what the member noticed.
    fn note(&self, notes: Vec<Note>) {
        for note in notes {
            match note {
                Note::Departed(removed) => {
                    self.metrics.consumers_removed.inc_by(removed.len() as u64);
                    tracing::info!(consumers = ?removed, "removed consumers that left the group");
                }
                Note::Gone(ids) => {
                    self.metrics.entries_gone.inc_by(ids.len() as u64);
                    tracing::warn!(entry_ids = ?ids,
                        "pending entries no longer on the stream; the broker dropped them from the group");
                }
                Note::Refused(e) => {
                    self.metrics.failure(e.class, e.broker.as_str());
                    tracing::warn!(error = %e, failure_class = %e.class, "housekeeping refused; consuming on");
                }
            }
        }
    }

    /// Decodes and applies one batch, whichever broker delivered it: what to dead-letter on
    /// the broker and what to acknowledge (the entries in neither stay pending). Counted in the
    /// metrics before the broker hears of it: whoever sees the group drained sees the counts.
    pub(crate) async fn process(&self, batch: Vec<Delivery>) -> Handled {
        let started = Instant::now();
        let mut incoming = Vec::with_capacity(batch.len());
        let mut dead = Vec::new();
        let mut gone = Vec::new();
        for d in batch {
            let Some(fields) = d.fields else {
                tracing::warn!(entry_id = %d.id, "pending entry no longer on the stream; acknowledging");
                self.metrics.entries_gone.inc();
                gone.push(d.id);
                continue;
            };
            match decode(&d.id, fields) {
                Ok(i) => incoming.push(i),
                Err(letter) => dead.push(letter),
            }
        }
        let spans: Vec<tracing::Span> = incoming.iter().map(|i| self.entry_span(i)).collect();
        // One transaction applies the whole batch; its span (`process <stream>` of the batch)
        // links to every entry's span so each order's trace leads to the database work done
        // for it.
        let batch_span = self.batch_span(incoming.len() + dead.len(), dead.len());
        for span in &spans {
            telemetry::propagation::add_link(&batch_span, span);
        }
        let settled = self.settle(&incoming, dead).instrument(batch_span).await;
        // Expired events were dead-lettered by the transaction that judged them.
        let expired = settled.outcomes.iter().flat_map(|s| &s.result.expired);
        let letters: Vec<DeadLetter> = settled.dead.iter().chain(expired).cloned().collect();
        for letter in &letters {
            tracing::warn!(entry_id = %letter.stream_entry_id, event_id = ?letter.event_id,
                aggregate_id = ?letter.aggregate_id, reason = %letter.reason, "dead-lettered");
        }
        let applied: Vec<String> = settled.outcomes.iter().map(|s| incoming[s.index].stream_id.clone()).collect();
        let mut ack = gone;
        ack.extend(settled.dead.iter().map(|d| d.stream_entry_id.clone()));
        ack.extend(applied.iter().cloned());
        self.record(&incoming, &spans, &settled.outcomes, settled.dead.len(), started);
        Handled { letters, ack, applied }
    }

    /// The broker counts every delivery: restarts and claims too. That count dead-letters nothing
    /// here; it is reported, and an entry delivered very often is named in the log (a replica
    /// that dies on it each time would show up this way).
    fn note_redeliveries(&self, counts: &HashMap<String, u64>) {
        let max = u64::from(self.config.max_deliveries);
        let again = counts.values().filter(|n| **n > 1).count();
        self.metrics.redelivered.inc_by(again as u64);
        for (id, n) in counts.iter().filter(|(_, n)| **n > max) {
            tracing::warn!(entry_id = %id, deliveries = n,
                "entry delivered many times; only failures of its own count towards MAX_DELIVERIES");
        }
    }

    async fn forget_failures(&self, ids: &[&str]) {
        if ids.is_empty() {
            return;
        }
        if let Err(e) = self.on_connection(async |c| entry_failures::forget(c, ids).await).await {
            tracing::debug!(error = %e, "counted failures of applied entries not cleared");
        }
    }

    /// The span of a batch's processing (`process <stream>`, CONSUMER, the conventions' batch
    /// form: a link to each entry's span). The read that fetched it has no span: most reads
    /// wait out `BLOCK` and return nothing, a span a second per replica with nothing in it.
    fn batch_span(&self, entries: usize, dead: usize) -> tracing::Span {
        let (c, peer) = (&self.config, &self.peer);
        tracing::info_span!(
            "process batch",
            otel.name = %format_args!("process {}", self.stream),
            otel.kind = "consumer",
            messaging.system = peer.system,
            messaging.operation.name = "process",
            messaging.operation.type = "process",
            messaging.destination.name = %self.stream,
            messaging.consumer.group.name = %c.consumer_group,
            messaging.client.id = %peer.client_id,
            messaging.batch.message_count = entries,
            server.address = %peer.server_address,
            server.port = peer.server_port,
            dead,
        )
    }

    /// The span of one event (`process <stream>`, CONSUMER), a child of its publication.
    fn entry_span(&self, i: &Incoming) -> tracing::Span {
        let (c, peer) = (&self.config, &self.peer);
        let span = tracing::info_span!(
            "process",
            otel.name = %format_args!("process {}", self.stream),
            otel.kind = "consumer",
            error.type = tracing::field::Empty,
            messaging.system = peer.system,
            messaging.operation.name = "process",
            messaging.operation.type = "process",
            messaging.destination.name = %self.stream,
            messaging.message.id = %i.event.event_id,
            messaging.consumer.group.name = %c.consumer_group,
            messaging.client.id = %peer.client_id,
            server.address = %peer.server_address,
            server.port = peer.server_port,
            aggregate_id = %i.event.aggregate_id,
            seq = i.event.seq,
            time_in_stream_ms = (Utc::now() - i.event.occurred_at).num_milliseconds(),
            result = tracing::field::Empty,
        );
        telemetry::propagation::set_remote_parent(&span, i.event.traceparent.as_deref(), i.event.tracestate.as_deref());
        span
    }

    fn record(
        &self,
        incoming: &[Incoming],
        spans: &[tracing::Span],
        applied: &[Settlement],
        dead: usize,
        started: Instant,
    ) {
        let now = Utc::now();
        let m = &self.metrics;
        let mut counts = [0u64; 4];
        for Settlement { index: i, outcome, result } in applied {
            let (slot, label) = match outcome {
                Outcome::Applied => (0, "applied"),
                Outcome::Duplicate => (1, "duplicate"),
                Outcome::Deferred => (2, "deferred"),
                Outcome::Expired => (3, "expired"),
            };
            counts[slot] += 1;
            if let Some(span) = spans.get(*i) {
                span.record("result", label);
                if matches!(outcome, Outcome::Expired) {
                    // Dead-lettered: too old to apply.
                    span.record("error.type", label);
                }
                span.in_scope(|| tracing::debug!(entry_id = %incoming[*i].stream_id, result = label, "handled"));
            }
            for a in &result.applied {
                m.end_to_end_latency.observe((now - a.occurred_at).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6);
            }
        }
        // Events released from parking count as applied too; the batch result lists them all.
        let released: u64 =
            applied.iter().map(|s| s.result.applied.len() as u64).sum::<u64>().saturating_sub(counts[0]);
        m.count(EventResult::applied, counts[0] + released);
        m.count(EventResult::duplicate, counts[1]);
        m.count(EventResult::deferred, counts[2]);
        m.count(EventResult::dead, dead as u64 + counts[3]);
        m.batch_size.observe((incoming.len() + dead) as f64);
        m.batch_duration.observe(started.elapsed().as_secs_f64());
    }
}

/// Decodes an entry, or says why it is dead.
fn decode(id: &str, fields: Vec<(String, Vec<u8>)>) -> Result<Incoming, DeadLetter> {
    let decoded = StreamEntry::from_fields(fields.iter().map(|(k, v)| (k, v))).and_then(|e| Event::try_from(&e));
    match decoded {
        Ok(event) => Ok(Incoming { stream_id: id.to_owned(), event, fields }),
        Err(e) => {
            let field = |name: &str| {
                fields.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            };
            Err(DeadLetter {
                stream_entry_id: id.to_owned(),
                event_id: field(domain::fields::EVENT_ID),
                aggregate_id: field(domain::fields::AGGREGATE_ID),
                reason: e.to_string(),
                fields,
            })
        }
    }
}
