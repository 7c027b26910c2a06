//! Trimming `outbox_published` to the retention window ([`outbox::published::trim_published`]),
//! every so often until shutdown.

use std::time::Duration;

use outbox::published::trim_published;
use service_kit::Shutdown;
use sqlx::PgPool;

/// Trims every `every` until shutdown.
pub async fn retention_loop(pool: PgPool, retention: Duration, every: Duration, shutdown: Shutdown) {
    loop {
        match trim_published(&pool, retention, 10_000, Duration::from_millis(50), &shutdown).await {
            Ok(r) if r.deleted > 0 => {
                tracing::info!(deleted = r.deleted, statements = r.statements, "trimmed published events")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "trimming published events failed"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
