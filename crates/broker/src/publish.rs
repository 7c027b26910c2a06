//! Publishing a batch of entries durably, on either broker: the entries in order, the ids the
//! broker gave them, or why the batch is not published, with whom that blames (the broker as
//! a whole, or the entries it refused for what they carry).

use std::time::Duration;

use domain::{Partitions, StreamEntry};
use service_kit::failure::FailureClass;
use service_kit::messaging::MessagingPeer;

use crate::redis::publish::RedisPublisher;
use crate::redis::tails::Tails;
use crate::redis::{RedisError, RedisTarget};

mod nats;

pub use nats::NatsPublisher;

/// A writer of the events to the broker (`BROKER`).
pub enum Publisher {
    Redis(RedisPublisher),
    Nats(NatsPublisher),
}

impl Publisher {
    /// A publisher to the one Redis stream `stream` on the node `redis_url`.
    pub fn new(redis_url: &str, stream: impl Into<String>) -> Result<Self, RedisError> {
        RedisPublisher::new(redis_url, stream).map(Self::Redis)
    }

    /// A publisher to `partitions` on the Redis `target`.
    pub fn to(target: RedisTarget, partitions: Partitions) -> Self {
        Self::Redis(RedisPublisher::to(target, partitions))
    }

    /// On Redis: a batch counts as published only once `replicas` replicas hold it
    /// ([`RedisPublisher::with_min_replicas`]). JetStream acknowledges what it stored.
    pub fn with_min_replicas(self, replicas: u32, timeout: Duration) -> Self {
        match self {
            Self::Redis(p) => Self::Redis(p.with_min_replicas(replicas, timeout)),
            nats => nats,
        }
    }

    /// On Redis: tells `tails` what it added ([`RedisPublisher::with_tails`]).
    pub fn with_tails(self, tails: Vec<Tails>, index: usize) -> Self {
        match self {
            Self::Redis(p) => Self::Redis(p.with_tails(tails, index)),
            nats => nats,
        }
    }

    pub fn partitions(&self) -> &Partitions {
        match self {
            Self::Redis(p) => p.partitions(),
            Self::Nats(p) => p.partitions(),
        }
    }

    /// The stream (Redis) or subject (NATS) an entry of the order `aggregate_id` goes to.
    pub fn stream_of(&self, aggregate_id: &str) -> &str {
        match self {
            Self::Redis(p) => p.stream_of(aggregate_id),
            Self::Nats(p) => p.subject_of(aggregate_id),
        }
    }

    pub fn peer(&self) -> &MessagingPeer {
        match self {
            Self::Redis(p) => p.peer(),
            Self::Nats(p) => p.peer(),
        }
    }

    /// Publishes `entries` in order: the ids the broker gave them (stream entry ids on Redis,
    /// stream sequences on JetStream), or why the batch is not published.
    pub async fn publish(&mut self, entries: &[StreamEntry]) -> Result<Vec<String>, PublishError> {
        match self {
            Self::Redis(p) => p.publish(entries).await,
            Self::Nats(p) => p.publish(entries).await,
        }
    }

    /// Whether the broker answers.
    pub async fn ping(&mut self) -> Result<(), String> {
        match self {
            Self::Redis(p) => p.ping().await.map_err(|e| e.to_string()),
            Self::Nats(p) => p.ping().await,
        }
    }
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
            Self::Broker { error, .. } => write!(f, "broker: {error}"),
            Self::Refused(refused) => write!(f, "the broker refused {} entries", refused.len()),
        }
    }
}

impl std::error::Error for PublishError {}
