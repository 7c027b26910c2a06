//! The HTTP calls the load is made of.

use std::time::Duration;

use serde::Deserialize;

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

#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    order_url: String,
    inventory_url: String,
}

#[derive(Deserialize)]
struct CreatedOrder {
    id: String,
}

impl Api {
    pub fn new(order_url: &str, inventory_url: &str, timeout: Duration, pool: usize) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(pool)
            .tcp_nodelay(true)
            .build()?;
        Ok(Self {
            http,
            order_url: order_url.trim_end_matches('/').to_owned(),
            inventory_url: inventory_url.trim_end_matches('/').to_owned(),
        })
    }

    /// `POST /orders`; returns the new order's id.
    pub async fn create(&self, body: &OrderBody, idempotency_key: Option<&str>) -> Result<String, Failure> {
        let mut request = self.http.post(format!("{}/orders", self.order_url)).json(body);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await.map_err(|e| Failure::from_reqwest(&e))?;
        if response.status() != reqwest::StatusCode::CREATED {
            return Err(Self::status_failure(response).await);
        }
        let order: CreatedOrder = response.json().await.map_err(|e| Failure::from_reqwest(&e))?;
        Ok(order.id)
    }

    /// `POST /orders/{id}/confirm` or `/cancel`.
    pub async fn transition(&self, order_id: &str, action: &str) -> Result<(), Failure> {
        let url = format!("{}/orders/{order_id}/{action}", self.order_url);
        let response = self.http.post(url).send().await.map_err(|e| Failure::from_reqwest(&e))?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(Self::status_failure(response).await);
        }
        // Read the body so the connection goes back to the pool.
        response.bytes().await.map_err(|e| Failure::from_reqwest(&e))?;
        Ok(())
    }

    /// `PUT /inventory/{sku}` with `{"on_hand": n}`.
    pub async fn set_stock(&self, sku: &str, on_hand: i64) -> Result<(), Failure> {
        let url = format!("{}/inventory/{sku}", self.inventory_url);
        let response = self
            .http
            .put(url)
            .json(&serde_json::json!({ "on_hand": on_hand }))
            .send()
            .await
            .map_err(|e| Failure::from_reqwest(&e))?;
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
