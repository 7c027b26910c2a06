//! The order API handlers.

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use domain::{Order, OrderId, Transition};

use crate::app::AppState;
use crate::body::{parse_create, require_json};
use crate::error::ApiError;
use crate::idempotency::{request_hash, IdempotencyKey};
use crate::orders::Created;

pub fn api() -> Router<AppState> {
    Router::new()
        .route("/orders", post(create_order))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/confirm", post(confirm_order))
        .route("/orders/{id}/cancel", post(cancel_order))
}

/// `body` was read whole, within its deadline and size limit, by the body middleware.
async fn create_order(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let key = IdempotencyKey::from_headers(&headers)?;
    let request = parse_create(&body)?;
    let key = key.map(|key| (key, request_hash(&request.canonical)));
    Ok(match state.orders.create(request.order, key).await? {
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

async fn get_order(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Order>, ApiError> {
    let id = order_id(path)?;
    Ok(Json(state.orders.find(id).await?))
}

async fn confirm_order(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Order>, ApiError> {
    transition(state, order_id(path)?, Transition::Confirm).await
}

async fn cancel_order(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Order>, ApiError> {
    transition(state, order_id(path)?, Transition::Cancel).await
}

async fn transition(state: AppState, id: OrderId, transition: Transition) -> Result<Json<Order>, ApiError> {
    let (order, changed) = state.orders.transition(id, transition).await?;
    if changed {
        state.metrics.order_transitioned(order.status);
    }
    Ok(Json(order))
}
