//! The commands of reading a Redis stream without a group ([`super::tail`],
//! [`super::partitioned`]): pages of its newest entries, blocking reads after an entry, the
//! stream's counters, and, for the partitions, pages read together with the server's clock.
//!
//! Replies are parsed from raw values, as the group's are ([`super::group`]), so an entry's
//! fields keep their order.

use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{RedisError, Value};

use super::group::{parse_entries, per_stream, string, unexpected};
use crate::tail::Entry;
use crate::Delivery;

fn entries(reply: Value) -> Result<Vec<Entry>, RedisError> {
    // An entry read without a group always has its fields.
    Ok(parse_entries(reply)?
        .into_iter()
        .map(|Delivery { id, fields }| Entry { id, fields: fields.unwrap_or_default() })
        .collect())
}

/// Up to `count` entries before `before` (`+`: the newest; `(<id>`: before that id), newest
/// first (`XREVRANGE`).
pub async fn newest(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    before: &str,
    count: usize,
) -> Result<Vec<Entry>, RedisError> {
    entries(redis::cmd("XREVRANGE").arg(stream).arg(before).arg("-").arg("COUNT").arg(count).query_async(conn).await?)
}

/// Up to `count` entries after `from`, waiting up to `block` for one (`XREAD BLOCK`). Run it
/// on a connection of its own: on a shared one it holds up every other command.
pub async fn read_after(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    from: &str,
    count: usize,
    block: Duration,
) -> Result<Vec<Entry>, RedisError> {
    let reply: Value = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX).max(1))
        .arg("STREAMS")
        .arg(stream)
        .arg(from)
        .query_async(conn)
        .await?;
    let mut out = Vec::new();
    for page in per_stream("XREAD", reply)? {
        out.extend(entries(page)?);
    }
    Ok(out)
}

/// Whether entry `id` is on the stream.
pub async fn holds(conn: &mut (impl ConnectionLike + Send), stream: &str, id: &str) -> Result<bool, RedisError> {
    let reply: Value = redis::cmd("XRANGE").arg(stream).arg(id).arg(id).query_async(conn).await?;
    Ok(!entries(reply)?.is_empty())
}

/// A stream's counters (`XINFO STREAM`); `None` where Redis does not give one (before 7.0).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamInfo {
    /// The id of the newest entry ever added (`0-0` for none).
    pub last_generated_id: Option<String>,
    /// Entries ever added.
    pub entries_added: Option<u64>,
    /// Entries on it now.
    pub length: Option<u64>,
}

/// The stream's counters, or `None` when there is no such stream.
pub async fn info(conn: &mut (impl ConnectionLike + Send), stream: &str) -> Result<Option<StreamInfo>, RedisError> {
    let info = match redis::cmd("XINFO").arg("STREAM").arg(stream).query_async::<Value>(conn).await {
        Ok(info) => info,
        Err(e) if e.to_string().contains("no such key") => return Ok(None),
        Err(e) => return Err(e),
    };
    let count = |name| field(&info, name).and_then(|n| n.parse::<u64>().ok());
    Ok(Some(StreamInfo {
        last_generated_id: field(&info, "last-generated-id"),
        entries_added: count("entries-added"),
        length: count("length"),
    }))
}

/// A field of an `XINFO STREAM` reply (a map in RESP3, a flat array in RESP2), as text.
fn field(info: &Value, name: &str) -> Option<String> {
    match info {
        Value::Array(flat) => {
            flat.chunks(2).find(|kv| string(&kv[0]).as_deref() == Some(name)).and_then(|kv| kv.get(1).and_then(string))
        }
        Value::Map(map) => map.iter().find(|(k, _)| string(k).as_deref() == Some(name)).and_then(|(_, v)| string(v)),
        _ => None,
    }
}

/// A page of entries and the server's clock when it was read.
#[derive(Debug)]
pub struct TimedPage {
    pub entries: Vec<Entry>,
    /// The server's `TIME`, in ms since the epoch.
    pub now_ms: u64,
}

/// A page of a partition stream after the last entry read, and the server's clock, read in
/// one step: no entry can be added between the two.
const READ_AFTER: &str = "\
-- KEYS[1]: a partition stream; ARGV[1]: the last entry read; ARGV[2]: the most entries.
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
local now = redis.call('TIME')
return {entries, now[1], now[2]}
";

/// A partition stream's newest entries, newest first, and the server's clock, read in one step.
const READ_NEWEST: &str = "\
-- KEYS[1]: a partition stream; ARGV[1]: the most entries.
local entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[1])
local now = redis.call('TIME')
return {entries, now[1], now[2]}
";

/// Up to `count` entries after `after`, oldest first, with the server's clock (a read-only
/// script, which a replica may serve).
pub async fn timed_after(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    after: &str,
    count: usize,
) -> Result<TimedPage, RedisError> {
    let mut script = redis::cmd("EVAL_RO");
    script.arg(READ_AFTER).arg(1).arg(stream).arg(after).arg(count);
    timed(conn, &script).await
}

/// Up to `count` of the newest entries, newest first, with the server's clock.
pub async fn timed_newest(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    count: usize,
) -> Result<TimedPage, RedisError> {
    let mut script = redis::cmd("EVAL_RO");
    script.arg(READ_NEWEST).arg(1).arg(stream).arg(count);
    timed(conn, &script).await
}

/// Runs a script that answers entries and the server's `TIME` (seconds, microseconds).
async fn timed(conn: &mut (impl ConnectionLike + Send), script: &redis::Cmd) -> Result<TimedPage, RedisError> {
    let reply: Value = script.query_async(conn).await?;
    let Value::Array(mut parts) = reply else { return Err(unexpected("a timed page", &reply)) };
    let time = |v: Option<&Value>| v.and_then(string).and_then(|n| n.parse::<u64>().ok());
    let (Some(seconds), Some(micros)) = (time(parts.get(1)), time(parts.get(2))) else {
        return Err(unexpected("a timed page", &Value::Array(parts)));
    };
    let page = parts.swap_remove(0);
    Ok(TimedPage { entries: entries(page)?, now_ms: seconds.saturating_mul(1000).saturating_add(micros / 1000) })
}
