//! What a replica loads as it starts: the newest entries of all partitions, in rank order, as
//! a contiguous stretch of the order every replica gives them.
//!
//! The partitions are read newest first, a page at a time, and merged as they come, highest
//! rank first: once as many entries at or below the watermark are taken as the history keeps,
//! the taken ones are every entry from the lowest of them on (a partition loaded less far back
//! than that would leave a hole a client's cursor could fall into unnoticed). Entries above the
//! watermark wait, as in [`Merge`], and count towards nothing. Only one page per partition is
//! held besides what is taken.

use std::collections::{BTreeMap, VecDeque};

use super::{EntryId, Merge, Rank};

/// A partition's newest entries, newest first, and its server's clock, read together.
pub struct FirstPage<T> {
    pub entries: Vec<(EntryId, T)>,
    /// As many entries as were asked for: older ones may be left.
    pub full: bool,
    pub now_ms: u64,
}

/// One partition, being loaded.
struct Loading<T> {
    /// Fetched and not yet taken, newest first.
    page: VecDeque<(EntryId, T)>,
    /// Older entries may be left to fetch.
    more: bool,
    /// The oldest entry fetched: the next page is before it.
    oldest: Option<EntryId>,
    /// The newest entry (reading goes on after it), and the partition's bound.
    newest: EntryId,
    bound: EntryId,
}

/// The load under way.
pub struct Load<T> {
    partitions: Vec<Loading<T>>,
    watermark: EntryId,
    /// Entries at or below the watermark to take.
    keep: usize,
    /// Taken, highest rank first.
    kept: Vec<(Rank, T)>,
    pending: BTreeMap<Rank, T>,
}

impl<T> Load<T> {
    /// Starts from each partition's first page; `keep`: entries the history keeps.
    pub fn new(first_pages: Vec<FirstPage<T>>, keep: usize) -> Self {
        let partitions: Vec<Loading<T>> = first_pages
            .into_iter()
            .map(|first| {
                let newest = first.entries.first().map_or(EntryId::ZERO, |(id, _)| *id);
                Loading {
                    oldest: first.entries.last().map(|(id, _)| *id),
                    page: first.entries.into(),
                    more: first.full,
                    newest,
                    bound: newest.max(EntryId::before_time(first.now_ms)),
                }
            })
            .collect();
        let watermark = partitions.iter().map(|p| p.bound).min().unwrap_or_default();
        Self { partitions, watermark, keep: keep.max(1), kept: Vec::new(), pending: BTreeMap::new() }
    }

    /// Takes entries, highest rank first, until it needs an older page of a partition (which
    /// it returns, with the entry the page must be before), or until it is done (`None`).
    pub fn advance(&mut self) -> Option<(usize, EntryId)> {
        while self.kept.len() < self.keep {
            // Which partition holds the next entry is known only when each has one at hand.
            if let Some(p) = self.partitions.iter().position(|p| p.page.is_empty() && p.more) {
                return self.partitions[p].oldest.map(|before| (p, before));
            }
            let next = (0..self.partitions.len())
                .filter_map(|p| self.partitions[p].page.front().map(|(id, _)| Rank { id: *id, partition: p }))
                .max()?;
            let Some((_, entry)) = self.partitions[next.partition].page.pop_front() else { break };
            if next.id > self.watermark {
                self.pending.insert(next, entry);
            } else {
                self.kept.push((next, entry));
            }
        }
        None
    }

    /// An older page of `partition` (newest first), asked for by [`Self::advance`].
    pub fn add_page(&mut self, partition: usize, entries: Vec<(EntryId, T)>, full: bool) {
        let loading = &mut self.partitions[partition];
        loading.more = full;
        if let Some((oldest, _)) = entries.last() {
            loading.oldest = Some(*oldest);
        }
        loading.page.extend(entries);
    }

    /// The loaded history in rank order, and the merge that reads on from there (holding the
    /// entries above the watermark; `cap` as in [`Merge`]).
    pub fn finish(self, cap: usize) -> (Vec<(Rank, T)>, Merge<T>) {
        let mut history = self.kept;
        history.reverse();
        let cursors = self.partitions.iter().map(|p| (p.newest, p.bound)).collect();
        (history, Merge::from_parts(cursors, self.pending, cap))
    }
}
