//! The relay loop: process batches while they come back full, then wait for a wake-up
//! ([`crate::wake`]); while Redis does not take entries, claim nothing and probe it with a
//! growing delay.

use std::sync::Arc;
use std::time::Duration;

use service_kit::{Backoff, Heartbeat, Shutdown};
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::batch::Worker;
use crate::wake::NextDue;

/// First wait for rows held back behind another claim's batch.
const WAITING_DELAY: Duration = Duration::from_millis(2);

/// Waits after a failed batch (Postgres down, say), and between probes of a Redis that is down.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// What a pump needs besides its worker.
pub struct PumpContext {
    pub pool: PgPool,
    pub wake: Arc<Notify>,
    pub poll_interval: Duration,
    /// The longest one batch may take before its connection is given up on.
    pub batch_deadline: Duration,
    pub heartbeat: Heartbeat,
    pub shutdown: Shutdown,
}

/// Runs until shutdown. The batch in flight when shutdown is requested is finished
/// (published and recorded) before returning; no new batch is claimed after it.
pub async fn pump(mut worker: Worker, cx: PumpContext) {
    let PumpContext { pool, wake, poll_interval, batch_deadline, heartbeat, shutdown } = cx;
    let mut retry = Backoff::new(RETRY_FIRST, RETRY_MAX);
    let mut broker_retry = Backoff::new(RETRY_FIRST, RETRY_MAX);
    let mut waiting_delay = WAITING_DELAY;
    let mut next_due = NextDue::new(pool, poll_interval);
    while !shutdown.is_cancelled() {
        heartbeat.beat();
        if worker.broker().is_down() {
            // Back off as a whole: claim again only once Redis answers, and then let the batch
            // tell whether it takes entries (it may answer a PING and still refuse writes).
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(broker_retry.next_delay()) => {}
            }
            heartbeat.beat();
            if !worker.probe_broker().await {
                continue;
            }
        }
        let full = worker.settings().batch_size as usize;
        let mut wakeable = true;
        let processed = match tokio::time::timeout(batch_deadline, worker.process_batch()).await {
            Ok(processed) => processed,
            Err(_) => Err(crate::batch::BatchError::Deadline(batch_deadline)),
        };
        if matches!(&processed, Ok(report) if !report.broker_failed) {
            // Published, or nothing to publish after Redis answered a probe.
            worker.broker().recovered();
        }
        let wait = match processed {
            Ok(report) if report.broker_failed => continue,
            Ok(report) if report.dead > 0 && report.failed == 0 => {
                // The batch was given back to dead-letter a poison row: claim the rest now.
                retry.reset();
                continue;
            }
            Ok(report) if report.locked >= full && !report.abandoned => {
                retry.reset();
                broker_retry.reset();
                waiting_delay = WAITING_DELAY;
                continue;
            }
            Ok(report) => {
                retry.reset();
                broker_retry.reset();
                if report.failed > 0 {
                    // Redis refused rows; they back off. Do not retry on every notification.
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
                    next_due.wait().await
                }
            }
            Err(e) => {
                let wait = retry.next_delay();
                let class = e.class();
                worker.metrics().failure(class, "postgres");
                tracing::warn!(error = %e, failure_class = %class, retry_in_ms = wait.as_millis() as u64, "relay batch failed");
                wakeable = false;
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
