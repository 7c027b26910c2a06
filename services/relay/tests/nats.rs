//! The relay on NATS JetStream (`BROKER=nats`), against the shared NATS server: what it
//! publishes, JetStream's de-duplication of a republished event, and the relay's trimming.

mod common;

use std::time::Duration;

use broker::async_nats;
use broker::jetstream::{self, publish::Publisher, Layout};
use common::*;
use domain::{Partitions, StreamEntry};

fn nats_config(database_url: &str, stream: &str, partitions: u16) -> relay::Config {
    let mut config = config(database_url, "redis://127.0.0.1:1", stream);
    config.broker = broker::BrokerArgs { broker: broker::Kind::Nats, nats_url: test_support::nats_url() };
    config.topology.stream_partitions = partitions;
    config
}

/// Every message of `layout`'s stream, in stream order: its subject, its `Nats-Msg-Id` and the
/// entry it decodes to.
async fn read_jetstream(layout: &Layout) -> Vec<(String, String, StreamEntry)> {
    let js = jetstream::context(async_nats::connect(test_support::nats_url()).await.expect("connect to NATS"));
    let stream = js.get_stream(&layout.stream).await.expect("the stream");
    let last = stream.get_info().await.expect("stream info").state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let Ok(m) = stream.get_raw_message(seq).await else { continue };
        let fields = broker::entry::fields_of(Some(&m.headers), &m.payload);
        let entry = StreamEntry::from_fields(fields.iter().map(|(k, v)| (k, v))).expect("a stream entry");
        let id = m.headers.get(broker::entry::MSG_ID).map(|v| v.as_str().to_owned()).unwrap_or_default();
        out.push((m.subject.to_string(), id, entry));
    }
    out
}

async fn delete_jetstream(layout: &Layout) {
    let js = jetstream::context(async_nats::connect(test_support::nats_url()).await.expect("connect to NATS"));
    let _ = js.delete_stream(&layout.stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_event_is_one_message_on_its_orders_subject_in_seq_order_named_by_its_event_id() {
    let db = migrated_database("relay_nats").await;
    let stream = test_support::unique_name("relay-nats");
    let relay = RunningRelay::start(nats_config(&db.url, &stream, 3)).await;
    append_spread(&db.pool, 60, 7).await;
    notify(&db.pool).await;
    wait_until_published(&db.pool, 60, Duration::from_secs(30)).await;

    let layout = Layout::new(&Partitions::new(&stream, 3).expect("3 partitions"));
    let messages = read_jetstream(&layout).await;
    assert_eq!(messages.len(), 60, "one message per event");
    let mut last_seq = std::collections::HashMap::new();
    for (subject, msg_id, entry) in &messages {
        assert_eq!(subject, layout.subject_of(&entry.aggregate_id), "each order's events on its partition's subject");
        assert_eq!(msg_id, &entry.event_id.to_string(), "Nats-Msg-Id is the event id");
        let previous = last_seq.insert(entry.aggregate_id.clone(), entry.seq);
        assert!(previous.is_none_or(|p| p < entry.seq), "seq order per order: {previous:?} then {}", entry.seq);
    }
    let published = count(&db.pool, "SELECT count(*) FROM outbox_published").await;
    assert_eq!(published, 60);
    relay.stop().await;
    delete_jetstream(&layout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_published_twice_inside_the_duplicate_window_is_stored_once() {
    let stream = test_support::unique_name("relay-nats-dup");
    let layout = Layout::new(&Partitions::single(&stream));
    let client = async_nats::connect(test_support::nats_url()).await.expect("connect to NATS");
    jetstream::ensure_stream(&jetstream::context(client.clone()), &layout).await.expect("stream");
    let publisher = Publisher::new(client, layout.clone());
    let entries: Vec<StreamEntry> = (0..5).map(|i| confirmed_entry(&format!("order-{i}"))).collect();

    let first = publisher.publish(&entries).await;
    assert!(first.iter().all(|p| p.as_ref().is_ok_and(|p| !p.duplicate)), "{first:?}");
    // A relay that published and could not record it publishes the batch again.
    let again = publisher.publish(&entries).await;
    assert!(again.iter().all(|p| p.as_ref().is_ok_and(|p| p.duplicate)), "JetStream knows them: {again:?}");
    assert_eq!(
        first.iter().map(|p| p.as_ref().map(|p| p.sequence).ok()).collect::<Vec<_>>(),
        again.iter().map(|p| p.as_ref().map(|p| p.sequence).ok()).collect::<Vec<_>>(),
        "a duplicate's acknowledgement names the message stored first"
    );
    assert_eq!(read_jetstream(&layout).await.len(), 5, "stored once");

    // The control: the same events under other ids are stored again (the check above would see
    // duplicates).
    let renamed: Vec<StreamEntry> =
        entries.iter().map(|e| StreamEntry { event_id: ulid::Ulid::new(), ..e.clone() }).collect();
    let other = publisher.publish(&renamed).await;
    assert!(other.iter().all(|p| p.as_ref().is_ok_and(|p| !p.duplicate)), "{other:?}");
    assert_eq!(read_jetstream(&layout).await.len(), 10);
    delete_jetstream(&layout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_finding_the_stream_made_for_another_number_of_partitions_does_no_work() {
    let db = migrated_database("relay_nats_parts").await;
    let stream = test_support::unique_name("relay-nats-parts");
    let layout = Layout::new(&Partitions::new(&stream, 2).expect("2 partitions"));
    let client = async_nats::connect(test_support::nats_url()).await.expect("connect to NATS");
    jetstream::ensure_stream(&jetstream::context(client), &layout).await.expect("stream of 2 partitions");
    append_spread(&db.pool, 5, 5).await;

    let relay = RunningRelay::start(nats_config(&db.url, &stream, 3)).await;
    let http = reqwest::Client::new();
    let readyz = format!("http://{}/readyz", relay.addr);
    let body = test_support::eventually("readyz names the partitions", Duration::from_secs(20), || async {
        let resp = http.get(&readyz).send().await.ok()?;
        let body = resp.text().await.ok()?;
        body.contains("STREAM_PARTITIONS").then_some(body)
    })
    .await;
    assert!(body.contains(&layout.stream), "{body}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox_published").await, 0, "nothing published");
    relay.stop().await;
    delete_jetstream(&layout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trimming_purges_only_what_every_group_acknowledged_and_is_older_than_the_retention() {
    let stream = test_support::unique_name("relay-nats-trim");
    let layout = Layout::new(&Partitions::single(&stream));
    let client = async_nats::connect(test_support::nats_url()).await.expect("connect to NATS");
    let js = jetstream::context(client.clone());
    jetstream::ensure_stream(&js, &layout).await.expect("stream");
    let publisher = Publisher::new(client.clone(), layout.clone());
    let entries: Vec<StreamEntry> = (0..10).map(|i| confirmed_entry(&format!("order-{i}"))).collect();
    assert!(publisher.publish(&entries).await.iter().all(Result::is_ok));

    // Two groups: one acknowledges 6 messages, the other 3.
    let settings = |group: &str| jetstream::group::GroupSettings {
        group: group.to_owned(),
        ack_wait: Duration::from_secs(30),
        batch: 10,
        max_ack_pending: 100,
    };
    for (group, acked) in [("fast", 6), ("slow", 3)] {
        let consumer = jetstream::group::ensure_consumer(&js, &layout, 0, &settings(group)).await.expect("consumer");
        let pulled = jetstream::group::pull(&consumer, acked, Duration::from_secs(2)).await.expect("pull");
        assert_eq!(pulled.len(), acked);
        jetstream::group::ack(&client, &pulled.iter().collect::<Vec<_>>()).await.expect("ack");
    }
    let acked_floor = async || {
        let mut stream = js.get_stream(&layout.stream).await.expect("stream");
        let mut floors = Vec::new();
        for name in ["fast", "slow"] {
            floors.push(stream.consumer_info(name).await.expect("consumer info").ack_floor.stream_sequence);
        }
        let _ = stream.info().await;
        floors
    };
    test_support::eventually("acknowledgements recorded", Duration::from_secs(5), || async {
        (acked_floor().await == [6, 3]).then_some(())
    })
    .await;

    // A retention longer than the messages' age keeps everything.
    assert_eq!(jetstream::trim::trim(&js, &layout, Duration::from_secs(3600)).await.expect("trim"), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Old enough: only what the slow group acknowledged goes.
    assert_eq!(jetstream::trim::trim(&js, &layout, Duration::from_millis(100)).await.expect("trim"), 3);
    let left: Vec<i64> = read_jetstream(&layout).await.iter().map(|(_, _, e)| e.seq).collect();
    assert_eq!(left.len(), 7, "the 7 messages the slow group has not acknowledged are kept");
    delete_jetstream(&layout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_jetstream_lost_is_made_again_and_every_retained_event_republished() {
    let db = migrated_database("relay_nats_lost").await;
    let stream = test_support::unique_name("relay-nats-lost");
    let layout = Layout::new(&Partitions::new(&stream, 2).expect("2 partitions"));
    let relay = RunningRelay::start(nats_config(&db.url, &stream, 2)).await;
    append_spread(&db.pool, 20, 4).await;
    notify(&db.pool).await;
    wait_until_published(&db.pool, 20, Duration::from_secs(30)).await;
    // The relay has recorded the stream's epoch (its first check is at start).
    test_support::eventually("the epoch recorded", Duration::from_secs(20), || async {
        let n = count(&db.pool, "SELECT count(*) FROM stream_positions WHERE stream LIKE 'nats:%'").await;
        (n == 1).then_some(())
    })
    .await;

    // JetStream loses the stream (a server whose storage was wiped, an operator's mistake).
    delete_jetstream(&layout).await;
    append_spread(&db.pool, 5, 4).await;
    notify(&db.pool).await;

    let messages = test_support::eventually("every event on the stream again", Duration::from_secs(60), || async {
        let js = jetstream::context(async_nats::connect(test_support::nats_url()).await.ok()?);
        js.get_stream(&layout.stream).await.ok()?;
        let messages = read_jetstream(&layout).await;
        let ids: std::collections::HashSet<String> = messages.iter().map(|(_, id, _)| id.clone()).collect();
        (ids.len() == 25).then_some(messages)
    })
    .await;
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM outbox_published").fetch_all(&db.pool).await.expect("ids");
    let on_stream: std::collections::HashSet<&str> = messages.iter().map(|(_, id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), 25);
    for id in &ids {
        assert!(on_stream.contains(id.as_str()), "event {id} is on the stream again");
    }
    assert_eq!(counter(&relay, "outbox_stream_recoveries").await, 1.0);
    relay.stop().await;
    delete_jetstream(&layout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_an_entry_too_large_for_nats_sends_nothing_and_blames_that_entry() {
    let stream = test_support::unique_name("relay-nats-large");
    let layout = Layout::new(&Partitions::single(&stream));
    let client = jetstream::connect(&test_support::nats_url(), "test").await.expect("connect to NATS");
    jetstream::ensure_stream(&jetstream::context(client.clone()), &layout).await.expect("stream");
    let publisher = Publisher::new(client, layout.clone());
    let mut entries: Vec<StreamEntry> = (0..3).map(|i| confirmed_entry(&format!("order-{i}"))).collect();
    entries[1].payload = format!("{{\"padding\":\"{}\"}}", "x".repeat(2 << 20));
    let results = publisher.publish(&entries).await;
    assert!(matches!(results[1], Err(jetstream::publish::EntryError::Refused(_))), "{results:?}");
    assert!(
        [&results[0], &results[2]].iter().all(|r| matches!(r, Err(jetstream::publish::EntryError::NotSent))),
        "{results:?}"
    );
    assert_eq!(read_jetstream(&layout).await.len(), 0, "nothing was sent");
    delete_jetstream(&layout).await;
}
