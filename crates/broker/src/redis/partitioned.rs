//! Tailing the partition streams (`STREAM_PARTITIONS` > 1) for a [`Reader`], in the one
//! order every replica gives their entries ([`super::merge`]), so that a cursor names the same
//! place on each replica, for a client of one order or of the whole tenant.
//!
//! The tail polls: `XREAD BLOCK` cannot tell when the watermark has passed an entry. Each
//! round reads the partitions at once, each with one read-only script on its own shard (a page
//! after the last entry read, and the server's clock, read together), then passes on what the
//! watermark lets through. The next round follows at once while a page came back full; while
//! entries wait on a slower clock, after about as long as that clock needs to pass them; else
//! after [`POLL`]. So an idle replica runs N scripts every 20 ms, and an event reaches its
//! clients up to 20 ms after it is written, plus the skew between the clocks of the shards
//! that hold the partitions (with one Redis, one clock). While the entries waiting exceed the
//! history's size, only the partitions holding the watermark back are read.
//!
//! At start it loads the newest entries of all partitions ([`super::merge::Load`]): each
//! partition's first page by the same kind of script, older pages by plain `XREVRANGE`. After
//! a lost connection each partition goes on as the one stream does ([`super::tail`]): a
//! partition gone is read from its start, one come back shorter after its newest entry, and
//! one whose last entry read was trimmed is a gap ([`Reader::gap`]); so is one nothing was
//! read of, if entries were trimmed from it meanwhile (with many partitions, some are often
//! still empty when a replica starts).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use domain::Partitions;
use service_kit::{Backoff, Shutdown};

use super::merge::{EntryId, FirstPage, Load, Merge};
use super::reads::{self, TimedPage};
use super::tail::{resume_from, resume_unread};
use super::target::{RedisConn, RedisTarget, Timeouts};
use super::RedisError;
use crate::tail::{Entry, Reader};

/// Entries read per partition per round, and per page of the first load.
const PAGE: usize = 1000;

/// Between rounds that found nothing new.
pub const POLL: Duration = Duration::from_millis(20);

pub struct PartitionedTail {
    pub target: RedisTarget,
    pub partitions: Partitions,
    pub reader: Arc<dyn Reader>,
    pub history_len: usize,
    /// `FEED_BLOCK`: no read blocks here, but answers are waited for as long as on one stream.
    pub block: Duration,
    /// Set while the reader holds the streams' recent entries and reading keeps up.
    pub caught_up: Arc<AtomicBool>,
}

impl PartitionedTail {
    /// Reads until `shutdown`.
    pub async fn run(self, shutdown: Shutdown) {
        let mut retry = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut merge = None;
        loop {
            let error = tokio::select! {
                () = shutdown.cancelled() => return,
                error = self.follow(&mut merge, &mut retry) => error,
            };
            self.caught_up.store(false, Ordering::Release);
            tracing::warn!(stream = self.partitions.base(), error = %error, "reading the partitions failed; retrying");
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(retry.next_delay()) => {}
            }
        }
    }

    /// Connects and reads until reading fails: the error. `merge` outlives a lost connection.
    async fn follow(&self, merge: &mut Option<Merge<Entry>>, retry: &mut Backoff) -> RedisError {
        let following: Result<Infallible, RedisError> = async {
            let timeouts = Timeouts::new(Duration::from_secs(5), self.block + Duration::from_secs(10));
            let conn = self.target.connect(timeouts).await?;
            let merge = match merge {
                Some(merge) => {
                    self.resume(&conn, merge).await?;
                    merge
                }
                None => merge.insert(self.load(&conn).await?),
            };
            loop {
                let any_full = self.round(&conn, merge).await?;
                // Reading works: the replica keeps up, and a later failure starts its backoff anew.
                self.caught_up.store(true, Ordering::Release);
                retry.reset();
                let pause = merge.pause(any_full, POLL);
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
        }
        .await;
        match following {
            Err(e) => e,
            Ok(never) => match never {},
        }
    }

    /// Loads the newest entries of all partitions for the reader: the merge that reads on.
    async fn load(&self, conn: &RedisConn) -> Result<Merge<Entry>, RedisError> {
        let firsts = self.partitions.streams().iter().map(|stream| {
            let mut conn = conn.clone();
            async move { read_newest(&mut conn, stream).await }
        });
        let firsts = futures::future::try_join_all(firsts).await?;
        let firsts = firsts
            .into_iter()
            .map(|page| FirstPage {
                full: page.entries.len() == PAGE,
                entries: with_ids(page.entries),
                now_ms: page.now_ms,
            })
            .collect();
        let mut load = Load::new(firsts, self.history_len);
        let mut conn = conn.clone();
        while let Some((partition, before)) = load.advance() {
            let page = reads::newest(&mut conn, self.partitions.stream(partition), &format!("({before}"), PAGE).await?;
            let full = page.len() == PAGE;
            load.add_page(partition, with_ids(page), full);
        }
        let (history, merge) = load.finish(self.history_len.max(PAGE));
        for (_, entry) in &history {
            self.reader.load(entry);
        }
        self.reader.loaded();
        tracing::info!(
            stream = self.partitions.base(),
            partitions = self.partitions.count(),
            loaded = history.len(),
            waiting = merge.pending(),
            "history loaded"
        );
        Ok(merge)
    }

    /// Where each partition goes on after a lost connection.
    async fn resume(&self, conn: &RedisConn, merge: &mut Merge<Entry>) -> Result<(), RedisError> {
        let mut conn = conn.clone();
        for (partition, stream) in self.partitions.streams().iter().enumerate() {
            let last = merge.last(partition);
            if last == EntryId::ZERO {
                resume_unread(&mut conn, stream, merge.bound(partition), self.reader.as_ref()).await?;
                continue;
            }
            let from = resume_from(&mut conn, stream, last.to_string(), self.reader.as_ref()).await?;
            merge.resume(partition, EntryId::from(from.as_str()));
        }
        Ok(())
    }

    /// Reads the partitions wanted, at once, and passes on what may go: whether a page came
    /// back full.
    async fn round(&self, conn: &RedisConn, merge: &mut Merge<Entry>) -> Result<bool, RedisError> {
        let reads = merge.wanted().into_iter().map(|partition| {
            let mut conn = conn.clone();
            let (stream, after) = (self.partitions.stream(partition), merge.last(partition));
            async move { read_after(&mut conn, stream, after).await.map(|page| (partition, page)) }
        });
        let pages = futures::future::try_join_all(reads).await?;
        let mut any_full = false;
        for (partition, page) in pages {
            let full = page.entries.len() == PAGE;
            any_full |= full;
            merge.take_page(partition, with_ids(page.entries), full, page.now_ms);
        }
        for (rank, entry) in merge.release() {
            self.reader.take(&entry, self.partitions.stream(rank.partition));
        }
        Ok(any_full)
    }
}

async fn read_after(conn: &mut RedisConn, stream: &str, after: EntryId) -> Result<TimedPage, RedisError> {
    reads::timed_after(conn, stream, &after.to_string(), PAGE).await
}

async fn read_newest(conn: &mut RedisConn, stream: &str) -> Result<TimedPage, RedisError> {
    reads::timed_newest(conn, stream, PAGE).await
}

fn with_ids(entries: Vec<Entry>) -> Vec<(EntryId, Entry)> {
    entries.into_iter().map(|e| (EntryId::from(e.id.as_str()), e)).collect()
}
