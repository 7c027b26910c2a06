//! The event broker between the relay and its readers (the consumers and the feeds).
//!
//! `BROKER=redis` (the default) keeps events in Redis Streams; `BROKER=nats` in a NATS
//! JetStream stream ([`jetstream`]). The guarantees the services give do not move with it: the
//! relay publishes at least once and in seq order per order, and the consumer applies each event
//! once (its dedupe and per-order checkpoints are in Postgres, whatever carried the event).

pub use async_nats;

pub mod entry;
pub mod group;
pub mod jetstream;
pub mod publish;
pub mod redis;
pub mod tail;

/// One entry as delivered to a member of a consumer group: its id on the broker (a Redis
/// entry id, a JetStream stream sequence) and its fields.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: String,
    /// `None` when the entry was deleted from the stream while still pending.
    pub fields: Option<Vec<(String, Vec<u8>)>>,
}

/// Which broker carries the events.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kind {
    /// Redis Streams (`REDIS_URL`, `REDIS_CLUSTER_URLS`).
    #[default]
    Redis,
    /// NATS JetStream (`NATS_URL`).
    Nats,
}

impl Kind {
    /// As `BROKER` spells it, and as spans name the messaging system.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Nats => "nats",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `BROKER` and `NATS_URL`, shared by the relay, the consumer and the feed.
#[derive(clap::Args, Clone, Debug)]
pub struct BrokerArgs {
    /// The broker the events go through: `redis` or `nats`.
    #[arg(long, env = "BROKER", value_enum, default_value_t = Kind::Redis)]
    pub broker: Kind,
    /// The NATS server, with JetStream, when `BROKER=nats`.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222", hide_env_values = true)]
    pub nats_url: String,
}

impl BrokerArgs {
    /// A client of `NATS_URL` named `name` when the broker is NATS ([`jetstream::connect`]),
    /// none for Redis.
    pub async fn nats_client(&self, name: &str) -> Result<Option<async_nats::Client>, async_nats::ConnectError> {
        match self.broker {
            Kind::Redis => Ok(None),
            Kind::Nats => jetstream::connect(&self.nats_url, name).await.map(Some),
        }
    }
}

impl Default for BrokerArgs {
    fn default() -> Self {
        Self { broker: Kind::Redis, nats_url: "nats://127.0.0.1:4222".to_owned() }
    }
}
