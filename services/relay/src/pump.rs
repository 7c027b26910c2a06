//! The relay loop: process batches while they come back full, then wait for a wake-up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use service_kit::Shutdown;
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::batch::Worker;
use crate::wake::next_due_in;

/// First wait for rows held back behind another claim's batch.
const WAITING_DELAY: Duration = Duration::from_millis(2);

/// Runs until shutdown. The batch in flight when shutdown is requested is finished
/// (published and recorded) before returning; no new batch is claimed after it.
pub async fn pump(mut worker: Worker, pool: PgPool, wake: Arc<Notify>, poll_interval: Duration, shutdown: Shutdown) {
    let mut error_delay = Duration::from_millis(100);
    let mut waiting_delay = WAITING_DELAY;
    let mut next_due: Option<Instant> = None;
    let mut due_checked: Option<Instant> = None;
    while !shutdown.is_cancelled() {
        let full = worker.settings().batch_size as usize;
        let mut wakeable = true;
        let wait = match worker.process_batch().await {
            Ok(report) if report.dead > 0 && report.failed == 0 => {
                // The batch was given back to dead-letter a poison row: claim the rest now.
                error_delay = Duration::from_millis(100);
                continue;
            }
            Ok(report) if report.locked >= full && !report.abandoned => {
                error_delay = Duration::from_millis(100);
                waiting_delay = WAITING_DELAY;
                continue;
            }
            Ok(report) => {
                error_delay = Duration::from_millis(100);
                if report.failed > 0 {
                    // Redis is failing: do not retry on every notification.
                    wakeable = false;
                    poll_interval
                } else if report.waiting() > 0 {
                    // Rows wait for another claim's batch with earlier rows of their orders,
                    // which takes milliseconds; look again soon, less often while it lasts.
                    let wait = waiting_delay.min(poll_interval);
                    waiting_delay =
                        if report.claimed == 0 { (waiting_delay * 2).min(poll_interval) } else { WAITING_DELAY };
                    wait
                } else {
                    waiting_delay = WAITING_DELAY;
                    // When the earliest backing-off row is due, looked up at most once per poll
                    // interval (a row that starts backing off meanwhile is found by the poll).
                    if due_checked.is_none_or(|at: Instant| at.elapsed() >= poll_interval) {
                        next_due = match next_due_in(&pool).await {
                            Ok(Some(due)) => Some(Instant::now() + due),
                            _ => None,
                        };
                        due_checked = Some(Instant::now());
                    }
                    match next_due {
                        Some(at) => {
                            let wait = at.saturating_duration_since(Instant::now());
                            if wait.is_zero() {
                                // Due now: this wake-up is spent on it.
                                next_due = None;
                            }
                            wait.min(poll_interval)
                        }
                        None => poll_interval,
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = error_delay.as_millis() as u64, "relay batch failed");
                let wait = error_delay;
                wakeable = false;
                error_delay = (error_delay * 2).min(Duration::from_secs(5));
                wait
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = wake.notified(), if wakeable => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
    tracing::info!("relay loop stopped");
}
