//! The read → apply → acknowledge loop of one replica.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use domain::{Event, StreamEntry};
use redis::aio::MultiplexedConnection;
use service_kit::connections::Connections;
use tokio::time::Instant;
use tracing::Instrument;

use crate::apply::{apply_batch, BatchResult, DeadLetter, Incoming, Outcome};
use crate::metrics::{EventResult, Metrics};
use crate::stream::{self, id_key, Delivery};
use crate::{Config, Shutdown};

/// Why the loop stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("stopped after commit without acknowledging (test hook)")]
    CrashedAfterCommit,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Crashed(#[from] ConsumerError),
}

pub struct Consumer {
    pub config: Config,
    /// Batches are applied on a connection of these (one at a time).
    pub db: Connections,
    pub redis: redis::Client,
    pub metrics: Metrics,
    pub shutdown: Shutdown,
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Consumer {
    /// Runs until shutdown; Redis or Postgres outages are waited out with capped backoff.
    pub async fn run(self) -> Result<(), ConsumerError> {
        let mut delay = Duration::from_millis(100);
        while !self.shutdown.is_cancelled() {
            // Bounded waits: a read blocks at most BLOCK on the server; a Redis that stops
            // answering is treated as down after a further 10 s.
            let limits = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Duration::from_secs(5))
                .set_response_timeout(self.config.block + Duration::from_secs(10));
            let conn = self.redis.get_multiplexed_async_connection_with_config(&limits).await;
            let outcome = match conn {
                Ok(mut conn) => self.session(&mut conn).await,
                Err(e) => Err(e.into()),
            };
            match outcome {
                Ok(()) => break,
                Err(SessionError::Crashed(e)) => return Err(e),
                Err(e) => tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "consumer interrupted"),
            }
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(MAX_BACKOFF);
        }
        tracing::info!(consumer = %self.config.consumer_name, "consumer stopped");
        Ok(())
    }

    async fn session(&self, conn: &mut MultiplexedConnection) -> Result<(), SessionError> {
        let c = &self.config;
        stream::ensure_group(conn, &c.redis_stream, &c.consumer_group).await?;
        tracing::info!(stream = %c.redis_stream, group = %c.consumer_group, consumer = %c.consumer_name, "consuming");
        // This replica's own unacknowledged entries first (left by a previous run), then new ones.
        let mut own_pending = Some("0".to_owned());
        let claim_every = (c.claim_min_idle / 2).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut next_claim = Instant::now();
        let mut next_sample = Instant::now();
        // New entries read while the previous batch was applied; delivered to this replica, so
        // handled even if shutdown comes first.
        let mut prefetched: Option<Vec<Delivery>> = None;
        while !self.shutdown.is_cancelled() {
            if Instant::now() >= next_sample {
                let pending = stream::pending_count(conn, &c.redis_stream, &c.consumer_group, &c.consumer_name).await?;
                self.metrics.pending_entries.set(pending as i64);
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

    async fn read(
        &self,
        conn: &mut MultiplexedConnection,
        id: &str,
        block: Option<Duration>,
    ) -> Result<Vec<Delivery>, redis::RedisError> {
        let c = &self.config;
        stream::read_group(conn, &c.redis_stream, &c.consumer_group, &c.consumer_name, id, c.batch_size, block).await
    }

    /// Takes over entries left idle by replicas that died, scanning the whole pending list.
    async fn claim_idle(&self, conn: &mut MultiplexedConnection) -> Result<(), SessionError> {
        let c = &self.config;
        let mut cursor = "0-0".to_owned();
        // Bounded: one scan of the pending list per round.
        for _ in 0..10_000 {
            let (next, batch) = stream::autoclaim(
                conn,
                &c.redis_stream,
                &c.consumer_group,
                &c.consumer_name,
                c.claim_min_idle,
                &cursor,
                c.batch_size,
            )
            .await?;
            if !batch.is_empty() {
                tracing::info!(claimed = batch.len(), "claimed idle entries");
                self.handle(conn, batch, true).await?;
            }
            if next == "0-0" || self.shutdown.is_cancelled() {
                break;
            }
            cursor = next;
        }
        Ok(())
    }

    /// Decodes, applies and acknowledges one batch. `redelivered`: the entries may have been
    /// delivered before, so their delivery counts are checked.
    async fn handle(
        &self,
        conn: &mut MultiplexedConnection,
        batch: Vec<Delivery>,
        redelivered: bool,
    ) -> Result<(), SessionError> {
        if batch.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let c = &self.config;
        let counts = if redelivered { self.delivery_counts(conn, &batch).await? } else { HashMap::new() };
        let mut incoming = Vec::with_capacity(batch.len());
        let mut dead = Vec::new();
        let mut gone = Vec::new();
        for d in batch {
            let Some(fields) = d.fields else {
                tracing::warn!(entry_id = %d.id, "pending entry no longer on the stream; acknowledging");
                gone.push(d.id);
                continue;
            };
            let deliveries = counts.get(&d.id).copied().unwrap_or(1);
            match classify(&d.id, fields, deliveries, c.max_deliveries) {
                Ok(i) => incoming.push(i),
                Err(letter) => dead.push(letter),
            }
        }
        let spans: Vec<tracing::Span> = incoming.iter().map(|i| self.entry_span(i)).collect();
        // One transaction applies the whole batch; its span links to every entry's span so each
        // order's trace leads to the database work done for it.
        let batch_span = tracing::info_span!("apply entries", entries = incoming.len(), dead = dead.len());
        for span in &spans {
            telemetry::propagation::add_link(&batch_span, span);
        }
        let (applied, dead_recorded) = self.apply(&incoming, &dead).instrument(batch_span).await;
        // Unrecorded dead letters stay pending, to be retried like any other entry.
        let dead = if dead_recorded { dead } else { Vec::new() };
        if c.crash_after_commit && !applied.is_empty() {
            return Err(ConsumerError::CrashedAfterCommit.into());
        }
        for letter in &dead {
            let mut fields = letter.fields.clone();
            fields.push(("reason".to_owned(), letter.reason.clone().into_bytes()));
            fields.push(("original_entry_id".to_owned(), letter.stream_entry_id.clone().into_bytes()));
            stream::add(conn, &c.dlq_stream(), &fields).await?;
            tracing::warn!(entry_id = %letter.stream_entry_id, event_id = ?letter.event_id,
                aggregate_id = ?letter.aggregate_id, reason = %letter.reason, "dead-lettered");
        }
        let mut ack: Vec<&str> = gone.iter().map(String::as_str).collect();
        ack.extend(dead.iter().map(|d| d.stream_entry_id.as_str()));
        ack.extend(applied.iter().map(|(i, _, _)| incoming[*i].stream_id.as_str()));
        stream::ack(conn, &c.redis_stream, &c.consumer_group, &ack).await?;
        self.record(&incoming, &spans, &applied, dead.len(), started);
        Ok(())
    }

    /// The committed outcome of each incoming event (by index) and what it released. Entries
    /// missing from the answer stay pending: they are retried after `CLAIM_MIN_IDLE` and
    /// dead-lettered after `MAX_DELIVERIES`.
    async fn apply(&self, incoming: &[Incoming], dead: &[DeadLetter]) -> (Vec<(usize, Outcome, BatchResult)>, bool) {
        let mut delay = Duration::from_millis(100);
        let mut conflicts = 0;
        loop {
            match self.apply_batch(incoming, dead).await {
                Ok(mut r) => {
                    let outcomes = std::mem::take(&mut r.outcomes);
                    let mut out: Vec<_> =
                        outcomes.into_iter().enumerate().map(|(i, o)| (i, o, BatchResult::default())).collect();
                    if let Some(first) = out.first_mut() {
                        first.2 = r;
                    }
                    return (out, true);
                }
                Err(e) if is_unavailable(&e) && !self.shutdown.is_cancelled() => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "database unavailable");
                    tokio::select! {
                        () = self.shutdown.cancelled() => return (Vec::new(), false),
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
                Err(e) if is_conflict(&e) && conflicts < 3 => {
                    conflicts += 1;
                    tracing::info!(error = %e, attempt = conflicts, "batch conflicted with another replica; retrying");
                }
                Err(e) if incoming.len() + dead.len() > 1 => {
                    tracing::warn!(error = %e, "batch failed; applying entry by entry");
                    return self.apply_one_by_one(incoming, dead).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "entry not applied; left pending");
                    return (Vec::new(), false);
                }
            }
        }
    }

    async fn apply_one_by_one(
        &self,
        incoming: &[Incoming],
        dead: &[DeadLetter],
    ) -> (Vec<(usize, Outcome, BatchResult)>, bool) {
        let dead_recorded = dead.is_empty()
            || match self.apply_batch(&[], dead).await {
                Ok(_) => true,
                Err(e) => {
                    tracing::error!(error = %e, "dead letters not recorded; left pending");
                    false
                }
            };
        let mut out = Vec::new();
        for (i, entry) in incoming.iter().enumerate() {
            match self.apply_batch(std::slice::from_ref(entry), &[]).await {
                Ok(mut r) => {
                    let outcome = r.outcomes.pop().unwrap_or(Outcome::Duplicate);
                    out.push((i, outcome, r));
                }
                Err(e) => tracing::error!(entry_id = %entry.stream_id, event_id = %entry.event.event_id,
                    aggregate_id = %entry.event.aggregate_id, seq = entry.event.seq, error = %e,
                    "entry not applied; left pending"),
            }
        }
        (out, dead_recorded)
    }

    /// [`apply_batch`] on a connection of `db`, which is kept unless it failed itself.
    async fn apply_batch(&self, incoming: &[Incoming], dead: &[DeadLetter]) -> Result<BatchResult, sqlx::Error> {
        let mut conn = self.db.acquire().await?;
        let applied = apply_batch(&mut conn, incoming, dead).await;
        match &applied {
            Ok(_) => conn.release(),
            Err(e) => conn.release_after(e).await,
        }
        applied
    }

    async fn delivery_counts(
        &self,
        conn: &mut MultiplexedConnection,
        batch: &[Delivery],
    ) -> Result<HashMap<String, u64>, redis::RedisError> {
        let c = &self.config;
        let min = batch.iter().map(|d| id_key(&d.id)).min().unwrap_or_default();
        let max = batch.iter().map(|d| id_key(&d.id)).max().unwrap_or_default();
        let (min, max) = (format!("{}-{}", min.0, min.1), format!("{}-{}", max.0, max.1));
        let limit = (batch.len() * 4).max(c.batch_size as usize);
        stream::delivery_counts(conn, &c.redis_stream, &c.consumer_group, &c.consumer_name, (&min, &max), limit).await
    }

    fn entry_span(&self, i: &Incoming) -> tracing::Span {
        let c = &self.config;
        let span = tracing::info_span!(
            "process",
            otel.name = format!("{} process", c.redis_stream),
            otel.kind = "consumer",
            messaging.system = "redis",
            messaging.destination.name = %c.redis_stream,
            messaging.message.id = %i.event.event_id,
            messaging.consumer.group.name = %c.consumer_group,
            messaging.operation.type = "process",
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
        applied: &[(usize, Outcome, BatchResult)],
        dead: usize,
        started: Instant,
    ) {
        let now = Utc::now();
        let m = &self.metrics;
        let mut counts = [0u64; 3];
        for (i, outcome, result) in applied {
            let (slot, label) = match outcome {
                Outcome::Applied => (0, "applied"),
                Outcome::Duplicate => (1, "duplicate"),
                Outcome::Deferred => (2, "deferred"),
            };
            counts[slot] += 1;
            if let Some(span) = spans.get(*i) {
                span.record("result", label);
                span.in_scope(|| tracing::debug!(entry_id = %incoming[*i].stream_id, result = label, "handled"));
            }
            for a in &result.applied {
                m.end_to_end_latency.observe((now - a.occurred_at).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6);
            }
        }
        // Events released from parking count as applied too; the batch result lists them all.
        let released: u64 =
            applied.iter().map(|(_, _, r)| r.applied.len() as u64).sum::<u64>().saturating_sub(counts[0]);
        m.count(EventResult::applied, counts[0] + released);
        m.count(EventResult::duplicate, counts[1]);
        m.count(EventResult::deferred, counts[2]);
        m.count(EventResult::dead, dead as u64);
        m.batch_size.observe((incoming.len() + dead) as f64);
        m.batch_duration.observe(started.elapsed().as_secs_f64());
    }
}

/// Decodes an entry, or says why it is dead.
fn classify(id: &str, fields: Vec<(String, Vec<u8>)>, deliveries: u64, max: u32) -> Result<Incoming, DeadLetter> {
    let field =
        |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned());
    let letter = |reason: String| DeadLetter {
        stream_entry_id: id.to_owned(),
        event_id: field(domain::fields::EVENT_ID),
        aggregate_id: field(domain::fields::AGGREGATE_ID),
        reason,
        fields: fields.clone(),
    };
    if deliveries > u64::from(max) {
        return Err(letter(format!("delivered {deliveries} times (MAX_DELIVERIES is {max})")));
    }
    let decoded = StreamEntry::from_fields(fields.iter().map(|(k, v)| (k, v))).and_then(|e| Event::try_from(&e));
    match decoded {
        Ok(event) => Ok(Incoming { stream_id: id.to_owned(), event, fields }),
        Err(e) => Err(letter(e.to_string())),
    }
}

/// Errors that say the database is unreachable (wait and retry), as opposed to an error caused
/// by the data (try entry by entry).
fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_))
        || matches!(e, sqlx::Error::Database(d) if d.code().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")))
}

/// Deadlock or serialization failure: retrying the same transaction is expected to succeed.
fn is_conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().is_some_and(|c| c == "40001" || c == "40P01"))
}
