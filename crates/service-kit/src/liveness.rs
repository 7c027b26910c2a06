//! Liveness that reflects the work loops, not just the process: each loop beats a
//! [`Heartbeat`] every time round, and `/healthz` fails once one has not beaten for longer than
//! its own bound. A loop that waits on a dependency keeps beating (it is alive, and readiness
//! says what it waits for); a loop stuck on something that never returns stops.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// The loops of a service. Cloning is cheap.
#[derive(Clone, Default)]
pub struct Liveness {
    loops: Arc<Mutex<Vec<Arc<LoopState>>>>,
}

struct LoopState {
    name: String,
    stall_after: Duration,
    beat: Mutex<Instant>,
}

/// A loop's heartbeat. Dropping it (the loop ended) removes the loop from the check.
pub struct Heartbeat {
    state: Arc<LoopState>,
    liveness: Liveness,
}

impl Liveness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a loop that beats at least every `stall_after` while it runs.
    pub fn register(&self, name: impl Into<String>, stall_after: Duration) -> Heartbeat {
        let state = Arc::new(LoopState { name: name.into(), stall_after, beat: Mutex::new(Instant::now()) });
        self.loops().push(state.clone());
        Heartbeat { state, liveness: self.clone() }
    }

    /// Loops that have not beaten within their bound: name and time since the last beat.
    pub fn stalled(&self) -> Vec<(String, Duration)> {
        self.loops()
            .iter()
            .filter_map(|l| {
                let since = l.beat.lock().unwrap_or_else(PoisonError::into_inner).elapsed();
                (since > l.stall_after).then(|| (l.name.clone(), since))
            })
            .collect()
    }

    fn loops(&self) -> std::sync::MutexGuard<'_, Vec<Arc<LoopState>>> {
        // A plain Vec: a panic while holding the lock cannot leave it inconsistent.
        self.loops.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Heartbeat {
    pub fn beat(&self) {
        *self.state.beat.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.liveness.loops().retain(|l| !Arc::ptr_eq(l, &self.state));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_loop_that_stops_beating_is_stalled_and_one_that_ended_is_not() {
        let liveness = Liveness::new();
        let consumer = liveness.register("consumer loop", Duration::from_millis(100));
        let other = liveness.register("other", Duration::from_millis(100));
        tokio::time::sleep(Duration::from_millis(60)).await;
        consumer.beat();
        other.beat();
        assert!(liveness.stalled().is_empty());
        tokio::time::sleep(Duration::from_millis(150)).await;
        other.beat();
        let stalled = liveness.stalled();
        assert_eq!(stalled.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(), ["consumer loop"]);
        assert!(stalled[0].1 >= Duration::from_millis(150));
        consumer.beat();
        assert!(liveness.stalled().is_empty());
        drop(other);
        drop(consumer);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(liveness.stalled().is_empty(), "loops that ended are not stalled");
    }
}
