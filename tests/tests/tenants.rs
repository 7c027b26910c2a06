//! Tenants end to end, through the real binaries: a token minted with `order-service token`
//! opens the API to its tenant only, and each event carries its tenant on the stream.

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
    let env = Env { order_service: vec![("AUTH_JWT_SECRET".to_owned(), SECRET.to_owned())], ..Env::default() };
    let mut system = System::start(env).await;
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
