//! When each order is meant to start.
//!
//! At a fixed rate the run is open-loop: order `j` is due at `start + j / rate` whatever the
//! system is doing, and its latency is measured from that due time. A client that is still
//! busy when an order falls due makes that order late, and the lateness counts against the
//! system, so a stall shows up in the percentiles instead of silently lowering the offered load
//! (coordinated omission).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct Schedule {
    start: Instant,
    deadline: Instant,
    max_orders: u64,
    interval: Option<Duration>,
    next: AtomicU64,
    handed_out: AtomicU64,
}

/// One order slot handed to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub index: u64,
    /// When the order is due; latency is measured from here.
    pub due: Instant,
}

impl Schedule {
    /// `rate` in orders per second; `None` means each order is due as soon as a client is free.
    pub fn new(start: Instant, duration: Duration, max_orders: Option<u64>, rate: Option<f64>) -> Self {
        Self {
            start,
            deadline: start + duration,
            max_orders: max_orders.unwrap_or(u64::MAX),
            interval: rate.map(|r| Duration::from_secs_f64(1.0 / r)),
            next: AtomicU64::new(0),
            handed_out: AtomicU64::new(0),
        }
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    /// Takes the next slot, or `None` when the run is over (count reached or past the deadline).
    pub fn take(&self, now: Instant) -> Option<Slot> {
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        if index >= self.max_orders {
            return None;
        }
        let due = match self.interval {
            Some(interval) => self.start + interval.mul_f64(index as f64),
            None => now,
        };
        if due >= self.deadline {
            return None;
        }
        self.handed_out.fetch_add(1, Ordering::Relaxed);
        Some(Slot { index, due })
    }

    /// Slots handed out so far.
    pub fn taken(&self) -> u64 {
        self.handed_out.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_rate_slots_are_due_on_the_clock_not_when_taken() {
        let start = Instant::now();
        let s = Schedule::new(start, Duration::from_secs(10), None, Some(100.0));
        let late = start + Duration::from_secs(5);
        let dues: Vec<_> = (0..5).map(|_| s.take(late).expect("slot").due).collect();
        let expected: Vec<_> = (0..5).map(|i| start + Duration::from_millis(10 * i)).collect();
        assert_eq!(dues, expected, "a late client still measures from the intended start");
    }

    #[test]
    fn fixed_rate_stops_at_the_deadline() {
        let start = Instant::now();
        let s = Schedule::new(start, Duration::from_secs(1), None, Some(50.0));
        let n = std::iter::from_fn(|| s.take(start)).count();
        assert_eq!(n, 50);
        assert!(s.take(start).is_none(), "stays over");
        assert_eq!(s.taken(), 50, "refused slots are not counted");
    }

    #[test]
    fn order_limit_stops_a_saturating_run() {
        let start = Instant::now();
        let s = Schedule::new(start, Duration::from_secs(60), Some(7), None);
        let slots: Vec<_> = std::iter::from_fn(|| s.take(start)).collect();
        assert_eq!(slots.len(), 7);
        assert!(slots.iter().all(|slot| slot.due == start));
        assert_eq!(s.taken(), 7);
    }

    #[test]
    fn saturating_run_stops_at_the_deadline() {
        let start = Instant::now();
        let s = Schedule::new(start, Duration::from_secs(1), None, None);
        assert!(s.take(start).is_some());
        assert!(s.take(start + Duration::from_secs(1)).is_none());
        assert_eq!(s.taken(), 1);
    }
}
