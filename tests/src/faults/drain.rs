//! Waiting for the system to settle, and what tells of redelivery.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker::redis::target::Timeouts;
use redis::aio::ConnectionLike;
use sqlx::PgPool;
use tokio::time::Instant;

use super::stream::{self, Probe, Session};
use super::FaultError;

/// Where the pipeline stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub outbox_pending: i64,
    /// Entries delivered to the group and not acknowledged (`XPENDING`; JetStream's
    /// `num_ack_pending`).
    pub stream_pending: i64,
    /// Entries not yet delivered to the group (`XINFO GROUPS` lag; JetStream's `num_pending`).
    pub stream_undelivered: i64,
    pub parked: i64,
}

impl Backlog {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The backlog of the outbox, of the group on every Redis stream of `streams` (the
/// partitions), and of the parked events: for tests that work on Redis directly.
pub async fn backlog(
    orders: &PgPool,
    inventory: &PgPool,
    redis: &mut (impl ConnectionLike + Send),
    streams: &[String],
    group: &str,
) -> Result<Backlog, FaultError> {
    let mut total = database_backlog(orders, inventory).await?;
    (total.stream_pending, total.stream_undelivered) = stream::redis::group_backlog(redis, streams, group).await?;
    Ok(total)
}

/// The backlog of the outbox, of the group (on whichever broker `session` reads), and of the
/// parked events.
pub async fn backlog_on(orders: &PgPool, inventory: &PgPool, session: &mut Session) -> Result<Backlog, FaultError> {
    let mut total = database_backlog(orders, inventory).await?;
    (total.stream_pending, total.stream_undelivered) = session.group_backlog().await?;
    Ok(total)
}

/// The databases' part of the backlog: the outbox's pending rows and the parked events.
async fn database_backlog(orders: &PgPool, inventory: &PgPool) -> Result<Backlog, FaultError> {
    let pg = |e: sqlx::Error| FaultError::Postgres(e.to_string());
    let outbox_pending = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE status = 'pending'")
        .fetch_one(orders)
        .await
        .map_err(pg)?;
    let parked = sqlx::query_scalar("SELECT count(*) FROM parked_events").fetch_one(inventory).await.map_err(pg)?;
    Ok(Backlog { outbox_pending, parked, ..Backlog::default() })
}

/// Waits (at most `timeout`) until nothing is pending anywhere; returns the last backlog seen.
pub async fn drain(orders: &PgPool, inventory: &PgPool, broker: &Probe, timeout: Duration) -> (Backlog, Duration) {
    let began = Instant::now();
    let mut last = Backlog { outbox_pending: -1, ..Backlog::default() };
    let mut session = None;
    while began.elapsed() < timeout {
        if session.is_none() {
            session = broker.connect().await.ok();
        }
        if let Some(s) = &mut session {
            match backlog_on(orders, inventory, s).await {
                Ok(b) if b.is_empty() => return (b, began.elapsed()),
                Ok(b) => last = b,
                // Connected anew next time: the broker may have restarted meanwhile.
                Err(_) => session = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (last, began.elapsed())
}

/// Samples, while the run goes on, what tells of redelivery: entries seen delivered more than
/// once ([`Session::redelivered`]), and the consumers' `consumer_events_total{result="duplicate"}`
/// and `{result="applied"}` (summed over process incarnations: a counter that went down
/// belongs to a new process). All are lower bounds: what happens between two samples, or after
/// the last sample of a killed process, is not seen.
pub struct RedeliverySampler {
    seen: Arc<Mutex<HashSet<String>>>,
    duplicates: Arc<Mutex<HashMap<u16, Counted>>>,
    applied: Arc<Mutex<HashMap<u16, Counted>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// A counter of one port's processes: what earlier incarnations counted, and the last sample.
#[derive(Debug, Clone, Copy, Default)]
struct Counted {
    earlier: f64,
    last: f64,
}

impl Counted {
    fn sample(&mut self, now: f64) {
        if now < self.last {
            self.earlier += self.last;
        }
        self.last = now;
    }

    fn total(map: &Mutex<HashMap<u16, Counted>>) -> u64 {
        map.lock().map(|m| m.values().map(|c| c.earlier + c.last).sum::<f64>() as u64).unwrap_or(0)
    }
}

/// What the sampler saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct Redeliveries {
    pub entries_seen_redelivered: usize,
    pub duplicates_skipped: u64,
    /// Events the consumers said they applied (a lower bound).
    pub applied_reported: u64,
}

impl RedeliverySampler {
    pub fn start(broker: Probe, consumer_ports: Vec<u16>) -> Self {
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let duplicates = Arc::new(Mutex::new(HashMap::<u16, Counted>::new()));
        let applied = Arc::new(Mutex::new(HashMap::<u16, Counted>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let http = reqwest::Client::new();
        let task = tokio::spawn({
            let (seen, duplicates, applied, stop) = (seen.clone(), duplicates.clone(), applied.clone(), stop.clone());
            async move {
                let mut session = None;
                loop {
                    // Once stopped, one last round, begun after the stop, then out.
                    let last = stop.load(Ordering::Relaxed);
                    if session.is_none() {
                        let connecting = tokio::time::timeout(Duration::from_secs(1), broker.connect());
                        session = connecting.await.ok().and_then(Result::ok);
                    }
                    if let Some(s) = &mut session {
                        match s.redelivered().await {
                            Ok(ids) => {
                                if let Ok(mut seen) = seen.lock() {
                                    seen.extend(ids);
                                }
                            }
                            // Connected anew next round: the broker may be restarting.
                            Err(_) => session = None,
                        }
                    }
                    for port in &consumer_ports {
                        let Some(text) = metrics_text(&http, *port, Duration::from_millis(500)).await else { continue };
                        for (label, counts) in [("result=\"duplicate\"", &duplicates), ("result=\"applied\"", &applied)]
                        {
                            if let (Some(now), Ok(mut c)) =
                                (sample(&text, "consumer_events_total", label), counts.lock())
                            {
                                c.entry(*port).or_default().sample(now);
                            }
                        }
                    }
                    if last {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        });
        Self { seen, duplicates, applied, stop, task }
    }

    pub async fn finish(self) -> Redeliveries {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        Redeliveries {
            entries_seen_redelivered: self.seen.lock().map(|s| s.len()).unwrap_or(0),
            duplicates_skipped: Counted::total(&self.duplicates),
            applied_reported: Counted::total(&self.applied),
        }
    }
}

/// A service's `/metrics` text, if it answers within `within`.
pub async fn metrics_text(http: &reqwest::Client, port: u16, within: Duration) -> Option<String> {
    let response = http.get(format!("http://127.0.0.1:{port}/metrics")).timeout(within).send();
    response.await.ok()?.text().await.ok()
}

pub use test_support::sample;

/// Connections the suite opens to look at Redis.
pub const TIMEOUTS: Timeouts = Timeouts::new(Duration::from_secs(2), Duration::from_secs(10));
