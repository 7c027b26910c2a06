//! The suite's questions, answered by Redis Streams: one stream per partition, the group on
//! each.

use std::collections::{HashMap, HashSet};

use redis::aio::ConnectionLike;
use redis::AsyncCommands;

use super::super::FaultError;

fn rd(e: redis::RedisError) -> FaultError {
    FaultError::Redis(e.to_string())
}

/// `(pending, undelivered)` of `group` over `streams`.
pub async fn group_backlog(
    conn: &mut (impl ConnectionLike + Send),
    streams: &[String],
    group: &str,
) -> Result<(i64, i64), FaultError> {
    let (mut pending, mut undelivered) = (0, 0);
    for stream in streams {
        let (p, u) = stream_backlog(conn, stream, group).await?;
        pending += p;
        undelivered += u;
    }
    Ok((pending, undelivered))
}

/// `(pending, undelivered)` of `group` on `stream`.
async fn stream_backlog(
    redis: &mut (impl ConnectionLike + Send),
    stream: &str,
    group: &str,
) -> Result<(i64, i64), FaultError> {
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

/// The entries `XPENDING` shows delivered more than once, named with their stream (entry ids
/// of different partitions may coincide).
pub async fn redelivered(
    conn: &mut (impl ConnectionLike + Send),
    streams: &[String],
    group: &str,
) -> Result<Vec<String>, FaultError> {
    let mut seen = Vec::new();
    for stream in streams {
        let pending = pending(conn, stream, group, 5_000, None).await?;
        seen.extend(pending.into_iter().filter(|p| p.3 > 1).map(|p| format!("{stream}/{}", p.0)));
    }
    Ok(seen)
}

/// The group's pending entries on `stream` (of `consumer` only, if given), at most `count`:
/// `(id, consumer, idle ms, deliveries)` each (`XPENDING`'s extended form).
async fn pending(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    group: &str,
    count: usize,
    consumer: Option<&str>,
) -> Result<Vec<(String, String, u64, u64)>, FaultError> {
    let mut cmd = redis::cmd("XPENDING");
    cmd.arg(stream).arg(group).arg("-").arg("+").arg(count);
    if let Some(consumer) = consumer {
        cmd.arg(consumer);
    }
    cmd.query_async(conn).await.map_err(rd)
}

/// The event ids of the entries `consumer` holds pending.
pub async fn held_by(
    conn: &mut (impl ConnectionLike + Send + Sync),
    streams: &[String],
    group: &str,
    consumer: &str,
) -> Result<Vec<String>, FaultError> {
    let mut event_ids = Vec::new();
    for stream in streams {
        for (id, ..) in pending(conn, stream, group, 100_000, Some(consumer)).await? {
            let entries: redis::streams::StreamRangeReply = conn.xrange(stream, &id, &id).await.map_err(rd)?;
            event_ids.extend(entries.ids.iter().filter_map(|e| e.get::<String>("event_id")));
        }
    }
    Ok(event_ids)
}

/// `(entries, distinct event_ids)` on the streams, read in pages.
pub async fn census(
    conn: &mut (impl ConnectionLike + Send + Sync),
    streams: &[String],
) -> Result<(usize, usize), FaultError> {
    let mut entries = 0;
    let mut distinct = HashSet::new();
    for stream in streams {
        let mut from = "-".to_owned();
        loop {
            let page: redis::streams::StreamRangeReply =
                conn.xrange_count(stream, &from, "+", 5_000).await.map_err(rd)?;
            let Some(last) = page.ids.last().map(|e| e.id.clone()) else { break };
            for e in &page.ids {
                entries += 1;
                if let Some(event_id) = e.get::<String>("event_id") {
                    distinct.insert(event_id);
                }
            }
            from = format!("({last}");
        }
    }
    Ok((entries, distinct.len()))
}
