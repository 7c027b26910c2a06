//! Stock is per tenant: the same sku in two tenants is two stocks, each order moves its own
//! tenant's, the stock API shows and sets only the token's tenant's, and Postgres' row-level
//! security holds that on its own.

use domain::{OrderId, TenantId};
use serde_json::{json, Value};
use service_kit::auth::{mint, SigningKey};
use sqlx::{Connection as _, PgConnection};

use crate::common::{cancelled, confirmed, created, of_tenant, Harness, Running};

const SECRET: &str = "tenants-test-secret-of-32-bytes-plus!";
const SKU: &str = "SHARED-SKU";

fn token(tenant: &str) -> String {
    let now = chrono::Utc::now().timestamp().unsigned_abs();
    mint(SigningKey::Secret(SECRET), &TenantId::parse(tenant).unwrap(), "inventory:read inventory:write", now + 600)
        .unwrap()
}

/// 5 of [`SKU`] for each of `tenants`.
async fn seed(h: &Harness, tenants: &[&str]) {
    sqlx::query("INSERT INTO inventory (tenant_id, sku, on_hand) SELECT t, $2, 5 FROM unnest($1::text[]) AS t")
        .bind(tenants)
        .bind(SKU)
        .execute(h.pool())
        .await
        .unwrap();
}

async fn start_authed(h: &Harness) -> Running {
    let mut config = h.config("c1");
    config.auth.auth_jwt_secret = Some(SECRET.to_owned());
    Running::start(config).await
}

#[tokio::test]
async fn the_same_sku_in_two_tenants_is_two_stocks() {
    let h = Harness::new("tenants").await;
    let running = start_authed(&h).await;
    let client = reqwest::Client::new();
    let url = running.url(&format!("/inventory/{SKU}"));
    for (tenant, on_hand) in [("t-a", 10), ("t-b", 3)] {
        let r = client.put(&url).bearer_auth(token(tenant)).json(&json!({"on_hand": on_hand})).send().await.unwrap();
        assert_eq!(r.status(), 200, "{tenant}");
    }

    // A reserves 4 of its 10; B asks for 4 of its 3 and is rejected, though A has plenty.
    let (a1, b1, a2) = (OrderId::new(), OrderId::new(), OrderId::new());
    h.xadd(&of_tenant(created(a1, &[(SKU, 4)]), "t-a")).await;
    h.xadd(&of_tenant(created(b1, &[(SKU, 4)]), "t-b")).await;
    h.xadd(&of_tenant(created(a2, &[(SKU, 5)]), "t-a")).await;
    h.xadd(&of_tenant(confirmed(a1, 2), "t-a")).await;
    // A cancel that names another tenant still releases the order's own tenant's stock.
    h.xadd(&of_tenant(cancelled(a2, 2), "t-b")).await;
    h.drained().await;

    assert_eq!(h.reservation(b1).await.as_deref(), Some("REJECTED"));
    assert_eq!(h.stock_of("t-a", SKU).await, Some((6, 0)), "A: 10 − 4 confirmed; 5 reserved, then released");
    assert_eq!(h.stock_of("t-b", SKU).await, Some((3, 0)), "B: untouched");

    // Each token sees its own tenant's stock only; a tenant without the sku gets 404.
    for (tenant, on_hand) in [("t-a", 6), ("t-b", 3)] {
        let got: Value = client.get(&url).bearer_auth(token(tenant)).send().await.unwrap().json().await.unwrap();
        assert_eq!(got["on_hand"], on_hand, "{tenant}");
    }
    assert_eq!(client.get(&url).bearer_auth(token("t-c")).send().await.unwrap().status(), 404);
    // An order of a tenant without the sku is rejected.
    let c1 = OrderId::new();
    h.xadd(&of_tenant(created(c1, &[(SKU, 1)]), "t-c")).await;
    h.drained().await;
    assert_eq!(h.reservation(c1).await.as_deref(), Some("REJECTED"));
    running.stop().await;
}

/// As the stock API's runtime role in a transaction of tenant A, statements that name only the
/// sku (no `tenant_id`) neither read nor change tenant B's row.
#[tokio::test]
async fn row_level_security_keeps_stock_apart_without_the_where_clause() {
    let h = Harness::new("tenants-rls").await;
    seed(&h, &["t-b"]).await;
    let mut conn = PgConnection::connect(&h.config("x").database_url).await.unwrap();
    async fn as_tenant(conn: &mut PgConnection, tenant: &str) -> (i64, u64) {
        let mut tx = conn.begin().await.unwrap();
        sqlx::query("SET LOCAL ROLE inventory_app").execute(&mut *tx).await.unwrap();
        sqlx::query("SELECT set_config('app.tenant_id', $1, true)").bind(tenant).execute(&mut *tx).await.unwrap();
        let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM inventory WHERE sku = $1")
            .bind(SKU)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        let changed = sqlx::query("UPDATE inventory SET on_hand = 0 WHERE sku = $1")
            .bind(SKU)
            .execute(&mut *tx)
            .await
            .unwrap()
            .rows_affected();
        tx.rollback().await.unwrap();
        (seen, changed)
    }
    assert_eq!(as_tenant(&mut conn, "t-a").await, (0, 0), "A sees and changes nothing of B's");
    // Control: B's own transaction finds and changes the row.
    assert_eq!(as_tenant(&mut conn, "t-b").await, (1, 1));
    // The runtime role reads no reservation and no dedupe state at all.
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE inventory_app").execute(&mut *tx).await.unwrap();
    assert!(sqlx::query("SELECT 1 FROM processed_messages").execute(&mut *tx).await.is_err());
    tx.rollback().await.unwrap();
}

/// A runtime role that row-level security would not hold (here a superuser) closes the stock
/// API, and `/readyz` says why; the event loop is not the API's business and keeps going.
#[tokio::test]
async fn a_runtime_role_exempt_from_row_level_security_closes_the_stock_api() {
    let h = Harness::new("tenants-unfit").await;
    let mut config = h.config("c1");
    config.database_runtime_role = "postgres".parse().unwrap();
    let running = Running::start(config).await;
    let client = reqwest::Client::new();
    let body = test_support::eventually("readyz to name the role", std::time::Duration::from_secs(30), || async {
        let body = client.get(running.url("/readyz")).send().await.ok()?.text().await.ok()?;
        body.contains("superuser").then_some(body)
    })
    .await;
    assert!(body.contains("runtime role"), "{body}");
    let r = client.put(running.url(&format!("/inventory/{SKU}"))).json(&json!({"on_hand": 1})).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(h.stock_of("default", SKU).await, None, "nothing written");
    let order = OrderId::new();
    h.xadd(&created(order, &[(SKU, 1)])).await;
    h.drained().await;
    assert_eq!(h.reservation(order).await.as_deref(), Some("REJECTED"), "the loop applied the event");
    running.stop().await;
}

/// A consumer from before the tenants migration writes reservations without a tenant (and
/// would update every tenant's row of a sku): each of its batches must fail, writing nothing.
#[tokio::test]
async fn an_old_consumers_batch_fails_instead_of_mixing_tenants() {
    let h = Harness::new("tenants-old").await;
    seed(&h, &["t-a", "t-b"]).await;
    // The previous consumer's batch write: stock by sku alone, reservations without a tenant.
    let old_write =
        "WITH stock AS (UPDATE inventory i SET reserved = u.reserved FROM unnest($1::text[], $2::bigint[]) \
                       AS u(sku, reserved) WHERE i.sku = u.sku), \
                     reservations AS (INSERT INTO order_reservations (order_id, status, items, reason) \
                       VALUES ('o-1', 'RESERVED', '[]', NULL)) SELECT 1";
    let refused = sqlx::query(old_write).bind(vec![SKU]).bind(vec![1_i64]).execute(h.pool()).await;
    let code = refused.err().and_then(|e| e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned()));
    assert_eq!(code.as_deref(), Some("23502"), "not null: tenant_id");
    for tenant in ["t-a", "t-b"] {
        assert_eq!(h.stock_of(tenant, SKU).await, Some((5, 0)), "{tenant}: untouched");
    }
}
