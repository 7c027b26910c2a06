//! `PUT`/`GET /inventory/{sku}`.
//!
//! Each response carries the stock row's version as its `ETag`; a `PUT` with `If-Match`
//! applies only to that version (else `412`), so a client that computed the new quantity from
//! what it read cannot overwrite a change made since (a reservation, another `PUT`).
//! `If-None-Match: *` creates the SKU only if it does not exist yet.

use std::sync::{Arc, OnceLock};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Extension, Json, Router};
use domain::{Sku, TenantId};
use serde::{Deserialize, Serialize};
use service_kit::auth::{require, Authenticator, Principal, Scope};
use service_kit::tenancy::Tenancy;
use service_kit::{failure, Problem};
use sqlx::{PgPool, Postgres, Transaction};

use crate::store::stock::{self, SetOutcome, SetWhen, StockRow};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// The largest `on_hand` a `PUT` may set. With it, and at most 100 items of at most 1 000 units
/// per order, no reservation, confirmation or restock comes anywhere near `i64::MAX` (the rules
/// saturate all the same).
pub const MAX_ON_HAND: i64 = 1_000_000_000_000;

/// What the stock API's handlers share.
#[derive(Clone)]
pub struct StockApi {
    pub pool: PgPool,
    /// Each request's transaction runs as the runtime role, for the token's tenant.
    pub tenancy: Tenancy,
    /// Set when the runtime role is one row-level security would not hold: the API refuses.
    pub unfit: Arc<OnceLock<String>>,
}

impl StockApi {
    /// A transaction of `tenant`, as the runtime role.
    async fn begin(&self, tenant: &TenantId) -> Result<Transaction<'static, Postgres>, ApiError> {
        if self.unfit.get().is_some() {
            return Err(ApiError::Unfit);
        }
        Ok(self.tenancy.begin_in(&self.pool, tenant).await?)
    }
}

/// `GET` needs the scope `inventory:read`, `PUT` `inventory:write` ([`service_kit::auth`]);
/// each works on the token's tenant's stock only.
pub fn router(api: StockApi, auth: &Authenticator) -> Router {
    let read = get(get_stock).route_layer(from_fn_with_state((auth.clone(), Scope::InventoryRead), require));
    let write = put(put_stock).route_layer(from_fn_with_state((auth.clone(), Scope::InventoryWrite), require));
    Router::new()
        .route("/inventory/{sku}", read.merge(write))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(api)
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
    #[error("the stock changed since it was read")]
    Stale,
    #[error("request body: {0}")]
    Body(#[from] JsonRejection),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the runtime role is unfit")]
    Unfit,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::Rule(field, detail) => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "Unprocessable Content").field(field).detail(detail)
            }
            Self::NotFound => Problem::new(StatusCode::NOT_FOUND, "Not Found").detail("no stock recorded for this sku"),
            Self::Stale => Problem::new(StatusCode::PRECONDITION_FAILED, "Precondition Failed")
                .detail(
                    "the stock is not at the version If-Match names (or If-None-Match: * and it exists); read it again",
                )
                .field("If-Match"),
            Self::Body(rejection) => body_problem(&rejection),
            Self::Database(e) => {
                let class = failure::of_postgres(&e);
                tracing::error!(error = %e, failure_class = %class, "inventory request failed");
                Problem::unavailable()
            }
            Self::Unfit => Problem::unavailable().detail("the service is misconfigured; see /readyz"),
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

/// The stock and its `ETag`.
fn stock_response(sku: &Sku, row: StockRow) -> Response {
    let StockRow { on_hand, reserved, version } = row;
    let view = StockView { sku: sku.to_string(), on_hand, reserved, available: on_hand - reserved };
    let mut response = Json(view).into_response();
    if let Ok(tag) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, tag);
    }
    response
}

async fn get_stock(
    State(api): State<StockApi>,
    Extension(principal): Extension<Principal>,
    Path(sku): Path<String>,
) -> Result<Response, ApiError> {
    let sku = parse_sku(&sku)?;
    let mut tx = api.begin(&principal.tenant).await?;
    let row = stock::find(&mut tx, &principal.tenant, sku.as_str()).await?;
    tx.commit().await?;
    Ok(stock_response(&sku, row.ok_or(ApiError::NotFound)?))
}

/// What a `PUT` requires of the row it writes.
#[derive(Debug, PartialEq, Eq)]
enum Precondition {
    None,
    /// `If-Match: *`: the SKU exists.
    Exists,
    /// `If-Match: "v1", "v2"`: the SKU is at one of these versions.
    Version(Vec<i64>),
    /// `If-None-Match: *`: the SKU does not exist yet.
    Absent,
}

/// Reads `If-Match` / `If-None-Match`. Tags are this API's own (`"<version>"`); a weak tag
/// never matches (If-Match compares strongly) and neither does a foreign one.
fn precondition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    let text = |name| headers.get(name).map(|v| v.to_str().map(str::trim));
    match (text(header::IF_MATCH), text(header::IF_NONE_MATCH)) {
        (Some(Err(_)), _) | (_, Some(Err(_))) => Err(ApiError::Rule("If-Match", "must be ASCII".to_owned())),
        (Some(Ok(_)), Some(Ok(_))) => {
            Err(ApiError::Rule("If-Match", "send If-Match or If-None-Match, not both".to_owned()))
        }
        (None, Some(Ok("*"))) => Ok(Precondition::Absent),
        (None, Some(Ok(_))) => {
            Err(ApiError::Rule("If-None-Match", "only `*` is supported (create if absent)".to_owned()))
        }
        (Some(Ok("*")), None) => Ok(Precondition::Exists),
        (Some(Ok(list)), None) => {
            let versions = list
                .split(',')
                .map(str::trim)
                .filter_map(|tag| tag.strip_prefix('"')?.strip_suffix('"')?.parse::<i64>().ok())
                .collect();
            Ok(Precondition::Version(versions))
        }
        (None, None) => Ok(Precondition::None),
    }
}

/// Creates the sku or sets its on-hand quantity; reservations are kept, so the new quantity
/// may not be below what is reserved (422).
async fn put_stock(
    State(api): State<StockApi>,
    Extension(principal): Extension<Principal>,
    Path(sku): Path<String>,
    headers: HeaderMap,
    body: Result<Json<SetStock>, JsonRejection>,
) -> Result<Response, ApiError> {
    let sku = parse_sku(&sku)?;
    let precondition = precondition(&headers)?;
    let Json(body) = body?;
    let on_hand = body
        .on_hand
        .as_i64()
        .filter(|n| (0..=MAX_ON_HAND).contains(n))
        .ok_or_else(|| ApiError::Rule("on_hand", format!("must be an integer from 0 to {MAX_ON_HAND}")))?;
    let when = match precondition {
        Precondition::None => SetWhen::Always,
        Precondition::Absent => SetWhen::Absent,
        Precondition::Exists => SetWhen::Exists { versions: None },
        Precondition::Version(versions) => SetWhen::Exists { versions: Some(versions) },
    };
    let mut tx = api.begin(&principal.tenant).await?;
    let outcome = stock::set(&mut tx, &principal.tenant, sku.as_str(), on_hand, &when).await?;
    if matches!(outcome, SetOutcome::Written(_)) {
        tx.commit().await?;
    }
    match outcome {
        SetOutcome::Written(row) => Ok(stock_response(&sku, row)),
        SetOutcome::Refused => Err(ApiError::Stale),
        SetOutcome::BelowReserved => {
            Err(ApiError::Rule("on_hand", "must not be below the quantity reserved".to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (header::HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn preconditions() {
        assert_eq!(precondition(&headers(&[])).ok(), Some(Precondition::None));
        assert_eq!(precondition(&headers(&[("if-match", "*")])).ok(), Some(Precondition::Exists));
        assert_eq!(precondition(&headers(&[("if-none-match", "*")])).ok(), Some(Precondition::Absent));
        assert_eq!(
            precondition(&headers(&[("if-match", "\"3\", W/\"4\", \"x\",\"5\"")])).ok(),
            Some(Precondition::Version(vec![3, 5]))
        );
        assert!(precondition(&headers(&[("if-match", "\"3\""), ("if-none-match", "*")])).is_err());
        assert!(precondition(&headers(&[("if-none-match", "\"3\"")])).is_err());
    }
}
