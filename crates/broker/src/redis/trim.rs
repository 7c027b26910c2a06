//! Keeping a stream to what its consumer groups still need: an entry goes once every group
//! is past it and it is older than the retention. One Lua script computes the cut and trims
//! below it, atomically, so any number of relays may run it; each call trims at most
//! [`TRIM_LIMIT`] entries in whole nodes, then at most [`EXACT_AT_MOST`] exactly, and a pass
//! makes at most [`CALLS_PER_PASS`] calls.

use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{RedisError, Value};
use service_kit::Shutdown;

use super::marker::StreamKeys;

/// Entries one script call may trim.
pub const TRIM_LIMIT: u64 = 10_000;
/// Entries below the cut that a call trims one by one (after the whole nodes).
pub const EXACT_AT_MOST: u64 = 200;
/// Script calls per pass; a backlog larger than this × [`TRIM_LIMIT`] takes several passes.
const CALLS_PER_PASS: u32 = 100;
/// Between two calls of a pass, so trimming never competes hard with publishing.
const PAUSE: Duration = Duration::from_millis(5);

/// KEYS[1]: the stream; KEYS[2]: the relays' marker (the relay's recovery). ARGV[1]: retention in ms; ARGV[2]: the most entries to trim in whole
/// nodes; ARGV[3]: the most to trim one by one. Returns {trimmed, cut or "", what set the cut,
/// 1 if entries below the cut remain, the time (ms of the id) below which every group has
/// acknowledged everything (-1 without groups), the marker's value ("" if none), then per group: name, pending, lag (-1
/// unknown)}.
const SCRIPT: &str = r#"
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function below(a_ms, a_seq, b_ms, b_seq)
  return a_ms < b_ms or (a_ms == b_ms and a_seq < b_seq)
end
local marker = redis.call('GET', KEYS[2]) or ''
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, '', 'no stream', 0, -1, marker} end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
local report = {0, '', '', 0, -1, marker}
if #groups == 0 then report[3] = 'no group'; return report end
local now = redis.call('TIME')
local cut_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[1])
local cut_seq = 0
local reason = 'retention'
local acked_ms = nil
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local ms, seq
  if tonumber(info['pending']) > 0 then
    ms, seq = parse(redis.call('XPENDING', KEYS[1], info['name'])[2])
  else
    ms, seq = parse(info['last-delivered-id'])
    seq = seq + 1
  end
  if acked_ms == nil or ms < acked_ms then acked_ms = ms end
  if below(ms, seq, cut_ms, cut_seq) then
    cut_ms, cut_seq, reason = ms, seq, 'group ' .. info['name']
  end
  table.insert(report, info['name'])
  table.insert(report, tonumber(info['pending']))
  table.insert(report, info['lag'] and tonumber(info['lag']) or -1)
end
report[3] = reason
report[5] = acked_ms
if cut_ms <= 0 then return report end
local cut = string.format('%.0f-%.0f', cut_ms, cut_seq)
report[2] = cut
local trimmed = redis.call('XTRIM', KEYS[1], 'MINID', '~', cut, 'LIMIT', ARGV[2])
local exact = tonumber(ARGV[3])
local left = redis.call('XRANGE', KEYS[1], '-', '(' .. cut, 'COUNT', exact + 1)
if #left > exact then
  report[4] = 1
elseif #left > 0 then
  trimmed = trimmed + redis.call('XTRIM', KEYS[1], 'MINID', '=', cut)
end
report[1] = trimmed
return report
"#;

/// A group of the stream, as the last call saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    /// Entries delivered to its consumers and not acknowledged.
    pub pending: u64,
    /// Entries not yet delivered to it; `None` when Redis cannot tell.
    pub lag: Option<u64>,
}

/// What one script call did and saw.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrimCall {
    pub trimmed: u64,
    /// The id below which entries went (or were already gone); `None`: nothing may go.
    pub cut: Option<String>,
    /// What set the cut: `retention`, `group <name>`, `no group`, `no stream`.
    pub bound_by: String,
    /// Entries below the cut remain (the call reached its limit).
    pub more: bool,
    /// Every group has acknowledged every entry with an id below this time (ms since the
    /// epoch, Redis's clock); `None` without groups.
    pub acked_below_ms: Option<i64>,
    /// The relays' marker as the call saw it (empty: none).
    pub marker: String,
    pub groups: Vec<Group>,
}

/// Runs the script once on `keys`' stream.
pub async fn trim_call(
    conn: &mut (impl ConnectionLike + Send),
    keys: &StreamKeys,
    retention: Duration,
    limit: u64,
) -> Result<TrimCall, RedisError> {
    let reply: Value = redis::cmd("EVAL")
        .arg(SCRIPT)
        .arg(2)
        .arg(&keys.stream)
        .arg(&keys.marker)
        .arg(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX))
        .arg(limit)
        .arg(EXACT_AT_MOST)
        .query_async(conn)
        .await?;
    parse_reply(reply)
        .ok_or_else(|| RedisError::from((redis::ErrorKind::TypeError, "unexpected reply of the trimming script")))
}

/// The stream's groups, trimming nothing (the script with a retention no entry is older than).
pub async fn groups(conn: &mut (impl ConnectionLike + Send), keys: &StreamKeys) -> Result<Vec<Group>, RedisError> {
    Ok(trim_call(conn, keys, Duration::MAX, 0).await?.groups)
}

fn parse_reply(reply: Value) -> Option<TrimCall> {
    let Value::Array(items) = reply else { return None };
    let mut items = items.into_iter();
    let trimmed = int(&items.next()?)?;
    let cut = text(&items.next()?)?;
    let bound_by = text(&items.next()?)?;
    let more = int(&items.next()?)? == 1;
    let acked_below_ms = Some(int(&items.next()?)?).filter(|ms| *ms >= 0);
    let marker = text(&items.next()?)?;
    let rest: Vec<Value> = items.collect();
    let groups = rest
        .chunks(3)
        .map(|g| match g {
            [name, pending, lag] => Some(Group {
                name: text(name)?,
                pending: u64::try_from(int(pending)?).ok()?,
                lag: u64::try_from(int(lag)?).ok(),
            }),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some(TrimCall {
        trimmed: u64::try_from(trimmed).ok()?,
        cut: (!cut.is_empty()).then_some(cut),
        bound_by,
        more,
        acked_below_ms,
        marker,
        groups,
    })
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// What a pass did: entries trimmed over its calls, and the last call's view.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrimPass {
    pub trimmed: u64,
    pub calls: u32,
    pub last: TrimCall,
}

/// Calls the script until no entry below the cut remains, [`CALLS_PER_PASS`] calls were made,
/// or shutdown.
pub async fn trim_pass(
    conn: &mut (impl ConnectionLike + Send),
    keys: &StreamKeys,
    retention: Duration,
    shutdown: &Shutdown,
) -> Result<TrimPass, RedisError> {
    let mut pass = TrimPass::default();
    loop {
        let call = trim_call(conn, keys, retention, TRIM_LIMIT).await?;
        pass.calls += 1;
        pass.trimmed += call.trimmed;
        // Nothing trimmed though entries remain below the cut (nodes larger than the exact
        // limit): the next pass tries again rather than this one spinning.
        let more = call.more && call.trimmed > 0;
        pass.last = call;
        if !more || pass.calls >= CALLS_PER_PASS {
            return Ok(pass);
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(pass),
            () = tokio::time::sleep(PAUSE) => {}
        }
    }
}

/// The stream's length (`XLEN`).
pub async fn length(conn: &mut (impl ConnectionLike + Send), stream: &str) -> Result<u64, RedisError> {
    redis::cmd("XLEN").arg(stream).query_async(conn).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_with_and_without_groups() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let none =
            Value::Array(vec![Value::Int(0), bulk(""), bulk("no group"), Value::Int(0), Value::Int(-1), bulk("m")]);
        let parsed = parse_reply(none).expect("parses");
        assert_eq!((parsed.cut, parsed.groups.len(), parsed.bound_by.as_str()), (None, 0, "no group"));
        assert_eq!(parsed.acked_below_ms, None);
        let two = Value::Array(vec![
            Value::Int(7),
            bulk("5-0"),
            bulk("group slow"),
            Value::Int(1),
            Value::Int(5),
            bulk("m"),
            bulk("fast"),
            Value::Int(0),
            Value::Int(0),
            bulk("slow"),
            Value::Int(3),
            Value::Int(-1),
        ]);
        let parsed = parse_reply(two).expect("parses");
        assert_eq!((parsed.trimmed, parsed.more, parsed.acked_below_ms), (7, true, Some(5)));
        assert_eq!(parsed.cut.as_deref(), Some("5-0"));
        assert_eq!(parsed.groups[1], Group { name: "slow".into(), pending: 3, lag: None });
        let odd = vec![Value::Int(0), bulk(""), bulk("x"), Value::Int(0), Value::Int(-1), bulk(""), bulk("g")];
        assert!(parse_reply(Value::Array(odd)).is_none());
    }
}
