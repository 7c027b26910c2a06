//! Publishing a batch of entries to JetStream: every message sent at once on the one
//! connection (so each subject gets them in order), then every acknowledgement awaited. An
//! entry counts as published only once JetStream acknowledged storing it.

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::Context;
use async_nats::Client;
use domain::StreamEntry;
use futures::future::join_all;

use super::Layout;
use crate::entry::{self, EncodeError};

/// Messages sent before their acknowledgements are awaited.
const IN_FLIGHT: usize = 1000;

/// What JetStream said about one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Its sequence in the stream (the earlier copy's, for a duplicate).
    pub sequence: u64,
    /// JetStream had it already, inside its duplicate window, and stored nothing.
    pub duplicate: bool,
}

/// Why an entry was not published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryError {
    /// The entry cannot be a message: it is to blame.
    Refused(EncodeError),
    /// JetStream failed to take it (down, no stream, no answer in time): nothing is to blame.
    Broker(String),
    /// Not sent: another entry of the batch was refused, or JetStream failed an earlier one.
    NotSent,
}

/// Publishes to the events' stream; cloning is cheap (one connection underneath).
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    js: Context,
    layout: Layout,
}

impl Publisher {
    pub fn new(client: Client, layout: Layout) -> Self {
        let js = super::context(client.clone());
        Self { client, js, layout }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn context(&self) -> &Context {
        &self.js
    }

    /// Publishes `entries`, in order, and says per entry what became of it. Nothing is sent
    /// if an entry cannot be a message, and nothing after an entry JetStream failed to take:
    /// sending on would only wait out the same failure (the client's buffer, while it
    /// reconnects), and could store an order's later event ahead of the failed one.
    pub async fn publish(&self, entries: &[StreamEntry]) -> Vec<Result<Published, EntryError>> {
        let max_payload = self.client.server_info().max_payload;
        // A client that has not connected yet knows no limit: the server's default.
        let max_payload = if max_payload == 0 { 1024 * 1024 } else { max_payload };
        let encoded: Vec<Result<entry::Encoded, EncodeError>> =
            entries.iter().map(|e| entry::encode(e, max_payload)).collect();
        if encoded.iter().any(Result::is_err) {
            return encoded
                .into_iter()
                .map(|e| Err(e.map_or_else(EntryError::Refused, |_| EntryError::NotSent)))
                .collect();
        }
        let mut out = Vec::with_capacity(entries.len());
        let mut failed = false;
        // Each publisher has a context of its own, whose acknowledgements in flight are
        // bounded (5 000): a chunk always fits, so a publisher never waits on itself.
        for (chunk, messages) in entries.chunks(IN_FLIGHT).zip(encoded.chunks(IN_FLIGHT)) {
            let mut pending = Vec::with_capacity(chunk.len());
            for (e, message) in chunk.iter().zip(messages.iter().flatten()) {
                if failed {
                    pending.push(Err(EntryError::NotSent));
                    continue;
                }
                let sent = self.send(e, message).await;
                failed = sent.is_err();
                pending.push(sent);
            }
            let acks = pending.into_iter().map(|sent| async move {
                let (subject, ack) = sent?;
                let ack = ack.await.map_err(|error| match error.kind() {
                    PublishErrorKind::StreamNotFound => {
                        EntryError::Broker(format!("no JetStream stream takes the subject {subject}"))
                    }
                    _ => EntryError::Broker(error.to_string()),
                })?;
                Ok(Published { sequence: ack.sequence, duplicate: ack.duplicate })
            });
            out.extend(join_all(acks).await);
        }
        out
    }

    async fn send(&self, e: &StreamEntry, encoded: &entry::Encoded) -> Result<(String, PublishAckFuture), EntryError> {
        let message = PublishMessage::build().headers(encoded.headers.clone()).payload(encoded.body.clone());
        let subject = self.layout.subject_of(&e.aggregate_id).to_owned();
        match self.js.send_publish(subject.clone(), message).await {
            Ok(ack) => Ok((subject, ack)),
            Err(error) => Err(EntryError::Broker(error.to_string())),
        }
    }

    /// Whether JetStream answers and holds the stream ([`super::ping`]).
    pub async fn ping(&self) -> Result<(), String> {
        super::ping(&self.js, &self.layout).await
    }
}
