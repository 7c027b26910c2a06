//! Replay demonstration: re-adds an entry the consumer already applied and shows that the
//! copy is acknowledged without a second effect.

use std::fmt;
use std::time::Duration;

use broker::redis::group as stream;
use broker::redis::{ConnectionLike, RedisError};
use sqlx::PgPool;

use crate::store::inspect;
use crate::Config;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error("entry {0} is not on the stream")]
    NoEntry(String),
    #[error("entry {0} has no event_id")]
    NoEventId(String),
    #[error("event {0} has not been applied yet; run the consumer first")]
    NotApplied(String),
    #[error("the consumer group did not handle the copy within {0:?}; is a consumer running?")]
    Timeout(Duration),
}

#[derive(Debug)]
pub struct ReplayReport {
    pub original_entry_id: String,
    pub copy_entry_id: String,
    pub event_id: String,
    pub processed_rows: i64,
    pub checkpoint_before: i64,
    pub checkpoint_after: i64,
}

impl fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "replayed entry {} as {} (event {})", self.original_entry_id, self.copy_entry_id, self.event_id)?;
        writeln!(f, "processed_messages rows for the event: {}", self.processed_rows)?;
        writeln!(f, "order checkpoint: {} before, {} after", self.checkpoint_before, self.checkpoint_after)?;
        let verdict = if self.processed_rows == 1 && self.checkpoint_before == self.checkpoint_after {
            "the copy was acknowledged as a duplicate: no second effect"
        } else {
            "UNEXPECTED: the copy changed state"
        };
        write!(f, "{verdict}")
    }
}

pub async fn run(
    pool: &PgPool,
    conn: &mut (impl ConnectionLike + Send),
    config: &Config,
    entry_id: Option<&str>,
    timeout: Duration,
) -> Result<ReplayReport, DemoError> {
    // With partitions, the first partition's stream (the entry id names an entry of it).
    let partitions = config.topology.partitions(&config.redis_stream);
    let stream_key = partitions.stream(0);
    let entry_id = match entry_id {
        Some(id) => id.to_owned(),
        None => stream::first_id(conn, stream_key).await?.ok_or_else(|| DemoError::NoEntry("(first)".into()))?,
    };
    let fields =
        stream::entry(conn, stream_key, &entry_id).await?.ok_or_else(|| DemoError::NoEntry(entry_id.clone()))?;
    let event_id = fields
        .iter()
        .find(|(k, _)| k == domain::fields::EVENT_ID)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .ok_or_else(|| DemoError::NoEventId(entry_id.clone()))?;
    let aggregate_id =
        inspect::applied_order(pool, &event_id).await?.ok_or_else(|| DemoError::NotApplied(event_id.clone()))?;
    let checkpoint_before = inspect::checkpoint(pool, &aggregate_id).await?;
    let copy_entry_id = stream::add(conn, stream_key, &fields).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    while !handled(conn, stream_key, &config.consumer_group, &copy_entry_id).await? {
        if tokio::time::Instant::now() >= deadline {
            return Err(DemoError::Timeout(timeout));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let processed_rows = inspect::processed_rows(pool, &event_id).await?;
    Ok(ReplayReport {
        original_entry_id: entry_id,
        copy_entry_id,
        event_id,
        processed_rows,
        checkpoint_before,
        checkpoint_after: inspect::checkpoint(pool, &aggregate_id).await?,
    })
}

/// The group has delivered `id` and it is no longer pending (acknowledged).
async fn handled(
    conn: &mut (impl ConnectionLike + Send),
    key: &str,
    group: &str,
    id: &str,
) -> Result<bool, RedisError> {
    if stream::is_pending(conn, key, group, id).await? {
        return Ok(false);
    }
    let last = stream::last_delivered_id(conn, key, group).await?;
    Ok(last.is_some_and(|last| domain::entry_id_key(&last) >= domain::entry_id_key(id)))
}
