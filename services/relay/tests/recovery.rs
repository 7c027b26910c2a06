//! Redis losing the stream's data is noticed and repaired by the relays themselves.

mod common;

use std::time::Duration;

use common::{append_with, config, counter, migrated_database, order_payload, stream_len, RunningRelay};
use redis::AsyncCommands;
use relay::recovery::{
    check, check_tails, marker_key, record_acked_below, Check, RecoverySettings, StreamKeys, TailCheck, MARGIN,
};

const DAY: Duration = Duration::from_secs(86_400);
const HOUR: Duration = Duration::from_secs(3_600);

#[tokio::test]
async fn the_marker_is_set_once_and_its_loss_is_claimed_by_exactly_one_checker() {
    let db = migrated_database("relay_marker").await;
    let stream = test_support::unique_name("relay-marker");
    let mut conn = test_support::redis_connection().await;
    assert_eq!(
        check(&mut conn, &db.pool, &StreamKeys::new(&stream, false), DAY, MARGIN).await.unwrap(),
        Check::Started
    );
    assert_eq!(check(&mut conn, &db.pool, &StreamKeys::new(&stream, false), DAY, MARGIN).await.unwrap(), Check::Intact);

    // Every group had acknowledged everything below a minute ago: republishing starts a
    // minute before that.
    let acked = chrono::Utc::now() - chrono::Duration::seconds(60);
    let epoch: String = conn.get(marker_key(&stream)).await.unwrap();
    record_acked_below(&db.pool, &stream, &epoch, acked.timestamp_millis()).await.unwrap();
    // A point measured under another marker (a stream that lost its data) is not taken.
    record_acked_below(&db.pool, &stream, "another", chrono::Utc::now().timestamp_millis()).await.unwrap();
    let _: () = conn.del(marker_key(&stream)).await.unwrap();
    let checks = (0..4).map(|_| {
        let (pool, stream) = (db.pool.clone(), stream.clone());
        tokio::spawn(async move {
            let mut conn = test_support::redis_connection().await;
            check(&mut conn, &pool, &StreamKeys::new(&stream, false), DAY, MARGIN).await.unwrap()
        })
    });
    let mut lost = Vec::new();
    for c in checks {
        if let Check::Lost { since } = c.await.unwrap() {
            lost.push(since);
        }
    }
    assert_eq!(lost.len(), 1, "one relay republishes");
    let expected = acked - chrono::Duration::from_std(MARGIN).unwrap();
    assert!((lost[0] - expected).num_milliseconds().abs() <= 1, "{} vs {expected}", lost[0]);
    assert_eq!(check(&mut conn, &db.pool, &StreamKeys::new(&stream, false), DAY, MARGIN).await.unwrap(), Check::Intact);

    // Never measured: everything retained.
    sqlx::query("UPDATE stream_positions SET acked_below_ms = NULL").execute(&db.pool).await.unwrap();
    let _: () = conn.del(marker_key(&stream)).await.unwrap();
    let Check::Lost { since } =
        check(&mut conn, &db.pool, &StreamKeys::new(&stream, false), DAY, MARGIN).await.unwrap()
    else {
        panic!("lost")
    };
    let retained_from = chrono::Utc::now() - chrono::Duration::days(1);
    assert!((since - retained_from).num_seconds().abs() <= 5, "{since}");
}

#[tokio::test]
async fn a_relay_republishes_by_itself_what_a_redis_restarted_empty_lost() {
    let db = migrated_database("relay_recovers").await;
    let redis_url = test_support::redis_url();
    let stream = test_support::unique_name("relay-recovers");
    let relay = RunningRelay::start(config(&db.url, &redis_url, &stream)).await;
    for i in 0..50 {
        append_with(&db.pool, &format!("order-{i}"), &order_payload("o"), true).await;
    }
    common::wait_until_published(&db.pool, 50, Duration::from_secs(30)).await;
    assert_eq!(stream_len(&redis_url, &stream).await, 50);
    // What a restart without persistence does to this stream's keys.
    let mut conn = test_support::redis_connection().await;
    let _: () = conn.del(&[stream.as_str(), marker_key(&stream).as_str()]).await.unwrap();
    test_support::eventually("the lost entries republished", Duration::from_secs(15), || async {
        (stream_len(&redis_url, &stream).await == 50).then_some(())
    })
    .await;
    let entries = common::read_stream(&redis_url, &stream).await;
    let mut aggregates: Vec<String> = entries.iter().map(|e| e.aggregate_id.clone()).collect();
    aggregates.sort();
    aggregates.dedup();
    assert_eq!(aggregates.len(), 50, "every event once");
    assert_eq!(counter(&relay, "outbox_stream_recoveries").await, 1.0);
    assert_eq!(counter(&relay, "outbox_stream_recovered_events").await, 50.0);
    relay.stop().await;
    let _: () = conn.del(&[stream.as_str(), marker_key(&stream).as_str()]).await.unwrap();
}

fn id_time(id: &str) -> chrono::DateTime<chrono::Utc> {
    let ms = id.split('-').next().and_then(|ms| ms.parse().ok()).expect("entry id");
    chrono::DateTime::from_timestamp_millis(ms).expect("time")
}

fn settings(stream: &str, stream_retention: Duration) -> RecoverySettings {
    RecoverySettings {
        partitions: vec![StreamKeys::new(stream, false)],
        retention: DAY,
        stream_retention,
        batch_size: 100,
        margin: MARGIN,
    }
}

#[tokio::test]
async fn an_added_entry_gone_with_the_marker_kept_owes_what_came_after_the_newest_entry_held() {
    let db = migrated_database("relay_tails").await;
    let stream = test_support::unique_name("relay-tails");
    let mut conn = test_support::redis_connection().await;
    assert_eq!(
        check(&mut conn, &db.pool, &StreamKeys::new(&stream, false), DAY, MARGIN).await.unwrap(),
        Check::Started
    );
    let epoch: String = conn.get(marker_key(&stream)).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let id: String = conn.xadd(&stream, "*", &[("n", i)]).await.unwrap();
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let hour = settings(&stream, HOUR);
    let tails = |range: std::ops::Range<usize>| ids[range].to_vec();
    assert_eq!(
        check_tails(&mut conn, &db.pool, &StreamKeys::new(&stream, false), &tails(0..3), Some(&epoch), &hour)
            .await
            .unwrap(),
        TailCheck::Held
    );

    // A failover to a replica that had received only the first entry: the marker came along.
    let _: u64 = conn.xdel(&stream, &ids[1..]).await.unwrap();
    let checked = check_tails(&mut conn, &db.pool, &StreamKeys::new(&stream, false), &tails(1..3), Some(&epoch), &hour)
        .await
        .unwrap();
    // From the newest entry still held, less the margin.
    let expected = id_time(&ids[0]) - chrono::Duration::from_std(MARGIN).unwrap();
    let TailCheck::Lost { since } = checked else { panic!("{checked:?}") };
    assert!((since - expected).num_milliseconds().abs() <= 1, "{since} vs {expected}");
    let owed: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT recover_since FROM stream_positions WHERE stream = $1")
            .bind(&stream)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(owed, Some(since), "recorded as owed");

    // An entry older than the stream's retention may have been trimmed: not judged.
    let zero = settings(&stream, Duration::ZERO);
    assert_eq!(
        check_tails(&mut conn, &db.pool, &StreamKeys::new(&stream, false), &tails(1..3), Some(&epoch), &zero)
            .await
            .unwrap(),
        TailCheck::Held
    );
    // Nor ones added to a stream since lost whole and replaced (another relay found its marker
    // gone, and republishes from the point every group had acknowledged).
    let checked = check_tails(&mut conn, &db.pool, &StreamKeys::new(&stream, false), &tails(1..3), Some("lost"), &hour)
        .await
        .unwrap();
    assert_eq!(checked, TailCheck::Replaced);
    // Nor one under a marker that is not the one recorded (its own check comes first).
    let _: () = conn.set(marker_key(&stream), "another").await.unwrap();
    let checked = check_tails(&mut conn, &db.pool, &StreamKeys::new(&stream, false), &tails(1..3), Some(&epoch), &hour)
        .await
        .unwrap();
    assert_eq!(checked, TailCheck::MarkerChanged);
    let _: () = conn.del(&[stream.as_str(), marker_key(&stream).as_str()]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_republishes_by_itself_the_latest_entries_a_failover_lost() {
    let db = migrated_database("relay_failover").await;
    // Its own Redis: the test cuts every client's connection, as a failover does.
    let redis = tokio::task::spawn_blocking(|| test_support::PrivateRedis::start(false)).await.unwrap();
    let redis_url = redis.url();
    let stream = test_support::unique_name("relay-failover");
    let relay = RunningRelay::start(config(&db.url, &redis_url, &stream)).await;
    for i in 0..50 {
        append_with(&db.pool, &format!("order-{i}"), &order_payload("o"), true).await;
    }
    common::wait_until_published(&db.pool, 50, Duration::from_secs(30)).await;
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let ids: Vec<String> = {
        let reply: redis::streams::StreamRangeReply = conn.xrange_all(&stream).await.unwrap();
        reply.ids.into_iter().map(|e| e.id).collect()
    };
    assert_eq!(ids.len(), 50);
    // The replica promoted had received the first 30 entries only, and the marker; every
    // client is cut off from the old primary.
    let _: u64 = conn.xdel(&stream, &ids[30..]).await.unwrap();
    let _: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut conn)
        .await
        .unwrap();
    // Published within the margin of the last entry held: every one of the 50 again.
    test_support::eventually("the lost entries republished", Duration::from_secs(20), || async {
        (counter(&relay, "outbox_stream_recovered_events").await == 50.0).then_some(())
    })
    .await;
    assert_eq!(counter(&relay, "outbox_stream_recoveries").await, 1.0);
    let entries = common::read_stream(&redis_url, &stream).await;
    let mut aggregates: Vec<String> = entries.iter().map(|e| e.aggregate_id.clone()).collect();
    aggregates.sort();
    aggregates.dedup();
    assert_eq!((entries.len(), aggregates.len()), (80, 50), "the 30 held and the 50 republished");
    relay.stop().await;
}
