//! Writing entries to the Redis streams: one pipeline of XADDs per batch (per partition's
//! shard on a cluster), and what a failure of it says: that Redis failed (every row waits,
//! none is to blame) or that Redis refused some entries for what they carry (those rows are
//! to blame).

use std::time::Duration;

use crate::redis::target::{RedisConn, RedisTarget, Timeouts};
use domain::{Partitions, StreamEntry};
use redis::aio::ConnectionLike;
use redis::{RedisError, Value};
use service_kit::failure::FailureClass;
use service_kit::messaging::MessagingPeer;

use super::tails::Tails;
use crate::publish::{PublishError, Refusal};

/// A writer of the Redis streams that reconnects after errors, so an outage never needs a
/// restart.
pub struct RedisPublisher {
    target: RedisTarget,
    partitions: Partitions,
    /// Redis and this relay, as its spans name them.
    peer: MessagingPeer,
    conn: Option<RedisConn>,
    /// Replicas that must confirm a batch (`WAIT`), and how long it may wait for them.
    durability: Option<(u32, Duration)>,
    /// Where it tells what it added, per partition (with its index among the relay's
    /// publishers).
    tails: Option<(Vec<Tails>, usize)>,
}

/// A publisher's connection: Redis answers each pipeline within 10 s or it failed.
const TIMEOUTS: Timeouts = Timeouts::new(Duration::from_secs(2), Duration::from_secs(10));

impl RedisPublisher {
    /// A publisher to the one stream `stream` on the node `redis_url`.
    pub fn new(redis_url: &str, stream: impl Into<String>) -> Result<Self, RedisError> {
        Ok(Self::to(RedisTarget::new(redis_url, &[])?, Partitions::single(stream)))
    }

    /// A publisher to `partitions` on `target`.
    pub fn to(target: RedisTarget, partitions: Partitions) -> Self {
        let peer = crate::redis::peer(&target, format!("relay-{}", service_kit::messaging::instance_name()));
        Self { target, partitions, peer, conn: None, durability: None, tails: None }
    }

    /// A batch counts as published only once `replicas` replicas hold it, confirmed within
    /// `timeout` (`WAIT`); 0 replicas: once the primary does.
    pub fn with_min_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.durability = (replicas > 0).then_some((replicas, timeout));
        self
    }

    /// Tells `tails` (one per partition, as publisher `index`) the newest entry it added on
    /// each connection.
    pub fn with_tails(mut self, tails: Vec<Tails>, index: usize) -> Self {
        self.tails = Some((tails, index));
        self
    }

    fn drop_connection(&mut self) {
        self.conn = None;
        if let Some((tails, index)) = &self.tails {
            for partition in tails {
                partition.connection_ended(*index);
            }
        }
    }

    pub fn partitions(&self) -> &Partitions {
        &self.partitions
    }

    /// The stream an entry of the order `aggregate_id` goes to.
    pub fn stream_of(&self, aggregate_id: &str) -> &str {
        self.partitions.stream_of(aggregate_id)
    }

    pub fn peer(&self) -> &MessagingPeer {
        &self.peer
    }

    async fn connection(&mut self) -> Result<&mut RedisConn, RedisError> {
        if self.conn.is_none() {
            self.conn = Some(self.target.connect(TIMEOUTS).await?);
        }
        match self.conn.as_mut() {
            Some(conn) => Ok(conn),
            None => unreachable!("the connection was just set"),
        }
    }

    /// XADDs every entry to its partition's stream, in order: in one round trip on one node,
    /// in one per partition (each to the shard holding it, all at once) on a cluster. The ids
    /// Redis gave them. On an error the whole batch counts as not published (entries before or
    /// around it may have been added: delivery is at least once). Each partition's replies are
    /// judged apart: a partition whose every entry was refused alike blames Redis (its
    /// stream), not its rows.
    pub async fn publish(&mut self, entries: &[StreamEntry]) -> Result<Vec<String>, PublishError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let partition_of: Vec<usize> = entries.iter().map(|e| self.partitions.of(&e.aggregate_id)).collect();
        let mut groups = vec![Vec::new(); self.partitions.count()];
        for (i, p) in partition_of.iter().enumerate() {
            groups[*p].push(i);
        }
        let conn = self.connection().await.map(|conn| conn.clone());
        let verdicts = match conn {
            Ok(conn) if self.target.is_cluster() => self.send_per_partition(conn, entries, &groups).await,
            Ok(conn) => self.send_at_once(conn, entries, &groups).await,
            Err(e) => Err(e),
        };
        let verdicts = match verdicts {
            Ok(verdicts) => verdicts,
            Err(e) => {
                tracing::debug!(stream = self.partitions.base(), error = %e,
                    "redis pipeline failed; reconnecting on next use");
                self.drop_connection();
                return Err(PublishError::Broker { class: crate::redis::of_redis(&e), error: e.to_string() });
            }
        };
        let judged = merge(groups.iter().zip(verdicts), entries.len());
        if let (Ok(ids), Some((tails, index))) = (&judged, &self.tails) {
            // The newest id per partition: entries of one partition went in order.
            for (p, group) in groups.iter().enumerate() {
                if let Some(last) = group.last() {
                    tails[p].added(*index, &ids[*last]);
                }
            }
        }
        judged
    }

    /// One node: every entry in one pipeline (and one `WAIT`); each partition's replies judged.
    async fn send_at_once(
        &self,
        mut conn: RedisConn,
        entries: &[StreamEntry],
        groups: &[Vec<usize>],
    ) -> Result<Vec<Result<Vec<String>, PublishError>>, RedisError> {
        let all: Vec<usize> = (0..entries.len()).collect();
        let (pipe, expected) = self.pipeline(entries, &all);
        // Each command's own reply, errors included, rather than the pipeline's first error.
        let mut replies = conn.req_packed_commands(&pipe, 0, expected).await?;
        if replies.len() != expected {
            let error = format!("{} replies to a pipeline of {expected} commands", replies.len());
            return Ok(vec![Err(PublishError::Broker { class: FailureClass::bug, error })]);
        }
        let confirmed = match self.durability {
            Some((replicas, _)) => confirmed_by(replies.pop(), replicas),
            None => Ok(()),
        };
        Ok(groups
            .iter()
            .map(|group| {
                let of_group = group.iter().map(|i| std::mem::replace(&mut replies[*i], Value::Nil)).collect();
                judge(of_group, group.len()).and_then(|ids| confirmed.clone().map(|()| ids))
            })
            .collect())
    }

    /// A cluster: a pipeline per partition, to the shard holding it, each with its own
    /// `WAIT`, all at once. The cluster client fails a whole pipeline on any error reply, so a
    /// partition refused for what its entries carry is sent again entry by entry, to find them.
    async fn send_per_partition(
        &self,
        conn: RedisConn,
        entries: &[StreamEntry],
        groups: &[Vec<usize>],
    ) -> Result<Vec<Result<Vec<String>, PublishError>>, RedisError> {
        let sends = groups.iter().map(|group| {
            let mut conn = conn.clone();
            async move {
                if group.is_empty() {
                    return Ok(Ok(Vec::new()));
                }
                let (pipe, expected) = self.pipeline(entries, group);
                match conn.req_packed_commands(&pipe, 0, expected).await {
                    Ok(replies) => Ok(self.judge_group(replies, group.len())),
                    Err(e) if refused_for_content(&e) => self.send_one_by_one(&mut conn, entries, group).await,
                    Err(e) => Err(e),
                }
            }
        });
        futures::future::join_all(sends).await.into_iter().collect()
    }

    /// The entries at `indices` sent one pipeline each: the ids, or the refused ones (by index
    /// into `indices`; all refused: Redis is to blame).
    async fn send_one_by_one(
        &self,
        conn: &mut RedisConn,
        entries: &[StreamEntry],
        indices: &[usize],
    ) -> Result<Result<Vec<String>, PublishError>, RedisError> {
        let mut ids = Vec::with_capacity(indices.len());
        let mut refused = Vec::new();
        for (index, i) in indices.iter().enumerate() {
            let (pipe, expected) = self.pipeline(entries, &[*i]);
            match conn.req_packed_commands(&pipe, 0, expected).await {
                Ok(replies) => match self.judge_group(replies, 1) {
                    Ok(mut id) => ids.append(&mut id),
                    Err(e) => return Ok(Err(e)),
                },
                Err(e) if refused_for_content(&e) => {
                    refused.push(Refusal { index, class: crate::redis::of_redis(&e), error: e.to_string() });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(match refused.len() {
            0 => Ok(ids),
            n if n == indices.len() => {
                let Refusal { class, error, .. } = refused.swap_remove(0);
                Err(PublishError::Broker { class, error })
            }
            _ => Err(PublishError::Refused(refused)),
        })
    }

    /// The pipeline of the entries at `indices` (with `WAIT` when replicas must confirm), and
    /// the replies it gets.
    fn pipeline(&self, entries: &[StreamEntry], indices: &[usize]) -> (redis::Pipeline, usize) {
        let mut pipe = redis::pipe();
        for entry in indices.iter().map(|i| &entries[*i]) {
            let cmd = pipe.cmd("XADD").arg(self.partitions.stream_of(&entry.aggregate_id)).arg("*");
            for (field, value) in entry.to_fields() {
                cmd.arg(field).arg(value);
            }
        }
        if let Some((replicas, timeout)) = self.durability {
            // In the same round trip: the replicas that hold every write before it.
            let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1);
            pipe.cmd("WAIT").arg(replicas).arg(ms);
        }
        (pipe, indices.len() + usize::from(self.durability.is_some()))
    }

    /// One pipeline's replies, judged: the ids, or whom its errors blame.
    fn judge_group(&self, mut replies: Vec<Value>, entries: usize) -> Result<Vec<String>, PublishError> {
        let confirmation = self.durability.map(|(replicas, _)| (replies.pop(), replicas));
        match (judge(replies, entries), confirmation) {
            // Taken by the primary, and by enough replicas?
            (Ok(ids), Some((reply, replicas))) => confirmed_by(reply, replicas).map(|()| ids),
            (judged, _) => judged,
        }
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
}

/// The judged pipelines of one batch (each with the batch indices of its entries) as one
/// verdict: Redis's failure if any pipeline's was, else every refused entry, else the ids in
/// the batch's order.
fn merge<'a>(
    judged: impl Iterator<Item = (&'a Vec<usize>, Result<Vec<String>, PublishError>)>,
    entries: usize,
) -> Result<Vec<String>, PublishError> {
    let mut ids = vec![String::new(); entries];
    let mut refused = Vec::new();
    for (indices, verdict) in judged {
        match verdict {
            Ok(group_ids) => {
                for (i, id) in indices.iter().zip(group_ids) {
                    ids[*i] = id;
                }
            }
            Err(PublishError::Refused(group_refused)) => {
                refused.extend(group_refused.into_iter().map(|r| Refusal { index: indices[r.index], ..r }));
            }
            Err(broker) => return Err(broker),
        }
    }
    if refused.is_empty() {
        Ok(ids)
    } else {
        refused.sort_by_key(|r| r.index);
        Err(PublishError::Refused(refused))
    }
}

/// Whether an error is Redis's reply refusing a command for what it carries (not a transport
/// error, a redirection or a transient state such as OOM or a failover in progress).
fn refused_for_content(e: &RedisError) -> bool {
    e.code().is_some() && !crate::redis::of_redis(e).is_transient() && e.kind() != ::redis::ErrorKind::CrossSlot
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
            class: crate::redis::of_redis_code(e.code()),
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
                let class = crate::redis::of_redis_code(e.code());
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
    fn per_shard_verdicts_merge_into_the_batch_s_order() {
        let (a, b) = (vec![0, 2], vec![1, 3]);
        let ok = |ids: &[&str]| Ok(ids.iter().map(|s| (*s).to_owned()).collect());
        let merged = merge([(&a, ok(&["1-1", "1-2"])), (&b, ok(&["9-1", "9-2"]))].into_iter(), 4);
        assert_eq!(merged, Ok(vec!["1-1".into(), "9-1".into(), "1-2".into(), "9-2".into()]));
        let refusal = Refusal { index: 1, class: FailureClass::permanent, error: "ERR value too large".into() };
        let merged = merge([(&a, ok(&["1-1", "1-2"])), (&b, Err(PublishError::Refused(vec![refusal])))].into_iter(), 4);
        let Err(PublishError::Refused(refused)) = merged else { panic!("{merged:?}") };
        assert_eq!(refused.iter().map(|r| r.index).collect::<Vec<_>>(), [3], "the batch's index, not the shard's");
        let down = PublishError::Broker { class: FailureClass::transient, error: "down".into() };
        let merged = merge([(&a, ok(&["1-1", "1-2"])), (&b, Err(down.clone()))].into_iter(), 4);
        assert_eq!(merged, Err(down), "one shard down fails the whole batch");
    }

    #[test]
    fn a_short_reply_is_a_bug_of_the_broker_side() {
        assert!(matches!(judge(vec![id(1)], 2), Err(PublishError::Broker { class: FailureClass::bug, .. })));
    }
}
