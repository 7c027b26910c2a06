//! Writing entries to the Redis stream: one pipeline of XADDs per batch, and what a failure of
//! it says: that Redis failed (every row waits, none is to blame) or that Redis refused some
//! entries for what they carry (those rows are to blame).

use std::time::Duration;

use domain::StreamEntry;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError, Value};
use service_kit::failure::{self, FailureClass};
use service_kit::messaging::MessagingPeer;

use crate::tails::Tails;

/// A Redis stream writer that reconnects after errors, so an outage never needs a restart.
pub struct Publisher {
    client: Client,
    stream: String,
    /// Redis and this relay, as its spans name them.
    peer: MessagingPeer,
    conn: Option<MultiplexedConnection>,
    /// Replicas that must confirm a batch (`WAIT`), and how long it may wait for them.
    durability: Option<(u32, Duration)>,
    /// Where it tells what it added (with its index among the relay's publishers).
    tails: Option<(Tails, usize)>,
}

/// Why a batch was not published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishError {
    /// Redis failed as a whole (down, out of memory, read-only, the stream key of another
    /// type …): no entry is to blame, and none may count it as a failed attempt.
    Broker { class: FailureClass, error: String },
    /// Redis took some entries and refused these (by index into the batch) for what they carry.
    Refused(Vec<Refusal>),
}

/// One entry Redis refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub index: usize,
    pub class: FailureClass,
    pub error: String,
}

impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Broker { error, .. } => write!(f, "redis: {error}"),
            Self::Refused(refused) => write!(f, "redis refused {} entries", refused.len()),
        }
    }
}

impl std::error::Error for PublishError {}

impl Publisher {
    pub fn new(redis_url: &str, stream: impl Into<String>) -> Result<Self, RedisError> {
        let client = Client::open(redis_url)?;
        let peer = MessagingPeer::redis(&client, format!("relay-{}", service_kit::messaging::instance_name()));
        Ok(Self { client, stream: stream.into(), peer, conn: None, durability: None, tails: None })
    }

    /// A batch counts as published only once `replicas` replicas hold it, confirmed within
    /// `timeout` (`WAIT`); 0 replicas: once the primary does.
    pub fn with_min_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.durability = (replicas > 0).then_some((replicas, timeout));
        self
    }

    /// Tells `tails` (as publisher `index`) the newest entry it added on each connection.
    pub fn with_tails(mut self, tails: Tails, index: usize) -> Self {
        self.tails = Some((tails, index));
        self
    }

    fn drop_connection(&mut self) {
        self.conn = None;
        if let Some((tails, index)) = &self.tails {
            tails.connection_ended(*index);
        }
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    pub fn peer(&self) -> &MessagingPeer {
        &self.peer
    }

    async fn connection(&mut self) -> Result<&mut MultiplexedConnection, RedisError> {
        if self.conn.is_none() {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Duration::from_secs(2))
                .set_response_timeout(Duration::from_secs(10));
            self.conn = Some(self.client.get_multiplexed_async_connection_with_config(&config).await?);
        }
        match self.conn.as_mut() {
            Some(conn) => Ok(conn),
            None => unreachable!("the connection was just set"),
        }
    }

    /// XADDs every entry, in order, in one round trip; the ids Redis gave them. On an error the
    /// whole batch counts as not published (entries before or around it may have been added:
    /// delivery is at least once).
    pub async fn publish(&mut self, entries: &[StreamEntry]) -> Result<Vec<String>, PublishError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for entry in entries {
            let cmd = pipe.cmd("XADD").arg(&self.stream).arg("*");
            for (field, value) in entry.to_fields() {
                cmd.arg(field).arg(value);
            }
        }
        if let Some((replicas, timeout)) = self.durability {
            // In the same round trip: the replicas that hold every write before it.
            let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1);
            pipe.cmd("WAIT").arg(replicas).arg(ms);
        }
        let expected = entries.len() + usize::from(self.durability.is_some());
        let replies = match self.connection().await {
            // Each command's own reply, errors included, rather than the pipeline's first error.
            Ok(conn) => conn.send_packed_commands(&pipe, 0, expected).await,
            Err(e) => Err(e),
        };
        let replies = match replies {
            Ok(replies) => replies,
            Err(e) => {
                tracing::debug!(stream = self.stream, error = %e, "redis pipeline failed; reconnecting on next use");
                self.drop_connection();
                return Err(PublishError::Broker { class: failure::of_redis(&e), error: e.to_string() });
            }
        };
        let mut replies = replies;
        let confirmation = self.durability.map(|(replicas, _)| (replies.pop(), replicas));
        let judged = match (judge(replies, entries.len()), confirmation) {
            // Taken by the primary, and by enough replicas?
            (Ok(ids), Some((reply, replicas))) => confirmed_by(reply, replicas).map(|()| ids),
            (judged, _) => judged,
        };
        if let (Ok(ids), Some((tails, index))) = (&judged, &self.tails) {
            if let Some(newest) = ids.last() {
                tails.added(*index, newest);
            }
        }
        judged
    }

    /// Whether Redis answers on this publisher's connection (reconnecting if needed).
    pub async fn ping(&mut self) -> Result<(), RedisError> {
        let conn = self.connection().await?;
        let pinged = redis::cmd("PING").query_async::<()>(conn).await;
        if pinged.is_err() {
            self.drop_connection();
        }
        pinged
    }

    /// Whether Redis answers (for /readyz).
    pub async fn ping_client(client: &Client) -> Result<(), RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(Duration::from_secs(1));
        let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
        redis::cmd("PING").query_async::<()>(&mut conn).await
    }
}

/// Whether `WAIT`'s reply says `replicas` replicas hold the batch. Fewer: Redis did not make
/// it durable in time, which no entry is to blame for (the batch goes back, attempts untouched).
fn confirmed_by(reply: Option<Value>, replicas: u32) -> Result<(), PublishError> {
    match reply {
        Some(Value::Int(n)) if n >= i64::from(replicas) => Ok(()),
        Some(Value::Int(n)) => Err(PublishError::Broker {
            class: FailureClass::transient,
            error: format!("WAIT: {n} of the {replicas} replicas required confirmed the batch in time"),
        }),
        Some(Value::ServerError(e)) => Err(PublishError::Broker {
            class: failure::of_redis_code(e.code()),
            error: format!("WAIT: {} {}", e.code(), e.details().unwrap_or_default()),
        }),
        other => {
            Err(PublishError::Broker { class: FailureClass::bug, error: format!("unexpected WAIT reply {other:?}") })
        }
    }
}

/// The ids of a pipeline's replies, or whom its errors blame: Redis itself when an error is
/// transient (it says nothing of the entry) or when every entry failed alike (the stream, the
/// server or its configuration is at fault), else the refused entries.
pub fn judge(replies: Vec<Value>, expected: usize) -> Result<Vec<String>, PublishError> {
    if replies.len() != expected {
        let error = format!("{} replies to a pipeline of {expected} XADDs", replies.len());
        return Err(PublishError::Broker { class: FailureClass::bug, error });
    }
    let mut ids = Vec::with_capacity(expected);
    let mut refused = Vec::new();
    for (index, reply) in replies.into_iter().enumerate() {
        match reply {
            Value::BulkString(id) => ids.push(String::from_utf8_lossy(&id).into_owned()),
            Value::SimpleString(id) => ids.push(id),
            Value::ServerError(e) => {
                let class = failure::of_redis_code(e.code());
                let error = format!("{} {}", e.code(), e.details().unwrap_or_default());
                if class.is_transient() {
                    return Err(PublishError::Broker { class, error });
                }
                refused.push(Refusal { index, class, error });
            }
            other => {
                let error = format!("unexpected XADD reply {other:?}");
                return Err(PublishError::Broker { class: FailureClass::bug, error });
            }
        }
    }
    match refused.len() {
        0 => Ok(ids),
        n if n == expected => {
            let Refusal { class, error, .. } = refused.swap_remove(0);
            Err(PublishError::Broker { class, error })
        }
        _ => Err(PublishError::Refused(refused)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> Value {
        Value::BulkString(format!("1-{n}").into_bytes())
    }

    #[test]
    fn a_batch_fewer_replicas_confirmed_goes_back_as_redis_s_failure_not_the_entries() {
        assert_eq!(confirmed_by(Some(Value::Int(2)), 2), Ok(()));
        assert_eq!(confirmed_by(Some(Value::Int(3)), 2), Ok(()));
        assert!(matches!(
            confirmed_by(Some(Value::Int(1)), 2),
            Err(PublishError::Broker { class: FailureClass::transient, .. })
        ));
        assert!(matches!(
            confirmed_by(Some(error_reply("NOPERM this user has no permissions to run the 'wait' command")), 1),
            Err(PublishError::Broker { .. })
        ));
        assert!(matches!(confirmed_by(None, 1), Err(PublishError::Broker { class: FailureClass::bug, .. })));
    }

    /// A reply as Redis sends it, e.g. `-OOM command not allowed`.
    fn error_reply(line: &str) -> Value {
        redis::parse_redis_value(format!("-{line}\r\n").as_bytes()).expect("an error reply")
    }

    #[test]
    fn ids_when_every_entry_was_added() {
        assert_eq!(judge(vec![id(1), id(2)], 2), Ok(vec!["1-1".to_owned(), "1-2".to_owned()]));
    }

    #[test]
    fn a_transient_error_anywhere_blames_redis() {
        let judged =
            judge(vec![id(1), error_reply("OOM command not allowed when used memory > 'maxmemory'."), id(3)], 3);
        assert!(matches!(judged, Err(PublishError::Broker { class: FailureClass::transient, .. })), "{judged:?}");
        let loading = error_reply("LOADING Redis is loading the dataset in memory");
        assert!(matches!(judge(vec![loading], 1), Err(PublishError::Broker { class: FailureClass::transient, .. })));
    }

    #[test]
    fn the_same_refusal_of_every_entry_blames_redis_not_the_rows() {
        let wrong_type = || error_reply("WRONGTYPE Operation against a key holding the wrong kind of value");
        let judged = judge(vec![wrong_type(), wrong_type()], 2);
        assert!(matches!(judged, Err(PublishError::Broker { class: FailureClass::permanent, .. })), "{judged:?}");
    }

    #[test]
    fn refusals_among_successes_blame_those_entries() {
        let judged = judge(vec![id(1), error_reply("ERR value too large"), id(3), error_reply("NEWCODE what")], 4);
        let Err(PublishError::Refused(refused)) = judged else { panic!("{judged:?}") };
        let blamed: Vec<(usize, FailureClass)> = refused.iter().map(|r| (r.index, r.class)).collect();
        assert_eq!(blamed, [(1, FailureClass::permanent), (3, FailureClass::bug)]);
        assert!(refused[0].error.starts_with("ERR value too large"), "{:?}", refused[0]);
    }

    #[test]
    fn a_short_reply_is_a_bug_of_the_broker_side() {
        assert!(matches!(judge(vec![id(1)], 2), Err(PublishError::Broker { class: FailureClass::bug, .. })));
    }
}
