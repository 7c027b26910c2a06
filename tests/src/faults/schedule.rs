//! The seeded fault schedule: which fault, against which process, at which point of the load.
//!
//! Faults are placed by load progress (the number of orders started), not by wall-clock time,
//! so a rerun with the same seed injects the same faults at the same points of the same load
//! whatever the speed of the machine.

use std::fmt;
use std::time::Duration;

use ::broker::Kind;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A process the schedule may kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Relay(usize),
    Consumer(usize),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Relay(i) => write!(f, "relay-{i}"),
            Self::Consumer(i) => write!(f, "consumer-{i}"),
        }
    }
}

/// One fault and how long the victim stays down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9`, restarted after `down_for`.
    Kill { target: Target, down_for: Duration },
    /// SIGSTOP on a relay for longer than its lease, then SIGCONT.
    FreezeRelay { relay: usize, frozen_for: Duration },
    /// SIGSTOP on a consumer in the middle of a batch transaction, for longer than
    /// `CLAIM_MIN_IDLE` (its entries are claimed by the others), then SIGCONT.
    FreezeConsumer { consumer: usize, frozen_for: Duration },
    /// The broker's server (Redis, or nats-server) `kill -9`, restarted on the same data
    /// directory.
    BrokerCrash { broker: Kind, down_for: Duration },
    /// `pg_ctl stop -m immediate`, restarted on the same data directory.
    PostgresCrash { down_for: Duration },
    /// A consumer dies after committing a batch and before acknowledging it to `broker`.
    ConsumerCrashAfterCommit { consumer: usize, broker: Kind },
}

impl Fault {
    /// The name faults are counted under in the report.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Kill { target: Target::Relay(_), .. } => "kill -9 relay",
            Self::Kill { target: Target::Consumer(_), .. } => "kill -9 consumer",
            Self::FreezeRelay { .. } => "SIGSTOP relay past lease",
            Self::FreezeConsumer { .. } => "SIGSTOP consumer mid-batch past CLAIM_MIN_IDLE",
            Self::BrokerCrash { broker: Kind::Redis, .. } => "kill -9 redis",
            Self::BrokerCrash { broker: Kind::Nats, .. } => "kill -9 nats",
            Self::PostgresCrash { .. } => "pg_ctl stop -m immediate",
            Self::ConsumerCrashAfterCommit { broker: Kind::Redis, .. } => "consumer crash after commit, before XACK",
            Self::ConsumerCrashAfterCommit { broker: Kind::Nats, .. } => "consumer crash after commit, before ack",
        }
    }
}

/// A fault and the load progress (orders started) at which it fires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    pub at_order: usize,
    pub fault: Fault,
}

/// What the schedule must contain.
#[derive(Debug, Clone)]
pub struct ScheduleSpec {
    pub orders: usize,
    pub relays: usize,
    pub consumers: usize,
    /// The broker whose server crashes, and which consumers acknowledge to.
    pub broker: Kind,
    pub kills: usize,
    pub relay_freezes: usize,
    pub consumer_freezes: usize,
    pub broker_crashes: usize,
    pub postgres_crashes: usize,
    pub consumer_commit_crashes: usize,
    /// A broker crash that stays down this long (an outage, besides the short crashes).
    pub broker_outage: Option<Duration>,
    /// The relays' lease: a freeze lasts longer than this.
    pub relay_lease: Duration,
    /// The consumers' `CLAIM_MIN_IDLE`: a freeze lasts longer than this.
    pub claim_min_idle: Duration,
}

/// Builds the schedule for `seed`: the same seed and spec always give the same schedule.
///
/// Faults are spread over the middle of the load (5 %–90 % of the orders) so that every fault
/// hits a system under load and the tail of the load runs on a recovered system.
pub fn generate(seed: u64, spec: &ScheduleSpec) -> Vec<Scheduled> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults = Vec::new();
    for _ in 0..spec.kills {
        let target = if rng.random_bool(0.5) && spec.relays > 0 {
            Target::Relay(rng.random_range(0..spec.relays))
        } else {
            Target::Consumer(rng.random_range(0..spec.consumers.max(1)))
        };
        faults.push(Fault::Kill { target, down_for: Duration::from_millis(rng.random_range(100..=1_200)) });
    }
    for _ in 0..spec.relay_freezes {
        let extra = Duration::from_millis(rng.random_range(500..=1_500));
        faults.push(Fault::FreezeRelay {
            relay: rng.random_range(0..spec.relays.max(1)),
            frozen_for: spec.relay_lease + extra,
        });
    }
    for _ in 0..spec.consumer_freezes {
        let extra = Duration::from_millis(rng.random_range(500..=1_500));
        faults.push(Fault::FreezeConsumer {
            consumer: rng.random_range(0..spec.consumers.max(1)),
            frozen_for: spec.claim_min_idle + extra,
        });
    }
    for _ in 0..spec.broker_crashes {
        let down_for = Duration::from_millis(rng.random_range(300..=2_000));
        faults.push(Fault::BrokerCrash { broker: spec.broker, down_for });
    }
    if let Some(down_for) = spec.broker_outage {
        faults.push(Fault::BrokerCrash { broker: spec.broker, down_for });
    }
    for _ in 0..spec.postgres_crashes {
        faults.push(Fault::PostgresCrash { down_for: Duration::from_millis(rng.random_range(300..=2_000)) });
    }
    for _ in 0..spec.consumer_commit_crashes {
        let consumer = rng.random_range(0..spec.consumers.max(1));
        faults.push(Fault::ConsumerCrashAfterCommit { consumer, broker: spec.broker });
    }
    // Fisher–Yates with the seeded generator, then evenly spaced, jittered positions.
    for i in (1..faults.len()).rev() {
        faults.swap(i, rng.random_range(0..=i));
    }
    let first = spec.orders / 20;
    let span = (spec.orders * 9 / 10).saturating_sub(first).max(1);
    let step = span / faults.len().max(1);
    faults
        .into_iter()
        .enumerate()
        .map(|(i, fault)| {
            let jitter = if step > 1 { rng.random_range(0..step) } else { 0 };
            Scheduled { at_order: first + i * step + jitter, fault }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ScheduleSpec {
        ScheduleSpec {
            orders: 10_000,
            relays: 2,
            consumers: 3,
            broker: Kind::Redis,
            kills: 30,
            relay_freezes: 1,
            consumer_freezes: 1,
            broker_crashes: 1,
            postgres_crashes: 1,
            consumer_commit_crashes: 2,
            broker_outage: None,
            relay_lease: Duration::from_secs(2),
            claim_min_idle: Duration::from_secs(2),
        }
    }

    #[test]
    fn same_seed_same_schedule_other_seed_other_schedule() {
        assert_eq!(generate(7, &spec()), generate(7, &spec()));
        assert_ne!(generate(7, &spec()), generate(8, &spec()));
    }

    #[test]
    fn holds_every_requested_fault_in_load_order() {
        let s = generate(42, &spec());
        assert_eq!(s.len(), 36);
        let count = |kind: &str| s.iter().filter(|f| f.fault.kind() == kind).count();
        assert_eq!(count("kill -9 relay") + count("kill -9 consumer"), 30);
        assert!(count("kill -9 relay") > 0 && count("kill -9 consumer") > 0);
        assert_eq!(count("kill -9 redis"), 1);
        assert_eq!(count("pg_ctl stop -m immediate"), 1);
        assert_eq!(count("consumer crash after commit, before XACK"), 2);
        assert_eq!(count("SIGSTOP consumer mid-batch past CLAIM_MIN_IDLE"), 1);
        assert!(s.windows(2).all(|w| w[0].at_order < w[1].at_order), "positions increase");
        assert!(s.iter().all(|f| f.at_order >= 500 && f.at_order < 9_000));
        for f in &s {
            match &f.fault {
                Fault::FreezeRelay { relay, frozen_for } => assert!(*relay < 2 && *frozen_for > Duration::from_secs(2)),
                Fault::Kill { target: Target::Relay(i), .. } => assert!(*i < 2),
                Fault::FreezeConsumer { consumer, frozen_for } => {
                    assert!(*consumer < 3 && *frozen_for > Duration::from_secs(2))
                }
                Fault::Kill { target: Target::Consumer(i), .. }
                | Fault::ConsumerCrashAfterCommit { consumer: i, .. } => {
                    assert!(*i < 3)
                }
                _ => {}
            }
        }
    }

    #[test]
    fn on_nats_the_same_seed_crashes_nats_server_where_it_crashed_redis() {
        let redis = generate(42, &spec());
        let nats = generate(42, &ScheduleSpec { broker: Kind::Nats, ..spec() });
        let on = |broker: Kind, f: &Fault| match f.clone() {
            Fault::BrokerCrash { down_for, .. } => Fault::BrokerCrash { broker, down_for },
            Fault::ConsumerCrashAfterCommit { consumer, .. } => Fault::ConsumerCrashAfterCommit { consumer, broker },
            other => other,
        };
        let as_on_redis: Vec<Scheduled> =
            nats.iter().map(|s| Scheduled { at_order: s.at_order, fault: on(Kind::Redis, &s.fault) }).collect();
        assert_eq!(as_on_redis, redis);
        let count = |kind: &str| nats.iter().filter(|f| f.fault.kind() == kind).count();
        assert_eq!((count("kill -9 nats"), count("kill -9 redis")), (1, 0));
        assert_eq!(count("consumer crash after commit, before ack"), 2);
    }
}
