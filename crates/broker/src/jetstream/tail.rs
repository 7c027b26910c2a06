//! Tailing the events on NATS JetStream (`BROKER=nats`) for a [`Reader`]: one stream
//! holds every partition's subject, so its sequence is already one order that every replica
//! shares; no merging is needed. An ordered consumer of the replica's own (ephemeral, no
//! acknowledgements, no group: every replica reads everything) reads from the stream's last
//! `FEED_HISTORY` messages at start, loaded, not passed on, then every new one.
//!
//! A lost connection is retried with backoff, and reading goes on after the last message read.
//! Meanwhile that message's successors may have been trimmed unread (a reader away longer than
//! the stream's retention): it cannot be known what was missed, so the reader is told of a gap
//! ([`Reader::gap`]), as on Redis. A stream made again (JetStream lost it; its creation time is
//! another) is read from its start: the events the relays publish again are ones the reader
//! has.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::Context;
use futures::StreamExt;
use service_kit::{Backoff, Shutdown};

use super::Layout;
use crate::tail::{Entry, Reader};

/// How often the stream's creation time is looked at while reading.
const REPLACED_CHECK: Duration = Duration::from_secs(1);

pub struct Tail {
    pub js: Context,
    pub layout: Layout,
    pub reader: Arc<dyn Reader>,
    pub history_len: usize,
    /// Set while the reader holds the stream's recent events and reading keeps up.
    pub caught_up: Arc<AtomicBool>,
}

/// Where reading is: the stream (by its creation time) and the last sequence read of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    created: i128,
    last: u64,
}

impl Tail {
    /// Reads until `shutdown`.
    pub async fn run(self, shutdown: Shutdown) {
        let mut retry = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut at: Option<Position> = None;
        loop {
            let error = tokio::select! {
                () = shutdown.cancelled() => return,
                error = self.follow(&mut at, &mut retry) => error,
            };
            self.caught_up.store(false, Ordering::Release);
            tracing::warn!(stream = self.layout.stream, error = %error, "reading the stream failed; retrying");
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(retry.next_delay()) => {}
            }
        }
    }

    /// Reads until reading fails: the error.
    async fn follow(&self, at: &mut Option<Position>, retry: &mut Backoff) -> String {
        let stream = match self.js.get_stream(&self.layout.stream).await {
            Ok(stream) => stream,
            Err(e) => return e.to_string(),
        };
        let info = stream.cached_info();
        let (created, first, newest) =
            (info.created.unix_timestamp_nanos(), info.state.first_sequence, info.state.last_sequence);
        if let Err(e) = super::check_subjects(info, &self.layout) {
            return e.to_string();
        }
        // Where to read from; from the start, the stream's last messages are history.
        let from = match *at {
            None => {
                let keep = u64::try_from(self.history_len).unwrap_or(u64::MAX);
                newest.saturating_sub(keep).saturating_add(1).max(first)
            }
            Some(p) if p.created != created => {
                tracing::warn!(stream = self.layout.stream, "the stream was made again: reading it from its start");
                first
            }
            // A first message past this one tells of a gap (below).
            Some(p) => p.last + 1,
        };
        let config = OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from.max(1) },
            description: Some("order-feed replica".to_owned()),
            ..Default::default()
        };
        let mut consumer = match stream.create_consumer(config).await {
            Ok(consumer) => consumer,
            Err(e) => return e.to_string(),
        };
        // What is there now is history until the last of it (the message after which none is
        // pending) has been read.
        let pending = consumer.info().await.map(|i| i.num_pending).unwrap_or(0);
        let mut loading = at.is_none() && pending > 0;
        let mut loaded = 0;
        if at.is_none() && !loading {
            self.loaded(loaded);
        } else if at.is_some() {
            self.caught_up.store(true, Ordering::Release);
        }
        let mut messages = match consumer.messages().await {
            Ok(messages) => messages,
            Err(e) => return e.to_string(),
        };
        // An empty stream says its first sequence is 0; its first message will be 1.
        let mut expected = from.max(1);
        // The ordered consumer follows a stream made again by itself, from the sequence after
        // the last it delivered: the stream's creation time is looked at beside it, and a new
        // one starts reading over, from the new stream's start.
        let mut replaced = tokio::time::interval(REPLACED_CHECK);
        replaced.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = tokio::select! {
                next = messages.next() => next,
                _ = replaced.tick() => match self.js.get_stream(&self.layout.stream).await {
                    Ok(now) if now.cached_info().created.unix_timestamp_nanos() != created => {
                        return "the stream was made again".to_owned();
                    }
                    _ => continue,
                },
            };
            let Some(next) = next else { break };
            let message = match next {
                Ok(message) => message,
                Err(e) => return e.to_string(),
            };
            let Ok((sequence, pending)) = message.info().map(|i| (i.stream_sequence, i.pending)) else { continue };
            if !loading && sequence > expected && at.is_some() {
                // Only trimming leaves holes, and only in what every group read long ago: one
                // here is what this replica missed.
                self.gap(expected.saturating_sub(1));
            }
            expected = sequence + 1;
            *at = Some(Position { created, last: sequence });
            let fields = crate::entry::fields_of(message.headers.as_ref(), &message.payload);
            let entry = Entry { id: sequence.to_string(), fields };
            if loading {
                self.reader.load(&entry);
                loaded += 1;
            } else {
                self.reader.take(&entry, message.subject.as_str());
            }
            if loading && pending == 0 {
                loading = false;
                self.loaded(loaded);
            }
            // Reading works: a later failure starts its backoff anew.
            retry.reset();
        }
        "the stream's messages ended".to_owned()
    }

    fn loaded(&self, loaded: usize) {
        self.reader.loaded();
        tracing::info!(stream = self.layout.stream, loaded, "history loaded");
        self.caught_up.store(true, Ordering::Release);
    }

    /// Messages after `last` were trimmed before this replica read them.
    fn gap(&self, last: u64) {
        tracing::warn!(
            stream = self.layout.stream,
            last,
            "messages after the last one read were trimmed unread: a gap"
        );
        self.reader.gap();
    }
}
