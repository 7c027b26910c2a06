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

/// A SKU's stock: `available` = `on_hand` − `reserved`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StockView {
    #[schema(example = "SKU-1")]
    pub sku: String,
    pub on_hand: i64,
    /// Reserved by pending orders.
    pub reserved: i64,
    pub available: i64,
}

/// The body of a `PUT`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SetStock {
    /// 0 to 1 000 000 000 000, and not below what is reserved.
    #[schema(value_type = i64, minimum = 0, maximum = 1_000_000_000_000_i64)]
    on_hand: serde_json::Value,
}

/// `*`: the one value of `If-None-Match` the API supports.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
enum AnyVersion {
    #[schema(rename = "*")]
    Any,
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(get_stock, put_stock),
    components(schemas(StockView, SetStock, AnyVersion)),
    tags((name = "inventory", description = "The token's tenant's stock; the consumer changes it as orders' events arrive")),
)]
struct Api;

/// inventory-consumer's OpenAPI document (`GET /openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    service_kit::openapi::document(
        "inventory-consumer",
        "The inventory API; the consumer applies each order's events to the stock exactly once.",
        Api::openapi(),
    )
}

#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("{0}")]
    Rule(&'static str, String),
    #[error("unknown sku")]
    NotFound,
    #[error("the stock changed since it was read")]
    Stale,
    #[error("on_hand below what is reserved")]
    BelowReserved,
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
            // A valid quantity the stock's current state refuses: a conflict, not a bad request.
            Self::BelowReserved => Problem::new(StatusCode::CONFLICT, "Conflict")
                .detail(
                    "on_hand must not be below the quantity reserved by pending orders; release or confirm them first",
                )
                .field("on_hand"),
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

/// The SKU's stock, with its version as `ETag`.
#[utoipa::path(get, path = "/inventory/{sku}", tag = "inventory",
    params(("sku" = String, Path, pattern = "^[A-Z0-9][A-Z0-9-]{0,31}$", description = "A SKU")),
    responses(
        (status = 200, description = "The stock", body = StockView, headers(("ETag" = String, description = "The stock's version, `\"<n>\"`: send it in `If-Match`"))),
        (status = 404, description = "No stock recorded for this SKU (for this tenant)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a SKU (`field`: `sku`)", body = Problem, content_type = "application/problem+json"),
        service_kit::openapi::Refusals,
    ),
    security(("bearer" = ["inventory:read"])))]
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
        // Both: the SKU would have to exist (If-Match, evaluated first, RFC 9110 §13.2.2) and
        // not exist (If-None-Match: *): the precondition can never hold.
        (Some(Ok(_)), Some(Ok("*"))) => Err(ApiError::Stale),
        (Some(Ok(_)), Some(Ok(_))) => {
            Err(ApiError::Rule("If-None-Match", "only `*` is supported (create if absent)".to_owned()))
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
/// may not be below what is reserved (409).
#[utoipa::path(put, path = "/inventory/{sku}", tag = "inventory",
    params(
        ("sku" = String, Path, pattern = "^[A-Z0-9][A-Z0-9-]{0,31}$", description = "A SKU"),
        ("If-Match" = Option<String>, Header, nullable = false, description = "Apply only to one of these versions (`\"3\"`), or to an existing SKU (`*`); else 412"),
        ("If-None-Match" = Option<AnyVersion>, Header, nullable = false, description = "`*`: create only if the SKU does not exist yet; else 412"),
    ),
    request_body(content = SetStock, content_type = "application/json"),
    responses(
        (status = 200, description = "The stock as written", body = StockView, headers(("ETag" = String, description = "The new version"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`on_hand` is below what pending orders reserve (`field`: `on_hand`)", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "The precondition does not hold: read again", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is over 64 KiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not `Content-Type: application/json`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A rule broken; `field` names it (`on_hand`, `sku`, `If-Match`, `If-None-Match`)", body = Problem, content_type = "application/problem+json"),
        service_kit::openapi::Refusals,
    ),
    security(("bearer" = ["inventory:write"])))]
async fn put_stock(
    State(api): State<StockApi>,
    Extension(principal): Extension<Principal>,
    Path(sku): Path<String>,
    headers: HeaderMap,
    body: Result<Json<SetStock>, JsonRejection>,
) -> Result<Response, ApiError> {
    let sku = parse_sku(&sku)?;
    // The request is checked whole before its preconditions: a malformed one is refused as
    // such, whatever the stock's state.
    let Json(body) = body?;
    let on_hand = service_kit::integer::from_json(&body.on_hand)
        .filter(|n| (0..=MAX_ON_HAND).contains(n))
        .ok_or_else(|| ApiError::Rule("on_hand", format!("must be an integer from 0 to {MAX_ON_HAND}")))?;
    let precondition = precondition(&headers)?;
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
        SetOutcome::BelowReserved => Err(ApiError::BelowReserved),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_api_md_has_every_operation_and_no_other() {
        let api_md = include_str!("../../../docs/API.md");
        assert_eq!(service_kit::openapi::undocumented(&openapi(), api_md, "inventory-consumer"), Vec::<String>::new());
    }

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
        assert!(matches!(
            precondition(&headers(&[("if-match", "\"3\""), ("if-none-match", "*")])),
            Err(ApiError::Stale)
        ));
        assert!(precondition(&headers(&[("if-none-match", "\"3\"")])).is_err());
    }
}
