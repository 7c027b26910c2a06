//! When a pump looks for work: a notification on the outbox channel that this relay answers
//! ([`Responder`], [`listen`]), the moment the earliest backing-off row becomes due
//! ([`NextDue`]), or the fallback poll. The writers' side, which writes carry a notification,
//! is [`outbox::Notifier`].

use std::sync::Arc;
use std::time::Duration;

use broker::redis::target::{RedisConn, RedisTarget, Timeouts};
use broker::redis::RedisError;
use service_kit::{Backoff, Shutdown};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long a relay's answer to a notification is remembered: far longer than the other relays
/// take to hear the same notification.
const ANSWER_TTL: Duration = Duration::from_secs(5);

/// After Redis failed to take a mark, how long every notification is answered without asking
/// it: a Redis that does not respond would otherwise hold up each notification for the
/// connection's timeout, and the notifications behind it.
const MARK_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Decides which relay answers a notification that names an event (its payload is the outbox
/// id): the first to mark it in Redis. Every relay hears every notification; without this,
/// each would run a claim for it and all but one would find nothing. A notification that names
/// no event (sent on its own, for writes that committed without one) is answered by every
/// relay, and so is any notification while Redis does not answer (for a few seconds after each
/// failure, without asking it).
pub struct Responder {
    /// None: no Redis to mark answers in (the events go to NATS); every relay answers.
    target: Option<RedisTarget>,
    conn: Option<RedisConn>,
    prefix: String,
    /// Set after a failure: until then, answer without asking Redis.
    retry_at: Option<Instant>,
}

impl Responder {
    /// Marks go under keys named after the outbox's database and the stream, so relays of
    /// other outboxes sharing the Redis never answer for these.
    pub fn new(target: RedisTarget, database: &str, stream: &str) -> Self {
        Self {
            target: Some(target),
            conn: None,
            prefix: format!("outbox-answered:{database}:{stream}:"),
            retry_at: None,
        }
    }

    /// A responder that answers every notification.
    pub fn everyone() -> Self {
        Self { target: None, conn: None, prefix: String::new(), retry_at: None }
    }

    /// Whether this relay answers the notification whose payload is `payload`.
    pub async fn answers(&mut self, payload: &str) -> bool {
        let Ok(id) = payload.parse::<i64>() else { return true };
        if self.target.is_none() {
            return true;
        }
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return true;
        }
        match self.mark(id).await {
            Ok(first) => {
                self.retry_at = None;
                first
            }
            Err(e) => {
                tracing::debug!(error = %e, retry_in_ms = MARK_RETRY_AFTER.as_millis() as u64,
                    "cannot mark a notification answered; answering every notification until then");
                self.conn = None;
                self.retry_at = Some(Instant::now() + MARK_RETRY_AFTER);
                true
            }
        }
    }

    async fn mark(&mut self, id: i64) -> Result<bool, RedisError> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => {
                let timeouts = Timeouts::new(Duration::from_secs(1), Duration::from_secs(1));
                let Some(target) = &self.target else { return Ok(true) };
                self.conn.insert(target.connect(timeouts).await?)
            }
        };
        broker::redis::set_once(conn, &format!("{}{id}", self.prefix), ANSWER_TTL).await
    }
}

/// When the earliest backing-off row becomes due: a pump with nothing else to do sleeps until
/// then (or a notification, or the poll interval). Looked up at most once per poll interval;
/// a row that starts backing off meanwhile is found by the poll.
pub struct NextDue {
    pool: PgPool,
    poll_interval: Duration,
    at: Option<Instant>,
    checked: Option<Instant>,
}

impl NextDue {
    pub fn new(pool: PgPool, poll_interval: Duration) -> Self {
        Self { pool, poll_interval, at: None, checked: None }
    }

    /// How long to sleep: until the earliest due row, at most the poll interval.
    pub async fn wait(&mut self) -> Duration {
        if self.checked.is_none_or(|at| at.elapsed() >= self.poll_interval) {
            self.at = match outbox::stats::next_due_in(&self.pool).await {
                Ok(Some(due)) => Some(Instant::now() + due),
                _ => None,
            };
            self.checked = Some(Instant::now());
        }
        let Some(at) = self.at else { return self.poll_interval };
        let wait = at.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            // Due now: this wake-up is spent on it.
            self.at = None;
        }
        wait.min(self.poll_interval)
    }
}

/// Listens on [`outbox::CHANNEL`] and pokes `wake` per notification this relay answers, until
/// shutdown. A lost connection is re-established with capped backoff; `wake` is poked after
/// each (re)connect because notifications sent meanwhile are lost.
pub async fn listen(pool: PgPool, mut responder: Responder, wake: Arc<Notify>, shutdown: Shutdown) {
    let mut retry = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
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
        let failed = match listener {
            Ok(mut listener) => {
                retry.reset();
                wake.notify_one();
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        n = listener.try_recv() => match n {
                            Ok(Some(n)) => {
                                if responder.answers(n.payload()).await {
                                    wake.notify_one();
                                }
                            }
                            Ok(None) => { wake.notify_one(); tracing::info!("outbox listener reconnecting"); }
                            Err(e) => { tracing::warn!(error = %e, "outbox listener lost; polling covers the gap"); break; }
                        }
                    }
                }
                None
            }
            Err(e) => Some(e),
        };
        let delay = retry.next_delay();
        if let Some(e) = failed {
            tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot LISTEN on the outbox channel");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}
