//! Tailing the one stream (`STREAM_PARTITIONS=1`) for a [`Reader`]: at start its last
//! entries (as many as the history keeps, loaded, not passed on), then every new one, with plain
//! `XREAD` (no consumer group: every replica reads everything). `XREAD BLOCK` runs on a
//! connection of its own: on a shared, multiplexed one it would hold up every other command.
//!
//! A lost connection is retried with backoff, and reading goes on after the last entry read.
//! Meanwhile the entry itself may have been trimmed, and newer ones with it (a reader away
//! longer than the stream's retention): it cannot be known what was missed, so the reader is
//! told of a gap ([`Reader::gap`]; a feed replica forgets its history, and each client, its
//! cursor unknown, is told to reload). Or the stream came back shorter, or not at all (Redis
//! lost it): reading goes on after its newest entry, or from its start, and the events the
//! relays publish again are ones the reader has (and knows by their event ids).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use domain::entry_id_key;
use service_kit::{Backoff, Shutdown};

use super::reads;
use super::target::{RedisConn, RedisTarget, Timeouts};
use super::{ConnectionLike, RedisError};
use crate::tail::{Entry, Reader};

/// Entries read per `XREAD`, and per page of the first load.
const PAGE: usize = 1000;

pub struct Tail {
    pub target: RedisTarget,
    pub reader: Arc<dyn Reader>,
    pub stream: String,
    pub history_len: usize,
    pub block: Duration,
    /// Set while the reader holds the stream's recent entries and reading keeps up.
    pub caught_up: Arc<AtomicBool>,
}

impl Tail {
    /// Reads until `shutdown`.
    pub async fn run(self, shutdown: Shutdown) {
        let mut retry = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut last: Option<String> = None;
        loop {
            let error = tokio::select! {
                () = shutdown.cancelled() => return,
                error = self.follow(&mut last, &mut retry) => error,
            };
            self.caught_up.store(false, Ordering::Release);
            tracing::warn!(stream = self.stream, error = %error, "reading the stream failed; retrying");
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(retry.next_delay()) => {}
            }
        }
    }

    /// Connects and reads until reading fails: the error.
    async fn follow(&self, last: &mut Option<String>, retry: &mut Backoff) -> RedisError {
        let following: Result<Infallible, RedisError> = async {
            let mut conn = self.connect().await?;
            let from = match last.clone() {
                None => self.load(&mut conn).await?,
                Some(last) => resume_from(&mut conn, &self.stream, last, self.reader.as_ref()).await?,
            };
            *last = Some(from);
            loop {
                let from = last.clone().unwrap_or_else(|| "0-0".to_owned());
                if let Some(id) = self.read(&mut conn, &from).await? {
                    *last = Some(id);
                }
                // Reading works: the replica keeps up, and a later failure starts its backoff anew.
                self.caught_up.store(true, Ordering::Release);
                retry.reset();
            }
        }
        .await;
        match following {
            Err(e) => e,
            Ok(never) => match never {},
        }
    }

    /// A connection of the tail's own, for its blocking reads.
    async fn connect(&self) -> Result<RedisConn, RedisError> {
        self.target.connect(Timeouts::new(Duration::from_secs(5), self.block + Duration::from_secs(10))).await
    }

    /// Loads the stream's last `history_len` entries, newest page first; reading goes on after
    /// the newest (from the start of an empty stream).
    async fn load(&self, conn: &mut RedisConn) -> Result<String, RedisError> {
        let mut pages: Vec<Vec<Entry>> = Vec::new();
        let mut loaded = 0;
        let mut before = "+".to_owned();
        while loaded < self.history_len {
            let count = PAGE.min(self.history_len - loaded);
            let page = reads::newest(conn, &self.stream, &before, count).await?;
            let Some(oldest) = page.last() else { break };
            before = format!("({}", oldest.id);
            loaded += page.len();
            let full = page.len() == count;
            pages.push(page);
            if !full {
                break;
            }
        }
        let newest = pages.first().and_then(|p| p.first()).map_or_else(|| "0-0".to_owned(), |e| e.id.clone());
        for entry in pages.iter().rev().flat_map(|page| page.iter().rev()) {
            self.reader.load(entry);
        }
        self.reader.loaded();
        tracing::info!(stream = self.stream, loaded, "history loaded");
        Ok(newest)
    }

    /// One `XREAD` after `from`: the id of the last entry read, if any.
    async fn read(&self, conn: &mut RedisConn, from: &str) -> Result<Option<String>, RedisError> {
        let entries = reads::read_after(conn, &self.stream, from, PAGE, self.block).await?;
        for entry in &entries {
            self.reader.take(entry, &self.stream);
        }
        Ok(entries.last().map(|entry| entry.id.clone()))
    }
}

/// Where reading `stream` goes on after a lost connection (see the module's opening comment).
pub(crate) async fn resume_from(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    last: String,
    reader: &dyn Reader,
) -> Result<String, RedisError> {
    let Some(info) = reads::info(conn, stream).await? else {
        // Redis lost it: the relays publish again what it held, which the history
        // knows (or, for an order with later events kept, drops as stale).
        tracing::warn!(stream = stream, last, "the stream is gone: reading it from its start when it is back");
        return Ok("0-0".to_owned());
    };
    let newest = info.last_generated_id.unwrap_or_else(|| "0-0".to_owned());
    if entry_id_key(&newest) < entry_id_key(&last) {
        tracing::warn!(
            stream = stream,
            last,
            newest,
            "the stream came back shorter: reading on after its newest entry"
        );
        return Ok(newest);
    }
    if newest == last {
        return Ok(last);
    }
    // Trimming removes the oldest entries first: while the last entry read is still there,
    // every later one is too. Once it is gone, later ones may have gone unread.
    if !reads::holds(conn, stream, &last).await? {
        tracing::warn!(stream = stream, last, "entries after the last one read may have been trimmed unread: a gap");
        reader.gap();
    }
    Ok(last)
}

/// Where reading `stream` goes on after a lost connection when nothing of it was read (a
/// partition empty so far, every entry up to `read_to` in hand): from its start, or from what
/// is left, if entries were removed and some were added after `read_to` (`entries-added` above
/// `length`, `last-generated-id` above `read_to`), unread, so the reader is told of a gap.
/// Redis 7.0 does not record what trimming removed (`max-deleted-entry-id` counts only
/// `XDEL`), so a partition trimmed before the reader read it that gets new entries, all kept,
/// while the reader is away is taken for a gap too: a reload too many, never an event missed.
/// [`resume_from`] would look for the last entry read, and find a gap in every stream that got
/// its first entries meanwhile.
pub(crate) async fn resume_unread(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    read_to: super::merge::EntryId,
    reader: &dyn Reader,
) -> Result<(), RedisError> {
    let Some(info) = reads::info(conn, stream).await? else { return Ok(()) };
    // Without the counts (before Redis 7.0), a gap is presumed.
    let removed = match (info.entries_added, info.length) {
        (Some(added), Some(length)) => added > length,
        _ => true,
    };
    let added_since = info.last_generated_id.is_none_or(|last| super::merge::EntryId::from(last.as_str()) > read_to);
    let removed = removed && added_since;
    if removed {
        tracing::warn!(stream, "entries were trimmed before any was read: a gap");
        reader.gap();
    }
    Ok(())
}
