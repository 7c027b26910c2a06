//! A member of a consumer group on one partition, on either broker: what the consumer reads,
//! dead-letters and acknowledges through, without knowing which broker it is.
//!
//! The loop is the same on both: [`Member::next`] hands over a batch (entries delivered
//! before first: this member's own after a restart, and those it takes over from a member
//! idle for `CLAIM_MIN_IDLE`; then new ones, waiting up to `BLOCK`), the consumer applies it
//! inside [`Member::alongside`] (which renews the batch's claim on JetStream, and reads ahead
//! on Redis), then
//! [`Member::settle`]s it: dead letters to the broker's dead-letter stream, then the
//! acknowledgements. An entry neither acknowledged nor dead-lettered stays pending, and comes
//! back. What differs is how each broker does it:
//!
//! | | Redis Streams ([`crate::redis::member`]) | NATS JetStream ([`crate::jetstream::member`]) |
//! |---|---|---|
//! | read | `XREADGROUP` | a pull from the group's durable consumer |
//! | own entries after a restart | `XREADGROUP … 0` | redelivered after `AckWait` |
//! | another member's, idle | `XAUTOCLAIM` after `CLAIM_MIN_IDLE` | redelivered after `AckWait` = `CLAIM_MIN_IDLE` |
//! | a batch applied for longer than `CLAIM_MIN_IDLE` | may be claimed by another member (applied once anyway: dedupe) | kept: progress acks renew `AckWait` |
//! | delivery counts | `XPENDING` | the message's own |
//! | dead letters | `XADD <stream>.dlq MAXLEN ~` | a message on `<stream>.dlq` |
//! | acknowledge | `XACK` | an ack per message |

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use service_kit::FailureClass;

use crate::{jetstream, redis, Delivery, Kind};

/// What a member needs to know of its group.
#[derive(Debug, Clone)]
pub struct MemberSettings {
    /// `CONSUMER_GROUP`.
    pub group: String,
    /// `CONSUMER_NAME`: this member among the group's.
    pub consumer: String,
    /// Entries one batch holds at most (`BATCH_SIZE`).
    pub batch_size: u32,
    /// How long a read waits for new entries (`BLOCK`).
    pub block: Duration,
    /// `CLAIM_MIN_IDLE`: an entry unacknowledged this long goes to another member.
    pub claim_min_idle: Duration,
    /// A member gone this long with nothing pending leaves the group (`CONSUMER_DEPARTED_AFTER`;
    /// JetStream keeps no members).
    pub departed_after: Duration,
    /// About how many dead letters the dead-letter stream keeps (`REDIS_DLQ_MAX_LEN`).
    pub dlq_max_len: u64,
}

/// A batch as a member hands it over.
#[derive(Debug, Default)]
pub struct Received {
    pub deliveries: Vec<Delivery>,
    /// The entries may have been delivered before (to this member or another).
    pub redelivered: bool,
    /// How often each of them was delivered, for a batch redelivered (empty otherwise).
    pub delivery_counts: HashMap<String, u64>,
}

/// Something a member noticed while reading, for the consumer to count and log.
#[derive(Debug)]
pub enum Note {
    /// Members that left the group (nothing pending, idle past `departed_after`) were removed.
    Departed(Vec<String>),
    /// Entries pending in the group were no longer on the stream (deleted, trimmed), and the
    /// broker dropped them from the group.
    Gone(Vec<String>),
    /// Housekeeping the broker refused (removing departed members, say); reading went on.
    Refused(GroupError),
}

/// An entry to dead-letter on the broker (already recorded in the consumer's `dead_letters`).
#[derive(Debug, Clone)]
pub struct Letter {
    /// The entry's fields as read.
    pub fields: Vec<(String, Vec<u8>)>,
    pub reason: String,
    /// The entry's id on the broker.
    pub original_entry_id: String,
    pub event_id: Option<String>,
    pub aggregate_id: Option<String>,
}

/// A member's failure: the broker's (away, refusing), with its class.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{broker}: {error}")]
pub struct GroupError {
    pub broker: Kind,
    pub class: FailureClass,
    pub error: String,
}

impl GroupError {
    pub(crate) fn of_redis(e: &::redis::RedisError) -> Self {
        Self { broker: Kind::Redis, class: redis::of_redis(e), error: e.to_string() }
    }

    /// JetStream's failures are taken for transient: a refusal for what a message carries
    /// is the publisher's, never a group member's.
    pub(crate) fn of_nats(error: impl Into<String>) -> Self {
        Self { broker: Kind::Nats, class: FailureClass::transient, error: error.into() }
    }
}

/// A member of the group on one partition.
pub enum Member {
    Redis(Box<redis::member::Member>),
    Nats(Box<jetstream::member::Member>),
}

impl Member {
    /// The next batch: empty when nothing came within `BLOCK` (or a step of a claim found
    /// nothing idle). On an error the member starts over (a new connection or binding, its own
    /// pending entries first) at the next call.
    pub async fn next(&mut self) -> Result<Received, GroupError> {
        match self {
            Self::Redis(m) => m.next().await,
            Self::Nats(m) => m.next().await,
        }
    }

    /// Runs `work` (applying the batch last handed over) and, alongside it, what the broker wants while a
    /// batch is worked on: on JetStream, renewing the batch's `AckWait`, so that no other
    /// member gets it meanwhile; on Redis, after a full batch of new entries, reading the next
    /// (without blocking) so that it is at hand once this one is settled. What `work` came to,
    /// and whether the broker's side failed (the batch is to be settled anyway).
    pub async fn alongside<T>(&mut self, work: impl Future<Output = T>) -> (T, Result<(), GroupError>) {
        match self {
            Self::Redis(m) => m.alongside(work).await,
            Self::Nats(m) => m.alongside(work).await,
        }
    }

    /// Adds `letters` to the dead-letter stream, then acknowledges the entries `ack` names (of
    /// the batch last handed over): they are gone from the group.
    pub async fn settle(&mut self, letters: &[Letter], ack: &[String]) -> Result<(), GroupError> {
        match self {
            Self::Redis(m) => m.settle(letters, ack).await,
            Self::Nats(m) => m.settle(letters, ack).await,
        }
    }

    /// What the member noticed since last asked ([`Note`]), whether its calls succeeded or
    /// not.
    pub fn take_notes(&mut self) -> Vec<Note> {
        match self {
            Self::Redis(m) => m.take_notes(),
            Self::Nats(_) => Vec::new(),
        }
    }

    /// Entries delivered to this member and not handed over yet (read ahead on Redis): to
    /// handle before leaving, else they stay pending until claimed.
    pub fn held(&mut self) -> Received {
        match self {
            Self::Redis(m) => m.held(),
            Self::Nats(_) => Received::default(),
        }
    }

    /// Entries delivered to the group and not acknowledged: this member's on Redis, the
    /// group's on its partition on JetStream (`None` there while it cannot tell).
    pub async fn pending(&mut self) -> Result<Option<u64>, GroupError> {
        match self {
            Self::Redis(m) => m.pending().await.map(Some),
            Self::Nats(m) => m.pending().await,
        }
    }
}

/// Fields as JSON `[[name, value], ...]` (values as UTF-8, lossily).
pub fn fields_json(fields: &[(String, Vec<u8>)]) -> serde_json::Value {
    fields.iter().map(|(k, v)| serde_json::json!([k, String::from_utf8_lossy(v)])).collect()
}

/// The inverse of [`fields_json`].
pub fn fields_from_json(value: &serde_json::Value) -> Vec<(String, Vec<u8>)> {
    let pairs = value.as_array().map(Vec::as_slice).unwrap_or_default();
    pairs
        .iter()
        .filter_map(|p| Some((p.get(0)?.as_str()?.to_owned(), p.get(1)?.as_str()?.as_bytes().to_vec())))
        .collect()
}
