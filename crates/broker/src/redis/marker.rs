//! The relays' marker beside each stream (`<stream>:relay-epoch`, in the stream's cluster
//! slot): a random token set once per stream. Redis losing the stream's data loses the marker
//! with it, which is how a loss is noticed; the relay's recovery decides what follows.

use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::RedisError;

const MARKER_SUFFIX: &str = ":relay-epoch";

/// The marker's key on one node.
pub fn marker_key(stream: &str) -> String {
    domain::partition::companion_key(stream, MARKER_SUFFIX, false)
}

/// A stream and its marker, named to share a cluster slot (the scripts read both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamKeys {
    pub stream: String,
    pub marker: String,
}

impl StreamKeys {
    pub fn new(stream: &str, cluster: bool) -> Self {
        Self { stream: stream.to_owned(), marker: domain::partition::companion_key(stream, MARKER_SUFFIX, cluster) }
    }

    /// Every partition's keys.
    pub fn of_partitions(partitions: &domain::Partitions, cluster: bool) -> Vec<Self> {
        partitions.streams().iter().map(|s| Self::new(s, cluster)).collect()
    }
}

/// Sets the marker to `token` unless one is set: whether it was set.
pub async fn set_if_none(
    conn: &mut (impl ConnectionLike + Send),
    keys: &StreamKeys,
    token: &str,
) -> Result<bool, RedisError> {
    let set: Option<String> = redis::cmd("SET").arg(&keys.marker).arg(token).arg("NX").query_async(conn).await?;
    Ok(set.is_some())
}

/// The marker, if set.
pub async fn get(conn: &mut (impl ConnectionLike + Send), keys: &StreamKeys) -> Result<Option<String>, RedisError> {
    redis::cmd("GET").arg(&keys.marker).query_async(conn).await
}

/// Deletes the marker if it is still `token`; an error is ignored (the marker stays, as if
/// the release had not been tried).
pub async fn release(conn: &mut (impl ConnectionLike + Send), keys: &StreamKeys, token: &str) {
    const RELEASE: &str =
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";
    let _: Result<i64, RedisError> =
        redis::cmd("EVAL").arg(RELEASE).arg(1).arg(&keys.marker).arg(token).query_async(conn).await;
}

/// KEYS[1]: the stream; KEYS[2]: the marker. ARGV[1]: an entry id; ARGV[2]: how young (ms)
/// an entry must be for the trimming to have surely left it. Returns {marker or nil, verdict,
/// the newest entry before the given one or nil}; verdict: "old" (too old to judge), "held" or
/// "gone".
const LOOK_FOR: &str = r"
local marker = redis.call('GET', KEYS[2])
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if tonumber(string.match(ARGV[1], '^(%d+)')) <= now_ms - tonumber(ARGV[2]) then
  return {marker, 'old', false}
end
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) > 0 then return {marker, 'held', false} end
local before = redis.call('XREVRANGE', KEYS[1], ARGV[1], '-', 'COUNT', 1)
return {marker, 'gone', before[1] and before[1][1] or false}
";

/// What looking for an entry on its stream found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Looked {
    /// Too old to judge: the trimming may have taken it.
    Old,
    Held,
    /// Gone, with the newest entry still held before it, if any.
    Gone {
        before: Option<String>,
    },
}

/// Looks for entry `id` on `keys`' stream, judging only an entry younger than `young`; the
/// marker as seen at the same moment.
pub async fn look_for(
    conn: &mut (impl ConnectionLike + Send),
    keys: &StreamKeys,
    id: &str,
    young: Duration,
) -> Result<(Option<String>, Looked), RedisError> {
    let (marker, verdict, before): (Option<String>, String, Option<String>) = redis::cmd("EVAL")
        .arg(LOOK_FOR)
        .arg(2)
        .arg(&keys.stream)
        .arg(&keys.marker)
        .arg(id)
        .arg(u64::try_from(young.as_millis()).unwrap_or(u64::MAX))
        .query_async(conn)
        .await?;
    let looked = match verdict.as_str() {
        "gone" => Looked::Gone { before },
        "held" => Looked::Held,
        // "old", or anything else: nothing to judge by.
        _ => Looked::Old,
    };
    Ok((marker, looked))
}

/// The time part (ms) of an entry id.
pub fn id_ms(id: &str) -> Option<i64> {
    id.split('-').next()?.parse().ok()
}
