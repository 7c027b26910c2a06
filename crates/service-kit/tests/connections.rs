//! `Connections` against a real Postgres: reuse without a round trip of its own, closing what
//! was not released, limits, and connections the server ended while they were idle.

use std::time::Duration;

use service_kit::connections::{Connections, Ended, TEST_AFTER_IDLE};
use sqlx::{Connection, PgPool};

async fn setup(prefix: &str, max: u32, acquire_timeout: Duration) -> (PgPool, Connections) {
    let db = test_support::fresh_database(prefix).await;
    sqlx::query("CREATE TABLE t (n int)").execute(&db.pool).await.expect("table");
    let connections = Connections::new(db.url.parse().expect("url"), max, acquire_timeout);
    (db.pool, connections)
}

async fn backend_pid(conn: &mut sqlx::PgConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(conn).await.expect("pid")
}

async fn backend_alive(pool: &PgPool, pid: i32) -> bool {
    sqlx::query_scalar("SELECT count(*) > 0 FROM pg_stat_activity WHERE pid = $1")
        .bind(pid)
        .fetch_one(pool)
        .await
        .expect("pg_stat_activity")
}

#[tokio::test]
async fn a_released_connection_is_reused_and_one_dropped_is_closed_with_its_transaction() {
    let (pool, connections) = setup("conns_reuse", 2, Duration::from_secs(5)).await;
    let mut first = connections.acquire().await.expect("acquire");
    let pid = backend_pid(&mut first).await;
    first.put_back(Ended::Completed).await;
    assert_eq!(connections.idle_count(), 1);
    let mut again = connections.acquire().await.expect("acquire");
    assert_eq!(backend_pid(&mut again).await, pid, "the released connection serves the next user");

    // Work left half done: a transaction with a row in it, never committed.
    sqlx::query("BEGIN").execute(&mut *again).await.expect("begin");
    sqlx::query("INSERT INTO t VALUES (1)").execute(&mut *again).await.expect("insert");
    drop(again);
    test_support::eventually("the dropped connection's backend ends", Duration::from_secs(5), || async {
        (!backend_alive(&pool, pid).await).then_some(())
    })
    .await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM t").fetch_one(&pool).await.expect("count");
    assert_eq!(rows, 0, "its transaction was rolled back, not handed to the next user");
    let mut next = connections.acquire().await.expect("acquire");
    assert_ne!(backend_pid(&mut next).await, pid);
}

#[tokio::test]
async fn acquiring_past_the_limit_waits_then_times_out() {
    let (_pool, connections) = setup("conns_limit", 1, Duration::from_millis(300)).await;
    let held = connections.acquire().await.expect("acquire");
    let started = std::time::Instant::now();
    let err = connections.acquire().await.expect_err("the only connection is taken");
    assert!(matches!(err, sqlx::Error::PoolTimedOut), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    // Releasing (or dropping) it frees the slot.
    drop(held);
    connections.acquire().await.expect("acquire after the holder is done").put_back(Ended::Completed).await;
}

#[tokio::test]
async fn a_connection_the_server_ended_while_idle_is_replaced_unseen() {
    let (pool, connections) = setup("conns_stale", 2, Duration::from_secs(5)).await;
    let mut conn = connections.acquire().await.expect("acquire");
    let pid = backend_pid(&mut conn).await;
    conn.put_back(Ended::Completed).await;
    sqlx::query("SELECT pg_terminate_backend($1)").bind(pid).execute(&pool).await.expect("terminate");
    // Idle long enough to be tested before its next use.
    tokio::time::sleep(TEST_AFTER_IDLE + Duration::from_millis(200)).await;
    let mut fresh = connections.acquire().await.expect("a working connection");
    assert_ne!(backend_pid(&mut fresh).await, pid);
}

#[tokio::test]
async fn a_database_error_keeps_the_connection_and_a_broken_one_does_not() {
    let (pool, connections) = setup("conns_errors", 2, Duration::from_secs(5)).await;
    let mut conn = connections.acquire().await.expect("acquire");
    let pid = backend_pid(&mut conn).await;
    let err = sqlx::query("SELECT * FROM no_such_table").execute(&mut *conn).await.expect_err("no table");
    conn.put_back(Ended::Failed(&err)).await;
    let mut conn = connections.acquire().await.expect("acquire");
    assert_eq!(backend_pid(&mut conn).await, pid, "a statement error leaves the connection usable");

    // The server ends the connection while it is in use: the next statement fails on it.
    sqlx::query("SELECT pg_terminate_backend($1)").bind(pid).execute(&pool).await.expect("terminate");
    let err = sqlx::query("SELECT 1").execute(&mut *conn).await.expect_err("connection gone");
    conn.put_back(Ended::Failed(&err)).await;
    assert_eq!(connections.idle_count(), 0, "a failed connection is not kept");
    let mut conn = connections.acquire().await.expect("acquire");
    assert_ne!(backend_pid(&mut conn).await, pid);
}

#[tokio::test]
async fn a_transaction_an_error_dropped_is_rolled_back_before_its_connection_goes_back() {
    let (pool, connections) = setup("conns_dropped_tx", 2, Duration::from_secs(5)).await;
    sqlx::query("INSERT INTO t VALUES (1)").execute(&pool).await.expect("row");
    let mut conn = connections.acquire().await.expect("acquire");
    let pid = backend_pid(&mut conn).await;
    let err = {
        let mut tx = conn.begin().await.expect("begin");
        sqlx::query("SELECT n FROM t FOR UPDATE").execute(&mut *tx).await.expect("lock the row");
        sqlx::query("SELECT 1/0").execute(&mut *tx).await.expect_err("a statement error")
        // `tx` is dropped here: sqlx only queues its ROLLBACK.
    };
    conn.put_back(Ended::Failed(&err)).await;
    assert_eq!(connections.idle_count(), 1, "a statement error leaves the connection usable");

    // Nobody uses the connection again, yet its transaction has ended and its lock is free.
    let state: String = sqlx::query_scalar("SELECT state FROM pg_stat_activity WHERE pid = $1")
        .bind(pid)
        .fetch_one(&pool)
        .await
        .expect("pg_stat_activity");
    assert_eq!(state, "idle", "the dropped transaction was rolled back on release");
    let mut other = pool.begin().await.expect("begin");
    sqlx::query("SELECT n FROM t FOR UPDATE NOWAIT").execute(&mut *other).await.expect("the row lock is free");
    other.rollback().await.expect("rollback");

    let mut again = connections.acquire().await.expect("acquire");
    assert_eq!(backend_pid(&mut again).await, pid, "the recycled connection serves the next user");
}

#[tokio::test]
async fn closing_refuses_new_acquisitions_and_closes_what_comes_back() {
    let (pool, connections) = setup("conns_close", 2, Duration::from_secs(5)).await;
    let mut idle = connections.acquire().await.expect("acquire");
    let idle_pid = backend_pid(&mut idle).await;
    let mut busy = connections.acquire().await.expect("acquire");
    let busy_pid = backend_pid(&mut busy).await;
    idle.put_back(Ended::Completed).await;
    connections.close().await;
    assert!(matches!(connections.acquire().await, Err(sqlx::Error::PoolClosed)));
    busy.put_back(Ended::Completed).await;
    assert_eq!(connections.idle_count(), 0);
    for pid in [idle_pid, busy_pid] {
        test_support::eventually("closed connections end", Duration::from_secs(5), || async {
            (!backend_alive(&pool, pid).await).then_some(())
        })
        .await;
    }
    let mut admin = sqlx::PgConnection::connect_with(&pool.connect_options()).await.expect("connect");
    sqlx::query("SELECT 1").execute(&mut admin).await.expect("the server is fine");
}
