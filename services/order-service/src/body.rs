//! Validating request bodies by hand, so every failure is a problem document naming what is
//! wrong rather than a framework rejection.

use axum::http::{header, HeaderMap};
use domain::{NewOrder, ValidationError};
use serde::Deserialize;
use service_kit::integer::Integer;

use crate::error::ApiError;

/// Largest accepted request body (enforced, with the body's deadline, by
/// [`service_kit::http::body::read_within`] before any handler runs).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// `Content-Type` must be `application/json`; parameters such as `charset` are allowed.
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let essence = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim());
    match essence {
        Some(mime) if mime.eq_ignore_ascii_case("application/json") => Ok(()),
        _ => Err(ApiError::UnsupportedMediaType),
    }
}

/// The create-order body as sent. Fields are optional here so a missing one is reported by
/// name like any other rule.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrder {
    customer_id: Option<String>,
    items: Option<Vec<RawItem>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawItem {
    sku: Option<String>,
    /// `2` or `2.0` (JSON Schema's integer), not `2.5`.
    quantity: Option<Integer>,
    unit_price_cents: Option<Integer>,
}

/// A validated create request and its canonical JSON (key order and whitespace fixed), which
/// identifies the request for `Idempotency-Key` comparisons.
pub struct CreateRequest {
    pub order: NewOrder,
    pub canonical: String,
}

/// Parses a create-order body: syntax errors are 400, anything else wrong is 422 naming the
/// field (`items[2].quantity`).
pub fn parse_create(bytes: &[u8]) -> Result<CreateRequest, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let raw: RawOrder = serde_path_to_error::deserialize(&mut de).map_err(json_error)?;
    de.end().map_err(|e| ApiError::MalformedJson(e.to_string()))?;

    let customer_id = raw.customer_id.ok_or_else(|| missing("customer_id"))?;
    let raw_items = raw.items.ok_or_else(|| missing("items"))?;
    let mut items = Vec::with_capacity(raw_items.len().min(NewOrder::MAX_ITEMS + 1));
    for (i, item) in raw_items.into_iter().enumerate() {
        let field = |name: &str| missing(&format!("items[{i}].{name}"));
        let sku = item.sku.ok_or_else(|| field("sku"))?;
        let Integer(quantity) = item.quantity.ok_or_else(|| field("quantity"))?;
        let Integer(price) = item.unit_price_cents.ok_or_else(|| field("unit_price_cents"))?;
        items.push((sku, quantity, price));
    }
    let order = NewOrder::parse(&customer_id, &items)?;
    let canonical = serde_json::json!({ "customer_id": order.customer_id, "items": order.items }).to_string();
    Ok(CreateRequest { order, canonical })
}

fn missing(field: &str) -> ApiError {
    ApiError::Invalid(ValidationError::new(field, "is required"))
}

fn json_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    use serde_json::error::Category;
    let path = e.path().to_string();
    let inner = e.into_inner();
    match inner.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::MalformedJson(inner.to_string()),
        Category::Data => {
            let message = inner.to_string();
            // The path names the offending field, unknown ones included (`items[0].color`);
            // a duplicate key is reported at its object, so name the key itself.
            let mut field = if path == "." { String::new() } else { path };
            if let Some(name) = message.strip_prefix("duplicate field `").and_then(|m| m.split('`').next()) {
                field = if field.is_empty() { name.to_owned() } else { format!("{field}.{name}") };
            }
            ApiError::Invalid(ValidationError::new(field, strip_position(&message)))
        }
    }
}

/// serde_json appends " at line 1 column 42" to data errors; the field name says more.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}
