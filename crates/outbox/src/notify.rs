use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;

/// The channel relays LISTEN on.
pub const CHANNEL: &str = "outbox_events";

/// Wakes relays after events commit.
///
/// Writers call [`Notifier::committed`] after their transaction commits; a single background
/// task coalesces those calls into at most one `pg_notify` in flight at a time. A lost
/// notification only delays publication until the relay's next poll.
#[derive(Clone, Debug)]
pub struct Notifier {
    wake: std::sync::Arc<Notify>,
}

impl Notifier {
    /// Starts the notifying task; it ends when `shutdown` resolves.
    pub fn spawn(pool: PgPool, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        let wake = std::sync::Arc::new(Notify::new());
        let task_wake = wake.clone();
        tokio::spawn(async move {
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    () = &mut shutdown => break,
                    () = task_wake.notified() => {}
                }
                let sent = tokio::time::timeout(
                    Duration::from_secs(2),
                    sqlx::query("SELECT pg_notify($1, '')").bind(CHANNEL).execute(&pool),
                )
                .await;
                if !matches!(sent, Ok(Ok(_))) {
                    tracing::debug!("outbox notify failed; relays will find the events by polling");
                }
            }
        });
        Self { wake }
    }

    /// A notifier that never notifies (relays poll).
    pub fn disabled() -> Self {
        Self { wake: std::sync::Arc::new(Notify::new()) }
    }

    /// Signals that events were committed.
    pub fn committed(&self) {
        self.wake.notify_one();
    }
}
