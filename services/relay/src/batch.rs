//! One batch: claim, publish in one pipeline, commit the claim (or record why not).

use std::time::{Duration, Instant};

use chrono::Utc;
use domain::StreamEntry;
use rand::Rng;
use sqlx::PgPool;

use service_kit::messaging::MessagingPeer;
use service_kit::FailureClass;

use crate::backoff::retry_delay;
use crate::broker_health::BrokerHealth;
use crate::metrics::Metrics;
use crate::Config;
use broker::publish::{PublishError, Publisher};
use outbox::claim::{claim_batch, Claim, ClaimConnection};
use outbox::failures::{mark_dead, record_failures, Failure, Poison};
use outbox::row::OutboxRow;

/// The knobs of batch processing.
#[derive(Debug, Clone)]
pub struct Settings {
    pub batch_size: u32,
    pub lease: Duration,
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub max_payload_bytes: usize,
}

impl From<&Config> for Settings {
    fn from(c: &Config) -> Self {
        Self {
            batch_size: c.batch_size,
            lease: c.lease,
            max_attempts: c.max_attempts,
            backoff_base: c.backoff_base,
            backoff_max: c.backoff_max,
            max_payload_bytes: c.max_payload_bytes,
        }
    }
}

/// What a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Rows locked by the claim, including rows left for later because an earlier row of
    /// their order was in another relay's batch.
    pub locked: usize,
    /// Rows taken for publishing.
    pub claimed: usize,
    pub published: usize,
    /// Rows Redis refused: their attempts were counted.
    pub failed: usize,
    pub dead: usize,
    /// Redis failed as a whole; the batch was given back and no row's attempts were counted.
    pub broker_failed: bool,
    /// Nothing was recorded (the lease ran out, or the batch was given back to dead-letter a
    /// poison row); the rows are claimed again.
    pub abandoned: bool,
}

impl BatchReport {
    /// Rows that were locked but left for later.
    pub fn waiting(&self) -> usize {
        self.locked.saturating_sub(self.claimed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("outbox database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the batch took longer than {0:?}; its connection was closed")]
    Deadline(Duration),
}

impl BatchError {
    pub fn class(&self) -> FailureClass {
        match self {
            Self::Database(e) => service_kit::failure::of_postgres(e),
            Self::Deadline(_) => FailureClass::transient,
        }
    }
}

/// How long opening the claim connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Moves batches from the outbox to the stream.
pub struct Worker {
    /// Failures and dead letters are recorded through the pool; claims run on a connection of
    /// the worker's own.
    pool: PgPool,
    conn: Option<ClaimConnection>,
    publisher: Publisher,
    settings: Settings,
    metrics: Metrics,
    broker: BrokerHealth,
}

impl Worker {
    pub fn new(pool: PgPool, publisher: Publisher, settings: Settings, metrics: Metrics, broker: BrokerHealth) -> Self {
        Self { pool, conn: None, publisher, settings, metrics, broker }
    }

    pub fn broker(&self) -> &BrokerHealth {
        &self.broker
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// While Redis is down: whether it answers again (then the next batch tells whether it
    /// takes entries; one with nothing to publish counts as taken).
    pub async fn probe_broker(&mut self) -> bool {
        match self.publisher.ping().await {
            Ok(()) => true,
            Err(e) => {
                self.broker.failed(&e.to_string());
                false
            }
        }
    }

    /// The claim connection, opened (with the pool's options) if there is none.
    async fn connection(&mut self) -> Result<ClaimConnection, sqlx::Error> {
        if let Some(conn) = self.conn.take() {
            return Ok(conn);
        }
        let options = self.pool.connect_options();
        match tokio::time::timeout(CONNECT_TIMEOUT, ClaimConnection::connect(&options)).await {
            Ok(connected) => connected,
            Err(_) => Err(sqlx::Error::PoolTimedOut),
        }
    }

    /// Ends `claim` with a rollback, keeping its connection if that worked.
    async fn abandon(&mut self, claim: Claim) -> Result<(), sqlx::Error> {
        self.conn = Some(claim.rollback().await?);
        Ok(())
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Claims one batch and publishes it.
    pub async fn process_batch(&mut self) -> Result<BatchReport, BatchError> {
        let claimed_at = Instant::now();
        let conn = self.connection().await?;
        let mut claim = claim_batch(conn, self.settings.batch_size).await?;
        let rows = std::mem::take(&mut claim.rows);
        let locked = claim.locked;
        self.metrics.claims.inc();
        if locked == 0 {
            self.metrics.empty_claims.inc();
        }
        if rows.is_empty() {
            self.abandon(claim).await?;
            return Ok(BatchReport { locked, ..BatchReport::default() });
        }
        let in_flight = i64::try_from(rows.len()).unwrap_or(i64::MAX);
        self.metrics.in_flight.inc_by(in_flight);
        let report = self.publish_claim(claim, &rows, claimed_at).await;
        self.metrics.in_flight.dec_by(in_flight);
        report.map(|r| BatchReport { locked, ..r })
    }

    async fn publish_claim(
        &mut self,
        claim: Claim,
        rows: &[OutboxRow],
        claimed_at: Instant,
    ) -> Result<BatchReport, BatchError> {
        let mut report = BatchReport { claimed: rows.len(), ..BatchReport::default() };
        let mut poison = Vec::new();
        let mut sending: Vec<(&OutboxRow, tracing::Span)> = Vec::with_capacity(rows.len());
        let mut entries: Vec<StreamEntry> = Vec::with_capacity(rows.len());
        for row in rows {
            match row.to_entry(self.settings.max_payload_bytes) {
                Ok(mut entry) => {
                    let span = producer_span(self.publisher.stream_of(&row.aggregate_id), self.publisher.peer(), row);
                    let (traceparent, tracestate) = telemetry::propagation::span_context_headers(&span);
                    if traceparent.is_some() {
                        entry.traceparent = traceparent;
                        entry.tracestate = tracestate;
                    }
                    entries.push(entry);
                    sending.push((row, span));
                }
                Err(reason) => {
                    self.metrics.failure(FailureClass::permanent, "row");
                    poison.push(Poison { id: row.id, attempts: row.attempts, reason });
                }
            }
        }
        if !poison.is_empty() {
            // Nothing is published: the batch goes back, the poison rows become dead, and the
            // next claim takes the rest (an order's rows behind a dead one then wait).
            self.abandon(claim).await?;
            report.dead = self.dead_letter(rows, &poison).await?;
            report.abandoned = true;
            return Ok(report);
        }
        if claimed_at.elapsed() >= self.settings.lease {
            // The database may have ended the claim already; publishing would only duplicate.
            tracing::warn!(
                rows = sending.len(),
                "lease expired before publishing; leaving the batch to the next claim"
            );
            // Rolling back a transaction the database already ended fails harmlessly.
            let _ = self.abandon(claim).await;
            report.abandoned = true;
            return Ok(report);
        }
        match self.publisher.publish(&entries).await {
            Ok(_ids) => {
                match claim.commit().await {
                    Ok(conn) => self.conn = Some(conn),
                    Err(e) => {
                        tracing::warn!(
                            rows = sending.len(),
                            error = %e,
                            "published, but the claim ended before it was recorded; the batch will be published again"
                        );
                        report.abandoned = true;
                        return Ok(report);
                    }
                }
                let now = Utc::now();
                for (row, span) in &sending {
                    let lag = (now - row.created_at).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
                    self.metrics.publish_lag_seconds.observe(lag.max(0.0));
                    span.in_scope(|| {
                        tracing::debug!(
                            event_id = row.event_id,
                            aggregate_id = row.aggregate_id,
                            seq = row.seq,
                            attempt = row.attempts + 1,
                            "published"
                        );
                    });
                }
                self.metrics.published.inc_by(sending.len() as u64);
                report.published = sending.len();
            }
            Err(PublishError::Broker { class, error }) => {
                // Nothing is the rows' fault: they go back as they were, attempts untouched.
                let _ = self.abandon(claim).await;
                self.metrics.failure(class, self.publisher.peer().system);
                for (_, span) in &sending {
                    span.record("otel.status_code", "ERROR");
                    span.record("error.type", class.as_str());
                }
                tracing::warn!(rows = sending.len(), failure_class = %class, error, "the broker did not take the batch");
                self.broker.failed(&error);
                report.broker_failed = true;
                report.abandoned = true;
            }
            Err(PublishError::Refused(refused)) => {
                // Redis took the others; all go back (an order's later rows must not be
                // recorded ahead of a refused earlier one) and only the refused count an attempt.
                let _ = self.abandon(claim).await;
                let failed: Vec<RowFailure<'_>> = refused
                    .iter()
                    .filter_map(|r| {
                        let (row, span) = sending.get(r.index)?;
                        let system = self.publisher.peer().system;
                        Some(RowFailure { row, span, class: r.class, error: format!("{system}: {}", r.error) })
                    })
                    .collect();
                report.failed = self.record_failures(&failed).await?;
            }
        }
        Ok(report)
    }

    /// Counts a failed attempt of each row Redis refused.
    async fn record_failures(&self, failed: &[RowFailure<'_>]) -> Result<usize, BatchError> {
        let failures: Vec<Failure> = failed
            .iter()
            .map(|f| {
                let jitter: f64 = rand::rng().random();
                let attempts = u32::try_from(f.row.attempts).unwrap_or(0).saturating_add(1);
                let retry_in = retry_delay(attempts, self.settings.backoff_base, self.settings.backoff_max, jitter);
                Failure { id: f.row.id, attempts: f.row.attempts, retry_in, error: f.error.clone() }
            })
            .collect();
        let outcomes = record_failures(&self.pool, &failures, self.settings.max_attempts).await?;
        self.metrics.publish_failures.inc_by(failed.len() as u64);
        for f in failed {
            self.metrics.failure(f.class, "row");
            f.span.record("otel.status_code", "ERROR");
            f.span.record("error.type", f.class.as_str());
            let Some(outcome) = outcomes.iter().find(|o| o.id == f.row.id) else { continue };
            if outcome.status == "dead" {
                self.metrics.dead_lettered.inc();
            }
            tracing::warn!(
                event_id = f.row.event_id,
                aggregate_id = f.row.aggregate_id,
                seq = f.row.seq,
                attempt = outcome.attempts,
                status = outcome.status,
                failure_class = %f.class,
                error = f.error,
                "publish refused"
            );
        }
        Ok(failed.len())
    }

    async fn dead_letter(&self, rows: &[OutboxRow], poison: &[Poison]) -> Result<usize, BatchError> {
        let marked = mark_dead(&self.pool, poison).await?;
        self.metrics.dead_lettered.inc_by(marked);
        for p in poison {
            if let Some(row) = rows.iter().find(|r| r.id == p.id) {
                tracing::warn!(
                    event_id = row.event_id,
                    aggregate_id = row.aggregate_id,
                    seq = row.seq,
                    attempt = row.attempts + 1,
                    status = "dead",
                    reason = p.reason,
                    "event can never be published; dead-lettered"
                );
            }
        }
        Ok(usize::try_from(marked).unwrap_or(usize::MAX))
    }
}

/// A row Redis refused, and why.
struct RowFailure<'a> {
    row: &'a OutboxRow,
    span: &'a tracing::Span,
    class: FailureClass,
    error: String,
}

/// The PRODUCER span of one event (`send <stream>`, per the messaging semantic conventions),
/// a child of the request that wrote it.
fn producer_span(stream: &str, peer: &MessagingPeer, row: &OutboxRow) -> tracing::Span {
    let waited_ms = (Utc::now() - row.created_at).num_milliseconds().max(0);
    let span = tracing::info_span!(
        "send",
        otel.name = %format_args!("send {stream}"),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        messaging.system = peer.system,
        messaging.operation.name = "send",
        messaging.operation.type = "send",
        messaging.destination.name = %stream,
        messaging.message.id = %row.event_id,
        messaging.client.id = %peer.client_id,
        server.address = %peer.server_address,
        server.port = peer.server_port,
        aggregate_id = %row.aggregate_id,
        seq = row.seq,
        outbox.wait_ms = waited_ms,
    );
    if !span.is_disabled() {
        telemetry::propagation::set_remote_parent(&span, row.traceparent.as_deref(), row.tracestate.as_deref());
    }
    span
}
