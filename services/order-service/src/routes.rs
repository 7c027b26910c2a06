//! The order API handlers.

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use domain::{Order, OrderId, Transition};
use service_kit::auth::{require, Authenticator, Principal, Scope};
use service_kit::Problem;

use crate::app::AppState;
use crate::body::{parse_create, require_json};
use crate::error::ApiError;
use crate::idempotency::{request_hash, IdempotencyKey};
use crate::openapi::CreateOrder;
use crate::orders::Created;

/// The order API: reads need the scope `orders:read`, writes `orders:write`
/// ([`service_kit::auth`]); every handler works on the token's tenant only.
pub fn api(auth: &Authenticator) -> Router<AppState> {
    let read = Router::new()
        .route("/orders/{id}", get(get_order))
        .route_layer(from_fn_with_state((auth.clone(), Scope::OrdersRead), require));
    let write = Router::new()
        .route("/orders", post(create_order))
        .route("/orders/{id}/confirm", post(confirm_order))
        .route("/orders/{id}/cancel", post(cancel_order))
        .route_layer(from_fn_with_state((auth.clone(), Scope::OrdersWrite), require));
    read.merge(write)
}

/// Creates an order (status `PENDING`) and its `OrderCreated` event, in one transaction.
///
/// `body` was read whole, within its deadline and size limit, by the body middleware.
#[utoipa::path(post, path = "/orders", tag = "orders",
    request_body(content = CreateOrder, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, pattern = "^[!-~]{1,255}$",
        description = "1 to 255 visible ASCII characters; the same key with the same body within IDEMPOTENCY_KEY_TTL returns the first response again (with `Idempotent-Replayed: true`), with another body 422")),
    responses(
        (status = 201, description = "Created", body = Order,
            headers(("Location" = String, description = "`/orders/{id}`"), ("Idempotent-Replayed" = String, description = "`true` on a replayed response"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The body did not arrive within HTTP_BODY_TIMEOUT", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is over 64 KiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not `Content-Type: application/json`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A rule broken; `field` names it (`items[0].sku`, `Idempotency-Key`)", body = Problem, content_type = "application/problem+json"),
        service_kit::openapi::Refusals,
    ),
    security(("bearer" = ["orders:write"])))]
pub(crate) async fn create_order(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let key = IdempotencyKey::from_headers(&headers)?;
    let request = parse_create(&body)?;
    let key = key.map(|key| (key, request_hash(&request.canonical)));
    Ok(match state.orders.create(&principal.tenant, request.order, key).await? {
        Created::New(order) => {
            state.metrics.order_created();
            created(&order.id.to_string(), Json(order).into_response(), false)
        }
        Created::Replayed { order_id, body } => created(&order_id, Json(body).into_response(), true),
    })
}

/// 201 with `Location`; a replayed response says so in `Idempotent-Replayed`.
fn created(order_id: &str, mut response: Response, replayed: bool) -> Response {
    *response.status_mut() = StatusCode::CREATED;
    // Order ids are ULIDs (Crockford base32), always a valid header value.
    if let Ok(location) = HeaderValue::from_str(&format!("/orders/{order_id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    if replayed {
        response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// A malformed id names no order, so it is a 404 like an unknown one.
fn order_id(path: Result<Path<String>, PathRejection>) -> Result<OrderId, ApiError> {
    let Path(raw) = path.map_err(|_| ApiError::OrderNotFound)?;
    raw.parse().map_err(|_| ApiError::OrderNotFound)
}

/// The order, if it is the token's tenant's.
#[utoipa::path(get, path = "/orders/{id}", tag = "orders",
    params(("id" = String, Path, description = "The order's id (a ULID)")),
    responses(
        (status = 200, description = "The order", body = Order),
        (status = 404, description = "No such order for this tenant (or not a ULID)", body = Problem, content_type = "application/problem+json"),
        service_kit::openapi::Refusals,
    ),
    security(("bearer" = ["orders:read"])))]
pub(crate) async fn get_order(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Order>, ApiError> {
    let id = order_id(path)?;
    Ok(Json(state.orders.find(&principal.tenant, id).await?))
}

/// `PENDING` → `CONFIRMED` (again on a confirmed order: 200, no new event).
#[utoipa::path(post, path = "/orders/{id}/confirm", tag = "orders",
    params(("id" = String, Path, description = "The order's id (a ULID)")),
    responses(
        (status = 200, description = "The order, confirmed", body = Order),
        (status = 404, description = "No such order for this tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The order is cancelled", body = Problem, content_type = "application/problem+json"),
        service_kit::openapi::Refusals,
    ),
    security(("bearer" = ["orders:write"])))]
pub(crate) async fn confirm_order(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Order>, ApiError> {
    transition(state, principal, order_id(path)?, Transition::Confirm).await
}

/// `PENDING` or `CONFIRMED` → `CANCELLED` (again on a cancelled order: 200, no new event).
#[utoipa::path(post, path = "/orders/{id}/cancel", tag = "orders",
    params(("id" = String, Path, description = "The order's id (a ULID)")),
    responses(
        (status = 200, description = "The order, cancelled", body = Order),
        (status = 404, description = "No such order for this tenant", body = Problem, content_type = "application/problem+json"),
        service_kit::openapi::Refusals,
    ),
    security(("bearer" = ["orders:write"])))]
pub(crate) async fn cancel_order(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Order>, ApiError> {
    transition(state, principal, order_id(path)?, Transition::Cancel).await
}

async fn transition(
    state: AppState,
    principal: Principal,
    id: OrderId,
    transition: Transition,
) -> Result<Json<Order>, ApiError> {
    let (order, changed) = state.orders.transition(&principal.tenant, id, transition).await?;
    if changed {
        state.metrics.order_transitioned(order.status);
    }
    Ok(Json(order))
}
