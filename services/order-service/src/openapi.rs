//! order-service's OpenAPI document (`GET /openapi.json`), from the handlers' annotations.

use domain::{LineItem, Order, OrderStatus};
use serde::Deserialize;
use utoipa::OpenApi;

/// The body of `POST /orders`, as documented (the handler validates it by hand, naming the
/// field of each broken rule).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct CreateOrder {
    /// 1 to 64 characters, no control characters.
    #[schema(pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]{1,64}$", example = "c-1")]
    customer_id: String,
    /// 1 to 100 lines.
    #[schema(min_items = 1, max_items = 100)]
    items: Vec<CreateOrderItem>,
}

/// A line of `POST /orders`: a [`LineItem`], no other field.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct CreateOrderItem {
    #[schema(pattern = "^[A-Z0-9][A-Z0-9-]{0,31}$", example = "SKU-1")]
    sku: String,
    #[schema(minimum = 1, maximum = 1000, example = 2)]
    quantity: i64,
    #[schema(minimum = 0, maximum = 1_000_000_000, example = 1250)]
    unit_price_cents: i64,
}

#[derive(OpenApi)]
#[openapi(
    paths(
        crate::routes::create_order,
        crate::routes::get_order,
        crate::routes::confirm_order,
        crate::routes::cancel_order,
    ),
    components(schemas(CreateOrder, CreateOrderItem, Order, LineItem, OrderStatus)),
    tags((name = "orders", description = "Orders of the token's tenant; each change writes its event to the outbox in the same transaction")),
)]
struct Api;

/// The whole document.
pub fn document() -> utoipa::openapi::OpenApi {
    service_kit::openapi::document(
        "order-service",
        "The order API: each state change of an order and its event are written in one transaction (the transactional outbox).",
        Api::openapi(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_has_every_route_its_headers_and_auth() {
        let json: serde_json::Value = serde_json::from_str(&document().to_json().expect("json")).expect("parse");
        if std::env::var_os("SHOW_OPENAPI").is_some() {
            println!("{}", serde_json::to_string_pretty(&json).expect("pretty"));
        }
        assert_eq!(json["openapi"], "3.1.0");
        let paths = &json["paths"];
        for (path, method) in [
            ("/orders", "post"),
            ("/orders/{id}", "get"),
            ("/orders/{id}/confirm", "post"),
            ("/orders/{id}/cancel", "post"),
            ("/healthz", "get"),
            ("/readyz", "get"),
        ] {
            assert!(paths[path][method].is_object(), "{method} {path} missing");
        }
        let create = &paths["/orders"]["post"];
        assert!(create["parameters"].as_array().expect("parameters").iter().any(|p| p["name"] == "Idempotency-Key"));
        assert!(create["responses"]["201"]["headers"]["Location"].is_object());
        assert_eq!(create["security"][0]["bearer"][0], "orders:write");
        assert!(create["responses"]["422"]["content"]["application/problem+json"].is_object());
    }

    #[test]
    fn docs_api_md_has_every_operation_and_no_other() {
        let api_md = include_str!("../../../docs/API.md");
        assert_eq!(service_kit::openapi::undocumented(&document(), api_md, "order-service"), Vec::<String>::new());
    }
}
