//! `Notifier` wakes listeners on the relay channel after commit, and coalesces bursts.

use std::time::Duration;

use outbox::{Notifier, CHANNEL};
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn committed_reaches_a_listener() {
    let db = test_support::fresh_database("outbox_notify").await;
    let mut listener = PgListener::connect(&db.url).await.expect("listener");
    listener.listen(CHANNEL).await.expect("listen");
    let stop = CancellationToken::new();
    let notifier = Notifier::spawn(db.pool.clone(), stop.clone().cancelled_owned());

    for _ in 0..100 {
        notifier.committed();
    }
    let first = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await.expect("notified").expect("recv");
    assert_eq!(first.channel(), CHANNEL);

    // A burst of 100 signals is coalesced: far fewer notifications than signals.
    let mut extra = 0;
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await {
        extra += 1;
    }
    assert!(extra < 99, "100 signals produced {} notifications", extra + 1);
    stop.cancel();
}
