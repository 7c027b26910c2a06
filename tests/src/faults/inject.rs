//! Carries out the fault schedule against a running cluster while the load runs.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::cluster::Cluster;
use super::load::Gate;
use super::schedule::{Fault, Scheduled, Target};
use super::FaultError;

/// What the injector did.
#[derive(Debug, Default, Clone)]
pub struct Injected {
    pub by_kind: BTreeMap<&'static str, usize>,
    /// Entries a consumer had applied (their event is in `processed_messages`) but not yet
    /// acknowledged when it was killed: the commit-to-acknowledgement window really was hit
    /// this often.
    pub applied_unacked_at_crash: usize,
    /// Entries pending on consumers frozen mid-batch: the others claim them, so each is
    /// delivered at least twice.
    pub held_by_frozen_consumers: usize,
    /// Services that exited without being killed (restarted, and reported).
    pub unexpected_exits: Vec<String>,
}

impl Injected {
    pub fn process_kills(&self) -> usize {
        self.by_kind
            .iter()
            .filter(|(k, _)| {
                k.starts_with("kill -9 relay") || k.starts_with("kill -9 consumer") || k.starts_with("consumer crash")
            })
            .map(|(_, n)| n)
            .sum()
    }
}

/// Fires each scheduled fault once the load has started its order, letting the load run on
/// to the next fault's position meanwhile; returns when the schedule is done.
pub async fn run_schedule(cluster: &mut Cluster, schedule: &[Scheduled], gate: &Gate) -> Result<Injected, FaultError> {
    let mut injected = Injected::default();
    for (k, scheduled) in schedule.iter().enumerate() {
        while gate.started.load(Ordering::SeqCst) < scheduled.at_order {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        gate.open_to(schedule.get(k + 1).map_or(usize::MAX, |next| next.at_order + 1));
        restart_crashed(cluster, &mut injected)?;
        eprintln!("fault {:>3} at order {:>6}: {:?}", k + 1, scheduled.at_order, scheduled.fault);
        fire(cluster, &scheduled.fault, &mut injected).await?;
        *injected.by_kind.entry(scheduled.fault.kind()).or_default() += 1;
    }
    gate.open_to(usize::MAX);
    Ok(injected)
}

/// A service that died on its own is a finding, not part of the schedule: note and restart it.
pub fn restart_crashed(cluster: &mut Cluster, injected: &mut Injected) -> Result<(), FaultError> {
    for s in cluster.services_mut() {
        if let Some(status) = s.exited() {
            eprintln!("{} exited by itself ({status}); restarting", s.name);
            injected.unexpected_exits.push(format!("{} ({status})", s.name));
            s.start()?;
        }
    }
    Ok(())
}

async fn fire(cluster: &mut Cluster, fault: &Fault, injected: &mut Injected) -> Result<(), FaultError> {
    match fault {
        Fault::Kill { target, down_for } => {
            let service = match target {
                Target::Relay(i) => &mut cluster.relays[*i],
                Target::Consumer(i) => &mut cluster.consumers[*i],
            };
            service.kill().await;
            tokio::time::sleep(*down_for).await;
            service.start()
        }
        Fault::FreezeRelay { relay, frozen_for } => {
            let service = &cluster.relays[*relay];
            service.signal("STOP")?;
            tokio::time::sleep(*frozen_for).await;
            service.signal("CONT")
        }
        Fault::FreezeConsumer { consumer, frozen_for } => {
            cluster.freeze_consumer_mid_transaction(*consumer).await?;
            injected.held_by_frozen_consumers += pending_of(cluster, *consumer).await?;
            tokio::time::sleep(*frozen_for).await;
            cluster.consumers[*consumer].signal("CONT")
        }
        Fault::BrokerCrash { down_for, .. } => {
            cluster.kill_broker();
            tokio::time::sleep(*down_for).await;
            cluster.restart_broker();
            Ok(())
        }
        Fault::PostgresCrash { down_for } => {
            tokio::task::block_in_place(|| cluster.postgres.stop_immediate());
            tokio::time::sleep(*down_for).await;
            tokio::task::block_in_place(|| cluster.postgres.restart());
            Ok(())
        }
        Fault::ConsumerCrashAfterCommit { consumer, .. } => {
            injected.applied_unacked_at_crash += crash_after_commit(cluster, *consumer).await?;
            Ok(())
        }
    }
}

/// Kills a consumer between its database commit and its acknowledgement.
///
/// The consumer has no failpoint reachable from outside its process, so the window is forced
/// from the broker's side ([`AckHold`]): its acknowledgements are held while the database
/// commits of batches already read go through. If the consumer then holds entries it has
/// applied but not acknowledged, it is killed while it waits; otherwise the hold is lifted
/// and the attempt repeated (bounded), and in the end it is killed regardless. Returns how
/// many of its pending entries were already applied when it died.
async fn crash_after_commit(cluster: &mut Cluster, index: usize) -> Result<usize, FaultError> {
    let name = cluster.consumer_name(index);
    let mut applied = 0;
    for attempt in 1..=20 {
        let hold = AckHold::start(cluster, index).await?;
        tokio::time::sleep(Duration::from_millis(400)).await;
        applied = applied_but_pending(cluster, index).await.unwrap_or(0);
        if applied > 0 || attempt == 20 {
            cluster.consumers[index].kill().await;
            hold.drop_held(cluster).await?;
            break;
        }
        hold.release(cluster).await?;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    eprintln!("  {name} died with {applied} applied-but-unacknowledged entries");
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.consumers[index].start()?;
    Ok(applied)
}

/// Acknowledgements held back. On Redis, `CLIENT PAUSE … WRITE` holds every client's writes
/// (XACK and XREADGROUP among them) while reads and the consumers' database commits go on; on
/// NATS the consumer's link holds its acknowledgements, from the next one on, and whatever it
/// sends after them.
enum AckHold {
    Redis(redis::aio::MultiplexedConnection),
    Nats(usize),
}

impl AckHold {
    async fn start(cluster: &Cluster, index: usize) -> Result<Self, FaultError> {
        if let Some(link) = cluster.links.get(index) {
            link.hold();
            return Ok(Self::Nats(index));
        }
        let client = cluster.redis_client()?;
        let mut conn = client.get_multiplexed_async_connection().await.map_err(rd)?;
        redis::cmd("CLIENT").arg("PAUSE").arg(5_000).arg("WRITE").query_async::<()>(&mut conn).await.map_err(rd)?;
        Ok(Self::Redis(conn))
    }

    /// Lets the held acknowledgements through.
    async fn release(self, cluster: &Cluster) -> Result<(), FaultError> {
        match self {
            Self::Redis(mut conn) => redis::cmd("CLIENT").arg("UNPAUSE").query_async::<()>(&mut conn).await.map_err(rd),
            Self::Nats(index) => {
                cluster.links[index].release();
                Ok(())
            }
        }
    }

    /// Ends the hold after the consumer died: what it had sent is lost with it (on Redis its
    /// connection closed with the process, and the paused commands with it).
    async fn drop_held(self, cluster: &Cluster) -> Result<(), FaultError> {
        if let Self::Nats(index) = &self {
            cluster.links[*index].cut();
        }
        self.release(cluster).await
    }
}

fn rd(e: redis::RedisError) -> FaultError {
    FaultError::Redis(e.to_string())
}

/// The event ids of the entries consumer `index` holds: delivered to it, not acknowledged.
async fn held_by(cluster: &Cluster, index: usize) -> Result<Vec<String>, FaultError> {
    let mut session = cluster.probe()?.connect().await?;
    session.held_by(index, &cluster.consumer_name(index)).await
}

/// How many entries consumer `index` holds.
async fn pending_of(cluster: &Cluster, index: usize) -> Result<usize, FaultError> {
    Ok(held_by(cluster, index).await?.len())
}

/// How many of the entries consumer `index` holds were applied already.
async fn applied_but_pending(cluster: &Cluster, index: usize) -> Result<usize, FaultError> {
    let event_ids = held_by(cluster, index).await?;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_messages WHERE event_id = ANY($1)")
        .bind(&event_ids)
        .fetch_one(&cluster.inventory_db)
        .await
        .map_err(|e| FaultError::Postgres(e.to_string()))?;
    Ok(usize::try_from(applied).unwrap_or(0))
}
