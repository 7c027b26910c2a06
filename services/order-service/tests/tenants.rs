//! Authentication, tenants and row-level security: every route refuses what it should, no
//! tenant sees or changes another's orders, and Postgres enforces it on its own.

mod common;

use std::time::Duration;

use common::{config, problem, start, valid_body, TestApp};
use domain::TenantId;
use serde_json::Value;
use service_kit::auth::{mint, SigningKey};
use sqlx::{Connection as _, PgConnection, Row as _};
use test_support::{fresh_database, TestDatabase};

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";
const ALL: &str = "orders:read orders:write inventory:read inventory:write admin";

fn now() -> u64 {
    chrono::Utc::now().timestamp().max(0).unsigned_abs()
}

fn token(tenant: &str, scopes: &str) -> String {
    let tenant = TenantId::parse(tenant).expect("tenant");
    mint(SigningKey::Secret(SECRET), &tenant, scopes, now() + 600).expect("mint")
}

struct Authed {
    app: TestApp,
    db: TestDatabase,
}

async fn spawn_authed() -> Authed {
    let db = fresh_database("orders").await;
    let mut config = config(&db.url);
    config.auth.auth_jwt_secret = Some(SECRET.to_owned());
    let app = start(config).await;
    app.wait_ready().await;
    Authed { app, db }
}

impl Authed {
    async fn send(&self, method: &str, path: &str, token: Option<&str>) -> reqwest::Response {
        let url = self.app.url(path);
        let mut req = match method {
            "GET" => self.app.client.get(url),
            _ => self.app.client.post(url),
        };
        if path == "/orders" {
            req = req.json(&valid_body());
        }
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req.send().await.expect("request sent")
    }

    async fn create(&self, token: &str) -> Value {
        let r = self.send("POST", "/orders", Some(token)).await;
        assert_eq!(r.status(), 201);
        r.json().await.expect("order")
    }
}

fn challenge(r: &reqwest::Response) -> String {
    r.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

#[tokio::test]
async fn every_route_refuses_missing_bad_expired_and_unscoped_tokens() {
    let app = spawn_authed().await;
    let order = app.create(&token("t-a", ALL)).await;
    let id = order["id"].as_str().expect("id");
    let routes = [
        ("GET", format!("/orders/{id}"), "orders:read"),
        ("POST", "/orders".to_owned(), "orders:write"),
        ("POST", format!("/orders/{id}/confirm"), "orders:write"),
        ("POST", format!("/orders/{id}/cancel"), "orders:write"),
    ];
    let other_key = "another-secret-also-at-least-32-bytes";
    let tenant = TenantId::parse("t-a").expect("tenant");
    let forged = mint(SigningKey::Secret(other_key), &tenant, ALL, now() + 600).expect("mint");
    let expired = mint(SigningKey::Secret(SECRET), &tenant, ALL, now() - 3600).expect("mint");
    for (method, path, scope) in &routes {
        let r = app.send(method, path, None).await;
        assert_eq!(challenge(&r), "Bearer", "{method} {path}");
        problem(r, 401).await;

        for (what, bad) in [("forged", forged.as_str()), ("expired", expired.as_str()), ("garbage", "not.a.jwt")] {
            let r = app.send(method, path, Some(bad)).await;
            assert!(challenge(&r).starts_with("Bearer error=\"invalid_token\""), "{what}: {method} {path}");
            problem(r, 401).await;
        }

        // Every scope but the route's own.
        let others = ALL.split(' ').filter(|s| s != scope).collect::<Vec<_>>().join(" ");
        let r = app.send(method, path, Some(&token("t-a", &others))).await;
        assert_eq!(challenge(&r), format!("Bearer error=\"insufficient_scope\", scope=\"{scope}\""));
        let body = problem(r, 403).await;
        assert!(body["detail"].as_str().unwrap_or_default().contains(scope), "{body}");
    }
    // Nothing was written by any refused request.
    assert_eq!(common::count(&app.db, "orders").await, 1);
    assert_eq!(common::events(&app.db, id).await, vec![(1, "OrderCreated".to_owned())]);
    app.app.stop().await;
}

#[tokio::test]
async fn a_tenant_never_sees_nor_changes_another_tenants_order() {
    let app = spawn_authed().await;
    let (a, b) = (token("t-a", ALL), token("t-b", ALL));
    let order = app.create(&a).await;
    let id = order["id"].as_str().expect("id");
    for (method, path) in [
        ("GET", format!("/orders/{id}")),
        ("POST", format!("/orders/{id}/confirm")),
        ("POST", format!("/orders/{id}/cancel")),
    ] {
        let r = app.send(method, &path, Some(&b)).await;
        let body = problem(r, 404).await;
        let text = body.to_string();
        assert!(!text.contains(id) && !text.contains("c-1"), "{method} {path}: {text}");
    }
    // The order is untouched and still its tenant's.
    let r = app.send("GET", &format!("/orders/{id}"), Some(&a)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.expect("order")["status"], "PENDING");
    assert_eq!(common::events(&app.db, id).await, vec![(1, "OrderCreated".to_owned())]);
    let tenants: Vec<(String, String)> =
        sqlx::query_as("SELECT tenant_id, aggregate_id FROM outbox UNION ALL SELECT tenant_id, id FROM orders")
            .fetch_all(&app.db.pool)
            .await
            .expect("tenants");
    assert!(tenants.iter().all(|(t, _)| t == "t-a"), "{tenants:?}");

    // B's own order is B's.
    let theirs = app.create(&b).await;
    let r = app.send("GET", &format!("/orders/{}", theirs["id"].as_str().expect("id")), Some(&a)).await;
    problem(r, 404).await;
    app.app.stop().await;
}

#[tokio::test]
async fn idempotency_keys_are_per_tenant() {
    let app = spawn_authed().await;
    let mut ids = Vec::new();
    for tenant in ["t-a", "t-b", "t-a"] {
        let r = app
            .app
            .client
            .post(app.app.url("/orders"))
            .bearer_auth(token(tenant, "orders:write"))
            .header("idempotency-key", "same-key")
            .json(&valid_body())
            .send()
            .await
            .expect("sent");
        assert_eq!(r.status(), 201);
        ids.push(r.json::<Value>().await.expect("order")["id"].as_str().expect("id").to_owned());
    }
    assert_ne!(ids[0], ids[1], "another tenant's key is another key");
    assert_eq!(ids[0], ids[2], "a tenant's retry replays its own first response");
    assert_eq!(common::count(&app.db, "orders").await, 2);
    app.app.stop().await;
}

/// Postgres, not the service's `WHERE tenant_id`, is what keeps tenants apart: statements
/// without that clause, run as the runtime role in a transaction of tenant A, neither read nor
/// change tenant B's rows.
#[tokio::test]
async fn row_level_security_holds_without_the_applications_where_clause() {
    let app = spawn_authed().await;
    let mine = app.create(&token("t-a", ALL)).await;
    let theirs = app.create(&token("t-b", ALL)).await;
    let (mine, theirs) = (mine["id"].as_str().expect("id"), theirs["id"].as_str().expect("id"));
    let key = app
        .app
        .client
        .post(app.app.url("/orders"))
        .bearer_auth(token("t-b", ALL))
        .header("idempotency-key", "b-key")
        .json(&valid_body())
        .send()
        .await
        .expect("sent");
    assert_eq!(key.status(), 201);
    app.app.stop().await;

    let mut conn = PgConnection::connect(&app.db.url).await.expect("connect");
    // What tenant `scope` (as the runtime role) sees of B's rows, by id only.
    async fn seen(conn: &mut PgConnection, scope: Option<&str>, theirs: &str) -> Vec<i64> {
        let mut tx = conn.begin().await.expect("begin");
        sqlx::query("SET LOCAL ROLE outbox_app").execute(&mut *tx).await.expect("role");
        if let Some(tenant) = scope {
            sqlx::query("SELECT set_config('app.tenant_id', $1, true)")
                .bind(tenant)
                .execute(&mut *tx)
                .await
                .expect("tenant");
        }
        let mut counts = Vec::new();
        for statement in [
            "SELECT count(*) FROM orders WHERE id = $1",
            "SELECT count(*) FROM orders",
            "SELECT count(*) FROM idempotency_keys",
        ] {
            let query = sqlx::query_scalar(statement);
            let query = if statement.contains("$1") { query.bind(theirs) } else { query };
            let n: i64 = query.fetch_one(&mut *tx).await.expect(statement);
            counts.push(n);
        }
        let updated = sqlx::query("UPDATE orders SET status = 'CANCELLED' WHERE id = $1")
            .bind(theirs)
            .execute(&mut *tx)
            .await
            .expect("update")
            .rows_affected();
        counts.push(i64::try_from(updated).unwrap_or(-1));
        tx.rollback().await.expect("rollback");
        counts
    }
    assert_eq!(seen(&mut conn, Some("t-a"), theirs).await, vec![0, 1, 0, 0], "tenant A sees only its own order");
    assert_eq!(seen(&mut conn, None, theirs).await, vec![0, 0, 0, 0], "no tenant set: nothing");
    // Control: the same statements in B's transaction find and change B's order, so the zeros
    // above come from the policy.
    assert_eq!(seen(&mut conn, Some("t-b"), theirs).await, vec![1, 2, 1, 1]);

    // Writing a row of another tenant is refused.
    let mut tx = conn.begin().await.expect("begin");
    sqlx::query("SET LOCAL ROLE outbox_app").execute(&mut *tx).await.expect("role");
    sqlx::query("SET LOCAL app.tenant_id = 't-a'").execute(&mut *tx).await.expect("tenant");
    let forged = sqlx::query(
        "INSERT INTO orders (id, customer_id, status, items, total_cents, created_at, updated_at, tenant_id) \
         VALUES ('01ARZ3NDEKTSV4RRFFQ69G5FAV', 'c', 'PENDING', '[]', 0, now(), now(), 't-b')",
    )
    .execute(&mut *tx)
    .await;
    let code = forged.err().and_then(|e| e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned()));
    assert_eq!(code.as_deref(), Some("42501"), "row-level security refuses the row");
    tx.rollback().await.expect("rollback");

    // The runtime role cannot delete orders nor read the outbox's events at all.
    let mut tx = conn.begin().await.expect("begin");
    sqlx::query("SET LOCAL ROLE outbox_app").execute(&mut *tx).await.expect("role");
    let denied = sqlx::query("SELECT payload FROM outbox").execute(&mut *tx).await;
    assert!(denied.is_err(), "outbox payloads are not the runtime role's to read");
    tx.rollback().await.expect("rollback");

    // As the owner, with no policy in the way, both orders exist: the runtime role is what
    // the policy holds.
    let all = sqlx::query("SELECT count(*) AS n FROM orders WHERE id IN ($1, $2)")
        .bind(mine)
        .bind(theirs)
        .fetch_one(&app.db.pool)
        .await
        .expect("count");
    assert_eq!(all.get::<i64, _>("n"), 2);
}

#[tokio::test]
async fn auth_off_serves_the_default_tenant_and_says_so() {
    let app = common::spawn_app().await;
    let ready = app.get("/readyz").await.text().await.expect("body");
    assert!(ready.contains("authentication is off"), "{ready}");
    let order = app.create_order().await;
    let tenant: String = sqlx::query_scalar("SELECT tenant_id FROM orders WHERE id = $1")
        .bind(order["id"].as_str().expect("id"))
        .fetch_one(&app.db.pool)
        .await
        .expect("tenant");
    assert_eq!(tenant, "default");
    let on = spawn_authed().await;
    let ready = on.app.get("/readyz").await.text().await.expect("body");
    assert_eq!(ready, "ready");
    on.app.stop().await;
}

#[tokio::test]
async fn a_runtime_role_that_rls_would_not_hold_keeps_the_api_closed() {
    let db = fresh_database("orders").await;
    let mut config = config(&db.url);
    config.database_runtime_role = "postgres".parse().expect("role");
    let app = start(config).await;
    let body = test_support::eventually("readyz to name the role", Duration::from_secs(30), || async {
        let r = app.get("/readyz").await;
        let body = r.text().await.ok()?;
        body.contains("superuser").then_some(body)
    })
    .await;
    assert!(body.contains("postgres"), "{body}");
    problem(app.post_json("/orders", &valid_body()).await, 503).await;
    app.stop().await;
}

/// RS256 and ES256 tokens verify against a PEM public key; each key type's token is refused by
/// the other's service.
#[tokio::test]
async fn public_key_tokens_verify() {
    let dir = std::env::temp_dir().join(format!("outbox-keys-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).expect("dir");
    let keys = [
        ("rsa", &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"][..]),
        ("ec", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"][..]),
    ];
    let mut apps = Vec::new();
    for (name, args) in keys {
        let private = dir.join(format!("{name}.pem"));
        let public = dir.join(format!("{name}.pub.pem"));
        let made = std::process::Command::new("openssl").arg("genpkey").args(args).arg("-out").arg(&private).status();
        assert!(made.is_ok_and(|s| s.success()), "openssl genpkey {name}");
        let made = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .status();
        assert!(made.is_ok_and(|s| s.success()), "openssl pkey {name}");
        let db = fresh_database("orders").await;
        let mut config = config(&db.url);
        config.auth.auth_jwt_public_key = Some(public);
        let app = start(config).await;
        app.wait_ready().await;
        let pem = std::fs::read(&private).expect("key");
        let tenant = TenantId::parse("t-a").expect("tenant");
        let token = mint(SigningKey::PrivatePem(&pem), &tenant, ALL, now() + 600).expect("mint");
        apps.push((app, db, token));
    }
    for (i, (app, _, _)) in apps.iter().enumerate() {
        for (j, (_, _, token)) in apps.iter().enumerate() {
            let r =
                app.client.post(app.url("/orders")).bearer_auth(token).json(&valid_body()).send().await.expect("sent");
            assert_eq!(r.status(), if i == j { 201 } else { 401 }, "service {i}, token {j}");
        }
    }
    for (app, _, _) in apps {
        app.stop().await;
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A relay from before the tenants migration claims with a statement that names no tenant: it
/// must fail to publish, not publish every tenant's events as the tenant `default`'s.
#[tokio::test]
async fn an_old_relays_claim_fails_instead_of_mislabelling_tenants() {
    let app = spawn_authed().await;
    app.create(&token("t-a", ALL)).await;
    app.app.stop().await;
    // The claim's move as the previous relay wrote it (columns without tenant_id).
    let old_claim = "WITH moved AS (DELETE FROM outbox \
           RETURNING id, event_id, aggregate_type, aggregate_id, seq, event_type, payload, occurred_at, \
                     traceparent, tracestate, attempts, created_at) \
         INSERT INTO outbox_published (id, event_id, aggregate_type, aggregate_id, seq, event_type, payload, \
                                       occurred_at, traceparent, tracestate, attempts, created_at) \
         SELECT * FROM moved";
    let refused = sqlx::query(old_claim).execute(&app.db.pool).await;
    let code = refused.err().and_then(|e| e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned()));
    assert_eq!(code.as_deref(), Some("23502"), "not null: tenant_id");
    assert_eq!(common::count(&app.db, "outbox").await, 1, "the event is still there to publish");
    assert_eq!(common::count(&app.db, "outbox_published").await, 0);
}
