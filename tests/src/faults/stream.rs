//! The broker's side of the pipeline, as the suite reads it: what the group has not finished,
//! what the stream holds, which entries were delivered more than once, and which one consumer
//! holds. The questions are the same on either broker; [`redis`] and [`jetstream`] answer them.

pub mod jetstream;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use broker::async_nats::jetstream::Context;
use broker::jetstream::Layout;
use broker::redis::target::{RedisConn, RedisTarget};

use super::drain::TIMEOUTS;
use super::link::Deliveries;
use super::FaultError;

/// Where the events are, and how to reach them.
#[derive(Clone)]
pub enum Probe {
    /// Redis streams (the partitions), and the group on them.
    Redis { target: RedisTarget, streams: Vec<String>, group: String },
    /// The JetStream stream and subjects, the group's durable consumers, and what each
    /// consumer's link carried (by consumer index).
    Nats { url: String, layout: Layout, group: String, links: Vec<Arc<Deliveries>>, ack_wait: Duration },
}

/// A [`Probe`] connected.
pub enum Session {
    Redis { conn: RedisConn, streams: Vec<String>, group: String },
    // A JetStream context is large: boxed, both variants are about the same size.
    Nats { js: Box<Context>, layout: Layout, group: String, links: Vec<Arc<Deliveries>>, ack_wait: Duration },
}

impl Probe {
    /// Connects; an error at once if the broker does not answer.
    pub async fn connect(&self) -> Result<Session, FaultError> {
        Ok(match self {
            Self::Redis { target, streams, group } => Session::Redis {
                conn: target.connect(TIMEOUTS).await.map_err(|e| FaultError::Redis(e.to_string()))?,
                streams: streams.clone(),
                group: group.clone(),
            },
            Self::Nats { url, layout, group, links, ack_wait } => Session::Nats {
                js: Box::new(jetstream::connect(url).await?),
                layout: layout.clone(),
                group: group.clone(),
                links: links.clone(),
                ack_wait: *ack_wait,
            },
        })
    }
}

impl Session {
    /// `(pending, undelivered)` of the group over every partition: entries delivered and not
    /// acknowledged, and entries not yet delivered.
    pub async fn group_backlog(&mut self) -> Result<(i64, i64), FaultError> {
        match self {
            Self::Redis { conn, streams, group } => redis::group_backlog(conn, streams, group).await,
            Self::Nats { js, layout, group, .. } => jetstream::group_backlog(js, layout, group).await,
        }
    }

    /// `(entries, distinct event_ids)` on the stream (every partition).
    pub async fn census(&mut self) -> Result<(usize, usize), FaultError> {
        match self {
            Self::Redis { conn, streams, .. } => redis::census(conn, streams).await,
            Self::Nats { js, layout, .. } => jetstream::census(js, layout).await,
        }
    }

    /// Entries seen delivered more than once so far. Redis shows those still pending
    /// (`XPENDING`, sampled); on NATS the consumers' links saw every delivery's count.
    pub async fn redelivered(&mut self) -> Result<Vec<String>, FaultError> {
        match self {
            Self::Redis { conn, streams, group } => redis::redelivered(conn, streams, group).await,
            Self::Nats { links, .. } => {
                Ok(links.iter().flat_map(|l| l.redelivered()).map(|seq| format!("nats/{seq}")).collect())
            }
        }
    }

    /// The event ids of the entries consumer `index` (running as `name`) holds: delivered to
    /// it and not acknowledged.
    pub async fn held_by(&mut self, index: usize, name: &str) -> Result<Vec<String>, FaultError> {
        match self {
            Self::Redis { conn, streams, group } => redis::held_by(conn, streams, group, name).await,
            Self::Nats { js, layout, links, ack_wait, .. } => {
                let held = links.get(index).map(|l| l.unacked(*ack_wait)).unwrap_or_default();
                jetstream::event_ids(js, layout, &held).await
            }
        }
    }
}
