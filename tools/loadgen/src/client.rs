//! The HTTP calls the load is made of.
//!
//! The order calls go over one keep-alive HTTP/1.1 connection per client ([`OrderConnection`]),
//! with no pool, redirect or per-request URL handling: the load generator runs on the machine
//! it measures, so the less CPU each request costs it, the more of the machine goes to the
//! system under test. Everything else (seeding stock, reading metrics) uses reqwest.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

use crate::mix::OrderBody;

/// Why a request did not succeed, as counted in the summary ("422", "timeout", ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure(pub String);

impl Failure {
    fn from_reqwest(e: &reqwest::Error) -> Self {
        let kind = if e.is_timeout() {
            "timeout"
        } else if e.is_connect() {
            "connect"
        } else if e.is_body() || e.is_decode() {
            "bad body"
        } else {
            "transport"
        };
        Self(kind.to_owned())
    }
}

/// One client's connection to the order API, opened on first use and again after an error.
pub struct OrderConnection {
    /// `host:port`.
    authority: String,
    /// The URL's path, without a trailing slash (usually empty).
    base: String,
    timeout: Duration,
    /// `Bearer <token>`, sent with every request when set.
    authorization: Option<HeaderValue>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl OrderConnection {
    /// For the order API at `order_url` (`http://host:port`).
    pub fn new(order_url: &str, timeout: Duration) -> Result<Self, String> {
        let uri: Uri = order_url.parse().map_err(|e| format!("{order_url}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("{order_url}: only http:// is supported"));
        }
        let authority = uri.authority().ok_or_else(|| format!("{order_url}: no host"))?;
        let authority = match authority.port_u16() {
            Some(_) => authority.to_string(),
            None => format!("{}:80", authority.host()),
        };
        Ok(Self {
            authority,
            base: uri.path().trim_end_matches('/').to_owned(),
            timeout,
            authorization: None,
            sender: None,
        })
    }

    /// Sends `token` as a bearer token with every request.
    pub fn with_token(mut self, token: Option<&str>) -> Result<Self, String> {
        self.authorization = token
            .map(|t| {
                HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| "the token is not a header value".to_owned())
            })
            .transpose()?;
        Ok(self)
    }

    /// `POST /orders`; returns the new order's id.
    pub async fn create(&mut self, body: &OrderBody, idempotency_key: Option<&str>) -> Result<String, Failure> {
        let json = serde_json::to_vec(body).map_err(|_| Failure("bad body".to_owned()))?;
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/orders", self.base))
            .header(header::HOST, &self.authority)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let request = request.body(Full::new(Bytes::from(json))).map_err(|_| Failure("bad request".to_owned()))?;
        let (status, body) = self.send(request).await?;
        if status != StatusCode::CREATED {
            return Err(Failure(status.as_u16().to_string()));
        }
        let order: CreatedOrder = serde_json::from_slice(&body).map_err(|_| Failure("bad body".to_owned()))?;
        Ok(order.id)
    }

    /// `POST /orders/{id}/confirm` or `/cancel`.
    pub async fn transition(&mut self, order_id: &str, action: &str) -> Result<(), Failure> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/orders/{order_id}/{action}", self.base))
            .header(header::HOST, &self.authority)
            .body(Full::new(Bytes::new()))
            .map_err(|_| Failure("bad request".to_owned()))?;
        let (status, _) = self.send(request).await?;
        if status != StatusCode::OK {
            return Err(Failure(status.as_u16().to_string()));
        }
        Ok(())
    }

    /// Sends `request` and reads the whole response, within the timeout. Any failure drops the
    /// connection; the next request opens a new one.
    async fn send(&mut self, mut request: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), Failure> {
        if let Some(authorization) = &self.authorization {
            request.headers_mut().insert(header::AUTHORIZATION, authorization.clone());
        }
        let exchange = async {
            let sender = match &mut self.sender {
                Some(sender) => sender,
                None => self.sender.insert(connect(&self.authority).await?),
            };
            sender.ready().await.map_err(|_| Failure("transport".to_owned()))?;
            let response = sender.send_request(request).await.map_err(|_| Failure("transport".to_owned()))?;
            let status = response.status();
            let body = response.into_body().collect().await.map_err(|_| Failure("bad body".to_owned()))?;
            Ok((status, body.to_bytes()))
        };
        let result = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(Failure("timeout".to_owned())),
        };
        if result.is_err() {
            self.sender = None;
        }
        result
    }
}

async fn connect(authority: &str) -> Result<SendRequest<Full<Bytes>>, Failure> {
    let stream = TcpStream::connect(authority).await.map_err(|_| Failure("connect".to_owned()))?;
    stream.set_nodelay(true).map_err(|_| Failure("connect".to_owned()))?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|_| Failure("connect".to_owned()))?;
    // Drives the connection until it closes (the sender is dropped, or the server hangs up).
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// The calls besides the order load: seeding stock, reading relays' metrics.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    inventory_url: String,
    token: Option<String>,
}

#[derive(Deserialize)]
struct CreatedOrder {
    id: String,
}

impl Api {
    pub fn new(inventory_url: &str, timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder().timeout(timeout).connect_timeout(timeout).tcp_nodelay(true).build()?;
        Ok(Self { http, inventory_url: inventory_url.trim_end_matches('/').to_owned(), token: None })
    }

    /// Sends `token` as a bearer token with the stock seeding.
    pub fn with_token(mut self, token: Option<&str>) -> Self {
        self.token = token.map(str::to_owned);
        self
    }

    /// `PUT /inventory/{sku}` with `{"on_hand": n}`.
    pub async fn set_stock(&self, sku: &str, on_hand: i64) -> Result<(), Failure> {
        let url = format!("{}/inventory/{sku}", self.inventory_url);
        let mut request = self.http.put(url).json(&serde_json::json!({ "on_hand": on_hand }));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| Failure::from_reqwest(&e))?;
        if !response.status().is_success() {
            return Err(Self::status_failure(response).await);
        }
        Ok(())
    }

    /// GET a metrics page (a relay's /metrics).
    pub async fn fetch_text(&self, url: &str) -> Result<String, Failure> {
        let response = self.http.get(url).send().await.map_err(|e| Failure::from_reqwest(&e))?;
        if !response.status().is_success() {
            return Err(Self::status_failure(response).await);
        }
        response.text().await.map_err(|e| Failure::from_reqwest(&e))
    }

    async fn status_failure(response: reqwest::Response) -> Failure {
        let status = response.status().as_u16();
        // Drain the problem body so the connection is reusable; its content is not needed.
        let _ = response.bytes().await;
        Failure(status.to_string())
    }
}
