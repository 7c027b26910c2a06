//! Trimming the stream never takes an entry some consumer group still needs.

mod common;

use std::time::Duration;

use broker::redis::trim::{trim_call, trim_pass, TRIM_LIMIT};
use common::{append_with, config, count, migrated_database, order_payload, RunningRelay};
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use relay::recovery::StreamKeys;
use service_kit::Shutdown;

/// A fresh stream of `n` entries; their ids in order.
async fn stream_of(conn: &mut MultiplexedConnection, stream: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for start in (0..n).step_by(5_000) {
        let mut pipe = redis::pipe();
        for i in start..n.min(start + 5_000) {
            pipe.cmd("XADD").arg(stream).arg("*").arg("i").arg(i);
        }
        let added: Vec<String> = pipe.query_async(conn).await.expect("XADD");
        ids.extend(added);
    }
    // Entries at least a millisecond old (ids carry milliseconds), so that a zero retention
    // has passed for every one of them.
    tokio::time::sleep(Duration::from_millis(3)).await;
    ids
}

async fn create_group(conn: &mut MultiplexedConnection, stream: &str, group: &str) {
    let () = conn.xgroup_create(stream, group, "0").await.expect("XGROUP CREATE");
}

/// Reads `n` new entries as `consumer` of `group`; their ids.
async fn read_new(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
    consumer: &str,
    n: usize,
) -> Vec<String> {
    let opts = StreamReadOptions::default().group(group, consumer).count(n);
    let reply: StreamReadReply = conn.xread_options(&[stream], &[">"], &opts).await.expect("XREADGROUP");
    reply.keys.into_iter().flat_map(|k| k.ids).map(|e| e.id).collect()
}

async fn ack(conn: &mut MultiplexedConnection, stream: &str, group: &str, ids: &[String]) {
    if !ids.is_empty() {
        let _: u64 = conn.xack(stream, group, ids).await.expect("XACK");
    }
}

/// A consumer restarted: its pending entries from the start of its history, with their
/// fields (an entry trimmed away comes back as an id without fields).
async fn pending_history(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
    consumer: &str,
) -> Vec<(String, bool)> {
    let opts = StreamReadOptions::default().group(group, consumer).count(100_000);
    let reply: redis::Value = conn.xread_options(&[stream], &["0"], &opts).await.expect("XREADGROUP 0");
    let redis::Value::Array(streams) = reply else { return Vec::new() };
    let mut out = Vec::new();
    for s in streams {
        let redis::Value::Array(kv) = s else { continue };
        let Some(redis::Value::Array(entries)) = kv.into_iter().nth(1) else { continue };
        for e in entries {
            let redis::Value::Array(parts) = e else { continue };
            let id: String = redis::from_redis_value(&parts[0]).expect("id");
            out.push((id, !matches!(parts[1], redis::Value::Nil)));
        }
    }
    out
}

async fn first_id(conn: &mut MultiplexedConnection, stream: &str) -> Option<String> {
    let reply: redis::streams::StreamRangeReply = conn.xrange_count(stream, "-", "+", 1).await.expect("XRANGE");
    reply.ids.into_iter().next().map(|e| e.id)
}

#[tokio::test]
async fn a_slow_group_holds_the_stream_and_a_fast_one_makes_it_lose_nothing() {
    let mut conn = test_support::redis_connection().await;
    let stream = test_support::unique_name("trim-two-groups");
    let ids = stream_of(&mut conn, &stream, 100).await;
    create_group(&mut conn, &stream, "fast").await;
    create_group(&mut conn, &stream, "slow").await;
    let all = read_new(&mut conn, &stream, "fast", "f1", 100).await;
    ack(&mut conn, &stream, "fast", &all).await;
    // The slow group was handed 30 and acknowledged the first 10; 20 are pending with "s1".
    let handed = read_new(&mut conn, &stream, "slow", "s1", 30).await;
    ack(&mut conn, &stream, "slow", &handed[..10]).await;

    let call = trim_call(&mut conn, &StreamKeys::new(&stream, false), Duration::ZERO, TRIM_LIMIT).await.expect("trim");
    assert_eq!(call.trimmed, 10, "{call:?}");
    assert_eq!(call.bound_by, "group slow");
    assert_eq!(call.cut.as_deref(), Some(ids[10].as_str()));
    assert_eq!(first_id(&mut conn, &stream).await.as_deref(), Some(ids[10].as_str()));
    let slow = call.groups.iter().find(|g| g.name == "slow").expect("slow group");
    assert_eq!((slow.pending, slow.lag), (20, Some(70)));

    // Restarted, the slow consumer still finds every pending entry, with its fields.
    let history = pending_history(&mut conn, &stream, "slow", "s1").await;
    assert_eq!(history.len(), 20);
    assert!(history.iter().all(|(_, whole)| *whole), "{history:?}");
    assert_eq!(history[0].0, ids[10]);

    // Acknowledged, the next 70 it has not even been handed still stay.
    ack(&mut conn, &stream, "slow", &handed[10..]).await;
    let call = trim_call(&mut conn, &StreamKeys::new(&stream, false), Duration::ZERO, TRIM_LIMIT).await.expect("trim");
    assert_eq!((call.trimmed, call.cut.as_deref()), (20, Some(ids[30].as_str())));
    assert_eq!(conn.xlen::<_, usize>(&stream).await.expect("XLEN"), 70);
    let _: () = conn.del(&stream).await.expect("DEL");
}

#[tokio::test]
async fn the_checker_sees_pending_entries_lost_to_a_trim_that_ignores_the_groups() {
    // Control: the same slow group, trimmed by length as `XADD … MAXLEN` would.
    let mut conn = test_support::redis_connection().await;
    let stream = test_support::unique_name("trim-control");
    stream_of(&mut conn, &stream, 100).await;
    create_group(&mut conn, &stream, "slow").await;
    read_new(&mut conn, &stream, "slow", "s1", 30).await;
    let _: u64 = conn.xtrim(&stream, redis::streams::StreamMaxlen::Equals(50)).await.expect("XTRIM");
    let history = pending_history(&mut conn, &stream, "slow", "s1").await;
    assert_eq!(history.len(), 30, "still pending in the group");
    assert_eq!(history.iter().filter(|(_, whole)| !whole).count(), 30, "and every one of them lost: {history:?}");
    let _: () = conn.del(&stream).await.expect("DEL");
}

#[tokio::test]
async fn nothing_goes_before_the_retention_nor_without_a_group_nor_past_what_was_delivered() {
    let mut conn = test_support::redis_connection().await;
    let stream = test_support::unique_name("trim-bounds");
    let ids = stream_of(&mut conn, &stream, 50).await;
    // No group yet: a group created later reads from the start.
    let call = trim_call(&mut conn, &StreamKeys::new(&stream, false), Duration::ZERO, TRIM_LIMIT).await.expect("trim");
    assert_eq!((call.trimmed, call.cut, call.bound_by.as_str()), (0, None, "no group"));

    create_group(&mut conn, &stream, "g").await;
    let read = read_new(&mut conn, &stream, "g", "c", 20).await;
    ack(&mut conn, &stream, "g", &read).await;
    // Acknowledged but younger than the retention.
    let call = trim_call(&mut conn, &StreamKeys::new(&stream, false), Duration::from_secs(3600), TRIM_LIMIT)
        .await
        .expect("trim");
    assert_eq!((call.trimmed, call.bound_by.as_str()), (0, "retention"));
    // Past the retention: exactly the 20 delivered and acknowledged, not the 30 never delivered.
    let call = trim_call(&mut conn, &StreamKeys::new(&stream, false), Duration::ZERO, TRIM_LIMIT).await.expect("trim");
    assert_eq!((call.trimmed, call.bound_by.as_str()), (20, "group g"));
    assert_eq!(first_id(&mut conn, &stream).await.as_deref(), Some(ids[20].as_str()));
    // A missing stream is no error.
    let _: () = conn.del(&stream).await.expect("DEL");
    let call = trim_call(&mut conn, &StreamKeys::new(&stream, false), Duration::ZERO, TRIM_LIMIT).await.expect("trim");
    assert_eq!((call.trimmed, call.bound_by.as_str()), (0, "no stream"));
}

#[tokio::test]
async fn a_large_backlog_goes_in_calls_of_bounded_size() {
    let mut conn = test_support::redis_connection().await;
    let stream = test_support::unique_name("trim-large");
    let n = 2 * TRIM_LIMIT as usize + 500;
    stream_of(&mut conn, &stream, n).await;
    create_group(&mut conn, &stream, "g").await;
    let () = redis::cmd("XGROUP").arg("SETID").arg(&stream).arg("g").arg("$").query_async(&mut conn).await.unwrap();
    let first = trim_call(&mut conn, &StreamKeys::new(&stream, false), Duration::ZERO, TRIM_LIMIT).await.expect("trim");
    assert!(first.trimmed <= TRIM_LIMIT, "{first:?}");
    let pass =
        trim_pass(&mut conn, &StreamKeys::new(&stream, false), Duration::ZERO, &Shutdown::new()).await.expect("pass");
    assert!(pass.calls >= 2, "{pass:?}");
    assert_eq!(first.trimmed + pass.trimmed, n as u64);
    assert_eq!(conn.xlen::<_, usize>(&stream).await.expect("XLEN"), 0);
    let _: () = conn.del(&stream).await.expect("DEL");
}

#[tokio::test]
async fn a_relay_with_a_short_retention_keeps_the_stream_to_what_the_group_has_not_acknowledged() {
    let db = migrated_database("relay_trim").await;
    let redis_url = test_support::redis_url();
    let stream = test_support::unique_name("relay-trim");
    let mut conn = test_support::redis_connection().await;
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("readers")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .expect("XGROUP CREATE");
    let mut cfg = config(&db.url, &redis_url, &stream);
    cfg.stream_retention = Duration::from_secs(1);
    let relay = RunningRelay::start(cfg).await;
    for i in 0..300 {
        append_with(&db.pool, &format!("order-{i}"), &order_payload("o"), true).await;
    }
    common::wait_until_published(&db.pool, 300, Duration::from_secs(30)).await;
    // Handed out and acknowledged: 200; handed out, pending: 50; never read: 50.
    let done = read_new(&mut conn, &stream, "readers", "c1", 200).await;
    ack(&mut conn, &stream, "readers", &done).await;
    let held = read_new(&mut conn, &stream, "readers", "c2", 50).await;
    test_support::eventually("the acknowledged entries trimmed", Duration::from_secs(10), || {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move { (conn.xlen::<_, usize>(&stream).await.ok()? == 100).then_some(()) }
    })
    .await;
    let history = pending_history(&mut conn, &stream, "readers", "c2").await;
    assert_eq!(history.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(), held);
    assert!(history.iter().all(|(_, whole)| *whole));
    let metrics = reqwest::get(format!("http://{}/metrics", relay.addr)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("outbox_stream_trimmed_total 200"), "{metrics}");
    let series = |name: &str| format!(r#"{name}{{stream="{stream}",group="readers"}} 50"#);
    assert!(metrics.contains(&series("outbox_stream_group_pending")), "{metrics}");
    assert!(metrics.contains(&series("outbox_stream_group_lag")), "{metrics}");
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox_published").await, 300, "the outbox keeps its record");
    relay.stop().await;
    let _: () = conn.del(&stream).await.expect("DEL");
}

/// Runs the relay binary with `args`; (success, stdout + stderr).
fn relay_command(stream: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(args)
        .env("DATABASE_URL", "postgres://unused@127.0.0.1:1/unused")
        .env("REDIS_URL", test_support::redis_url())
        .env("REDIS_STREAM", stream)
        .output()
        .expect("run the relay binary");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test]
async fn a_group_nobody_reads_is_listed_with_its_lag_and_removed_by_a_command() {
    let mut conn = test_support::redis_connection().await;
    let stream = test_support::unique_name("trim-groups");
    stream_of(&mut conn, &stream, 30).await;
    create_group(&mut conn, &stream, "live").await;
    create_group(&mut conn, &stream, "abandoned").await;
    let read = read_new(&mut conn, &stream, "live", "c", 30).await;
    ack(&mut conn, &stream, "live", &read).await;

    let (ok, listed) = relay_command(&stream, &["stream", "groups"]);
    assert!(ok, "{listed}");
    assert!(listed.contains("30 entries"), "{listed}");
    assert!(listed.contains("abandoned\t0\t30"), "{listed}");
    assert!(listed.contains("live\t0\t0"), "{listed}");
    assert_eq!(conn.xlen::<_, usize>(&stream).await.expect("XLEN"), 30, "listing trims nothing");

    // The abandoned group holds every entry; once removed, the stream is trimmed past it.
    let held = trim_call(&mut conn, &StreamKeys::new(&stream, false), Duration::ZERO, TRIM_LIMIT).await.expect("trim");
    assert_eq!((held.trimmed, held.bound_by.as_str()), (0, "group abandoned"));
    let (ok, out) = relay_command(&stream, &["stream", "drop-group", "abandoned"]);
    assert!(ok, "{out}");
    let (ok, out) = relay_command(&stream, &["stream", "drop-group", "abandoned"]);
    assert!(!ok && out.contains("no group abandoned"), "{out}");
    let call = trim_call(&mut conn, &StreamKeys::new(&stream, false), Duration::ZERO, TRIM_LIMIT).await.expect("trim");
    assert_eq!(call.trimmed, 30);
    let _: () = conn.del(&stream).await.expect("DEL");
}
