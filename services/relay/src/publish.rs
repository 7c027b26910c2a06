//! Writing entries to the Redis stream: one pipeline of XADDs per batch.

use std::time::Duration;

use domain::StreamEntry;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError};

/// A Redis stream writer that reconnects after errors, so an outage never needs a restart.
pub struct Publisher {
    client: Client,
    stream: String,
    conn: Option<MultiplexedConnection>,
}

impl Publisher {
    pub fn new(redis_url: &str, stream: impl Into<String>) -> Result<Self, RedisError> {
        Ok(Self { client: Client::open(redis_url)?, stream: stream.into(), conn: None })
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    async fn connection(&mut self) -> Result<&mut MultiplexedConnection, RedisError> {
        if self.conn.is_none() {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Duration::from_secs(2))
                .set_response_timeout(Duration::from_secs(10));
            self.conn = Some(self.client.get_multiplexed_async_connection_with_config(&config).await?);
        }
        match self.conn.as_mut() {
            Some(conn) => Ok(conn),
            None => unreachable!("the connection was just set"),
        }
    }

    /// XADDs every entry, in order, in one round trip. On any error the whole batch counts as
    /// failed (entries before the error may have been added: delivery is at least once).
    pub async fn publish(&mut self, entries: &[StreamEntry]) -> Result<(), RedisError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for entry in entries {
            let cmd = pipe.cmd("XADD").arg(&self.stream).arg("*");
            for (field, value) in entry.to_fields() {
                cmd.arg(field).arg(value);
            }
            cmd.ignore();
        }
        let stream = self.stream.clone();
        let conn = self.connection().await?;
        let result = pipe.query_async::<()>(conn).await;
        if let Err(e) = &result {
            tracing::debug!(stream, error = %e, "redis pipeline failed; reconnecting on next use");
            self.conn = None;
        }
        result
    }

    /// Whether Redis answers (for /readyz).
    pub async fn ping(client: &Client) -> Result<(), RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(Duration::from_secs(1));
        let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
        redis::cmd("PING").query_async::<()>(&mut conn).await
    }
}
