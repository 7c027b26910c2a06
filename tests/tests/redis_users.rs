//! The Redis users the system ships (deploy/redis/users.acl.template), on a Redis started the
//! way compose starts it (deploy/redis/start): the relay and the consumer do all their work
//! as their own users without one denial, and each user is refused what it must not do.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::Value;
use system_tests::system::{Env, System};

const RELAY_PASSWORD: &str = "relay-test-password";
const CONSUMER_PASSWORD: &str = "consumer-test-password";
const ADMIN_PASSWORD: &str = "admin-test-password";
const FEED_PASSWORD: &str = "feed-test-password";

/// `deploy/redis/start` on a free port, killed when dropped.
struct UsersRedis {
    port: u16,
    child: Child,
    dir: PathBuf,
}

impl UsersRedis {
    fn start(stream: &str) -> Self {
        let port = system_tests::process::free_local_addr().port();
        let dir = std::env::temp_dir().join(test_support::unique_name("redis-users"));
        std::fs::create_dir_all(&dir).expect("data dir");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/redis/start");
        let child = Command::new(script)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"])
            .arg(&dir)
            .env("REDIS_STREAM", stream)
            .env("REDIS_RELAY_USER", "relay")
            .env("REDIS_RELAY_PASSWORD", RELAY_PASSWORD)
            .env("REDIS_CONSUMER_USER", "inventory")
            .env("REDIS_CONSUMER_PASSWORD", CONSUMER_PASSWORD)
            .env("REDIS_FEED_USER", "feed")
            .env("REDIS_FEED_PASSWORD", FEED_PASSWORD)
            .env("REDIS_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run deploy/redis/start");
        let redis = Self { port, child, dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "deploy/redis/start did not bring Redis up");
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    fn url(&self, user: &str, password: &str) -> String {
        format!("redis://{user}:{password}@127.0.0.1:{}", self.port)
    }

    async fn connect(&self, user: &str, password: &str) -> MultiplexedConnection {
        let client = redis::Client::open(self.url(user, password)).expect("URL");
        client.get_multiplexed_async_connection().await.unwrap_or_else(|e| panic!("connect as {user}: {e}"))
    }
}

impl Drop for UsersRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The error code of `cmd` on `conn` (`None`: it succeeded).
async fn refusal(conn: &mut MultiplexedConnection, cmd: &redis::Cmd) -> Option<String> {
    match cmd.query_async::<Value>(conn).await {
        Ok(_) => None,
        Err(e) => Some(e.code().unwrap_or("(no code)").to_owned()),
    }
}

/// Waits until `key` holds `len` entries.
async fn xlen_reaches(admin: &MultiplexedConnection, key: &str, len: u64, what: &str) {
    test_support::eventually(what, Duration::from_secs(30), || async {
        let mut admin = admin.clone();
        let now: u64 = redis::cmd("XLEN").arg(key).query_async(&mut admin).await.ok()?;
        (now == len).then_some(())
    })
    .await;
}

/// The `ACL LOG` entries of `user` (of the last 128, all Redis keeps by default): each a
/// command (or key) it was refused.
async fn denials(admin: &mut MultiplexedConnection, user: &str) -> Vec<String> {
    let log: Vec<Vec<Value>> = redis::cmd("ACL").arg("LOG").arg(128).query_async(admin).await.expect("ACL LOG");
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        other => format!("{other:?}"),
    };
    log.iter()
        .filter_map(|entry| {
            let fields: Vec<String> = entry.iter().map(text).collect();
            let field = |name: &str| fields.iter().position(|f| f == name).and_then(|i| fields.get(i + 1)).cloned();
            (field("username").as_deref() == Some(user))
                .then(|| format!("{} {}", field("reason").unwrap_or_default(), field("object").unwrap_or_default()))
        })
        .collect()
}

#[tokio::test]
async fn relay_and_consumer_work_as_their_own_redis_users_and_may_do_no_more() {
    users_work_and_may_do_no_more(1).await;
}

/// The same with the events spread over partition streams: the users' key patterns cover
/// them, their dead letters and the recorded number of partitions.
#[tokio::test]
async fn with_partitions_the_users_work_on_every_partition_and_may_do_no_more() {
    users_work_and_may_do_no_more(3).await;
}

async fn users_work_and_may_do_no_more(partitions: u16) {
    let base = test_support::unique_name("users-stream");
    let redis = UsersRedis::start(&base);
    let mut admin = redis.connect("admin", ADMIN_PASSWORD).await;
    let streams = domain::Partitions::new(&base, partitions).expect("partitions").streams().to_vec();
    // The checks of one stream use the first partition's.
    let stream = streams[0].clone();

    let env = Env {
        all: vec![("STREAM_PARTITIONS".into(), partitions.to_string())],
        redis: Some((redis.url("admin", ADMIN_PASSWORD), base.clone())),
        // Trimming runs every half second, so the relay's trim runs under its user too.
        relay: vec![
            ("REDIS_URL".into(), redis.url("relay", RELAY_PASSWORD)),
            ("REDIS_STREAM_RETENTION".into(), "1s".into()),
        ],
        consumer: vec![("REDIS_URL".into(), redis.url("inventory", CONSUMER_PASSWORD))],
        ..Env::default()
    };
    let mut system = System::start(env).await;
    // The live feed, as its own user: it loads the stream and follows it.
    let mut feed = system_tests::ServiceProcess::spawn(
        "order-feed",
        [
            ("REDIS_URL", redis.url("feed", FEED_PASSWORD)),
            ("REDIS_STREAM", base.clone()),
            ("STREAM_PARTITIONS", partitions.to_string()),
        ],
    );
    feed.wait_ready(Duration::from_secs(30)).await;

    // The whole flow: an order reserved then confirmed, and a poison entry dead-lettered.
    system.set_stock("SKU-ACL", 10).await;
    let traceparent = system_tests::system::untraced();
    let id = system.create_order("SKU-ACL", 3, &traceparent).await;
    system.post(&format!("/orders/{id}/confirm"), None, &traceparent).await;
    system.wait_for_stock("SKU-ACL", (7, 0), Duration::from_secs(30)).await;
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("event_id")
        .arg("not-a-ulid")
        .query_async(&mut admin)
        .await
        .expect("XADD a poison entry as admin");
    let dlq = format!("{stream}.dlq");
    xlen_reaches(&admin, &dlq, 1, "the poison entry dead-lettered").await;
    // Every entry acknowledged and older than the retention: the relay trims them all.
    for partition in &streams {
        xlen_reaches(&admin, partition, 0, "the relay trimmed the acknowledged entries").await;
    }
    // Nothing either service did was refused, however it handled the refusal.
    for user in ["relay", "inventory", "feed"] {
        assert_eq!(denials(&mut admin, user).await, Vec::<String>::new(), "{user} was refused");
    }

    // What each may not do.
    let mut consumer = redis.connect("inventory", CONSUMER_PASSWORD).await;
    let mut relay = redis.connect("relay", RELAY_PASSWORD).await;
    let groups: Vec<Vec<Value>> =
        redis::cmd("XINFO").arg("GROUPS").arg(&stream).query_async(&mut admin).await.expect("XINFO GROUPS");
    let group = match groups.first().and_then(|g| g.get(1)) {
        Some(Value::BulkString(name)) => String::from_utf8_lossy(name).into_owned(),
        other => panic!("no consumer group on {stream}: {other:?}"),
    };
    let add = |key: &str| redis::cmd("XADD").arg(key).arg("*").arg("event_id").arg("forged").to_owned();
    let read_group = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&group)
        .arg("intruder")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .to_owned();
    let destroy = redis::cmd("XGROUP").arg("DESTROY").arg(&stream).arg(&group).to_owned();
    let other_key = redis::cmd("GET").arg("some-other-key").to_owned();
    let consumer_may_not = [
        ("XADD to the event stream", add(&stream)),
        ("XTRIM of the event stream", redis::cmd("XTRIM").arg(&stream).arg("MAXLEN").arg(0).to_owned()),
        ("XGROUP DESTROY", destroy.clone()),
        ("GET of another key", other_key.clone()),
    ];
    let relay_may_not = [
        ("XREADGROUP", read_group.clone()),
        ("XACK", redis::cmd("XACK").arg(&stream).arg(&group).arg("0-1").to_owned()),
        ("XGROUP DESTROY", destroy),
        ("XADD to the dead-letter stream", add(&dlq)),
        ("GET of another key", other_key),
        ("FLUSHALL", redis::cmd("FLUSHALL").to_owned()),
        ("DEL of the event stream", redis::cmd("DEL").arg(&stream).to_owned()),
        ("SET over the event stream", redis::cmd("SET").arg(&stream).arg("x").to_owned()),
    ];
    for (what, cmd) in consumer_may_not {
        assert_eq!(refusal(&mut consumer, &cmd).await.as_deref(), Some("NOPERM"), "the consumer's {what} was allowed");
    }
    for (what, cmd) in relay_may_not {
        assert_eq!(refusal(&mut relay, &cmd).await.as_deref(), Some("NOPERM"), "the relay's {what} was allowed");
    }
    let mut feed_user = redis.connect("feed", FEED_PASSWORD).await;
    let feed_may_not = [
        ("XADD to the event stream", add(&stream)),
        ("XREADGROUP", read_group.clone()),
        ("XTRIM of the event stream", redis::cmd("XTRIM").arg(&stream).arg("MAXLEN").arg(0).to_owned()),
        ("DEL of the event stream", redis::cmd("DEL").arg(&stream).to_owned()),
        ("XADD to the dead-letter stream", add(&dlq)),
    ];
    for (what, cmd) in feed_may_not {
        assert_eq!(refusal(&mut feed_user, &cmd).await.as_deref(), Some("NOPERM"), "the feed's {what} was allowed");
    }
    let read = redis::cmd("XREAD").arg("COUNT").arg(1).arg("STREAMS").arg(&stream).arg("0-0").to_owned();
    assert_eq!(refusal(&mut feed_user, &read).await, None, "the feed may XREAD");
    assert!(feed.stop(Duration::from_secs(10)).await.success(), "the feed stops cleanly");
    // Without a password a connection may only PING.
    let mut anonymous = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port))
        .expect("URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect without a password");
    assert_eq!(refusal(&mut anonymous, &redis::cmd("PING")).await, None);
    assert_eq!(refusal(&mut anonymous, &read_group).await.as_deref(), Some("NOPERM"));
    // A wrong password does not connect at all.
    let wrong = redis::Client::open(redis.url("relay", "not-the-password")).expect("URL");
    assert!(wrong.get_multiplexed_async_connection().await.is_err(), "a wrong password was accepted");

    // Controls: the checks see a refusal when there is one, and none where the user may act.
    assert!(!denials(&mut admin, "relay").await.is_empty(), "ACL LOG shows none of the relay user's refusals");
    assert!(!denials(&mut admin, "inventory").await.is_empty(), "ACL LOG shows none of the consumer's refusals");
    assert_eq!(refusal(&mut admin, &add(&stream)).await, None, "admin may XADD: the NOPERM check is not blind");
    assert_eq!(refusal(&mut admin, &read_group).await, None, "admin may XREADGROUP");
    assert_eq!(refusal(&mut relay, &add(&stream)).await, None, "the relay may XADD to the event stream");
    let mut wait = redis::cmd("WAIT");
    wait.arg(0).arg(1);
    assert_eq!(refusal(&mut relay, &wait).await, None, "the relay may WAIT for replicas (REDIS_MIN_REPLICAS)");

    system.stop().await;
}
