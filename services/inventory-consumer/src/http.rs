//! `PUT`/`GET /inventory/{sku}`.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use domain::Sku;
use serde::{Deserialize, Serialize};
use service_kit::Problem;
use sqlx::PgPool;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/inventory/{sku}", get(get_stock).put(put_stock))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(pool)
}

#[derive(Debug, Serialize)]
pub struct StockView {
    pub sku: String,
    pub on_hand: i64,
    pub reserved: i64,
    pub available: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetStock {
    on_hand: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("{0}")]
    Rule(&'static str, String),
    #[error("unknown sku")]
    NotFound,
    #[error("request body: {0}")]
    Body(#[from] JsonRejection),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::Rule(field, detail) => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "Unprocessable Content").field(field).detail(detail)
            }
            Self::NotFound => Problem::new(StatusCode::NOT_FOUND, "Not Found").detail("no stock recorded for this sku"),
            Self::Body(rejection) => body_problem(&rejection),
            Self::Database(e) => {
                tracing::error!(error = %e, "inventory request failed");
                Problem::unavailable()
            }
        }
        .into_response()
    }
}

fn body_problem(rejection: &JsonRejection) -> Problem {
    let status = rejection.status();
    let title = match status {
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "Unsupported Media Type",
        StatusCode::PAYLOAD_TOO_LARGE => "Content Too Large",
        StatusCode::UNPROCESSABLE_ENTITY => "Unprocessable Content",
        _ => "Bad Request",
    };
    // serde's message names the offending field (`unknown field `x``, `missing field `on_hand``).
    let status = if status.is_client_error() { status } else { StatusCode::BAD_REQUEST };
    Problem::new(status, title).detail(rejection.body_text())
}

fn parse_sku(raw: &str) -> Result<Sku, ApiError> {
    Sku::parse(raw).map_err(|e| ApiError::Rule("sku", e.to_string()))
}

async fn get_stock(State(pool): State<PgPool>, Path(sku): Path<String>) -> Result<Json<StockView>, ApiError> {
    let sku = parse_sku(&sku)?;
    let row: Option<(i64, i64)> = sqlx::query_as("SELECT on_hand, reserved FROM inventory WHERE sku = $1")
        .bind(sku.as_str())
        .fetch_optional(&pool)
        .await?;
    let (on_hand, reserved) = row.ok_or(ApiError::NotFound)?;
    Ok(Json(StockView { sku: sku.to_string(), on_hand, reserved, available: on_hand - reserved }))
}

/// Creates the sku or sets its on-hand quantity; reservations are kept, so the new quantity
/// may not be below what is reserved (422).
async fn put_stock(
    State(pool): State<PgPool>,
    Path(sku): Path<String>,
    body: Result<Json<SetStock>, JsonRejection>,
) -> Result<Json<StockView>, ApiError> {
    let sku = parse_sku(&sku)?;
    let Json(body) = body?;
    let on_hand = body
        .on_hand
        .as_i64()
        .filter(|n| *n >= 0)
        .ok_or_else(|| ApiError::Rule("on_hand", "must be an integer >= 0".to_owned()))?;
    let row: Result<(i64, i64), sqlx::Error> = sqlx::query_as(
        "INSERT INTO inventory (sku, on_hand) VALUES ($1, $2) \
         ON CONFLICT (sku) DO UPDATE SET on_hand = excluded.on_hand, updated_at = now() \
         RETURNING on_hand, reserved",
    )
    .bind(sku.as_str())
    .bind(on_hand)
    .fetch_one(&pool)
    .await;
    let (on_hand, reserved) = match row {
        Err(sqlx::Error::Database(e)) if e.constraint() == Some("inventory_reserved_within_on_hand") => {
            return Err(ApiError::Rule("on_hand", "must not be below the quantity reserved".to_owned()));
        }
        other => other?,
    };
    Ok(Json(StockView { sku: sku.to_string(), on_hand, reserved, available: on_hand - reserved }))
}
