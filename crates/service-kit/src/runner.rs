//! One shape for every service: bound first (its address known, nothing running yet), then run
//! until its shutdown is cancelled, by SIGTERM or Ctrl-C in the binaries ([`serve`]) or by a
//! test. Running, it keeps its background tasks in a [`TaskTracker`] and, once shut down,
//! finishes what is in flight, stops them and closes its connections before it returns.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

pub use tokio_util::task::TaskTracker;

use crate::Shutdown;

/// How long a service's background tasks get to end once it has stopped: each ends at its next
/// await point, and a statement in flight is bounded by the statement timeout, far shorter in
/// practice.
pub const TASKS_GRACE: Duration = Duration::from_secs(10);

/// Why a service could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid DATABASE_URL: {0}")]
    DatabaseUrl(#[source] sqlx::Error),
    #[error("invalid REDIS_URL: {0}")]
    RedisUrl(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("invalid settings: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("initialising telemetry: {0}")]
    Telemetry(String),
    #[error("HTTP server: {0}")]
    Serve(#[source] std::io::Error),
}

/// A bound service.
pub trait Service: Sized {
    /// Its name in logs, traces and the `listening on` line.
    const NAME: &'static str;

    /// The address it listens on (the real port when configured with port 0).
    fn local_addr(&self) -> SocketAddr;

    /// Runs until `shutdown` is cancelled, then drains (see the module's opening comment).
    fn run(self, shutdown: Shutdown) -> impl Future<Output = Result<(), StartError>> + Send;
}

/// A binary's whole life: telemetry (logs in `format`), the service bound by `bind`, its
/// address printed, run until SIGTERM or Ctrl-C, and the telemetry flushed.
pub async fn serve<S: Service>(
    format: telemetry::LogFormat,
    bind: impl Future<Output = Result<S, StartError>>,
) -> Result<(), StartError> {
    let telemetry = telemetry::init(S::NAME, format).map_err(|e| StartError::Telemetry(e.to_string()))?;
    let result = async {
        let service = bind.await?;
        println!("{} listening on {}", S::NAME, service.local_addr());
        let shutdown = Shutdown::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            crate::shutdown_signal().await;
            signal.cancel();
        });
        service.run(shutdown).await
    }
    .await;
    if let Err(e) = &result {
        tracing::error!(error = %e, service = S::NAME, "stopped with an error");
    }
    // Flushing spans blocks; keep it off the async workers.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    result
}

/// Waits (at most `limit`) for the tasks of a service that is shutting down to end.
pub async fn drain(tasks: &TaskTracker, limit: Duration) {
    tasks.close();
    if tokio::time::timeout(limit, tasks.wait()).await.is_err() {
        tracing::warn!(left = tasks.len(), "background tasks still running at shutdown; leaving them");
    }
}
