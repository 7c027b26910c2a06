//! The live page in a real browser (headless Chromium), through nginx in front of two feed
//! replicas: the test kills the replica serving the page, the browser's EventSource reconnects
//! through nginx to the other, and the page ends with every event of the run once, in order.

use std::time::Duration;

use chrono::Utc;
use domain::{StreamEntry, TenantId};
use system_tests::browser::Browser;
use system_tests::nginx::Nginx;
use system_tests::ServiceProcess;
use ulid::Ulid;

async fn publish(stream: &str, order: Ulid, seq: i64) -> String {
    let entry = StreamEntry {
        event_id: Ulid::new(),
        event_type: match seq {
            1 => "OrderCreated",
            10 => "OrderCancelled",
            _ => "OrderConfirmed",
        }
        .to_owned(),
        aggregate_type: "order".to_owned(),
        aggregate_id: order.to_string(),
        seq,
        occurred_at: Utc::now(),
        payload: serde_json::json!({ "order_id": order.to_string() }).to_string(),
        traceparent: None,
        tracestate: None,
        tenant_id: TenantId::default_tenant(),
    };
    test_support::xadd(stream, &entry.to_fields()).await;
    entry.event_id.to_string()
}

async fn clients(feed: &ServiceProcess) -> Option<i64> {
    let text = feed.http().get(feed.url("/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix("feed_clients ")).and_then(|v| v.trim().parse().ok())
}

/// The event ids the page has shown, in the order it got them.
async fn received(browser: &Browser) -> Vec<String> {
    let value = browser.eval("return window.received || [];").await;
    value.as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

#[tokio::test]
async fn the_live_page_keeps_every_event_once_in_order_when_its_replica_is_killed() {
    let stream = test_support::unique_name("feed-browser");
    let redis = test_support::redis_url();
    let spawn =
        || ServiceProcess::spawn("order-feed", [("REDIS_URL", redis.as_str()), ("REDIS_STREAM", stream.as_str())]);
    let mut feeds = [spawn(), spawn()];
    for feed in &mut feeds {
        feed.wait_ready(Duration::from_secs(30)).await;
    }
    let nginx = Nginx::start(&[feeds[0].addr(), feeds[1].addr()]);
    let browser = Browser::start().await;
    browser.open(&nginx.url("/")).await;
    test_support::eventually("the page live", Duration::from_secs(20), || async {
        (browser.eval("return document.getElementById('status').textContent;").await == "live").then_some(())
    })
    .await;

    let order = Ulid::new();
    let mut written = Vec::new();
    for seq in 1..=5 {
        written.push(publish(&stream, order, seq).await);
    }
    test_support::eventually("five events on the page", Duration::from_secs(20), || async {
        (received(&browser).await.len() == 5).then_some(())
    })
    .await;
    let serving = test_support::eventually("the serving replica known", Duration::from_secs(10), || async {
        match [clients(&feeds[0]).await?, clients(&feeds[1]).await?] {
            [1, 0] => Some(0),
            [0, 1] => Some(1),
            _ => None,
        }
    })
    .await;
    feeds[serving].kill().await;
    for seq in 6..=10 {
        written.push(publish(&stream, order, seq).await);
    }
    let shown = test_support::eventually("all ten events on the page", Duration::from_secs(30), || async {
        let shown = received(&browser).await;
        (shown.len() >= written.len()).then_some(shown)
    })
    .await;
    assert_eq!(shown, written, "every event once, in order, across the replica's death");
    // The other replica serves the page now, having resumed it.
    let other = &feeds[1 - serving];
    assert_eq!(clients(other).await, Some(1));
    assert_eq!(browser.eval("return window.resets;").await, 0, "no reset: the cursor was known");
    let screenshot = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("order-feed-page.png");
    browser.screenshot(&screenshot).await;
    assert!(std::fs::metadata(&screenshot).map(|m| m.len() > 1000).unwrap_or(false), "a screenshot");
}
