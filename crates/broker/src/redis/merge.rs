//! The one order every replica gives the entries of the partition streams, and the merging of
//! the partitions' reads into it. Pure: the reading is [`super::partitioned`]'s.
//!
//! An entry's [`Rank`] is its id in its partition stream (ms, seq), then the partition's index
//! for ties. A replica passes an entry on only once no entry of lower rank can still turn up:
//! for each partition it keeps a bound B such that it holds every entry of the partition with
//! an id at or below B, and the watermark W is the least B. Entries at or below W are released
//! in rank order; the others wait. So every replica releases prefixes of the same sequence,
//! however its reads were timed, and a cursor names the same place on each.
//!
//! Each read of a partition moves its B: a full page ends at its last entry (more may follow);
//! a short one held every entry there was when the partition's server read its clock, and
//! `XADD` numbers later entries from that clock's millisecond on, so B = max(last entry read,
//! (clock - 1 ms, any seq)). The watermark thus follows the slowest clock among the servers
//! that hold the partitions: clock skew between them delays every event by as much. A clock
//! set back would break the rule, and entries it numbers below W are released on arrival (out
//! of the order other replicas give them).

mod load;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

pub use load::{FirstPage, Load};

/// An entry's id in its stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    pub ms: u64,
    pub seq: u64,
}

impl EntryId {
    /// Before every entry (`XRANGE` after it reads a stream from its start).
    pub const ZERO: Self = Self { ms: 0, seq: 0 };

    pub const fn new(ms: u64, seq: u64) -> Self {
        Self { ms, seq }
    }

    /// Above every id a stream holds when its server's clock reads `now_ms`, and below every
    /// id it gives a later entry.
    pub const fn before_time(now_ms: u64) -> Self {
        Self { ms: now_ms.saturating_sub(1), seq: u64::MAX }
    }
}

impl From<&str> for EntryId {
    fn from(id: &str) -> Self {
        let (ms, seq) = domain::entry_id_key(id);
        Self { ms, seq }
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// An entry's place in the order every replica gives the entries of all partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rank {
    pub id: EntryId,
    pub partition: usize,
}

/// One partition as read so far.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    /// The last entry read: the next read is after it.
    last: EntryId,
    /// Every entry with an id up to this one is in hand (released, or pending).
    bound: EntryId,
}

/// The partitions' reads, merged: what may be released, and what must wait.
pub struct Merge<T> {
    cursors: Vec<Cursor>,
    pending: BTreeMap<Rank, T>,
    /// Pending entries past which only the partitions holding the watermark back are read.
    cap: usize,
}

impl<T> Merge<T> {
    /// Partitions read up to `last` each, with their bounds, and entries waiting.
    fn from_parts(cursors: Vec<(EntryId, EntryId)>, pending: BTreeMap<Rank, T>, cap: usize) -> Self {
        let cursors = cursors.into_iter().map(|(last, bound)| Cursor { last, bound }).collect();
        Self { cursors, pending, cap: cap.max(1) }
    }

    /// `partitions` partitions, none read yet.
    pub fn new(partitions: usize, cap: usize) -> Self {
        Self::from_parts(vec![(EntryId::ZERO, EntryId::ZERO); partitions], BTreeMap::new(), cap)
    }

    /// The last entry read of `partition`.
    pub fn last(&self, partition: usize) -> EntryId {
        self.cursors[partition].last
    }

    /// Every entry of `partition` up to this one is in hand.
    pub fn bound(&self, partition: usize) -> EntryId {
        self.cursors[partition].bound
    }

    /// Reading `partition` goes on after `last` (after a lost connection). Its bound stays:
    /// a stream lost or cut back numbers its new entries from its server's clock, above it.
    pub fn resume(&mut self, partition: usize, last: EntryId) {
        self.cursors[partition].last = last;
    }

    /// Below this, every entry of every partition is in hand.
    pub fn watermark(&self) -> EntryId {
        self.cursors.iter().map(|c| c.bound).min().unwrap_or_default()
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The partitions to read this round: all of them, or, while `cap` entries wait, only
    /// those holding the watermark back (reading them is what lets the waiting ones go).
    pub fn wanted(&self) -> Vec<usize> {
        let watermark = self.watermark();
        let all = self.pending.len() < self.cap;
        (0..self.cursors.len()).filter(|&p| all || self.cursors[p].bound == watermark).collect()
    }

    /// A page of `partition` read after its last entry, in stream order; `full`: as many
    /// entries as were asked for; `now_ms`: the partition's server's clock, read with the page.
    pub fn take_page(&mut self, partition: usize, page: Vec<(EntryId, T)>, full: bool, now_ms: u64) {
        let cursor = &mut self.cursors[partition];
        for (id, entry) in page {
            cursor.last = cursor.last.max(id);
            self.pending.insert(Rank { id, partition }, entry);
        }
        let bound = if full { cursor.last } else { cursor.last.max(EntryId::before_time(now_ms)) };
        cursor.bound = cursor.bound.max(bound);
    }

    /// Every entry at or below the watermark, in rank order: each is passed on once.
    pub fn release(&mut self) -> Vec<(Rank, T)> {
        let watermark = self.watermark();
        let mut released = Vec::new();
        while let Some(first) = self.pending.first_entry() {
            if first.key().id > watermark {
                break;
            }
            released.push(first.remove_entry());
        }
        released
    }

    /// How long to wait before the next round: none after a full page (more is there); while
    /// entries wait, about as long as the slowest clock needs to pass the oldest of them (at
    /// least 1 ms, at most `poll`); else `poll`.
    pub fn pause(&self, any_full: bool, poll: Duration) -> Duration {
        if any_full {
            return Duration::ZERO;
        }
        match self.pending.first_key_value() {
            Some((oldest, _)) => {
                let behind = oldest.id.ms.saturating_sub(self.watermark().ms);
                Duration::from_millis(behind).clamp(Duration::from_millis(1), poll)
            }
            None => poll,
        }
    }
}

#[cfg(test)]
mod tests;
