//! The relay's upkeep of the JetStream stream (`BROKER=nats`): trimming what every group
//! acknowledged and is older than `REDIS_STREAM_RETENTION` ([`broker::jetstream::trim`]),
//! `outbox_stream_length` per partition subject, and noticing that JetStream lost the stream
//! and republishing what it held.
//!
//! A lost stream is noticed by its creation time, which JetStream keeps and which a stream made
//! again does not share: recorded in `stream_positions` (as `nats:<stream>`) at the first
//! check, compared every [`crate::recovery::CHECK_EVERY`]. The relay that notices a new one
//! records that the events published since the last point every group had acknowledged (kept
//! by the trimming passes) are owed, and whichever relay holds that republishes them
//! ([`crate::recovery::republish_owed`]). A stream that is gone is made again here: the
//! publishers would otherwise wait for it for ever.

use std::time::Duration;

use broker::async_nats;
use broker::jetstream::{trim, Layout};
use futures::TryStreamExt;
use service_kit::Shutdown;

use crate::metrics::Metrics;
use crate::recovery::{self, Check, RecoverySettings};
use broker::publish::Publisher;

/// The name a JetStream stream's positions are recorded under in `stream_positions` (apart from
/// Redis streams of the same name).
pub fn positions_key(layout: &Layout) -> String {
    format!("nats:{}", layout.stream)
}

/// The stream's epoch: its creation time, in nanoseconds.
async fn epoch(js: &async_nats::jetstream::Context, layout: &Layout) -> Result<String, String> {
    let stream = js.get_stream(&layout.stream).await.map_err(|e| e.to_string())?;
    Ok(stream.cached_info().created.unix_timestamp_nanos().to_string())
}

/// Checks the stream at start and every [`recovery::CHECK_EVERY`] until shutdown, making it
/// again if it is gone and republishing what a loss owes. Failures (NATS or Postgres down) are
/// logged and tried again.
pub async fn recovery_loop(
    js: async_nats::jetstream::Context,
    layout: Layout,
    pool: sqlx::PgPool,
    mut publisher: Publisher,
    settings: RecoverySettings,
    metrics: Metrics,
    shutdown: Shutdown,
) {
    let key = positions_key(&layout);
    loop {
        if let Err(e) = recover_once(&js, &layout, &key, &pool, &mut publisher, &settings, &metrics, &shutdown).await {
            tracing::warn!(stream = layout.stream, error = %e,
                "checking the JetStream stream, or republishing after a loss, failed; trying again");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(recovery::CHECK_EVERY) => {}
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn recover_once(
    js: &async_nats::jetstream::Context,
    layout: &Layout,
    key: &str,
    pool: &sqlx::PgPool,
    publisher: &mut Publisher,
    settings: &RecoverySettings,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> Result<(), String> {
    broker::jetstream::ensure_stream(js, layout).await.map_err(|e| e.to_string())?;
    let epoch = epoch(js, layout).await?;
    let checked = recovery::note_epoch(pool, key, &epoch, settings.retention, settings.margin)
        .await
        .map_err(|e| e.to_string())?;
    if let Check::Lost { since } = checked {
        metrics.stream_recoveries.inc();
        tracing::warn!(stream = layout.stream, since = %since.to_rfc3339(),
            "JetStream lost the stream (it was made again); republishing the events published since");
    }
    recovery::republish_owed(pool, publisher, key, crate::replay::Only::All, settings.batch_size, metrics, shutdown)
        .await
        .map_err(|e| e.to_string())
}

/// Trims every pass ([`service_kit::prune::pass_interval`]) until `shutdown`. JetStream being
/// away is the publishers' to report; a failed pass is tried again on the next.
pub async fn trim_loop(
    js: async_nats::jetstream::Context,
    layout: Layout,
    pool: sqlx::PgPool,
    retention: Duration,
    metrics: Metrics,
    shutdown: Shutdown,
) {
    let every = service_kit::prune::pass_interval(retention);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match trim::trim(&js, &layout, retention).await {
            Ok(purged) => {
                metrics.stream_trimmed.inc_by(purged);
            }
            Err(e) => {
                tracing::debug!(stream = layout.stream, error = %e, "trimming the stream failed; trying again next pass")
            }
        }
        if let Err(e) = record_acked_below(&js, &layout, &pool).await {
            tracing::debug!(stream = layout.stream, error = %e, "recording how far the groups acknowledged failed");
        }
        if let Err(e) = sample_lengths(&js, &layout, &metrics).await {
            tracing::debug!(stream = layout.stream, error = %e, "reading the stream's length failed");
        }
    }
}

/// Records the point below which every group acknowledged everything, for a loss to owe only
/// what came after it (under the epoch it was measured on).
async fn record_acked_below(
    js: &async_nats::jetstream::Context,
    layout: &Layout,
    pool: &sqlx::PgPool,
) -> Result<(), String> {
    let epoch = epoch(js, layout).await?;
    let Some(below) = trim::acked_below(js, layout).await? else { return Ok(()) };
    let ms = i64::try_from(below.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    recovery::record_acked_below(pool, &positions_key(layout), &epoch, ms).await.map_err(|e| e.to_string())
}

/// Messages per partition subject.
async fn sample_lengths(js: &async_nats::jetstream::Context, layout: &Layout, metrics: &Metrics) -> Result<(), String> {
    let stream = js.get_stream(&layout.stream).await.map_err(|e| e.to_string())?;
    let subjects = stream.info_with_subjects(">").await.map_err(|e| e.to_string())?;
    let counts: Vec<(String, usize)> = subjects.try_collect().await.map_err(|e| e.to_string())?;
    for subject in &layout.subjects {
        let n = counts.iter().find(|(s, _)| s == subject).map_or(0, |(_, n)| *n);
        metrics.stream_length(subject).set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    Ok(())
}
