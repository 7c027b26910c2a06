//! Waking relays: every committed event is followed by a notification on the relay channel,
//! sent by the write itself (a carrier) or, for writes that commit while a carrier is in
//! flight, by the notifier's background task; never by a write that rolled back.

use std::time::Duration;

use chrono::Utc;
use outbox::{append, NewEvent, Notifier, CHANNEL, FALLBACK_DELAY, MIGRATOR};
use sqlx::postgres::{PgListener, PgNotification};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

struct Fixture {
    pool: PgPool,
    listener: PgListener,
    notifier: Notifier,
    stop: CancellationToken,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn fixture(prefix: &str) -> Fixture {
    fixture_with_delay(prefix, FALLBACK_DELAY).await
}

async fn fixture_with_delay(prefix: &str, delay: Duration) -> Fixture {
    let db = test_support::fresh_database(prefix).await;
    MIGRATOR.run(&db.pool).await.expect("migrate");
    let mut listener = PgListener::connect(&db.url).await.expect("listener");
    listener.listen(CHANNEL).await.expect("listen");
    let stop = CancellationToken::new();
    let notifier = Notifier::with_fallback_delay(db.pool.clone(), delay, stop.clone().cancelled_owned());
    Fixture { pool: db.pool, listener, notifier, stop }
}

/// Appends one event for `aggregate_id` in its own transaction, which commits or rolls back.
async fn write(pool: &PgPool, aggregate_id: &str, notify: bool, commit: bool) {
    let mut tx = pool.begin().await.expect("begin");
    let event = NewEvent {
        aggregate_type: "order",
        aggregate_id,
        event_type: "OrderConfirmed",
        payload: r#"{"order_id":"x"}"#,
        occurred_at: Utc::now(),
        notify,
    };
    append(&mut tx, event).await.expect("append");
    if commit {
        tx.commit().await.expect("commit");
    } else {
        tx.rollback().await.expect("rollback");
    }
}

async fn next(listener: &mut PgListener, within: Duration) -> Option<PgNotification> {
    tokio::time::timeout(within, listener.recv()).await.ok().map(|n| n.expect("listener"))
}

/// Notifications that arrive within `within` of each other, counted until a quiet spell.
async fn drain(listener: &mut PgListener, within: Duration) -> usize {
    let mut n = 0;
    while next(listener, within).await.is_some() {
        n += 1;
    }
    n
}

#[tokio::test]
async fn a_write_at_rest_carries_its_own_notification_sent_at_its_commit() {
    let mut f = fixture("outbox_notify_carrier").await;
    let wake = f.notifier.write();
    assert!(wake.carries(), "with no other write in flight, a write carries the notification");
    write(&f.pool, "a", wake.carries(), true).await;
    let sent = next(&mut f.listener, Duration::from_secs(5)).await.expect("notified at commit");
    assert_eq!(sent.channel(), CHANNEL);
    wake.finished(true);
    assert_eq!(drain(&mut f.listener, FALLBACK_DELAY * 50).await, 0, "no second notification for a carrier");
}

#[tokio::test]
async fn a_write_that_rolls_back_sends_nothing() {
    let mut f = fixture("outbox_notify_rollback").await;
    let wake = f.notifier.write();
    assert!(wake.carries());
    write(&f.pool, "a", true, false).await;
    wake.finished(false);
    assert_eq!(drain(&mut f.listener, FALLBACK_DELAY * 50).await, 0, "a rolled-back event announces nothing");
}

#[tokio::test]
async fn a_write_committed_while_a_carrier_is_in_flight_is_covered_after_its_commit() {
    let mut f = fixture("outbox_notify_cover").await;
    // The carrier started first: its commit may come before the second write's, so it cannot
    // cover it.
    let carrier = f.notifier.write();
    assert!(carrier.carries());
    let other = f.notifier.write();
    assert!(!other.carries(), "one carrier in flight at a time");
    write(&f.pool, "b", false, true).await;
    other.finished(true);
    assert!(
        next(&mut f.listener, Duration::from_secs(5)).await.is_some(),
        "the background task notifies for a write no carrier covered"
    );
    // The carrier ends without an event: it sent nothing, and nothing is left to cover.
    carrier.finished(false);
    assert_eq!(drain(&mut f.listener, FALLBACK_DELAY * 50).await, 0);
}

#[tokio::test]
async fn a_carrier_that_starts_after_a_commit_covers_it() {
    // The background task waits long enough for the next carrier to commit.
    let mut f = fixture_with_delay("outbox_notify_next_carrier", Duration::from_millis(500)).await;
    let first = f.notifier.write();
    let other = f.notifier.write();
    write(&f.pool, "b", false, true).await;
    other.finished(true);
    // The in-flight carrier finishes at once and the next write carries: its notification,
    // sent after the uncovered commit, is the only one.
    first.finished(false);
    let next_carrier = f.notifier.write();
    assert!(next_carrier.carries());
    write(&f.pool, "c", true, true).await;
    next_carrier.finished(true);
    assert_eq!(drain(&mut f.listener, Duration::from_secs(1)).await, 1, "one notification covers both commits");
}

#[tokio::test]
async fn a_failed_carrier_leaves_earlier_commits_to_the_background_task() {
    let mut f = fixture("outbox_notify_failed_carrier").await;
    let first = f.notifier.write();
    let other = f.notifier.write();
    write(&f.pool, "b", false, true).await;
    first.finished(false);
    // This carrier starts after the uncovered commit but rolls back: its notification is never
    // sent, so the earlier commit still needs one.
    let failing = f.notifier.write();
    assert!(failing.carries());
    write(&f.pool, "c", true, false).await;
    failing.finished(false);
    other.finished(true);
    assert!(next(&mut f.listener, Duration::from_secs(5)).await.is_some(), "the committed write is covered");
}

#[tokio::test]
async fn a_write_dropped_before_its_outcome_is_known_is_assumed_committed() {
    let mut f = fixture("outbox_notify_dropped").await;
    let carrier = f.notifier.write();
    let other = f.notifier.write();
    write(&f.pool, "b", false, true).await;
    // E.g. the connection failed after the commit, or the request was cancelled.
    drop(other);
    assert!(next(&mut f.listener, Duration::from_secs(5)).await.is_some());
    drop(carrier);
}

#[tokio::test]
async fn uncovered_commits_get_at_most_one_notification_per_fallback_delay() {
    let mut f = fixture("outbox_notify_burst").await;
    let carrier = f.notifier.write();
    let started = std::time::Instant::now();
    for i in 0..100 {
        let wake = f.notifier.write();
        assert!(!wake.carries());
        write(&f.pool, &format!("o-{i}"), false, true).await;
        wake.finished(true);
    }
    let bound = started.elapsed().as_micros() / FALLBACK_DELAY.as_micros() + 2;
    let sent = drain(&mut f.listener, Duration::from_millis(300)).await;
    assert!(sent >= 1 && sent as u128 <= bound, "100 uncovered commits produced {sent} notifications (bound {bound})");
    drop(carrier);
}

#[tokio::test]
async fn a_disabled_notifier_never_carries_nor_notifies() {
    let mut f = fixture("outbox_notify_disabled").await;
    let disabled = Notifier::disabled();
    let wake = disabled.write();
    assert!(!wake.carries());
    write(&f.pool, "a", false, true).await;
    wake.finished(true);
    assert_eq!(drain(&mut f.listener, FALLBACK_DELAY * 50).await, 0);
}

#[tokio::test]
async fn writes_still_uncovered_at_shutdown_are_notified_before_the_task_ends() {
    // A fallback delay far longer than the test: only the stop can send the notification.
    let mut f = fixture_with_delay("outbox_notify_stop", Duration::from_secs(600)).await;
    let carrier = f.notifier.write();
    let other = f.notifier.write();
    write(&f.pool, "b", false, true).await;
    other.finished(true);
    f.stop.cancel();
    assert!(next(&mut f.listener, Duration::from_secs(5)).await.is_some(), "notified on the way out");
    drop(carrier);
}

#[tokio::test]
async fn the_background_task_replaces_a_connection_the_server_ended() {
    let mut f = fixture("outbox_notify_reconnect").await;
    let carrier = f.notifier.write();
    let other = f.notifier.write();
    write(&f.pool, "b", false, true).await;
    other.finished(true);
    assert!(next(&mut f.listener, Duration::from_secs(5)).await.is_some());
    // The task's connection is ended while idle (a server restart, a proxy's idle cut).
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE '%pg_notify%'",
    )
    .fetch_one(&f.pool)
    .await
    .expect("terminate");
    assert_eq!(ended, 1, "the background task's connection");
    let other = f.notifier.write();
    write(&f.pool, "c", false, true).await;
    other.finished(true);
    assert!(
        next(&mut f.listener, Duration::from_secs(5)).await.is_some(),
        "the first notification after the loss is sent on a new connection"
    );
    drop(carrier);
}
