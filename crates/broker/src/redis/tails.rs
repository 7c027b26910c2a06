//! The newest entry each of this relay's publishers added, kept so that after Redis went away
//! (a restart, a failover) the relay can check that Redis still holds it (the relay's
//! recovery, with [`super::marker::look_for`]).
//!
//! A publisher hands its newest entry over when its connection ends; the recovery loop hands
//! over every publisher's newest when its own connection ends. Between them, whatever a
//! publisher added before Redis went away is checked, whether or not the publisher has added
//! more since (on a new connection) or not used Redis at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// The most entry ids waiting to be checked; more are not kept (the oldest are, as they show
/// the earliest loss).
const MOST_TO_CHECK: usize = 64;

#[derive(Debug, Clone, Default)]
pub struct Tails {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Per publisher, the id of the newest entry it added on its current connection.
    newest: HashMap<usize, String>,
    to_check: Vec<String>,
    /// The stream's marker at the recovery loop's last look: the stream these entries went to.
    marker: Option<String>,
}

impl Inner {
    fn hand_over(&mut self, id: String) {
        if self.to_check.len() < MOST_TO_CHECK && !self.to_check.contains(&id) {
            self.to_check.push(id);
        }
    }
}

impl Tails {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding it; a poisoned map is still a map.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Publisher `publisher` added entries up to `id`.
    pub fn added(&self, publisher: usize, id: &str) {
        self.lock().newest.insert(publisher, id.to_owned());
    }

    /// Publisher `publisher`'s connection ended: its newest entry is to be checked.
    pub fn connection_ended(&self, publisher: usize) {
        let mut inner = self.lock();
        if let Some(id) = inner.newest.remove(&publisher) {
            inner.hand_over(id);
        }
    }

    /// Redis went away: every publisher's newest entry is to be checked.
    pub fn redis_went_away(&self) {
        let mut inner = self.lock();
        let newest: Vec<String> = inner.newest.values().cloned().collect();
        for id in newest {
            inner.hand_over(id);
        }
    }

    /// The entries to check, taken.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().to_check)
    }

    /// The recovery loop saw `marker` on the stream.
    pub fn saw_marker(&self, marker: Option<String>) {
        self.lock().marker = marker;
    }

    /// The marker the recovery loop saw last.
    pub fn marker_seen(&self) -> Option<String> {
        self.lock().marker.clone()
    }

    /// Entries taken and not checked, to check at the next look.
    pub fn put_back(&self, ids: Vec<String>) {
        let mut inner = self.lock();
        for id in ids {
            inner.hand_over(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_publisher_added_last_is_handed_over_once_its_connection_ends() {
        let tails = Tails::default();
        tails.added(0, "1-1");
        tails.added(0, "2-1");
        tails.added(1, "3-1");
        assert!(tails.take().is_empty(), "nothing ended yet");
        tails.connection_ended(0);
        assert_eq!(tails.take(), ["2-1"]);
        tails.connection_ended(0);
        assert!(tails.take().is_empty(), "handed over once");
        tails.redis_went_away();
        tails.redis_went_away();
        assert_eq!(tails.take(), ["3-1"], "the other publisher's, once");
        tails.put_back(vec!["3-1".to_owned()]);
        assert_eq!(tails.take(), ["3-1"]);
    }

    #[test]
    fn the_oldest_are_kept_when_too_many_wait() {
        let tails = Tails::default();
        for i in 0..MOST_TO_CHECK + 10 {
            tails.added(i, &format!("{i}-0"));
            tails.connection_ended(i);
        }
        let taken = tails.take();
        assert_eq!(taken.len(), MOST_TO_CHECK);
        assert_eq!(taken[0], "0-0");
    }
}
