//! A consumer group on a Redis stream: reads, claims, delivery counts, acknowledgements, the
//! dead letters' stream, and removing a group.
//!
//! Replies are parsed from raw values so an entry's fields keep their order and repeats (the
//! decoder rejects a repeated field) and an entry deleted while pending (nil fields) is seen.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{RedisError, Value};

use crate::Delivery;

/// Creates the group (and the stream) unless it exists.
pub async fn ensure_group(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    group: &str,
) -> Result<(), RedisError> {
    let created: Result<Value, RedisError> =
        redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(group).arg("0").arg("MKSTREAM").query_async(conn).await;
    match created {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(e),
    }
}

/// XREADGROUP from `id` (`0`: this consumer's pending entries; `>`: new ones).
pub async fn read_group(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    group: &str,
    consumer: &str,
    id: &str,
    count: u32,
    block: Option<Duration>,
) -> Result<Vec<Delivery>, RedisError> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP").arg(group).arg(consumer).arg("COUNT").arg(count);
    if let Some(block) = block {
        cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
    }
    cmd.arg("STREAMS").arg(stream).arg(id);
    let reply: Value = cmd.query_async(conn).await?;
    let mut out = Vec::new();
    for entries in per_stream("XREADGROUP", reply)? {
        out.extend(parse_entries(entries)?);
    }
    Ok(out)
}

/// The entries of each stream of an `XREAD` or `XREADGROUP` reply (nil: none; an array of
/// `[name, entries]` in RESP2, a map in RESP3).
pub(crate) fn per_stream(command: &str, reply: Value) -> Result<Vec<Value>, RedisError> {
    match reply {
        Value::Nil => Ok(Vec::new()),
        Value::Array(streams) => Ok(streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => kv.pop(),
                _ => None,
            })
            .collect()),
        Value::Map(streams) => Ok(streams.into_iter().map(|(_, v)| v).collect()),
        other => Err(unexpected(command, &other)),
    }
}

/// One XAUTOCLAIM step: entries idle for `min_idle`, from `cursor`.
pub struct Claimed {
    /// Where the next step starts; `0-0` when the scan is complete.
    pub next: String,
    pub entries: Vec<Delivery>,
    /// Pending entries no longer on the stream: Redis dropped them from the pending list.
    pub deleted: Vec<String>,
}

/// One XAUTOCLAIM step: entries idle for `min_idle`, from `cursor`, taken over by `consumer`.
pub async fn autoclaim(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    group: &str,
    consumer: &str,
    min_idle: Duration,
    cursor: &str,
    count: u32,
) -> Result<Claimed, RedisError> {
    let reply: Value = redis::cmd("XAUTOCLAIM")
        .arg(stream)
        .arg(group)
        .arg(consumer)
        .arg(min_idle.as_millis() as u64)
        .arg(cursor)
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await?;
    let Value::Array(mut parts) = reply else { return Err(unexpected("XAUTOCLAIM", &reply)) };
    if parts.len() < 2 {
        return Err(unexpected("XAUTOCLAIM", &Value::Array(parts)));
    }
    let deleted = match parts.get(2) {
        Some(Value::Array(ids)) => ids.iter().filter_map(string).collect(),
        _ => Vec::new(),
    };
    let entries = parts.remove(1);
    let next = string(&parts[0]).ok_or_else(|| unexpected("XAUTOCLAIM cursor", &parts[0]))?;
    Ok(Claimed { next, entries: parse_entries(entries)?, deleted })
}

/// Removes, atomically, each consumer of the group other than `keep` that has nothing pending
/// and has been idle longer than `idle` (one that left: a replica replaced under another
/// name). A consumer that reads again is simply created again. Returns the names removed.
pub async fn remove_departed(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    group: &str,
    keep: &str,
    idle: Duration,
) -> Result<Vec<String>, RedisError> {
    const SCRIPT: &str = r#"
local removed = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if tonumber(info['pending']) == 0 and tonumber(info['idle']) > tonumber(ARGV[2]) and info['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    table.insert(removed, info['name'])
  end
end
return removed
"#;
    redis::cmd("EVAL")
        .arg(SCRIPT)
        .arg(1)
        .arg(stream)
        .arg(group)
        .arg(u64::try_from(idle.as_millis()).unwrap_or(u64::MAX))
        .arg(keep)
        .query_async(conn)
        .await
}

/// Delivery counts of this consumer's pending entries with ids in `[min, max]`.
pub async fn delivery_counts(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    group: &str,
    consumer: &str,
    (min, max): (&str, &str),
    count: usize,
) -> Result<HashMap<String, u64>, RedisError> {
    let reply: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg(min)
        .arg(max)
        .arg(count)
        .arg(consumer)
        .query_async(conn)
        .await?;
    let Value::Array(rows) = reply else { return Err(unexpected("XPENDING", &reply)) };
    let mut out = HashMap::with_capacity(rows.len());
    for row in rows {
        // [id, consumer, idle ms, deliveries]
        if let Value::Array(cols) = &row {
            if let (Some(id), Some(Value::Int(n))) = (cols.first().and_then(string), cols.get(3)) {
                out.insert(id, (*n).max(0) as u64);
                continue;
            }
        }
        return Err(unexpected("XPENDING row", &row));
    }
    Ok(out)
}

/// This consumer's pending entries (XPENDING summary form).
pub async fn pending_count(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    group: &str,
    consumer: &str,
) -> Result<u64, RedisError> {
    let reply: Value = redis::cmd("XPENDING").arg(stream).arg(group).query_async(conn).await?;
    let Value::Array(parts) = reply else { return Err(unexpected("XPENDING", &reply)) };
    let Some(Value::Array(consumers)) = parts.get(3) else { return Ok(0) };
    for c in consumers {
        if let Value::Array(pair) = c {
            if pair.first().and_then(string).as_deref() == Some(consumer) {
                return Ok(pair.get(1).and_then(string).and_then(|n| n.parse().ok()).unwrap_or(0));
            }
        }
    }
    Ok(0)
}

pub async fn ack(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    group: &str,
    ids: &[&str],
) -> Result<(), RedisError> {
    if ids.is_empty() {
        return Ok(());
    }
    redis::cmd("XACK").arg(stream).arg(group).arg(ids).query_async::<Value>(conn).await.map(|_| ())
}

/// XADD with an automatic id; returns the new id.
pub async fn add(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    fields: &[(String, Vec<u8>)],
) -> Result<String, RedisError> {
    xadd(conn, stream, None, fields).await
}

/// [`add`] to a stream no consumer group depends on, kept to about `max_len` entries
/// (`MAXLEN ~`: whole nodes go, the oldest first).
pub async fn add_capped(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    max_len: u64,
    fields: &[(String, Vec<u8>)],
) -> Result<String, RedisError> {
    xadd(conn, stream, Some(max_len), fields).await
}

async fn xadd(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    max_len: Option<u64>,
    fields: &[(String, Vec<u8>)],
) -> Result<String, RedisError> {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream);
    if let Some(max_len) = max_len {
        cmd.arg("MAXLEN").arg("~").arg(max_len);
    }
    cmd.arg("*");
    for (k, v) in fields {
        cmd.arg(k).arg(v);
    }
    cmd.query_async(conn).await
}

/// The fields of entry `id`, if it is still on the stream.
pub async fn entry(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    id: &str,
) -> Result<Option<Vec<(String, Vec<u8>)>>, RedisError> {
    let reply: Value = redis::cmd("XRANGE").arg(stream).arg(id).arg(id).query_async(conn).await?;
    Ok(parse_entries(reply)?.into_iter().next().and_then(|d| d.fields))
}

pub(crate) fn parse_entries(entries: Value) -> Result<Vec<Delivery>, RedisError> {
    let Value::Array(entries) = entries else {
        return if matches!(entries, Value::Nil) { Ok(Vec::new()) } else { Err(unexpected("entries", &entries)) };
    };
    entries.into_iter().map(parse_entry).collect()
}

fn parse_entry(entry: Value) -> Result<Delivery, RedisError> {
    let Value::Array(mut parts) = entry else { return Err(unexpected("entry", &entry)) };
    if parts.len() != 2 {
        return Err(unexpected("entry", &Value::Array(parts)));
    }
    let fields = parts.pop().unwrap_or(Value::Nil);
    let id = string(&parts[0]).ok_or_else(|| unexpected("entry id", &parts[0]))?;
    let fields = match fields {
        Value::Nil => None,
        Value::Array(flat) => {
            let mut pairs = Vec::with_capacity(flat.len() / 2);
            let mut it = flat.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                let key = string(&k).ok_or_else(|| unexpected("field name", &k))?;
                pairs.push((key, bytes(v)));
            }
            Some(pairs)
        }
        Value::Map(map) => {
            let mut pairs = Vec::with_capacity(map.len());
            for (k, v) in map {
                let key = string(&k).ok_or_else(|| unexpected("field name", &k))?;
                pairs.push((key, bytes(v)));
            }
            Some(pairs)
        }
        other => return Err(unexpected("entry fields", &other)),
    };
    Ok(Delivery { id, fields })
}

pub(crate) fn string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn bytes(v: Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        Value::Int(n) => n.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

pub(crate) fn unexpected(what: &str, v: &Value) -> RedisError {
    RedisError::from((redis::ErrorKind::TypeError, "unexpected reply", format!("{what}: {v:?}")))
}

/// The group's last delivered id (XINFO GROUPS).
pub async fn last_delivered_id(
    conn: &mut (impl ConnectionLike + Send),
    key: &str,
    group: &str,
) -> Result<Option<String>, RedisError> {
    let reply: Value = redis::cmd("XINFO").arg("GROUPS").arg(key).query_async(conn).await?;
    let Value::Array(groups) = reply else { return Ok(None) };
    for g in groups {
        let pairs: Vec<(String, Value)> = match g {
            Value::Array(flat) => {
                let mut it = flat.into_iter();
                std::iter::from_fn(|| Some((string(&it.next()?)?, it.next()?))).collect()
            }
            Value::Map(map) => map.into_iter().filter_map(|(k, v)| Some((string(&k)?, v))).collect(),
            _ => continue,
        };
        if pairs.iter().any(|(k, v)| k == "name" && string(v).as_deref() == Some(group)) {
            return Ok(pairs.iter().find(|(k, _)| k == "last-delivered-id").and_then(|(_, v)| string(v)));
        }
    }
    Ok(None)
}

/// Removes `group` from `stream`: whether it was there (a stream nothing was published to yet
/// has no group).
pub async fn destroy(conn: &mut (impl ConnectionLike + Send), stream: &str, group: &str) -> Result<bool, RedisError> {
    let exists: bool = redis::cmd("EXISTS").arg(stream).query_async(conn).await?;
    if !exists {
        return Ok(false);
    }
    let removed: u64 = redis::cmd("XGROUP").arg("DESTROY").arg(stream).arg(group).query_async(conn).await?;
    Ok(removed > 0)
}

/// The id of the stream's first entry, if any.
pub async fn first_id(conn: &mut (impl ConnectionLike + Send), key: &str) -> Result<Option<String>, RedisError> {
    let reply: Value = redis::cmd("XRANGE").arg(key).arg("-").arg("+").arg("COUNT").arg(1).query_async(conn).await?;
    Ok(match reply {
        Value::Array(entries) => entries.into_iter().next().and_then(|e| match e {
            Value::Array(mut parts) if !parts.is_empty() => match parts.swap_remove(0) {
                Value::BulkString(b) => String::from_utf8(b).ok(),
                _ => None,
            },
            _ => None,
        }),
        _ => None,
    })
}

/// Whether entry `id` is pending in `group` (delivered and not acknowledged).
pub async fn is_pending(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    group: &str,
    id: &str,
) -> Result<bool, RedisError> {
    let pending: Value = redis::cmd("XPENDING").arg(stream).arg(group).arg(id).arg(id).arg(1).query_async(conn).await?;
    Ok(matches!(&pending, Value::Array(rows) if !rows.is_empty()))
}
