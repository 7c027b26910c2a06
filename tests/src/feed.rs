//! The live feed's system tests share these: events written as a relay writes them, two
//! replicas on one stream, and which of them serves a client.

use std::time::Duration;

use chrono::Utc;
use domain::{StreamEntry, TenantId};
use ulid::Ulid;

use crate::ServiceProcess;

/// Adds event `seq` of `order` (`event_type`, with `traceparent` if given) to `stream`; its id.
pub async fn publish_as(stream: &str, order: Ulid, seq: i64, event_type: &str, traceparent: Option<String>) -> String {
    let entry = StreamEntry {
        event_id: Ulid::new(),
        event_type: event_type.to_owned(),
        aggregate_type: "order".to_owned(),
        aggregate_id: order.to_string(),
        seq,
        occurred_at: Utc::now(),
        payload: serde_json::json!({ "order_id": order.to_string() }).to_string(),
        traceparent,
        tracestate: None,
        tenant_id: TenantId::default_tenant(),
    };
    test_support::xadd(stream, &entry.to_fields()).await;
    entry.event_id.to_string()
}

/// [`publish_as`] an `OrderCreated` for seq 1, else an `OrderConfirmed`, without trace context.
pub async fn publish(stream: &str, order: Ulid, seq: i64) -> String {
    publish_as(stream, order, seq, if seq == 1 { "OrderCreated" } else { "OrderConfirmed" }, None).await
}

/// Two order-feed replicas reading `stream` on the shared Redis (with `env` besides), ready.
pub async fn replicas(stream: &str, env: &[(&str, &str)]) -> [ServiceProcess; 2] {
    let redis = test_support::redis_url();
    let spawn = || {
        let base = [("REDIS_URL", redis.as_str()), ("REDIS_STREAM", stream)];
        ServiceProcess::spawn("order-feed", base.into_iter().chain(env.iter().copied()))
    };
    let mut feeds = [spawn(), spawn()];
    for feed in &mut feeds {
        feed.wait_ready(Duration::from_secs(30)).await;
    }
    feeds
}

/// Clients a replica serves (`feed_clients`), if it answers.
pub async fn clients(feed: &ServiceProcess) -> Option<i64> {
    let text = feed.http().get(feed.url("/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix("feed_clients ")).and_then(|v| v.trim().parse().ok())
}

/// Which of the two replicas serves the one client connected.
pub async fn serving(feeds: &[ServiceProcess; 2]) -> usize {
    test_support::eventually("the serving replica known", Duration::from_secs(10), || async {
        match [clients(&feeds[0]).await?, clients(&feeds[1]).await?] {
            [1, 0] => Some(0),
            [0, 1] => Some(1),
            _ => None,
        }
    })
    .await
}
