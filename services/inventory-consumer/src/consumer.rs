//! The read → apply → acknowledge loop of one replica.

pub mod jetstream;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use broker::redis::target::{RedisConn, RedisTarget, Timeouts};
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
use domain::entry_id_key;

use crate::{Config, Shutdown};
use broker::redis::group as stream;
use broker::redis::RedisError;
use broker::Delivery;

pub struct Consumer {
    pub config: Config,
    /// The partition stream this loop reads, and its dead-letter stream.
    pub stream: String,
    pub dlq: String,
    /// Batches are applied on a connection of these (one at a time).
    pub db: Connections,
    pub redis: RedisTarget,
    /// Redis and this consumer, as its spans name them.
    pub peer: MessagingPeer,
    pub metrics: Metrics,
    pub shutdown: Shutdown,
    /// Beaten every time round the loop (and while waiting out an outage).
    pub heartbeat: Heartbeat,
    /// The longest one batch's transaction may take before its connection is given up on.
    pub apply_deadline: Duration,
}

/// A session that lasted this long worked; the retry delay after it starts over.
const SESSION_WORKED: Duration = Duration::from_secs(10);

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
    /// Runs until shutdown; Redis or Postgres outages are waited out with capped backoff.
    pub async fn run(self) {
        let mut retry = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        while !self.shutdown.is_cancelled() {
            self.heartbeat.beat();
            // Bounded waits: a read blocks at most BLOCK on the server; a Redis that stops
            // answering is treated as down after a further 10 s.
            let limits = Timeouts::new(Duration::from_secs(5), self.config.block + Duration::from_secs(10));
            let conn = self.redis.connect(limits).await;
            let began = Instant::now();
            let outcome = match conn {
                Ok(mut conn) => self.session(&mut conn).await,
                Err(e) => Err(e),
            };
            if began.elapsed() >= SESSION_WORKED {
                // The session ran a while before it broke: this is a new outage, not the same one.
                retry.reset();
            }
            let delay = retry.next_delay();
            match outcome {
                Ok(()) => break,
                Err(e) => {
                    let class = broker::redis::of_redis(&e);
                    self.metrics.failure(class, "redis");
                    tracing::warn!(error = %e, failure_class = %class, retry_in_ms = delay.as_millis() as u64,
                        "consumer interrupted");
                }
            }
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        tracing::info!(consumer = %self.config.consumer_name, stream = self.stream, "consumer stopped");
    }

    async fn session(&self, conn: &mut RedisConn) -> Result<(), RedisError> {
        let c = &self.config;
        stream::ensure_group(conn, &self.stream, &c.consumer_group).await?;
        tracing::info!(stream = %self.stream, group = %c.consumer_group, consumer = %c.consumer_name, "consuming");
        // This replica's own unacknowledged entries first (left by a previous run), then new ones.
        let mut own_pending = Some("0".to_owned());
        let claim_every = (c.claim_min_idle / 2).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut next_claim = Instant::now();
        let mut next_sample = Instant::now();
        let sweep_every = (c.departed_after / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut next_sweep = Instant::now();
        // New entries read while the previous batch was applied; delivered to this replica, so
        // handled even if shutdown comes first.
        let mut prefetched: Option<Vec<Delivery>> = None;
        while !self.shutdown.is_cancelled() {
            self.heartbeat.beat();
            if Instant::now() >= next_sample {
                let pending = stream::pending_count(conn, &self.stream, &c.consumer_group, &c.consumer_name).await?;
                self.metrics.pending_entries(&self.stream).set(pending as i64);
                next_sample = Instant::now() + Duration::from_secs(2);
            }
            if let Some(cursor) = own_pending.take() {
                let batch = self.read(conn, &cursor, None).await?;
                if let Some(last) = batch.last() {
                    own_pending = Some(last.id.clone());
                    self.handle(conn, batch, true).await?;
                }
                continue;
            }
            if Instant::now() >= next_sweep {
                self.remove_departed(conn).await?;
                next_sweep = Instant::now() + sweep_every;
            }
            if Instant::now() >= next_claim {
                self.claim_idle(conn).await?;
                next_claim = Instant::now() + claim_every;
            }
            // Not raced against shutdown: an interrupted read could lose track of entries it
            // delivered. BLOCK bounds how long shutdown waits.
            let batch = match prefetched.take() {
                Some(batch) => batch,
                None => self.read(conn, ">", Some(c.block)).await?,
            };
            if batch.len() < c.batch_size as usize {
                self.handle(conn, batch, false).await?;
                continue;
            }
            // A full batch: more are likely waiting. The next is read (without blocking, so the
            // shared connection is never held up) while this one is applied.
            let mut reader = conn.clone();
            let (next, handled) = tokio::join!(self.read(&mut reader, ">", None), self.handle(conn, batch, false));
            // Entries read are this replica's to handle, whatever happened to the batch before.
            let next = next?;
            if !next.is_empty() {
                prefetched = Some(next);
            }
            handled?;
        }
        if let Some(batch) = prefetched {
            self.handle(conn, batch, false).await?;
        }
        Ok(())
    }

    async fn read(&self, conn: &mut RedisConn, id: &str, block: Option<Duration>) -> Result<Vec<Delivery>, RedisError> {
        let c = &self.config;
        stream::read_group(conn, &self.stream, &c.consumer_group, &c.consumer_name, id, c.batch_size, block).await
    }

    /// Removes consumers of the group that have left (see [`stream::remove_departed`]).
    /// Housekeeping: Redis refusing it (a server that runs no scripts for this user, say) is
    /// counted and logged, and consuming goes on; only a broken connection ends the session.
    async fn remove_departed(&self, conn: &mut RedisConn) -> Result<(), RedisError> {
        let c = &self.config;
        match stream::remove_departed(conn, &self.stream, &c.consumer_group, &c.consumer_name, c.departed_after).await {
            Ok(removed) if removed.is_empty() => {}
            Ok(removed) => {
                self.metrics.consumers_removed.inc_by(removed.len() as u64);
                tracing::info!(consumers = ?removed, "removed consumers that left the group");
            }
            Err(e) if broker::redis::of_redis(&e).is_transient() => return Err(e),
            Err(e) => {
                let class = broker::redis::of_redis(&e);
                self.metrics.failure(class, "redis");
                tracing::warn!(error = %e, failure_class = %class, "removing departed consumers refused; consuming on");
            }
        }
        Ok(())
    }

    /// Takes over entries left idle by replicas that died, scanning the whole pending list.
    async fn claim_idle(&self, conn: &mut RedisConn) -> Result<(), RedisError> {
        let c = &self.config;
        let mut cursor = "0-0".to_owned();
        // Bounded: one scan of the pending list per round.
        for _ in 0..10_000 {
            self.heartbeat.beat();
            let claimed = stream::autoclaim(
                conn,
                &self.stream,
                &c.consumer_group,
                &c.consumer_name,
                c.claim_min_idle,
                &cursor,
                c.batch_size,
            )
            .await?;
            if !claimed.deleted.is_empty() {
                self.metrics.entries_gone.inc_by(claimed.deleted.len() as u64);
                tracing::warn!(entry_ids = ?claimed.deleted,
                    "pending entries no longer on the stream; Redis dropped them from the pending list");
            }
            if !claimed.entries.is_empty() {
                tracing::info!(claimed = claimed.entries.len(), "claimed idle entries");
                self.handle(conn, claimed.entries, true).await?;
            }
            if claimed.next == "0-0" || self.shutdown.is_cancelled() {
                break;
            }
            cursor = claimed.next;
        }
        Ok(())
    }

    /// Decodes, applies and acknowledges one batch. `redelivered`: the entries may have been
    /// delivered before (own pending entries, claims).
    async fn handle(&self, conn: &mut RedisConn, batch: Vec<Delivery>, redelivered: bool) -> Result<(), RedisError> {
        if batch.is_empty() {
            return Ok(());
        }
        let c = &self.config;
        if redelivered {
            let counts = self.delivery_counts(conn, &batch).await?;
            self.note_redeliveries(&counts);
        }
        let handled = self.process(batch).await;
        for letter in &handled.letters {
            let mut fields = letter.fields.clone();
            fields.push(("reason".to_owned(), letter.reason.clone().into_bytes()));
            fields.push(("original_entry_id".to_owned(), letter.stream_entry_id.clone().into_bytes()));
            stream::add_capped(conn, &self.dlq, c.dlq_max_len, &fields).await?;
        }
        let ack: Vec<&str> = handled.ack.iter().map(String::as_str).collect();
        stream::ack(conn, &self.stream, &c.consumer_group, &ack).await?;
        if redelivered {
            // An entry applied on a later try may have failures counted from earlier ones.
            let done: Vec<&str> = handled.applied.iter().map(String::as_str).collect();
            self.forget_failures(&done).await;
        }
        Ok(())
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

    /// Redis counts every delivery: restarts and claims too. That count dead-letters nothing
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

    /// How often each entry of `batch` has been delivered (read from this consumer's pending
    /// list over the batch's id range, which may hold other entries: those are left out).
    async fn delivery_counts(
        &self,
        conn: &mut RedisConn,
        batch: &[Delivery],
    ) -> Result<HashMap<String, u64>, RedisError> {
        let c = &self.config;
        let min = batch.iter().map(|d| entry_id_key(&d.id)).min().unwrap_or_default();
        let max = batch.iter().map(|d| entry_id_key(&d.id)).max().unwrap_or_default();
        let (min, max) = (format!("{}-{}", min.0, min.1), format!("{}-{}", max.0, max.1));
        let limit = (batch.len() * 4).max(c.batch_size as usize);
        let mut counts =
            stream::delivery_counts(conn, &self.stream, &c.consumer_group, &c.consumer_name, (&min, &max), limit)
                .await?;
        let ids: HashSet<&str> = batch.iter().map(|d| d.id.as_str()).collect();
        counts.retain(|id, _| ids.contains(id.as_str()));
        Ok(counts)
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
