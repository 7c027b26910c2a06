//! Serving HTTP safely in front of anyone: bounded connections, timeouts on every phase of a
//! request, and metric labels that clients cannot multiply.
//!
//! - [`server::serve`]: the accept loop every service runs (connection cap, header-read and
//!   keep-alive idle timeouts, graceful shutdown).
//! - [`body::read_within`]: a middleware that reads each request's body within a deadline and
//!   a size limit, on every route.
//! - [`method_label`]: the request method as a metric label from a fixed set.

pub mod body;
pub mod server;

use std::time::Duration;

use axum::http::Method;

use crate::parse_duration;

/// The HTTP limits every service takes from its settings.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpSettings {
    /// Connections served at once; more are answered 503 and closed.
    #[arg(long = "http-max-connections", env = "HTTP_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
    /// Time a client has to send a request's headers, from their first byte.
    #[arg(long = "http-header-timeout", env = "HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// Time a connection may wait for its next request (or its first) before it is closed.
    #[arg(long = "http-idle-timeout", env = "HTTP_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Time a client has to send a request's body, once its headers are in.
    #[arg(long = "http-body-timeout", env = "HTTP_BODY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub body_timeout: Duration,
    /// Time a connection may stay unable to send (its client reads nothing) before it is
    /// closed: a client that stops reading a long response, such as an event stream, frees
    /// its connection.
    #[arg(long = "http-write-timeout", env = "HTTP_WRITE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub write_timeout: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// The method as a metric label: the standard ones by name, anything else `other` (a client
/// may send any token as a method; each would otherwise become a series of its own).
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_outside_the_standard_set_share_one_label() {
        assert_eq!(method_label(&Method::POST), "POST");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").expect("token")), "other");
        assert_eq!(method_label(&Method::from_bytes(b"get").expect("token")), "other");
    }
}
