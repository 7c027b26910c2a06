//! The live page in a real browser (headless Chromium), through nginx in front of two feed
//! replicas: the test kills the replica serving the page, the browser's EventSource reconnects
//! through nginx to the other, and the page ends with every event of the run once, in order.

use std::time::Duration;

use system_tests::browser::Browser;
use system_tests::feed::{clients, publish, publish_as, replicas, serving};
use system_tests::nginx::Nginx;
use ulid::Ulid;

/// The event ids the page has shown, in the order it got them.
async fn received(browser: &Browser) -> Vec<String> {
    let value = browser.eval("return window.received || [];").await;
    value.as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

#[tokio::test]
async fn the_live_page_keeps_every_event_once_in_order_when_its_replica_is_killed() {
    let stream = test_support::unique_name("feed-browser");
    let mut feeds = replicas(&stream, &[]).await;
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
    let serving = serving(&feeds).await;
    feeds[serving].kill().await;
    for seq in 6..=9 {
        written.push(publish(&stream, order, seq).await);
    }
    written.push(publish_as(&stream, order, 10, "OrderCancelled", None).await);
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
