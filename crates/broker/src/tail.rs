//! Tailing the events without a group, on either broker: every reader (a feed replica) reads
//! everything, from the newest `history` entries at start (kept, not passed on) to every new
//! one, in one order that every reader gives them, so that a place in it names the same entry
//! on each. A lost connection is retried with backoff, and reading goes on after the last
//! entry read; entries removed unread meanwhile (trimmed while the reader was away) are a gap,
//! which the reader is told of.
//!
//! | | one order | resuming | a gap |
//! |---|---|---|---|
//! | Redis, one stream ([`crate::redis::tail`]) | the stream's | after the last id read | the last entry read is gone |
//! | Redis, partitions ([`crate::redis::partitioned`]) | merged by id and the shards' clocks ([`crate::redis::merge`]) | per partition | as on one stream, per partition |
//! | JetStream ([`crate::jetstream::tail`]) | the stream's sequence | after the last sequence read | a hole in the sequence |

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use domain::Partitions;
use service_kit::Shutdown;

use crate::redis::RedisTarget;
use crate::{jetstream, redis};

/// An entry read without a group: its id on the broker (a Redis entry id, a JetStream stream
/// sequence) and its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub fields: Vec<(String, Vec<u8>)>,
}

/// Whoever the entries are read for.
pub trait Reader: Send + Sync {
    /// An entry read as reading starts: history, to keep, not news to pass on.
    fn load(&self, entry: &Entry);
    /// The history read at start is loaded.
    fn loaded(&self);
    /// A new entry, read from `destination` (its stream or subject).
    fn take(&self, entry: &Entry, destination: &str);
    /// Entries after the last one read may have been removed unread: what the reader holds is
    /// no longer a whole stretch of the order.
    fn gap(&self);
}

/// What a tail reads and keeps.
#[derive(Clone)]
pub struct TailSettings {
    pub partitions: Partitions,
    /// Entries loaded at start at most (`FEED_HISTORY`).
    pub history: usize,
    /// How long a read waits for new entries (`FEED_BLOCK`).
    pub block: Duration,
}

/// Where the events are.
pub enum Source {
    Redis(RedisTarget),
    Nats(async_nats::Client),
}

/// Reads the events from `source` for `reader` until `shutdown`. First it agrees with the
/// broker on the partitions (a reader never records their number): if they differ, `unfit`
/// says why and nothing is read. `caught_up` is set while the reader holds the recent entries
/// and reading keeps up.
pub async fn follow(
    source: Source,
    settings: TailSettings,
    reader: Arc<dyn Reader>,
    caught_up: Arc<AtomicBool>,
    unfit: &OnceLock<String>,
    shutdown: Shutdown,
) {
    let TailSettings { partitions, history, block } = settings;
    match source {
        Source::Nats(client) => {
            let js = jetstream::context(client);
            let layout = jetstream::Layout::new(&partitions);
            match jetstream::agree_on_subjects(&js, &layout, &shutdown).await {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    tracing::error!(error = %e, "refusing to read the JetStream stream");
                    let _ = unfit.set(e.to_string());
                    return;
                }
                None => return,
            }
            let tail = jetstream::tail::Tail { js, layout, reader, history_len: history, caught_up };
            tail.run(shutdown).await;
        }
        Source::Redis(target) => {
            if !redis::target::agree_on_partitions(&target, &partitions, false, unfit, &shutdown).await {
                return;
            }
            if partitions.count() == 1 {
                let stream = partitions.base().to_owned();
                let tail = redis::tail::Tail { target, reader, stream, history_len: history, block, caught_up };
                tail.run(shutdown).await;
            } else {
                let tail = redis::partitioned::PartitionedTail {
                    target,
                    partitions,
                    reader,
                    history_len: history,
                    block,
                    caught_up,
                };
                tail.run(shutdown).await;
            }
        }
    }
}
