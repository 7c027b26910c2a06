//! Request bodies read within a deadline and a size limit, before any handler sees them.
//!
//! A client that sends its headers and then trickles the body would otherwise hold a handler
//! (and whatever it holds: a database connection, a permit) for as long as it likes. Bodies
//! here are small (the APIs take JSON documents of at most 64 KiB), so reading them whole
//! first costs nothing worth measuring.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::Body as _;
use http_body_util::BodyExt;

use crate::Problem;

/// The limits [`read_within`] enforces.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Time to receive the whole body once the handler chain starts.
    pub timeout: Duration,
    /// Largest body accepted.
    pub max_bytes: usize,
}

/// Middleware (`axum::middleware::from_fn_with_state`): reads the request body within
/// `limits`, answering `408` (too slow), `413` (too large) or `400` (broken off) as a problem
/// document, and hands the handler the body already in memory.
pub async fn read_within(State(limits): State<BodyLimits>, request: Request, next: Next) -> Response {
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes as u64) {
        return too_large(limits.max_bytes);
    }
    let (parts, body) = request.into_parts();
    let limited = http_body_util::Limited::new(body, limits.max_bytes);
    let bytes: Bytes = match tokio::time::timeout(limits.timeout, limited.collect()).await {
        Err(_) => return too_slow(limits.timeout),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return too_large(limits.max_bytes)
        }
        Ok(Err(_)) => {
            return Problem::new(StatusCode::BAD_REQUEST, "Bad Request")
                .detail("the request body could not be read")
                .into_response()
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

fn too_large(limit: usize) -> Response {
    Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "Payload Too Large")
        .detail(format!("the body is larger than {limit} bytes"))
        .into_response()
}

/// 408, and the connection closes: the rest of a body that arrives late must not be read as
/// the next request.
fn too_slow(timeout: Duration) -> Response {
    let mut response = Problem::new(StatusCode::REQUEST_TIMEOUT, "Request Timeout")
        .detail(format!("the request body did not arrive within {} ms", timeout.as_millis()))
        .into_response();
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
