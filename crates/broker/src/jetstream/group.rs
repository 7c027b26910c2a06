//! The consumer group on JetStream: a durable pull consumer per partition, shared by every
//! replica of the group (JetStream spreads its messages over the replicas that pull).
//!
//! - Each message is acknowledged explicitly, after the work it carries committed.
//! - A message unacknowledged for `AckWait` (`CLAIM_MIN_IDLE`) is delivered again, to
//!   whichever replica pulls next: Redis's claim after idle. A replica still working on a
//!   batch says so ([`progress`]) so that a slow batch is not handed to another replica.
//! - `MaxDeliver` is unlimited. JetStream counts every delivery, those after a replica died or
//!   froze too, and at `MaxDeliver` stops delivering a message without a word to the group
//!   (an advisory only). The consumer counts the failures that are the entry's own and
//!   dead-letters it after `MAX_DELIVERIES` of them, exactly as with Redis: an outage or a
//!   crash never turns into a dead letter or a message no one reads.

use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::{AckKind, Context, Message};
use futures::StreamExt;

use super::{Layout, REQUEST_TIMEOUT};
use crate::entry;

/// What a group member pulls with.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    pub group: String,
    /// `CLAIM_MIN_IDLE`.
    pub ack_wait: Duration,
    /// Messages one pull returns at most.
    pub batch: usize,
    /// Messages delivered and not yet acknowledged, over the whole group, at most.
    pub max_ack_pending: i64,
}

/// One delivery of a message.
pub struct Delivery {
    /// The message's sequence in the stream.
    pub sequence: u64,
    /// How often JetStream delivered it, this time included.
    pub delivered: i64,
    /// Its fields, as a Redis entry's would read ([`entry::fields_of`]).
    pub fields: Vec<(String, Vec<u8>)>,
    message: Message,
}

impl Delivery {
    /// The id entries are known by in logs, counted failures and dead letters: the stream
    /// sequence.
    pub fn id(&self) -> String {
        self.sequence.to_string()
    }
}

/// Creates the durable consumer of the group on partition `index` if there is none, and
/// binds to it. One made with another `AckWait` or bound on messages out (`CLAIM_MIN_IDLE`,
/// the batch size changed) is updated: an `AckWait` the server kept from before could lapse
/// between the renewals of a batch worked on.
pub async fn ensure_consumer(
    js: &Context,
    layout: &Layout,
    index: usize,
    settings: &GroupSettings,
) -> Result<PullConsumer, String> {
    let stream = js.get_stream(&layout.stream).await.map_err(|e| e.to_string())?;
    let durable = layout.durable(&settings.group, index);
    let config = Config {
        durable_name: Some(durable.clone()),
        description: Some(format!("consumer group {} on {}", settings.group, layout.subjects[index])),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        max_deliver: -1,
        filter_subject: layout.subjects[index].clone(),
        max_ack_pending: settings.max_ack_pending,
        ..Default::default()
    };
    let mut consumer: PullConsumer =
        stream.get_or_create_consumer(&durable, config.clone()).await.map_err(|e| e.to_string())?;
    let held = &consumer.cached_info().config;
    if held.ack_wait != config.ack_wait || held.max_ack_pending != config.max_ack_pending {
        tracing::info!(
            durable,
            ack_wait_ms = config.ack_wait.as_millis() as u64,
            max_ack_pending = config.max_ack_pending,
            "updating the group's consumer to the settings"
        );
        // Creating it again with its name changes the fields JetStream lets change.
        consumer = stream.create_consumer(config).await.map_err(|e| e.to_string())?;
    }
    Ok(consumer)
}

/// Pulls up to `max` messages: those waiting, at once; if none is, the first to come within
/// `wait`, with whatever came with it. (A pull request waits until it has `max` messages or
/// its time is up: asked for a whole batch, it would hold the first message until then.)
pub async fn pull(consumer: &PullConsumer, max: usize, wait: Duration) -> Result<Vec<Delivery>, String> {
    let waiting = collect(consumer.fetch().max_messages(max).messages().await, REQUEST_TIMEOUT).await?;
    if !waiting.is_empty() {
        return Ok(waiting);
    }
    let expires = wait.max(Duration::from_millis(100));
    let first = consumer.batch().max_messages(1).expires(expires).messages().await;
    let mut first = collect(first, expires + REQUEST_TIMEOUT).await?;
    if !first.is_empty() && max > 1 {
        match collect(consumer.fetch().max_messages(max - 1).messages().await, REQUEST_TIMEOUT).await {
            Ok(more) => first.extend(more),
            Err(e) => tracing::debug!(error = %e, "pulling the rest of a batch failed"),
        }
    }
    Ok(first)
}

/// The messages of one pull request, until it ends or `within` has passed. Those delivered
/// before an error are this replica's, and handled; an error before any is the pull's.
///
/// The end of a request may never come: a server that died (`kill -9`) took the request, or
/// the rest of its answer, with it, and a pull without `expires` (a fetch) has no timeout of
/// its own in the client, so the loop would wait for good, holding what was delivered. Past
/// `within` the pull is over: with what it delivered (this replica's, to handle and
/// acknowledge), or as failed if nothing came.
async fn collect(
    batch: Result<async_nats::jetstream::consumer::pull::Batch, async_nats::jetstream::consumer::pull::BatchError>,
    within: Duration,
) -> Result<Vec<Delivery>, String> {
    let mut batch = batch.map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    loop {
        let next = match tokio::time::timeout_at(deadline, batch.next()).await {
            Ok(Some(next)) => next,
            Ok(None) => break,
            Err(_) if out.is_empty() => return Err(format!("the pull was not answered within {within:?}")),
            Err(_) => {
                tracing::debug!(delivered = out.len(), "the pull was not ended in time; handling what it delivered");
                break;
            }
        };
        match next {
            Ok(message) => {
                let Ok(info) = message.info() else {
                    // Not a JetStream delivery (no reply subject to acknowledge): nothing to do.
                    continue;
                };
                let (sequence, delivered) = (info.stream_sequence, info.delivered);
                let fields = entry::fields_of(message.headers.as_ref(), &message.payload);
                out.push(Delivery { sequence, delivered, fields, message });
            }
            Err(e) if out.is_empty() => return Err(e.to_string()),
            Err(e) => {
                tracing::debug!(error = %e, "pull ended early");
                break;
            }
        }
    }
    Ok(out)
}

/// Acknowledges `done`: the work they carried is committed, and each is gone from the group.
/// An acknowledgement lost on the way only means a redelivery, which the consumer's dedupe
/// absorbs; the client's buffer is flushed so that none waits behind the next pull.
pub async fn ack(client: &async_nats::Client, done: &[&Delivery]) -> Result<(), String> {
    for d in done {
        bounded_io(d.message.ack()).await?;
    }
    bounded_io(client.flush()).await
}

/// A step of acknowledging within [`super::REQUEST_TIMEOUT`]: while the client reconnects it
/// sends nothing, and a replica shutting down during an outage must not wait for NATS to come
/// back (a lost acknowledgement is a redelivery, which the consumer's dedupe absorbs).
async fn bounded_io<E: std::fmt::Display>(
    step: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), String> {
    match tokio::time::timeout(super::REQUEST_TIMEOUT, step).await {
        Ok(done) => done.map_err(|e| e.to_string()),
        Err(_) => Err(format!("not sent within {:?}", super::REQUEST_TIMEOUT)),
    }
}

/// Tells JetStream that work on `working` goes on: their `AckWait` starts over.
pub async fn progress(working: &[Delivery]) -> Result<(), String> {
    for d in working {
        bounded_io(d.message.ack_with(AckKind::Progress)).await?;
    }
    Ok(())
}
