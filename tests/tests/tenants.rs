//! Tenants end to end, through the real binaries: a token minted with `order-service token`
//! opens the APIs to its tenant only, each event carries its tenant on the stream, and two
//! tenants selling the same sku names each keep their own stock.

use std::time::Duration;

use system_tests::system::{Env, System};

const SECRET: &str = "system-test-secret-of-32-bytes-or-more";

/// `order-service token --tenant … --scope … --ttl …`, with the secret from the environment.
fn mint(tenant: &str, scope: &str) -> String {
    let out = std::process::Command::new(system_tests::process::binary_path("order-service"))
        .args(["token", "--tenant", tenant, "--scope", scope, "--ttl", "10m"])
        .env("AUTH_JWT_SECRET", SECRET)
        .output()
        .expect("run order-service token");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8").trim().to_owned()
}

#[tokio::test]
async fn each_tenants_events_carry_their_tenant_on_the_stream() {
    tenants_on_the_stream(broker::Kind::Redis).await;
}

#[tokio::test]
async fn each_tenants_events_carry_their_tenant_on_the_stream_on_nats() {
    tenants_on_the_stream(broker::Kind::Nats).await;
}

async fn tenants_on_the_stream(broker: broker::Kind) {
    let mut system = System::start(Env::default().all("AUTH_JWT_SECRET", SECRET).on(broker)).await;
    let service = &system.order_service;
    let body =
        serde_json::json!({"customer_id": "c-1", "items": [{"sku": "SKU-1", "quantity": 1, "unit_price_cents": 1}]});
    let mut orders = Vec::new();
    for tenant in ["t-a", "t-b"] {
        let token = mint(tenant, "orders:write orders:read");
        let r = service.http().post(service.url("/orders")).bearer_auth(&token).json(&body).send().await.expect("POST");
        assert_eq!(r.status(), 201);
        let order: serde_json::Value = r.json().await.expect("order");
        let id = order["id"].as_str().expect("id").to_owned();
        let r = service.http().post(service.url(&format!("/orders/{id}/confirm"))).bearer_auth(&token).send().await;
        assert_eq!(r.expect("confirm").status(), 200);
        orders.push((tenant, id));
    }
    // A token of one tenant does not reach the other's order; none at all is a 401.
    let (a, b) = (&orders[0], &orders[1]);
    let r =
        service.http().get(service.url(&format!("/orders/{}", b.1))).bearer_auth(mint(a.0, "orders:read")).send().await;
    assert_eq!(r.expect("GET").status(), 404);
    let r = service.http().get(service.url(&format!("/orders/{}", a.1))).send().await;
    assert_eq!(r.expect("GET").status(), 401);
    // A scope the token lacks is a 403.
    let r = service.http().post(service.url("/orders")).bearer_auth(mint(a.0, "orders:read")).json(&body).send().await;
    assert_eq!(r.expect("POST").status(), 403);

    for (tenant, id) in &orders {
        let entries = test_support::eventually("both events on the stream", Duration::from_secs(30), || async {
            let entries = system.stream_entries(id).await;
            (entries.len() == 2).then_some(entries)
        })
        .await;
        for entry in entries {
            assert_eq!(entry.get("tenant_id").map(String::as_str), Some(*tenant), "{entry:?}");
        }
    }
    system.stop().await;
}

/// (on_hand, reserved) of `sku` as `tenant`'s token reads it from the inventory API.
async fn stock(system: &System, tenant: &str, sku: &str) -> Option<(i64, i64)> {
    let consumer = &system.consumer;
    let r = consumer
        .http()
        .get(consumer.url(&format!("/inventory/{sku}")))
        .bearer_auth(mint(tenant, "inventory:read"))
        .send()
        .await
        .ok()?;
    let body: serde_json::Value = r.json().await.ok()?;
    Some((body["on_hand"].as_i64()?, body["reserved"].as_i64()?))
}

#[tokio::test]
async fn two_tenants_with_the_same_skus_each_keep_their_own_stock() {
    own_stock(broker::Kind::Redis).await;
}

#[tokio::test]
async fn two_tenants_with_the_same_skus_each_keep_their_own_stock_on_nats() {
    own_stock(broker::Kind::Nats).await;
}

async fn own_stock(broker: broker::Kind) {
    const SKU: &str = "SKU-SHARED";
    let mut system = System::start(Env::default().all("AUTH_JWT_SECRET", SECRET).on(broker)).await;
    let (service, consumer) = (&system.order_service, &system.consumer);
    for (tenant, on_hand) in [("t-a", 10), ("t-b", 4)] {
        let r = consumer
            .http()
            .put(consumer.url(&format!("/inventory/{SKU}")))
            .bearer_auth(mint(tenant, "inventory:write"))
            .json(&serde_json::json!({"on_hand": on_hand}))
            .send()
            .await
            .expect("PUT");
        assert_eq!(r.status(), 200);
    }
    let order = |tenant: &'static str, quantity: u32| {
        let body = serde_json::json!({"customer_id": "c-1", "items": [{"sku": SKU, "quantity": quantity, "unit_price_cents": 5}]});
        async move {
            let r = service.http().post(service.url("/orders")).bearer_auth(mint(tenant, "orders:write")).json(&body);
            let r = r.send().await.expect("POST");
            assert_eq!(r.status(), 201);
            r.json::<serde_json::Value>().await.expect("order")["id"].as_str().expect("id").to_owned()
        }
    };
    let transition = |tenant: &'static str, id: String, to: &'static str| async move {
        let url = service.url(&format!("/orders/{id}/{to}"));
        let r = service.http().post(url).bearer_auth(mint(tenant, "orders:write")).send().await.expect("POST");
        assert_eq!(r.status(), 200);
    };
    // The model: A has 10; 2 confirmed, 3 cancelled, 1 pending → on hand 8, reserved 1.
    // B has 4; 3 confirmed → on hand 1; then 2 more is more than is available: rejected.
    let a1 = order("t-a", 2).await;
    transition("t-a", a1, "confirm").await;
    let a2 = order("t-a", 3).await;
    transition("t-a", a2, "cancel").await;
    order("t-a", 1).await;
    let b1 = order("t-b", 3).await;
    transition("t-b", b1, "confirm").await;
    test_support::eventually("B's confirmation applied", Duration::from_secs(30), || async {
        (stock(&system, "t-b", SKU).await == Some((1, 0))).then_some(())
    })
    .await;
    order("t-b", 2).await;
    test_support::eventually("each tenant's stock at its model", Duration::from_secs(30), || async {
        let a = stock(&system, "t-a", SKU).await;
        let b = stock(&system, "t-b", SKU).await;
        (a == Some((8, 1)) && b == Some((1, 0))).then_some(())
    })
    .await;
    // Settled: B's rejected order changed nothing, later either.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stock(&system, "t-b", SKU).await, Some((1, 0)));
    assert_eq!(stock(&system, "t-a", SKU).await, Some((8, 1)));
    system.stop().await;
}

#[test]
fn token_refuses_an_unknown_scope_and_a_bad_tenant() {
    for args in [["--tenant", "t-a", "--scope", "orders:delete"], ["--tenant", "T A", "--scope", "orders:read"]] {
        let out = std::process::Command::new(system_tests::process::binary_path("order-service"))
            .arg("token")
            .args(args)
            .env("AUTH_JWT_SECRET", SECRET)
            .output()
            .expect("run order-service token");
        assert!(!out.status.success(), "{args:?}");
        assert!(out.stdout.is_empty(), "no token printed for {args:?}");
    }
}

/// A relay, consumer or key expiry whose work role row-level security holds would see no
/// tenant's rows (a relay stalls; a consumer finds no stock and rejects every order; keys pile
/// up): each says so on `/readyz`, naming the role, and starts no work (order-service keeps its
/// API closed). The control: the same database with the shipped roles is ready.
#[tokio::test]
async fn a_work_role_held_by_row_level_security_starts_no_work() {
    for (binary, prefix, variable, held) in [
        ("order-service", "held_keys", "DATABASE_KEY_EXPIRY_ROLE", "outbox_app"),
        ("relay", "held_orders", "DATABASE_RUNTIME_ROLE", "outbox_app"),
        ("inventory-consumer", "held_inventory", "DATABASE_CONSUMER_ROLE", "inventory_app"),
    ] {
        let db = test_support::fresh_database(prefix).await;
        let stream = test_support::unique_name("held-stream");
        let redis = test_support::redis_url();
        let common = [("DATABASE_URL", db.url.as_str()), ("REDIS_URL", redis.as_str()), ("REDIS_STREAM", &stream)];
        let process = system_tests::ServiceProcess::spawn(
            binary,
            common.iter().copied().chain([(variable, held), ("CONSUMER_NAME", "held-1")]),
        );
        let body = test_support::eventually("readyz to name the role", Duration::from_secs(60), || async {
            let r = process.http().get(process.url("/readyz")).send().await.ok()?;
            let status = r.status();
            let body = r.text().await.ok()?;
            (status == 503 && body.contains("row-level security")).then_some(body)
        })
        .await;
        assert!(body.contains(held), "{binary}: {body}");
        let mut shipped =
            system_tests::ServiceProcess::spawn(binary, common.iter().copied().chain([("CONSUMER_NAME", "shipped-1")]));
        shipped.wait_ready(Duration::from_secs(60)).await;
    }
}

/// Every service connects as a login that is neither a superuser nor the tables' owner, a
/// member only of the roles the migrations made for it (`outbox_app` and `outbox_key_expiry`;
/// `outbox_relay`; `inventory_consumer` and `inventory_app`), with migrations on the owner's
/// URL: an order still goes all the way through, expired keys are removed, and the relay's
/// login cannot read orders.
#[tokio::test]
async fn every_service_runs_on_a_least_privileged_login() {
    let orders = test_support::fresh_database("least_orders").await;
    let inventory = test_support::fresh_database("least_inventory").await;
    for (binary, db) in [("order-service", &orders), ("inventory-consumer", &inventory)] {
        let out = std::process::Command::new(system_tests::process::binary_path(binary))
            .arg("migrate")
            .env("DATABASE_URL", &db.url)
            .output()
            .expect("run migrate");
        assert!(out.status.success(), "{binary} migrate: {}", String::from_utf8_lossy(&out.stderr));
    }
    let order_login = test_support::unique_name("order_login").replace('-', "_").to_lowercase();
    let relay_login = test_support::unique_name("relay_login").replace('-', "_").to_lowercase();
    let consumer_login = test_support::unique_name("consumer_login").replace('-', "_").to_lowercase();
    for statement in [
        format!("CREATE ROLE \"{order_login}\" LOGIN"),
        format!("GRANT outbox_app TO \"{order_login}\""),
        format!("GRANT CONNECT ON DATABASE \"{}\" TO \"{order_login}\"", orders.name),
        format!("CREATE ROLE \"{relay_login}\" LOGIN"),
        format!("GRANT outbox_relay TO \"{relay_login}\""),
        format!("GRANT CONNECT ON DATABASE \"{}\" TO \"{relay_login}\"", orders.name),
        format!("CREATE ROLE \"{consumer_login}\" LOGIN"),
        format!("GRANT inventory_consumer, inventory_app TO \"{consumer_login}\""),
        format!("GRANT CONNECT ON DATABASE \"{}\" TO \"{consumer_login}\"", inventory.name),
    ] {
        sqlx::query(&statement).execute(&orders.pool).await.unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    let as_login = |db: &test_support::TestDatabase, login: &str| {
        let url = db.url.replacen("postgres://postgres@", &format!("postgres://{login}@"), 1);
        assert_ne!(url, db.url, "TEST_POSTGRES_URL is postgres://postgres@…");
        url
    };
    let (relay_url, consumer_url) = (as_login(&orders, &relay_login), as_login(&inventory, &consumer_login));

    // Not yet a member of key expiry's role: order-service cannot start it, and says so.
    let unfit = system_tests::ServiceProcess::spawn(
        "order-service",
        [("DATABASE_URL", as_login(&orders, &order_login)), ("DATABASE_MIGRATION_URL", orders.url.clone())],
    );
    let body = test_support::eventually("readyz to say why", Duration::from_secs(60), || async {
        let r = unfit.http().get(unfit.url("/readyz")).send().await.ok()?;
        let (status, body) = (r.status(), r.text().await.ok()?);
        (status == 503 && body.contains("permission denied to set role")).then_some(body)
    })
    .await;
    assert!(body.contains("outbox_key_expiry"), "{body}");
    drop(unfit);
    let grant = format!("GRANT outbox_key_expiry TO \"{order_login}\"");
    sqlx::query(&grant).execute(&orders.pool).await.expect("grant key expiry's role");

    let env = Env {
        order_service: vec![
            ("DATABASE_URL".into(), as_login(&orders, &order_login)),
            ("DATABASE_MIGRATION_URL".into(), orders.url.clone()),
            ("IDEMPOTENCY_KEY_TTL".into(), "1s".into()),
        ],
        relay: vec![("DATABASE_URL".into(), relay_url.clone()), ("DATABASE_MIGRATION_URL".into(), orders.url.clone())],
        consumer: vec![("DATABASE_URL".into(), consumer_url), ("DATABASE_MIGRATION_URL".into(), inventory.url.clone())],
        ..Env::default()
    };
    let mut system = System::start_on(orders, inventory, env).await;
    system.set_stock("SKU-LEAST", 5).await;
    let traceparent = system_tests::system::untraced();
    let id = system.create_order("SKU-LEAST", 2, &traceparent).await;
    system.post(&format!("/orders/{id}/confirm"), None, &traceparent).await;
    system.wait_for_stock("SKU-LEAST", (3, 0), Duration::from_secs(30)).await;

    // A key of its own; expiry, as its role, removes it once it is older than the TTL.
    let service = &system.order_service;
    let body = serde_json::json!({"customer_id": "c-1", "items": [{"sku": "SKU-LEAST", "quantity": 1, "unit_price_cents": 1}]});
    let r = service.http().post(service.url("/orders")).header("Idempotency-Key", "k-1").json(&body).send().await;
    assert_eq!(r.expect("POST").status(), 201);
    let keys = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM idempotency_keys")
            .fetch_one(&system.orders.pool)
            .await
            .expect("count keys")
    };
    assert_eq!(keys().await, 1, "the key is stored");
    test_support::eventually("the expired key removed", Duration::from_secs(30), || async {
        (keys().await == 0).then_some(())
    })
    .await;

    // The relay's login, as its role, may not read orders; it does see every tenant's outbox.
    let relay_pool = sqlx::PgPool::connect(&relay_url).await.expect("connect as the relay's login");
    let mut conn = relay_pool.acquire().await.expect("connection");
    sqlx::query("SET ROLE outbox_relay").execute(&mut *conn).await.expect("SET ROLE");
    let denied = sqlx::query("SELECT count(*) FROM orders").execute(&mut *conn).await.expect_err("orders readable");
    assert!(denied.to_string().contains("permission denied"), "{denied}");
    let published: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_published")
        .fetch_one(&mut *conn)
        .await
        .expect("outbox_published readable");
    assert_eq!(published, 3);
    // Control: the owner reads orders.
    let owner_count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(&system.orders.pool).await.expect("owner reads");
    assert_eq!(owner_count, 2);
    drop(conn);
    relay_pool.close().await;
    // Key expiry's role reads a key's tenant, key and age, never the stored response.
    let order_pool = sqlx::PgPool::connect(&as_login(&system.orders, &order_login)).await.expect("order login");
    let mut conn = order_pool.acquire().await.expect("connection");
    sqlx::query("SET ROLE outbox_key_expiry").execute(&mut *conn).await.expect("SET ROLE");
    sqlx::query("SELECT tenant_id, key, created_at FROM idempotency_keys")
        .execute(&mut *conn)
        .await
        .expect("its columns");
    let denied = sqlx::query("SELECT * FROM idempotency_keys").execute(&mut *conn).await.expect_err("every column");
    assert!(denied.to_string().contains("permission denied"), "{denied}");
    drop(conn);
    order_pool.close().await;
    system.stop().await;

    let admin = test_support::fresh_database("least_admin").await;
    for db in [&system.orders, &system.inventory] {
        db.pool.close().await;
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", db.name)).execute(&admin.pool).await.ok();
    }
    for login in [order_login, relay_login, consumer_login] {
        sqlx::query(&format!("DROP ROLE IF EXISTS \"{login}\"")).execute(&admin.pool).await.ok();
    }
}

/// Neither a bearer token nor an `Idempotency-Key` reaches a log line or a span, even at the
/// most verbose log level; the order id, which the same requests carry, does (the control that
/// shows the search sees what is there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_idempotency_keys_reach_no_log_and_no_span() {
    let collector = otlp_collector::Collector::start().await.expect("collector");
    let env = Env::default()
        .all("AUTH_JWT_SECRET", SECRET)
        .all("OTEL_EXPORTER_OTLP_ENDPOINT", collector.grpc_endpoint())
        .all("RUST_LOG", "trace")
        .all("LOG_FORMAT", "json");
    let mut system = System::start(env).await;
    let service = &system.order_service;
    let token = mint("t-a", "orders:write orders:read");
    let key = format!("secret-key-{}", ulid::Ulid::new());
    let body =
        serde_json::json!({"customer_id": "c-1", "items": [{"sku": "SKU-1", "quantity": 1, "unit_price_cents": 1}]});
    let mut order_id = String::new();
    for _ in 0..2 {
        let r = service
            .http()
            .post(service.url("/orders"))
            .bearer_auth(&token)
            .header("idempotency-key", &key)
            .json(&body)
            .send()
            .await
            .expect("POST");
        assert_eq!(r.status(), 201);
        order_id = r.json::<serde_json::Value>().await.expect("order")["id"].as_str().expect("id").to_owned();
    }
    // A refused token is not logged either.
    let r =
        service.http().get(service.url(&format!("/orders/{order_id}"))).bearer_auth("not.a.valid-token").send().await;
    assert_eq!(r.expect("GET").status(), 401);
    system.stop().await;

    let logs: Vec<String> =
        [&system.order_service, &system.relay, &system.consumer].iter().flat_map(|p| p.logs()).collect();
    let spans: Vec<String> = collector.spans().iter().map(|s| format!("{} {:?}", s.name, s.attributes)).collect();
    let signature = token.rsplit('.').next().expect("a JWT has a signature");
    for (what, text) in [("logs", &logs), ("spans", &spans)] {
        assert!(text.iter().any(|line| line.contains(&order_id)), "control: the order id is in the {what}");
        for secret in [token.as_str(), signature, key.as_str(), "not.a.valid-token"] {
            let leaked: Vec<&String> = text.iter().filter(|line| line.contains(secret)).collect();
            assert!(leaked.is_empty(), "{what} carry {secret}: {leaked:?}");
        }
    }
}
