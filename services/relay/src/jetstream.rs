//! The relay's upkeep of the JetStream stream (`BROKER=nats`): trimming what every group
//! acknowledged and is older than `REDIS_STREAM_RETENTION` ([`broker::jetstream::trim`]), and
//! `outbox_stream_length` per partition subject.

use std::time::Duration;

use broker::async_nats;
use broker::jetstream::{trim, Layout};
use futures::TryStreamExt;
use service_kit::Shutdown;

use crate::metrics::Metrics;

/// Trims every pass ([`service_kit::prune::pass_interval`]) until `shutdown`. JetStream being
/// away is the publishers' to report; a failed pass is tried again on the next.
pub async fn trim_loop(
    js: async_nats::jetstream::Context,
    layout: Layout,
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
        if let Err(e) = sample_lengths(&js, &layout, &metrics).await {
            tracing::debug!(stream = layout.stream, error = %e, "reading the stream's length failed");
        }
    }
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
