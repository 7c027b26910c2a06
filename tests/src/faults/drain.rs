//! Waiting for the system to settle, and what the stream says about deliveries.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::AsyncCommands;
use service_kit::redis_target::{RedisTarget, Timeouts};
use sqlx::PgPool;
use tokio::time::Instant;

use super::FaultError;

/// Where the pipeline stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub outbox_pending: i64,
    pub stream_pending: i64,
    /// Entries not yet delivered to the group (`XINFO GROUPS` lag).
    pub stream_undelivered: i64,
    pub parked: i64,
}

impl Backlog {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The backlog of the outbox, of the group on every stream of `streams` (the partitions), and
/// of the parked events.
pub async fn backlog(
    orders: &PgPool,
    inventory: &PgPool,
    redis: &mut (impl ConnectionLike + Send),
    streams: &[String],
    group: &str,
) -> Result<Backlog, FaultError> {
    let pg = |e: sqlx::Error| FaultError::Postgres(e.to_string());
    let outbox_pending = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE status = 'pending'")
        .fetch_one(orders)
        .await
        .map_err(pg)?;
    let parked = sqlx::query_scalar("SELECT count(*) FROM parked_events").fetch_one(inventory).await.map_err(pg)?;
    let mut total = Backlog { outbox_pending, parked, ..Backlog::default() };
    for stream in streams {
        let (pending, undelivered) = stream_backlog(redis, stream, group).await?;
        total.stream_pending += pending;
        total.stream_undelivered += undelivered;
    }
    Ok(total)
}

/// `(pending, undelivered)` of `group` on `stream`.
async fn stream_backlog(
    redis: &mut (impl ConnectionLike + Send),
    stream: &str,
    group: &str,
) -> Result<(i64, i64), FaultError> {
    let rd = |e: redis::RedisError| FaultError::Redis(e.to_string());
    let groups: Vec<HashMap<String, redis::Value>> =
        redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(redis).await.map_err(rd)?;
    let group =
        groups.iter().find(|g| matches!(g.get("name"), Some(redis::Value::BulkString(n)) if n == group.as_bytes()));
    let int = |key: &str| match group.and_then(|g| g.get(key)) {
        Some(redis::Value::Int(n)) => Some(*n),
        _ => None,
    };
    let Some(stream_pending) = int("pending") else {
        return Err(FaultError::Redis(format!("no consumer group `{group:?}` on `{stream}` yet")));
    };
    // The group has read everything when its last delivered id is the stream's last id.
    // `lag` alone is not enough: Redis 7.0 reports a stale non-zero lag once its
    // `entries-read` counter went wrong (seen after restarts), and nil when it cannot tell.
    let info: HashMap<String, redis::Value> =
        redis::cmd("XINFO").arg("STREAM").arg(stream).query_async(redis).await.map_err(rd)?;
    let text = |v: Option<&redis::Value>| match v {
        Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        Some(redis::Value::SimpleString(s)) => Some(s.clone()),
        _ => None,
    };
    let caught_up = text(group.and_then(|g| g.get("last-delivered-id"))) == text(info.get("last-generated-id"));
    let stream_undelivered = if caught_up { 0 } else { int("lag").unwrap_or(1).max(1) };
    Ok((stream_pending, stream_undelivered))
}

/// Waits (at most `timeout`) until nothing is pending anywhere; returns the last backlog seen.
pub async fn drain(
    orders: &PgPool,
    inventory: &PgPool,
    redis: &RedisTarget,
    streams: &[String],
    group: &str,
    timeout: Duration,
) -> (Backlog, Duration) {
    let began = Instant::now();
    let mut last = Backlog { outbox_pending: -1, ..Backlog::default() };
    while began.elapsed() < timeout {
        if let Ok(mut conn) = redis.connect(TIMEOUTS).await {
            match backlog(orders, inventory, &mut conn, streams, group).await {
                Ok(b) if b.is_empty() => return (b, began.elapsed()),
                Ok(b) => last = b,
                Err(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (last, began.elapsed())
}

/// Samples, while the run goes on, what tells of redelivery: entries `XPENDING` shows
/// delivered more than once, and the consumers' `consumer_events_total{result="duplicate"}`
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
    pub fn start(redis: RedisTarget, streams: Vec<String>, group: String, consumer_ports: Vec<u16>) -> Self {
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let duplicates = Arc::new(Mutex::new(HashMap::<u16, Counted>::new()));
        let applied = Arc::new(Mutex::new(HashMap::<u16, Counted>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let http = reqwest::Client::new();
        let task = tokio::spawn({
            let (seen, duplicates, applied, stop) = (seen.clone(), duplicates.clone(), applied.clone(), stop.clone());
            async move {
                loop {
                    // Once stopped, one last round, begun after the stop, then out.
                    let last = stop.load(Ordering::Relaxed);
                    if let Ok(Ok(mut conn)) =
                        tokio::time::timeout(Duration::from_secs(1), redis.connect(TIMEOUTS)).await
                    {
                        for stream in &streams {
                            let pending: Result<Vec<(String, String, u64, u64)>, _> = redis::cmd("XPENDING")
                                .arg(stream)
                                .arg(&group)
                                .arg("-")
                                .arg("+")
                                .arg(5_000)
                                .query_async(&mut conn)
                                .await;
                            if let (Ok(pending), Ok(mut seen)) = (pending, seen.lock()) {
                                // Entry ids of different partitions may coincide: named with their stream.
                                seen.extend(
                                    pending.into_iter().filter(|p| p.3 > 1).map(|p| format!("{stream}/{}", p.0)),
                                );
                            }
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

/// `(entries, distinct event_ids)` on the streams (the partitions), read in pages.
pub async fn stream_census(
    conn: &mut (impl ConnectionLike + Send + Sync),
    streams: &[String],
) -> Result<(usize, usize), FaultError> {
    let mut entries = 0;
    let mut distinct = HashSet::new();
    for stream in streams {
        entries += census_of(conn, stream, &mut distinct).await?;
    }
    Ok((entries, distinct.len()))
}

/// The entries of one stream, counted, their event ids added to `distinct`.
async fn census_of(
    conn: &mut (impl ConnectionLike + Send + Sync),
    stream: &str,
    distinct: &mut HashSet<String>,
) -> Result<usize, FaultError> {
    let mut entries = 0;
    let mut from = "-".to_owned();
    loop {
        let page: redis::streams::StreamRangeReply =
            conn.xrange_count(stream, &from, "+", 5_000).await.map_err(|e| FaultError::Redis(e.to_string()))?;
        let Some(last) = page.ids.last().map(|e| e.id.clone()) else { break };
        for e in &page.ids {
            entries += 1;
            if let Some(event_id) = e.get::<String>("event_id") {
                distinct.insert(event_id);
            }
        }
        from = format!("({last}");
    }
    Ok(entries)
}

/// Connections the suite opens to look at Redis.
pub const TIMEOUTS: Timeouts = Timeouts::new(Duration::from_secs(2), Duration::from_secs(10));
