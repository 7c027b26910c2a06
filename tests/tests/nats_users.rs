//! The NATS users the `nats` compose profile ships (deploy/nats/nats.conf), on a NATS server
//! started on that configuration: the relay, the consumer and the feed do all their work as
//! their own users without one permissions violation, and each user is refused what it must
//! not do.

use std::time::Duration;

use broker::async_nats;
use broker::jetstream::{self, Layout};
use system_tests::system::{Env, System};
use test_support::sse::SseClient;
use test_support::PrivateNats;

const USERS: [(&str, &str, &str); 4] = [
    ("relay", "NATS_RELAY_PASSWORD", "relay-test-password"),
    ("inventory", "NATS_CONSUMER_PASSWORD", "consumer-test-password"),
    ("feed", "NATS_FEED_PASSWORD", "feed-test-password"),
    ("admin", "NATS_ADMIN_PASSWORD", "admin-test-password"),
];

/// The configuration's stream: its permissions name the default `REDIS_STREAM`'s subjects, and
/// the server is the test's own.
const STREAM: &str = "orders.events";

fn url(nats: &PrivateNats, user: &str) -> String {
    let password = USERS.iter().find(|(u, _, _)| *u == user).map(|(_, _, p)| *p).expect("a user");
    format!("nats://{user}:{password}@127.0.0.1:{}", nats.port)
}

async fn connect(nats: &PrivateNats, user: &str) -> async_nats::Client {
    jetstream::connect(&url(nats, user), "test").await.unwrap_or_else(|e| panic!("connect as {user}: {e}"))
}

/// The permissions violations the server logged for `user`.
fn violations(nats: &PrivateNats, user: &str) -> Vec<String> {
    nats.log()
        .lines()
        .filter(|l| l.contains("Violation") && l.contains(&format!("User \"{user}\"")))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_consumer_and_feed_work_as_their_own_nats_users_and_may_do_no_more() {
    let config = include_str!("../../deploy/nats/nats.conf");
    let env: Vec<(&str, &str)> = USERS.iter().map(|(_, var, password)| (*var, *password)).collect();
    let nats = PrivateNats::with_config(config, &env);
    let env = Env {
        redis: Some((test_support::redis_url(), STREAM.to_owned())),
        nats: Some(url(&nats, "admin")),
        // Trimming runs every half second, so the relay's trim runs under its user too.
        relay: vec![("NATS_URL".into(), url(&nats, "relay")), ("REDIS_STREAM_RETENTION".into(), "1s".into())],
        consumer: vec![("NATS_URL".into(), url(&nats, "inventory")), ("CONSUMER_GROUP".into(), "inventory".into())],
        ..Env::default()
    };
    let mut system = System::start(env).await;
    let mut feed = system_tests::ServiceProcess::spawn(
        "order-feed",
        [("BROKER", "nats".to_owned()), ("NATS_URL", url(&nats, "feed")), ("REDIS_STREAM", STREAM.to_owned())],
    );
    feed.wait_ready(Duration::from_secs(30)).await;
    let mut client = SseClient::connect(&feed.url("/events"), &[]).await;

    // The whole flow: an order reserved then confirmed (the feed sends both events), and a
    // poison message dead-lettered.
    system.set_stock("SKU-NATS", 10).await;
    let traceparent = system_tests::system::untraced();
    let id = system.create_order("SKU-NATS", 3, &traceparent).await;
    system.post(&format!("/orders/{id}/confirm"), None, &traceparent).await;
    system.wait_for_stock("SKU-NATS", (7, 0), Duration::from_secs(30)).await;
    assert_eq!(client.take(2).await.len(), 2, "the feed sent the order's events");
    let admin = jetstream::context(connect(&nats, "admin").await);
    admin.publish(STREAM, "not an event".into()).await.expect("publish").await.expect("stored");
    let layout = Layout::new(&domain::Partitions::single(STREAM));
    let count =
        async |stream: &str| admin.get_stream(stream).await.ok()?.get_info().await.ok().map(|i| i.state.messages);
    test_support::eventually("the poison message dead-lettered", Duration::from_secs(30), || async {
        (count(&layout.dlq_stream).await? == 1).then_some(())
    })
    .await;
    // Every message acknowledged and older than the retention: the relay trims them all.
    test_support::eventually("the relay trimmed the acknowledged messages", Duration::from_secs(30), || async {
        (count(&layout.stream).await? == 0).then_some(())
    })
    .await;
    for user in ["relay", "inventory", "feed"] {
        assert_eq!(violations(&nats, user), Vec::<String>::new(), "{user} was refused");
    }

    // What each may not do: write events (but the relay), read as the group (but the
    // consumers), delete the stream (only an operator may). The consumer stops first, so that a
    // message waits for the group.
    system.consumer.stop(Duration::from_secs(30)).await;
    admin.publish(STREAM, "waiting for the group".into()).await.expect("publish").await.expect("stored");
    for user in ["inventory", "feed"] {
        let js = jetstream::context(connect(&nats, user).await);
        let forged = match js.publish(STREAM, "forged".into()).await {
            Ok(ack) => tokio::time::timeout(Duration::from_secs(3), ack).await.ok().and_then(Result::ok),
            Err(_) => None,
        };
        assert!(forged.is_none(), "{user} published an event");
    }
    // A pull from the group's durable consumer, as the request any client could send.
    let next = format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", layout.stream, layout.durable("inventory", 0));
    for user in ["relay", "feed"] {
        let client = connect(&nats, user).await;
        let pulled = tokio::time::timeout(
            Duration::from_secs(3),
            client.request(next.clone(), r#"{"batch":1,"no_wait":true}"#.into()),
        )
        .await;
        let got = pulled.ok().and_then(Result::ok).is_some_and(|m| m.headers.is_none() && !m.payload.is_empty());
        assert!(!got, "{user} read as a member of the group");
        let refused = violations(&nats, user);
        assert!(refused.iter().any(|l| l.contains(&next)), "{user}'s pull was refused: {refused:?}");
    }
    for user in ["relay", "inventory", "feed"] {
        let js = jetstream::context(connect(&nats, user).await);
        assert!(js.delete_stream(&layout.stream).await.is_err(), "{user} deleted the stream");
    }
    assert!(!violations(&nats, "feed").is_empty(), "the server logs what it refused (the check above sees it)");
    assert!(count(&layout.stream).await.is_some(), "the stream is still there");

    feed.terminate();
    let _ = feed.wait_exit(Duration::from_secs(20)).await;
    system.stop().await;
}
