use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use domain::{TransitionError, ValidationError};
use service_kit::Problem;

use crate::store::StoreError;

/// Every way an API request can fail, each mapped to one status code.
///
/// Server-side failures are logged here, once, inside the request span; clients get a problem
/// document without internal detail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    #[error("order not found")]
    OrderNotFound,
    #[error(transparent)]
    IllegalTransition(#[from] TransitionError),
    #[error("not found")]
    RouteNotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the service is starting (database migrations not applied yet)")]
    NotReady,
    #[error("the request took longer than {0:?}")]
    Timeout(std::time::Duration),
    #[error("the database is unavailable")]
    Unavailable(#[source] StoreError),
    #[error("internal error")]
    Internal(#[source] StoreError),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.class().is_transient() {
            Self::Unavailable(e)
        } else {
            Self::Internal(e)
        }
    }
}

impl ApiError {
    fn problem(&self) -> Problem {
        use StatusCode as S;
        match self {
            Self::UnsupportedMediaType => Problem::new(S::UNSUPPORTED_MEDIA_TYPE, "Unsupported Media Type")
                .detail(self.to_string())
                .field("Content-Type"),
            Self::MalformedJson(_) => Problem::new(S::BAD_REQUEST, "Bad Request").detail(self.to_string()),
            // An error about the body as a whole (e.g. not an object) names no field.
            Self::Invalid(e) if e.field.is_empty() => {
                Problem::new(S::UNPROCESSABLE_ENTITY, "Unprocessable Content").detail(e.message.clone())
            }
            Self::Invalid(e) => Problem::new(S::UNPROCESSABLE_ENTITY, "Unprocessable Content")
                .detail(e.to_string())
                .field(e.field.clone()),
            Self::OrderNotFound | Self::RouteNotFound => {
                Problem::new(S::NOT_FOUND, "Not Found").detail(self.to_string())
            }
            Self::IllegalTransition(_) => Problem::new(S::CONFLICT, "Conflict").detail(self.to_string()),
            Self::MethodNotAllowed => Problem::new(S::METHOD_NOT_ALLOWED, "Method Not Allowed"),
            Self::NotReady | Self::Timeout(_) | Self::Unavailable(_) => Problem::unavailable(),
            Self::Internal(_) => Problem::internal(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Internal(e) => tracing::error!(error = %e, cause = ?std::error::Error::source(e),
                failure_class = %e.class(), "request failed"),
            Self::Unavailable(e) => tracing::warn!(error = %e, cause = ?std::error::Error::source(e),
                failure_class = %e.class(), "database unavailable"),
            Self::Timeout(_) | Self::NotReady => tracing::warn!(error = %self, "request not served"),
            _ => {}
        }
        let retry = matches!(self, Self::NotReady | Self::Timeout(_) | Self::Unavailable(_));
        let class = match &self {
            Self::Internal(e) | Self::Unavailable(e) => Some(e.class()),
            Self::NotReady | Self::Timeout(_) => Some(service_kit::FailureClass::transient),
            _ => None,
        };
        let mut response = self.problem().into_response();
        if let Some(class) = class {
            // For the request metrics, which count failures by class.
            response.extensions_mut().insert(class);
        }
        if retry {
            // The outage is expected to be short; clients should come back soon, not hammer.
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
