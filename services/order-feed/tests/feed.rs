//! The feed against the shared Redis: resuming across replicas, the cursor rules, duplicates,
//! tenants, limits and shutdown.

mod common;

use std::time::Duration;

use common::*;
use ulid::Ulid;

const DEFAULT: &str = "default";

/// Random bits for a ULID made from a chosen time.
fn rand_bits() -> u128 {
    Ulid::new().random()
}

/// Three events on the stream, read live from replica A; three more written while the client
/// is away. Replica B, given the last id A sent (as `Last-Event-ID`, as `after`, or both with
/// `after` winning), sends exactly the missing events, in order; an event whose id is older
/// than the cursor but that reached the stream later (a late commit) is not skipped.
#[tokio::test]
async fn a_client_resumes_on_another_replica_with_exactly_the_missing_events() {
    resume_on_another_replica(broker::Kind::Redis).await;
}

#[tokio::test]
async fn a_client_resumes_on_another_replica_with_exactly_the_missing_events_on_nats() {
    resume_on_another_replica(broker::Kind::Nats).await;
}

async fn resume_on_another_replica(kind: broker::Kind) {
    let bus = Bus::new("feed-resume", kind).await;
    let a = RunningFeed::start(bus.config()).await;
    let b = RunningFeed::start(bus.config()).await;
    let (o1, o2) = (Ulid::new(), Ulid::new());
    let ids_written: Vec<Ulid> = (0..6).map(|_| Ulid::new()).collect();
    // An id from a second before every other, for an event written last: the late commit.
    let late_id = Ulid::from_parts(ids_written[0].timestamp_ms() - 1000, rand_bits());
    let orders = [(o1, 1), (o2, 1), (o1, 2), (o2, 2), (o1, 3), (o2, 3)];

    let mut client = SseClient::connect(&a.url("/events"), &[]).await;
    for (id, (order, seq)) in ids_written.iter().zip(orders).take(3) {
        bus.xadd(&entry(*id, order, seq, DEFAULT)).await;
    }
    let first = client.take(3).await;
    let expected: Vec<String> = ids_written.iter().map(Ulid::to_string).collect();
    assert_eq!(ids(&first), expected[..3]);
    assert_eq!(first[0].event.as_deref(), Some("OrderCreated"));
    let data: serde_json::Value = serde_json::from_str(&first[0].data).expect("data is JSON");
    assert_eq!(data["event_id"], expected[0].as_str());
    assert_eq!(data["aggregate_id"], o1.to_string());
    assert_eq!(data["seq"], 1);
    assert_eq!(data["payload"]["order_id"], o1.to_string());
    assert!(data["occurred_at"].is_string());
    drop(client);

    for (id, (order, seq)) in ids_written.iter().zip(orders).skip(3) {
        bus.xadd(&entry(*id, order, seq, DEFAULT)).await;
    }
    for feed in [&a, &b] {
        feed.wait_read(6).await;
    }
    let cursor = expected[2].as_str();
    let mut resumed = SseClient::connect(&b.url("/events"), &[("Last-Event-ID", cursor)]).await;
    assert_eq!(ids(&resumed.take(3).await), expected[3..]);
    assert_eq!(resumed.next(Duration::from_millis(500)).await, None, "nothing more, nothing twice");

    let mut by_after = SseClient::connect(&a.url(&format!("/events?after={cursor}")), &[]).await;
    assert_eq!(ids(&by_after.take(3).await), expected[3..]);
    let url = b.url(&format!("/events?after={}", expected[4]));
    let mut both = SseClient::connect(&url, &[("Last-Event-ID", expected[1].as_str())]).await;
    assert_eq!(ids(&both.take(1).await), expected[5..], "after wins over Last-Event-ID");
    let mut empty_after = SseClient::connect(&b.url("/events?after="), &[("Last-Event-ID", cursor)]).await;
    assert_eq!(ids(&empty_after.take(3).await), expected[3..], "an empty after leaves Last-Event-ID");

    // The late commit: its id sorts before every other, its entry comes last.
    bus.xadd(&entry(late_id, o1, 4, DEFAULT)).await;
    b.wait_read(7).await;
    let mut after_last = SseClient::connect(&b.url("/events"), &[("Last-Event-ID", expected[5].as_str())]).await;
    assert_eq!(ids(&after_last.take(1).await), vec![late_id.to_string()]);
    // The live clients got it too, once.
    assert_eq!(ids(&resumed.take(1).await), vec![late_id.to_string()]);
    assert_eq!(resumed.next(Duration::from_millis(300)).await, None);

    a.stop().await;
    b.stop().await;
    bus.delete().await;
}

/// A replica that starts late loads the stream's recent entries, so a cursor from before it
/// started resumes on it too.
#[tokio::test]
async fn a_replica_started_later_resumes_from_events_written_before_it_started() {
    replica_started_later(broker::Kind::Redis).await;
}

#[tokio::test]
async fn a_replica_started_later_resumes_from_events_written_before_it_started_on_nats() {
    replica_started_later(broker::Kind::Nats).await;
}

async fn replica_started_later(kind: broker::Kind) {
    let bus = Bus::new("feed-load", kind).await;
    let ids_written: Vec<Ulid> = (0..4).map(|_| Ulid::new()).collect();
    let order = Ulid::new();
    for (seq, id) in ids_written.iter().enumerate() {
        bus.xadd(&entry(*id, order, seq as i64 + 1, DEFAULT)).await;
    }
    let feed = RunningFeed::start(bus.config()).await;
    let mut client = SseClient::connect(&feed.url("/events"), &[("Last-Event-ID", &ids_written[1].to_string())]).await;
    let expected: Vec<String> = ids_written[2..].iter().map(Ulid::to_string).collect();
    assert_eq!(ids(&client.take(2).await), expected);
    feed.stop().await;
    bus.delete().await;
}

/// A cursor the replica does not keep (older than its history, or unknown) is told to reload
/// its state, explicitly, and then gets the live events: never a silent gap.
#[tokio::test]
async fn a_cursor_too_old_or_unknown_gets_a_reset_then_the_live_events() {
    let stream = test_support::unique_name("feed-reset");
    let mut small = config(&stream);
    small.history = 2;
    let feed = RunningFeed::start(small).await;
    let order = Ulid::new();
    let ids_written: Vec<Ulid> = (0..3).map(|_| Ulid::new()).collect();
    for (seq, id) in ids_written.iter().enumerate() {
        xadd(&stream, &entry(*id, order, seq as i64 + 1, DEFAULT)).await;
    }
    test_support::eventually("the feed read all three", Duration::from_secs(10), || async {
        feed.metrics().await.contains("feed_events_read_total 3").then_some(())
    })
    .await;
    // Control: the cursor still kept resumes.
    let mut client = SseClient::connect(&feed.url("/events"), &[("Last-Event-ID", &ids_written[1].to_string())]).await;
    let resumed = client.take(1).await.remove(0);
    assert_eq!(resumed.id, Some(ids_written[2].to_string()));
    for cursor in [ids_written[0].to_string(), Ulid::new().to_string(), "not-an-id".to_owned()] {
        let mut client = SseClient::connect(&feed.url("/events"), &[("Last-Event-ID", &cursor)]).await;
        let reset = client.take(1).await.remove(0);
        assert_eq!(reset.event.as_deref(), Some("reset"), "{cursor}");
        assert_eq!(reset.id, None, "a reset carries no id: the client keeps its cursor until new events come");
        let data: serde_json::Value = serde_json::from_str(&reset.data).expect("JSON");
        assert_eq!(data["cursor"], cursor.as_str());
        let next = Ulid::new();
        xadd(&stream, &entry(next, Ulid::new(), 1, DEFAULT)).await;
        assert_eq!(ids(&client.take(1).await), vec![next.to_string()]);
    }
    let metrics = feed.metrics().await;
    assert!(metrics.contains(r#"feed_resumes_total{result="unknown"} 3"#), "{metrics}");
    assert!(metrics.contains(r#"feed_resumes_total{result="resumed"} 1"#), "{metrics}");
    feed.stop().await;
    delete_stream(&stream).await;
}

/// An event the relays published twice is sent once.
#[tokio::test]
async fn an_event_on_the_stream_twice_is_sent_once() {
    sent_once(broker::Kind::Redis).await;
}

#[tokio::test]
async fn an_event_on_the_stream_twice_is_sent_once_on_nats() {
    sent_once(broker::Kind::Nats).await;
}

async fn sent_once(kind: broker::Kind) {
    let bus = Bus::new("feed-dup", kind).await;
    let feed = RunningFeed::start(bus.config()).await;
    let mut client = SseClient::connect(&feed.url("/events"), &[]).await;
    let (twice, after) = (entry(Ulid::new(), Ulid::new(), 1, DEFAULT), entry(Ulid::new(), Ulid::new(), 1, DEFAULT));
    bus.xadd(&twice).await;
    bus.xadd(&twice).await;
    bus.xadd(&after).await;
    assert_eq!(ids(&client.take(2).await), vec![twice.event_id.to_string(), after.event_id.to_string()]);
    assert_eq!(client.next(Duration::from_millis(300)).await, None);
    assert!(feed.metrics().await.contains("feed_duplicates_total 1"));
    feed.stop().await;
    bus.delete().await;
}

const SECRET: &str = "feed-test-secret-of-32-bytes-or-more";

fn token(tenant: &str, scope: &str) -> String {
    let exp = u64::try_from(chrono::Utc::now().timestamp()).expect("time") + 600;
    let tenant = domain::TenantId::parse(tenant).expect("tenant");
    service_kit::auth::mint(service_kit::auth::SigningKey::Secret(SECRET), &tenant, scope, exp).expect("mint")
}

/// With authentication on, a client gets its own tenant's events only (the token from the
/// header, the `access_token` parameter or cookie), optionally one order's; no token is 401,
/// one without `orders:read` 403, a malformed order id 422.
#[tokio::test]
async fn each_client_gets_its_own_tenants_events_only() {
    let stream = test_support::unique_name("feed-tenants");
    let mut with_auth = config(&stream);
    with_auth.auth.auth_jwt_secret = Some(SECRET.to_owned());
    let feed = RunningFeed::start(with_auth).await;
    let (a, b) = (token("t-a", "orders:read"), token("t-b", "orders:read"));
    let mut by_header = SseClient::connect(&feed.url("/events"), &[("Authorization", &format!("Bearer {a}"))]).await;
    let mut by_query = SseClient::connect(&feed.url(&format!("/events?access_token={b}")), &[]).await;
    let mut by_cookie =
        SseClient::connect(&feed.url("/events"), &[("Cookie", &format!("x=1; access_token={a}"))]).await;
    let (order_a, order_b) = (Ulid::new(), Ulid::new());
    let one_order = feed.url(&format!("/events?aggregate_id={order_a}&access_token={a}"));
    let mut of_one_order = SseClient::connect(&one_order, &[]).await;
    let written = [
        entry(Ulid::new(), order_a, 1, "t-a"),
        entry(Ulid::new(), order_b, 1, "t-b"),
        entry(Ulid::new(), Ulid::new(), 1, "t-a"),
        entry(Ulid::new(), order_a, 2, "t-a"),
    ];
    for e in &written {
        xadd(&stream, e).await;
    }
    let id = |i: usize| written[i].event_id.to_string();
    assert_eq!(ids(&by_header.take(3).await), vec![id(0), id(2), id(3)]);
    assert_eq!(ids(&by_cookie.take(3).await), vec![id(0), id(2), id(3)]);
    assert_eq!(ids(&by_query.take(1).await), vec![id(1)]);
    assert_eq!(ids(&of_one_order.take(2).await), vec![id(0), id(3)]);
    for client in [&mut by_header, &mut by_query, &mut of_one_order] {
        assert_eq!(client.next(Duration::from_millis(300)).await, None, "no other tenant's or order's event");
    }

    let http = reqwest::Client::new();
    let status = |url: String| {
        let http = http.clone();
        async move { http.get(url).send().await.expect("GET").status().as_u16() }
    };
    assert_eq!(status(feed.url("/events")).await, 401);
    assert_eq!(status(feed.url("/events?access_token=garbage")).await, 401);
    let no_scope = token("t-a", "orders:write");
    assert_eq!(status(feed.url(&format!("/events?access_token={no_scope}"))).await, 403);
    assert_eq!(status(feed.url(&format!("/events?aggregate_id=nope&access_token={a}"))).await, 422);
    feed.stop().await;
    delete_stream(&stream).await;
}

/// A client following one order that stays quiet while the tenant's other orders change is
/// given, on heartbeats, the id of the newest of those events it passed over (never another
/// tenant's), and resumes from it with nothing missed; its last event of its own order would
/// by then have left the feed's history. Control: resuming from that event gets a reset.
#[tokio::test]
async fn a_client_following_a_quiet_order_resumes_from_its_heartbeats_id() {
    let stream = test_support::unique_name("feed-quiet");
    let mut small = config(&stream);
    small.history = 4;
    small.heartbeat = Duration::from_millis(200);
    let feed = RunningFeed::start(small).await;
    let (quiet, busy) = (Ulid::new(), Ulid::new());
    let mut client = SseClient::connect(&feed.url(&format!("/events?aggregate_id={quiet}")), &[]).await;
    let first = entry(Ulid::new(), quiet, 1, DEFAULT);
    xadd(&stream, &first).await;
    assert_eq!(ids(&client.take(1).await), vec![first.event_id.to_string()]);
    let others: Vec<_> = (1..=10).map(|seq| entry(Ulid::new(), busy, seq, DEFAULT)).collect();
    for e in &others {
        xadd(&stream, e).await;
    }
    // Newest of all, but another tenant's: never named to this client.
    xadd(&stream, &entry(Ulid::new(), Ulid::new(), 1, "t-other")).await;
    feed.wait_read(12).await;
    let newest_passed = others[9].event_id.to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while client.last_event_id() != Some(newest_passed.as_str()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no heartbeat named {newest_passed}: {:?}",
            client.last_event_id()
        );
        assert_eq!(client.next(Duration::from_millis(300)).await, None, "no event of another order");
    }
    // Later heartbeats name nothing newer: the other tenant's event, the newest, is not named.
    assert_eq!(client.next(Duration::from_millis(700)).await, None);
    assert_eq!(client.last_event_id(), Some(newest_passed.as_str()));
    drop(client);

    let second = entry(Ulid::new(), quiet, 2, DEFAULT);
    xadd(&stream, &second).await;
    feed.wait_read(13).await;
    let url = feed.url(&format!("/events?aggregate_id={quiet}"));
    let mut resumed = SseClient::connect(&url, &[("Last-Event-ID", &newest_passed)]).await;
    let next = resumed.take(1).await.remove(0);
    assert_eq!(next.id, Some(second.event_id.to_string()), "resumed with the missed event, no reset: {next:?}");
    let mut control = SseClient::connect(&url, &[("Last-Event-ID", &first.event_id.to_string())]).await;
    assert_eq!(control.take(1).await[0].event.as_deref(), Some("reset"));
    drop((resumed, control));

    // Resumed with a backlog of other orders' events only: the first heartbeat names the newest.
    let more: Vec<_> = (11..=13).map(|seq| entry(Ulid::new(), busy, seq, DEFAULT)).collect();
    for e in &more {
        xadd(&stream, e).await;
    }
    feed.wait_read(16).await;
    let mut again = SseClient::connect(&url, &[("Last-Event-ID", &second.event_id.to_string())]).await;
    assert_eq!(again.next(Duration::from_millis(700)).await, None, "no event of another order");
    assert_eq!(again.last_event_id(), Some(more[2].event_id.to_string().as_str()));
    feed.stop().await;
    delete_stream(&stream).await;
}

/// A stream ends once its token is no longer accepted (`exp` plus the clock skew allowed), and
/// the client's reconnect with it is refused; a client with a fresh token stays.
#[tokio::test]
async fn a_stream_ends_when_its_token_lapses() {
    let stream = test_support::unique_name("feed-token");
    let mut with_auth = config(&stream);
    with_auth.auth.auth_jwt_secret = Some(SECRET.to_owned());
    let feed = RunningFeed::start(with_auth).await;
    let now = u64::try_from(chrono::Utc::now().timestamp()).expect("time");
    // Expired, but within the skew allowed for two more seconds.
    let exp = now - service_kit::auth::CLOCK_SKEW_SECONDS + 2;
    let tenant = domain::TenantId::parse("t-a").expect("tenant");
    let lapsing = service_kit::auth::mint(service_kit::auth::SigningKey::Secret(SECRET), &tenant, "orders:read", exp)
        .expect("mint");
    let url = feed.url(&format!("/events?access_token={lapsing}"));
    let mut ending = SseClient::connect(&url, &[]).await;
    let fresh = token("t-a", "orders:read");
    let mut staying = SseClient::connect(&feed.url("/events"), &[("Authorization", &format!("Bearer {fresh}"))]).await;
    assert!(ending.ends_within(Duration::from_secs(6)).await, "the stream outlived its token");
    let refused = reqwest::get(&url).await.expect("GET").status();
    assert_eq!(refused, 401, "the lapsed token is refused on reconnect");
    assert!(!staying.ends_within(Duration::from_millis(500)).await, "a fresh token's stream ended too");
    let e = entry(Ulid::new(), Ulid::new(), 1, "t-a");
    xadd(&stream, &e).await;
    assert_eq!(ids(&staying.take(1).await), vec![e.event_id.to_string()]);
    feed.stop().await;
    delete_stream(&stream).await;
}

/// Past `FEED_MAX_CLIENTS` a client is answered 503 with `Retry-After`; a slot frees when a
/// client leaves.
#[tokio::test]
async fn clients_past_the_cap_are_refused_until_one_leaves() {
    let stream = test_support::unique_name("feed-cap");
    let mut capped = config(&stream);
    capped.max_clients = 1;
    let feed = RunningFeed::start(capped).await;
    let first = SseClient::connect(&feed.url("/events"), &[]).await;
    let refused = reqwest::get(feed.url("/events")).await.expect("GET");
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    drop(first);
    test_support::eventually("a slot free again", Duration::from_secs(10), || async {
        let r = reqwest::Client::new().get(feed.url("/events")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert!(feed.metrics().await.contains("feed_rejected_clients_total"));
    feed.stop().await;
    delete_stream(&stream).await;
}

/// A client that stops reading falls behind; once it reads again and is more than
/// `FEED_CLIENT_LAG` events behind, it is disconnected, and it resumes from its last event with
/// nothing lost.
#[tokio::test]
async fn a_client_that_falls_behind_is_disconnected_and_resumes_without_a_gap() {
    let stream = test_support::unique_name("feed-slow");
    let mut small = config(&stream);
    small.client_lag = 8;
    let feed = RunningFeed::start(small).await;
    let mut slow = SseClient::connect(&feed.url("/events"), &[]).await;
    // Large events, so the socket's buffers fill long before the client has read them all.
    let padding = "x".repeat(64 * 1024);
    let order = Ulid::new();
    let written: Vec<String> = {
        let mut out = Vec::new();
        for seq in 1..=400 {
            let e = entry_with(Ulid::new(), order, seq, DEFAULT, &padding);
            xadd(&stream, &e).await;
            out.push(e.event_id.to_string());
        }
        out
    };
    test_support::eventually("the feed read every event", Duration::from_secs(30), || async {
        feed.metrics().await.contains("feed_events_read_total 400").then_some(())
    })
    .await;
    // Reading again, the client gets what was on its way, then the feed finds it behind and
    // ends its stream.
    let mut got = Vec::new();
    while let Some(message) = slow.next(Duration::from_secs(5)).await {
        got.push(message.id.unwrap_or_default());
    }
    assert!(got.len() < written.len(), "the slow client was cut off before the end");
    assert!(feed.metrics().await.contains("feed_slow_clients_total 1"));
    assert_eq!(got[..], written[..got.len()], "what it got is in order and without a gap");
    let last = got.last().cloned().unwrap_or_default();
    let mut resumed = SseClient::connect(&feed.url("/events"), &[("Last-Event-ID", &last)]).await;
    let mut rest = Vec::new();
    while rest.len() < written.len() - got.len() {
        let Some(message) = resumed.next(Duration::from_secs(10)).await else { break };
        rest.push(message.id.unwrap_or_default());
    }
    assert_eq!(rest[..], written[got.len()..], "the rest, resumed");
    feed.stop().await;
    delete_stream(&stream).await;
}

/// At shutdown every stream ends, so clients reconnect (to another replica).
#[tokio::test]
async fn shutdown_ends_every_stream() {
    let stream = test_support::unique_name("feed-stop");
    let feed = RunningFeed::start(config(&stream)).await;
    let mut client = SseClient::connect(&feed.url("/events"), &[]).await;
    feed.shutdown.cancel();
    assert!(client.ends_within(Duration::from_secs(5)).await, "the stream ended");
    feed.stop().await;
    delete_stream(&stream).await;
}

/// The live page is plain HTML that follows `/events` with `EventSource`.
#[tokio::test]
async fn the_live_page_follows_the_events() {
    let stream = test_support::unique_name("feed-page");
    let feed = RunningFeed::start(config(&stream)).await;
    let page = reqwest::get(feed.url("/")).await.expect("GET /");
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().expect("type").starts_with("text/html"));
    let html = page.text().await.expect("text");
    assert!(html.contains("new EventSource(\"events\""), "{html}");
    feed.stop().await;
}

/// A replica that does not read the stream (Redis unreachable) sends clients elsewhere (503,
/// `Retry-After`) rather than telling them to reload: it cannot know what they missed.
#[tokio::test]
async fn a_replica_not_reading_the_stream_sends_clients_elsewhere() {
    let mut cut_off = config(&test_support::unique_name("feed-down"));
    cut_off.redis_url = "redis://127.0.0.1:1".to_owned();
    let feed = order_feed::OrderFeed::bind(cut_off).await.expect("bind");
    let addr = order_feed::Service::local_addr(&feed);
    let shutdown = order_feed::Shutdown::new();
    let task = tokio::spawn(order_feed::Service::run(feed, shutdown.clone()));
    let response = reqwest::Client::new()
        .get(format!("http://{addr}/events"))
        .header("Last-Event-ID", Ulid::new().to_string())
        .send()
        .await
        .expect("GET /events");
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    let ready = reqwest::get(format!("http://{addr}/readyz")).await.expect("readyz");
    assert_eq!(ready.status(), 503);
    shutdown.cancel();
    task.await.expect("task").expect("clean stop");
}

/// Entries trimmed while a replica could not read (longer away than the stream's retention) are
/// a gap it cannot fill: it ends every stream, and each client, resuming, is told to reload.
/// Control: without the trim, the same reconnect resumes the client with nothing missed.
#[tokio::test]
async fn entries_trimmed_while_a_replica_was_away_make_every_client_reload() {
    for trimmed in [false, true] {
        let redis = test_support::PrivateRedis::start(false);
        let stream = test_support::unique_name("feed-gap");
        let mut own = config(&stream);
        own.redis_url = redis.url();
        let feed = RunningFeed::start(own).await;
        let client = redis::Client::open(redis.url()).expect("URL");
        let mut admin = client.get_multiplexed_async_connection().await.expect("connect");
        let add = |e: &domain::StreamEntry| {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&stream).arg("*");
            for (k, v) in e.to_fields() {
                cmd.arg(k).arg(v);
            }
            cmd
        };
        let order = Ulid::new();
        let first = entry(Ulid::new(), order, 1, DEFAULT);
        let _: String = add(&first).query_async(&mut admin).await.expect("XADD");
        feed.wait_read(1).await;
        let mut sse = SseClient::connect(&feed.url("/events"), &[("Last-Event-ID", &first.event_id.to_string())]).await;
        // Cut the replica off; while it is away, one event is added, and maybe trimmed.
        let missed = entry(Ulid::new(), order, 2, DEFAULT);
        let mut away = redis::pipe();
        away.atomic().cmd("CLIENT").arg("KILL").arg("SKIPME").arg("yes").arg("TYPE").arg("normal").ignore();
        away.add_command(add(&missed)).ignore();
        if trimmed {
            away.cmd("XTRIM").arg(&stream).arg("MAXLEN").arg(0).ignore();
        }
        let () = away.query_async(&mut admin).await.expect("cut off, add, trim");
        if trimmed {
            assert!(sse.ends_within(Duration::from_secs(10)).await, "the stream ended");
            // Until it reads again the replica sends clients elsewhere (503); then it takes them.
            test_support::eventually("the replica reading again", Duration::from_secs(10), || async {
                let r = reqwest::get(feed.url("/readyz")).await.ok()?;
                (r.status() == 200).then_some(())
            })
            .await;
            let mut again =
                SseClient::connect(&feed.url("/events"), &[("Last-Event-ID", &first.event_id.to_string())]).await;
            assert_eq!(again.take(1).await[0].event.as_deref(), Some("reset"));
            assert!(feed.metrics().await.contains("feed_stream_gaps_total 1"));
        } else {
            assert_eq!(ids(&sse.take(1).await), vec![missed.event_id.to_string()]);
            assert!(feed.metrics().await.contains("feed_stream_gaps_total 0"));
        }
        feed.stop().await;
    }
}

/// JetStream lost the stream and the relays made it again, republishing what it had not
/// delivered to every group: the replica reads the new stream from its start (its sequences
/// start over), sends the events it had not sent, and none twice.
#[tokio::test]
async fn a_stream_made_again_on_nats_is_read_from_its_start_and_no_event_is_sent_twice() {
    let bus = Bus::new("feed-again", broker::Kind::Nats).await;
    let feed = RunningFeed::start(bus.config()).await;
    let mut client = SseClient::connect(&feed.url("/events"), &[]).await;
    let order = Ulid::new();
    let events: Vec<_> = (1..=4).map(|seq| entry(Ulid::new(), order, seq, DEFAULT)).collect();
    for e in &events[..3] {
        bus.xadd(e).await;
    }
    assert_eq!(ids(&client.take(3).await), ids_of(&events[..3]));

    bus.delete().await;
    let layout = broker::jetstream::Layout::new(&domain::Partitions::single(&bus.stream));
    let js = broker::jetstream::context(broker::async_nats::connect(test_support::nats_url()).await.expect("NATS"));
    broker::jetstream::ensure_stream(&js, &layout).await.expect("made again");
    // Republished from the last point every group had acknowledged (the third event), then a
    // new one: the new stream's sequences 1 and 2, below those the replica had read.
    for e in &events[2..] {
        bus.xadd(e).await;
    }
    assert_eq!(ids(&client.take(1).await), ids_of(&events[3..]), "the new event");
    assert_eq!(client.next(Duration::from_secs(2)).await, None, "nothing twice");
    feed.stop().await;
    bus.delete().await;
}

fn ids_of(events: &[domain::StreamEntry]) -> Vec<String> {
    events.iter().map(|e| e.event_id.to_string()).collect()
}
