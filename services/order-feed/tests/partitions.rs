//! The feed over `STREAM_PARTITIONS=3`: replicas started at different times give every event
//! the same place, so a cursor got on one resumes on another, tenant-wide or for one order;
//! and a feed that finds the events spread over another number of partitions reads nothing.

mod common;

use std::time::Duration;

use broker::redis::merge::{EntryId, Rank};
use broker::redis::target::{RedisConn, RedisTarget, Timeouts};
use common::*;
use domain::Partitions;
use ulid::Ulid;

const PARTITIONS: u16 = 3;

fn partitioned(stream: &str, count: u16) -> order_feed::Config {
    let mut config = config(stream);
    config.topology.stream_partitions = count;
    config
}

/// Two orders per partition, interleaved: partition 0, 1, 2, 0, 1, 2.
fn orders(partitions: &Partitions) -> Vec<Ulid> {
    let mut per: Vec<Vec<Ulid>> = vec![Vec::new(); partitions.count()];
    while per.iter().any(|orders| orders.len() < 2) {
        let order = Ulid::new();
        let of = &mut per[partitions.of(&order.to_string())];
        if of.len() < 2 {
            of.push(order);
        }
    }
    (0..2).flat_map(|i| per.iter().map(move |orders| orders[i]).collect::<Vec<_>>()).collect()
}

/// An event written to its partition.
#[derive(Debug, Clone)]
struct Written {
    event_id: String,
    order: Ulid,
    rank: Rank,
}

/// Writes events as the relays do: to the shared Redis, or to a cluster.
struct Writer {
    partitions: Partitions,
    orders: Vec<Ulid>,
    conn: RedisConn,
    /// A round in one atomic pipeline (one Redis only): entries of one millisecond in several
    /// partitions.
    atomic: bool,
}

impl Writer {
    async fn new(target: &RedisTarget, stream: &str) -> Self {
        let partitions = Partitions::new(stream, PARTITIONS).expect("partitions");
        let conn =
            target.connect(Timeouts::new(Duration::from_secs(5), Duration::from_secs(5))).await.expect("connect");
        Self { orders: orders(&partitions), partitions, conn, atomic: !target.is_cluster() }
    }

    /// Event `seq` of every order, each to its order's partition, the last order first (so in
    /// another order than their rank's).
    async fn round(&mut self, seq: i64) -> Vec<Written> {
        let events: Vec<_> = self.orders.iter().rev().map(|order| entry(Ulid::new(), *order, seq, "default")).collect();
        let xadds: Vec<redis::Cmd> = events
            .iter()
            .map(|event| {
                let mut xadd = redis::cmd("XADD");
                xadd.arg(self.partitions.stream_of(&event.aggregate_id)).arg("*");
                for (k, v) in event.to_fields() {
                    xadd.arg(k).arg(v);
                }
                xadd
            })
            .collect();
        let mut ids: Vec<String> = Vec::new();
        if self.atomic {
            let mut pipe = redis::pipe();
            for xadd in xadds {
                pipe.atomic().add_command(xadd);
            }
            ids = pipe.query_async(&mut self.conn).await.expect("XADD");
        } else {
            // A cluster takes no pipeline across slots.
            for xadd in xadds {
                ids.push(xadd.query_async(&mut self.conn).await.expect("XADD"));
            }
        }
        events
            .iter()
            .zip(ids)
            .map(|(event, id)| Written {
                event_id: event.event_id.to_string(),
                order: event.aggregate_id.parse().expect("order id"),
                rank: Rank { id: EntryId::from(id.as_str()), partition: self.partitions.of(&event.aggregate_id) },
            })
            .collect()
    }
}

fn event_ids(events: &[Written]) -> Vec<String> {
    events.iter().map(|w| w.event_id.clone()).collect()
}

/// Replica A runs alone while three rounds of events are written to the partitions, then B
/// starts (loading them) and two more rounds follow. Both send the events in rank order, and a
/// tenant-wide client resuming on one replica from any event id got on the other gets exactly
/// the events after it. The replicas, and the events as written and in rank order.
async fn replicas_started_apart_agree(
    config: impl Fn() -> order_feed::Config,
    writer: &mut Writer,
) -> (RunningFeed, RunningFeed, Vec<Written>, Vec<Written>) {
    let a = RunningFeed::start(config()).await;
    let mut live_a = SseClient::connect(&a.url("/events"), &[]).await;
    let mut written = Vec::new();
    for seq in 1..=3 {
        written.extend(writer.round(seq).await);
    }
    let b = RunningFeed::start(config()).await;
    // B has passed every entry it loaded on (none may still wait on its watermark).
    b.wait_kept(18).await;
    let mut live_b = SseClient::connect(&b.url("/events"), &[]).await;
    for seq in 4..=5 {
        written.extend(writer.round(seq).await);
    }
    let mut by_rank = written.clone();
    by_rank.sort_by_key(|w| w.rank);
    let expected = event_ids(&by_rank);
    assert_eq!(ids(&live_a.take(30).await), expected, "A sends the events in rank order");
    assert_eq!(ids(&live_b.take(12).await), expected[18..], "so does B, from where it joined");
    for feed in [&a, &b] {
        feed.wait_kept(30).await;
    }
    for (from, to) in [(&a, &b), (&b, &a)] {
        for k in [0, 7, 17, 18, 24, 29] {
            let cursor = [("Last-Event-ID", expected[k].as_str())];
            let mut resumed = SseClient::connect(&to.url("/events"), &cursor).await;
            assert_eq!(ids(&resumed.take(29 - k).await), expected[k + 1..], "after event {k} of {}", from.addr);
            assert_eq!(resumed.next(Duration::from_millis(300)).await, None, "nothing more, nothing twice");
        }
    }
    (a, b, written, by_rank)
}

/// [`replicas_started_apart_agree`] on one Redis; a client of one order resumes as well, from
/// its own event or from another order's (a heartbeat's id). Control: in the order a plain
/// XREAD of the partitions returns the same entries, the same cursors would skip some events
/// and repeat others.
#[tokio::test]
async fn replicas_started_apart_resume_each_other_s_cursors_with_nothing_missed_or_repeated() {
    let stream = test_support::unique_name("feed-parts");
    let target = RedisTarget::new(&test_support::redis_url(), &[]).expect("URL");
    let mut writer = Writer::new(&target, &stream).await;
    let (a, b, written, by_rank) = replicas_started_apart_agree(|| partitioned(&stream, PARTITIONS), &mut writer).await;
    let expected = event_ids(&by_rank);

    let order = writer.orders[4];
    let of_order: Vec<String> = by_rank.iter().filter(|w| w.order == order).map(|w| w.event_id.clone()).collect();
    let url = b.url(&format!("/events?aggregate_id={order}"));
    let mut own = SseClient::connect(&url, &[("Last-Event-ID", &of_order[0])]).await;
    assert_eq!(ids(&own.take(4).await), of_order[1..]);
    let at = 20;
    let mut other = SseClient::connect(&url, &[("Last-Event-ID", &expected[at])]).await;
    let after: Vec<String> =
        by_rank[at + 1..].iter().filter(|w| w.order == order).map(|w| w.event_id.clone()).collect();
    assert!(!after.is_empty());
    assert_eq!(ids(&other.take(after.len()).await), after);
    assert_eq!(other.next(Duration::from_millis(300)).await, None);

    // Control: the partitions read together with XREAD come back a partition after another.
    let arrival = xread_all(&writer.partitions, &written).await;
    assert_ne!(arrival, expected);
    let resumed_in_arrival_order = |k: usize| {
        let at = arrival.iter().position(|id| *id == expected[k]).expect("there");
        arrival[at + 1..].to_vec()
    };
    assert!(
        [0, 7, 17, 18, 24].iter().any(|&k| resumed_in_arrival_order(k) != expected[k + 1..]),
        "the check above would catch an order that is not the rank order"
    );

    a.stop().await;
    b.stop().await;
    for stream in writer.partitions.streams() {
        delete_stream(stream).await;
    }
}

/// The same on a Redis Cluster of three shards, a partition on each: every partition is read
/// on its own shard, by the script that reads it with that shard's clock.
#[tokio::test]
async fn replicas_agree_on_a_cluster_too() {
    let cluster =
        tokio::task::spawn_blocking(|| test_support::PrivateRedisCluster::start(3, 0, Duration::from_millis(1500)))
            .await
            .expect("cluster");
    let stream = test_support::unique_name("feed-parts-cluster");
    let target = RedisTarget::new("", &cluster.urls()).expect("URLs");
    let mut writer = Writer::new(&target, &stream).await;
    let on_cluster = || {
        let mut config = partitioned(&stream, PARTITIONS);
        config.topology.redis_cluster_urls = cluster.urls();
        config
    };
    let (a, b, _, _) = replicas_started_apart_agree(on_cluster, &mut writer).await;
    a.stop().await;
    b.stop().await;
}

/// The event ids of the partitions as one XREAD of all of them returns their entries.
async fn xread_all(partitions: &Partitions, written: &[Written]) -> Vec<String> {
    let mut conn = test_support::redis_connection().await;
    let mut cmd = redis::cmd("XREAD");
    cmd.arg("COUNT").arg(1000).arg("STREAMS").arg(partitions.streams());
    for _ in partitions.streams() {
        cmd.arg("0-0");
    }
    let reply: redis::streams::StreamReadReply = cmd.query_async(&mut conn).await.expect("XREAD");
    let by_rank = |rank: Rank| written.iter().find(|w| w.rank == rank).map(|w| w.event_id.clone()).expect("written");
    reply
        .keys
        .iter()
        .flat_map(|key| {
            let partition = partitions.streams().iter().position(|s| *s == key.key).expect("a partition");
            key.ids.iter().map(move |e| Rank { id: EntryId::from(e.id.as_str()), partition })
        })
        .map(by_rank)
        .collect()
}

/// The events are spread over two partitions (so recorded): a feed set to three reads nothing
/// and says why on `/readyz`; clients are sent elsewhere. Control: a feed set to two reads.
#[tokio::test]
async fn a_feed_set_to_another_number_of_partitions_reads_nothing_and_says_why() {
    let stream = test_support::unique_name("feed-parts-count");
    let key = format!("{stream}:partitions");
    let mut conn = test_support::redis_connection().await;
    let () = redis::cmd("SET").arg(&key).arg(2).query_async(&mut conn).await.expect("SET");

    let feed = order_feed::OrderFeed::bind(partitioned(&stream, PARTITIONS)).await.expect("bind");
    let addr = order_feed::Service::local_addr(&feed);
    let shutdown = order_feed::Shutdown::new();
    let task = tokio::spawn(order_feed::Service::run(feed, shutdown.clone()));
    let why = test_support::eventually("readyz to say why", Duration::from_secs(10), || async {
        let r = reqwest::get(format!("http://{addr}/readyz")).await.ok()?;
        let status = r.status();
        let body = r.text().await.ok()?;
        (status == 503 && body.contains("stream partitions")).then_some(body)
    })
    .await;
    assert!(why.contains("STREAM_PARTITIONS is 3") && why.contains(&key), "{why}");
    let refused = reqwest::get(format!("http://{addr}/events")).await.expect("GET /events");
    assert_eq!(refused.status(), 503);
    shutdown.cancel();
    task.await.expect("task").expect("clean stop");

    let agreeing = RunningFeed::start(partitioned(&stream, 2)).await;
    let event = entry(Ulid::new(), Ulid::new(), 1, "default");
    let mut client = SseClient::connect(&agreeing.url("/events"), &[]).await;
    let two = Partitions::new(&stream, 2).expect("partitions");
    xadd(two.stream_of(&event.aggregate_id), &event).await;
    assert_eq!(ids(&client.take(1).await), vec![event.event_id.to_string()]);
    agreeing.stop().await;
    let _: i64 = redis::cmd("DEL").arg(&key).arg(two.streams()).query_async(&mut conn).await.expect("DEL");
}

/// After a lost connection each partition goes on from its last entry read; one whose last
/// entry was trimmed meanwhile makes every client reload, and so does one that was empty and
/// got entries that were trimmed meanwhile. Control: without the trim, the client resumes with
/// nothing missed, in the partition read before as in the one that was empty.
#[tokio::test]
async fn a_partition_trimmed_while_a_replica_was_away_makes_every_client_reload() {
    for (trimmed, elsewhere) in [(false, false), (true, false), (false, true), (true, true)] {
        let redis = test_support::PrivateRedis::start(false);
        let stream = test_support::unique_name("feed-parts-gap");
        let partitions = Partitions::new(&stream, PARTITIONS).expect("partitions");
        let mut own = partitioned(&stream, PARTITIONS);
        own.redis_url = redis.url();
        let feed = RunningFeed::start(own).await;
        let mut admin =
            redis::Client::open(redis.url()).expect("URL").get_multiplexed_async_connection().await.expect("connect");
        let add = |e: &domain::StreamEntry| {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(partitions.stream_of(&e.aggregate_id)).arg("*");
            for (k, v) in e.to_fields() {
                cmd.arg(k).arg(v);
            }
            cmd
        };
        let order = Ulid::new();
        let first = entry(Ulid::new(), order, 1, "default");
        let _: String = add(&first).query_async(&mut admin).await.expect("XADD");
        feed.wait_read(1).await;
        let first_id = first.event_id.to_string();
        let cursor = [("Last-Event-ID", first_id.as_str())];
        let mut sse = SseClient::connect(&feed.url("/events"), &cursor).await;
        // Cut the replica off; while it is away, one event is added (to the partition read
        // before, or to one still empty), and maybe trimmed.
        let missed = if elsewhere {
            let other = std::iter::repeat_with(Ulid::new)
                .find(|o| partitions.of(&o.to_string()) != partitions.of(&order.to_string()))
                .expect("an order of another partition");
            entry(Ulid::new(), other, 1, "default")
        } else {
            entry(Ulid::new(), order, 2, "default")
        };
        let mut away = redis::pipe();
        away.atomic().cmd("CLIENT").arg("KILL").arg("SKIPME").arg("yes").arg("TYPE").arg("normal").ignore();
        away.add_command(add(&missed)).ignore();
        if trimmed {
            away.cmd("XTRIM").arg(partitions.stream_of(&missed.aggregate_id)).arg("MAXLEN").arg(0).ignore();
        }
        let () = away.query_async(&mut admin).await.expect("cut off, add, trim");
        let case = format!("trimmed: {trimmed}, to a partition empty before: {elsewhere}");
        if trimmed {
            assert!(sse.ends_within(Duration::from_secs(10)).await, "the stream ended ({case})");
            test_support::eventually("the replica reading again", Duration::from_secs(10), || async {
                let r = reqwest::get(feed.url("/readyz")).await.ok()?;
                (r.status() == 200).then_some(())
            })
            .await;
            let mut again = SseClient::connect(&feed.url("/events"), &cursor).await;
            assert_eq!(again.take(1).await[0].event.as_deref(), Some("reset"), "{case}");
            assert!(feed.metrics().await.contains("feed_stream_gaps_total 1"), "{case}");
        } else {
            assert_eq!(ids(&sse.take(1).await), vec![missed.event_id.to_string()], "{case}");
            assert!(feed.metrics().await.contains("feed_stream_gaps_total 0"), "{case}");
        }
        feed.stop().await;
    }
}
