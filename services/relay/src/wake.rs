//! When to look for work: a notification on the outbox channel, the fallback poll, or the
//! moment the earliest backing-off row becomes due.

use std::sync::Arc;
use std::time::Duration;

use service_kit::Shutdown;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;

/// Listens on [`outbox::CHANNEL`] and pokes `wake` per notification, until shutdown. A lost
/// connection is re-established with capped backoff; `wake` is poked after each (re)connect
/// because notifications sent meanwhile are lost.
pub async fn listen(pool: PgPool, wake: Arc<Notify>, shutdown: Shutdown) {
    let mut delay = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(outbox::CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let listener = tokio::select! {
            () = shutdown.cancelled() => return,
            l = connected => l,
        };
        match listener {
            Ok(mut listener) => {
                delay = Duration::from_millis(100);
                wake.notify_one();
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        n = listener.try_recv() => match n {
                            Ok(Some(_)) => wake.notify_one(),
                            Ok(None) => { wake.notify_one(); tracing::info!("outbox listener reconnecting"); }
                            Err(e) => { tracing::warn!(error = %e, "outbox listener lost; polling covers the gap"); break; }
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot LISTEN on the outbox channel")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// How long until the earliest backing-off row is due, if any is. Only attempted rows back off;
/// they are in the small `outbox_held_back_idx`.
pub async fn next_due_in(pool: &PgPool) -> Result<Option<Duration>, sqlx::Error> {
    let secs: Option<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM min(next_attempt_at) - now())::float8 FROM outbox \
         WHERE status = 'pending' AND attempts > 0 AND next_attempt_at > now()",
    )
    .fetch_one(pool)
    .await?;
    Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
}
