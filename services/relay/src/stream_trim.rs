//! Keeping each partition's Redis stream to what its consumer groups still need
//! ([`broker::redis::trim`]), on a timer, reporting what each pass saw.

use std::collections::HashSet;
use std::time::Duration;

use broker::redis::marker::StreamKeys;
use broker::redis::target::{RedisConn, RedisTarget, Timeouts};
use broker::redis::trim::{self, trim_pass};
use broker::redis::RedisError;
use service_kit::Shutdown;
use sqlx::PgPool;

use crate::metrics::Metrics;

/// Trims each partition's stream every [`service_kit::prune::pass_interval`] of the retention
/// until shutdown, reports its length and its groups' lag and pending counts, and records how
/// far every group has acknowledged ([`crate::recovery`]). Redis being down is the publishers'
/// concern: a failed pass is logged at debug and tried again next time.
pub async fn trim_loop(
    target: RedisTarget,
    pool: PgPool,
    partitions: Vec<StreamKeys>,
    retention: Duration,
    metrics: Metrics,
    shutdown: Shutdown,
) {
    let every = service_kit::prune::pass_interval(retention);
    let timeouts = Timeouts::new(Duration::from_secs(2), Duration::from_secs(10));
    let mut conn: Option<RedisConn> = None;
    // Per partition, the groups its last pass reported (to drop the series of one removed).
    let mut reported: Vec<HashSet<String>> = vec![HashSet::new(); partitions.len()];
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        if conn.is_none() {
            conn = target.connect(timeouts).await.ok();
        }
        for (keys, reported) in partitions.iter().zip(&mut reported) {
            let Some(c) = conn.as_mut() else { break };
            if shutdown.is_cancelled() {
                return;
            }
            if let Err(e) = trim_partition(c, &pool, keys, retention, &metrics, reported, &shutdown).await {
                tracing::debug!(stream = keys.stream, error = %e, "trimming the stream failed; trying again next pass");
                conn = None;
            }
        }
    }
}

/// One pass over one partition's stream.
async fn trim_partition(
    conn: &mut RedisConn,
    pool: &PgPool,
    keys: &StreamKeys,
    retention: Duration,
    metrics: &Metrics,
    reported: &mut HashSet<String>,
    shutdown: &Shutdown,
) -> Result<(), RedisError> {
    let stream = keys.stream.as_str();
    let pass = trim_pass(conn, keys, retention, shutdown).await?;
    if pass.trimmed > 0 {
        tracing::debug!(stream, trimmed = pass.trimmed, cut = ?pass.last.cut, bound_by = pass.last.bound_by, "stream trimmed");
    }
    metrics.record_trim(stream, &pass, reported);
    if let (Some(ms), false) = (pass.last.acked_below_ms, pass.last.marker.is_empty()) {
        // Where republishing starts should Redis lose the stream.
        if let Err(e) = crate::recovery::record_acked_below(pool, stream, &pass.last.marker, ms).await {
            tracing::debug!(stream, error = %e, "recording how far the groups have acknowledged failed");
        }
    }
    if let Ok(len) = trim::length(conn, stream).await {
        metrics.stream_length(stream).set(i64::try_from(len).unwrap_or(i64::MAX));
    }
    Ok(())
}
