//! Waking relays after events commit, at a fraction of a notification per event.
//!
//! A relay waits for a notification on [`CHANNEL`] (or its fallback poll) before it looks for
//! new events. Every committed event must be followed by a notification sent after its commit.
//!
//! The cheapest such notification rides on a write: a `NOTIFY` in the write's own transaction
//! (see [`crate::NewEvent::notify`]) is sent by its commit and costs no round trip. But a
//! transaction that notifies holds a cluster-wide lock through its commit, so notifying writes
//! commit one after another; only one write in flight at a time carries a notification (a
//! *carrier*). A carrier's commit comes after everything that committed before it started, so
//! it covers those writes too. Writes that commit while a carrier is in flight are covered by
//! the next carrier, or, if none has covered them after [`FALLBACK_DELAY`], by a notification
//! of its own that a background task sends. Under load most writes are covered by carriers; at
//! rest, every write is a carrier.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::Notify;

/// The channel relays LISTEN on. A notification's payload is the outbox id of the event whose
/// transaction sent it, or empty when sent on its own (by the background task). `outbox_append`
/// names it too (migration 0011).
pub const CHANNEL: &str = "outbox_events";

/// Writes in flight that carry the notification.
const MAX_CARRIERS: usize = 1;

/// How long writes not covered by a carrier wait for one before the background task notifies
/// for them: about the time a carrier in flight takes to commit and the next to start.
pub const FALLBACK_DELAY: Duration = Duration::from_millis(2);

/// Decides which writes carry the relays' notification, and notifies for the others.
#[derive(Clone, Debug)]
pub struct Notifier {
    shared: Option<Arc<Shared>>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Wakes the background task.
    wake: Notify,
    carriers: AtomicUsize,
    /// Writes that committed an event without carrying a notification, counted.
    committed: AtomicU64,
    /// The highest count of such writes known to be followed by a notification.
    covered: AtomicU64,
}

impl Shared {
    fn uncovered_commit(&self) {
        self.committed.fetch_add(1, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

impl Notifier {
    /// Starts the background task, connecting as `pool` does; it ends when `shutdown` resolves
    /// (after notifying for writes still uncovered then), so resolve it once writes are over.
    pub fn spawn(pool: PgPool, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        Self::with_fallback_delay(pool, FALLBACK_DELAY, shutdown)
    }

    /// [`Notifier::spawn`], the background task waiting `delay` for a carrier.
    pub fn with_fallback_delay(
        pool: PgPool,
        delay: Duration,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Self {
        let shared = Arc::new(Shared::default());
        tokio::spawn(cover(shared.clone(), pool, delay, shutdown));
        Self { shared: Some(shared) }
    }

    /// A notifier that never notifies (relays poll); no write carries a notification.
    pub fn disabled() -> Self {
        Self { shared: None }
    }

    /// Called right before a write that may append an event: its part in waking relays.
    pub fn write(&self) -> Wake {
        let Some(shared) = &self.shared else { return Wake { shared: None, carrier: None, appended: None } };
        let carries = shared
            .carriers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < MAX_CARRIERS).then_some(n + 1))
            .is_ok();
        // A carrier covers every write counted before it starts.
        let carrier = carries.then(|| shared.committed.load(Ordering::SeqCst));
        Wake { shared: Some(shared.clone()), carrier, appended: None }
    }
}

/// One write's part in waking relays: [`Wake::carries`] says whether its statement notifies at
/// commit; [`Wake::finished`] reports whether it committed an event. Dropped without that (the
/// write was cancelled), it assumes an event may have committed.
#[derive(Debug)]
pub struct Wake {
    shared: Option<Arc<Shared>>,
    /// For a carrier: the count of uncovered writes when it started.
    carrier: Option<u64>,
    appended: Option<bool>,
}

impl Wake {
    /// Whether the write's transaction should send the notification at its commit.
    pub fn carries(&self) -> bool {
        self.carrier.is_some()
    }

    /// The write is over; `appended`: it committed an event.
    pub fn finished(mut self, appended: bool) {
        self.appended = Some(appended);
    }
}

impl Drop for Wake {
    fn drop(&mut self) {
        let Some(shared) = &self.shared else { return };
        match self.carrier {
            Some(before) => {
                shared.carriers.fetch_sub(1, Ordering::SeqCst);
                // The notification goes with the event: it was sent if and only if the event
                // committed.
                if self.appended == Some(true) {
                    shared.covered.fetch_max(before, Ordering::SeqCst);
                }
            }
            None if self.appended != Some(false) => shared.uncovered_commit(),
            None => {}
        }
    }
}

/// The background task: after `delay`, notifies for writes no carrier has covered. When
/// `shutdown` resolves, it notifies once more for any still uncovered, then ends.
async fn cover(shared: Arc<Shared>, pool: PgPool, delay: Duration, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut conn: Option<PgConnection> = None;
    loop {
        let stopping = tokio::select! {
            () = &mut shutdown => true,
            () = shared.wake.notified() => false,
        };
        let stopping = stopping
            || tokio::select! {
                () = &mut shutdown => true,
                () = tokio::time::sleep(delay) => false,
            };
        let target = shared.committed.load(Ordering::SeqCst);
        if shared.covered.load(Ordering::SeqCst) < target {
            let mut sent = notify(&pool, &mut conn).await;
            // A connection idle since the last notification may have been ended unseen (a
            // server restart): one more try on a new one.
            if !sent && conn.take().is_some() {
                sent = notify(&pool, &mut conn).await;
            }
            if sent {
                shared.covered.fetch_max(target, Ordering::SeqCst);
            } else {
                conn = None;
                tracing::debug!("outbox notify failed; relays will find the events by polling");
            }
        }
        if stopping {
            break;
        }
    }
    if let Some(conn) = conn {
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
    }
}

/// Sends one notification on `conn`, connecting first if there is none. Bounded in time.
async fn notify(pool: &PgPool, conn: &mut Option<PgConnection>) -> bool {
    let sent = tokio::time::timeout(Duration::from_secs(2), async {
        let c = match conn {
            Some(c) => c,
            None => conn.insert(PgConnection::connect_with(&pool.connect_options()).await?),
        };
        // A transaction of its own. A `NOTIFY` gives its transaction an id, so its commit would
        // wait for a WAL flush like any write; nothing needs this one to be durable (the events
        // it announces were committed durably, and relays poll), so it commits without waiting.
        sqlx::query!(
            r#"SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, '') AS "notified: ()""#,
            CHANNEL,
        )
        .fetch_one(c)
        .await
        .map(drop)
    })
    .await;
    matches!(sent, Ok(Ok(())))
}
