//! `Idempotency-Key`: the first response to a keyed create is stored with the order, in the
//! same transaction, and replayed for retries of the same request within the key's time to
//! live (`IDEMPOTENCY_KEY_TTL`). An expired key counts as absent whether or not it has been
//! removed yet, and expired keys are removed in bounded batches ([`expiry_loop`]).

use std::time::Duration;

use axum::http::HeaderMap;
use domain::{TenantId, ValidationError};
use service_kit::prune::{delete_in_batches, millis, pass_interval};
use service_kit::Shutdown;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};

use crate::store::StoreError;

pub const HEADER: &str = "Idempotency-Key";
const MAX_LEN: usize = 255;

/// A validated key: 1 to 255 visible ASCII characters. Keys are per tenant. A key is never
/// logged nor put in a span: it may be a secret of the client's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The request's key, if it sent one.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, ValidationError> {
        let mut values = headers.get_all(HEADER).iter();
        let Some(value) = values.next() else { return Ok(None) };
        let invalid = |why: &str| ValidationError::new(HEADER, why);
        if values.next().is_some() {
            return Err(invalid("must be sent once"));
        }
        let bytes = value.as_bytes();
        if bytes.is_empty() || bytes.len() > MAX_LEN || !bytes.iter().all(|b| b.is_ascii_graphic()) {
            return Err(invalid("must be 1 to 255 visible ASCII characters"));
        }
        // Visible ASCII is valid UTF-8.
        Ok(Some(Self(String::from_utf8_lossy(bytes).into_owned())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Identifies a request body: SHA-256 of its canonical JSON, hex encoded.
pub fn request_hash(canonical: &str) -> String {
    format!("{:x}", Sha256::digest(canonical.as_bytes()))
}

/// A response stored under a key.
#[derive(Debug)]
pub struct Stored {
    pub request_hash: String,
    pub order_id: String,
    pub body: serde_json::Value,
}

/// Records `key` for a new order as the transaction's first write, taking it over if it has
/// expired. Returns `false` when the key is taken; if another transaction holds it uncommitted,
/// this waits for that one to end, so two requests with one key never both create an order.
#[tracing::instrument(skip_all, fields(order_id = order_id, db.system = "postgresql"))]
pub async fn claim(
    conn: &mut PgConnection,
    tenant: &TenantId,
    key: &IdempotencyKey,
    request_hash: &str,
    order_id: &str,
    body: &serde_json::Value,
    ttl: Duration,
) -> Result<bool, StoreError> {
    let claimed = sqlx::query!(
        "INSERT INTO idempotency_keys (key, request_hash, order_id, response_body, tenant_id)
         VALUES ($1, $2, $3, $4, $6)
         ON CONFLICT ON CONSTRAINT idempotency_keys_pkey DO UPDATE
           SET request_hash = EXCLUDED.request_hash, order_id = EXCLUDED.order_id,
               response_body = EXCLUDED.response_body, created_at = EXCLUDED.created_at
           WHERE idempotency_keys.created_at < now() - $5 * interval '1 millisecond'",
        key.as_str(),
        request_hash,
        order_id,
        body,
        millis(ttl),
        tenant.as_str(),
    )
    .execute(conn)
    .await?
    .rows_affected();
    Ok(claimed == 1)
}

/// The committed response stored under `tenant`'s `key`.
#[tracing::instrument(skip_all, fields(db.system = "postgresql"))]
pub async fn stored(
    conn: &mut PgConnection,
    tenant: &TenantId,
    key: &IdempotencyKey,
) -> Result<Option<Stored>, StoreError> {
    let stored = sqlx::query_as!(
        Stored,
        r#"SELECT request_hash, order_id, response_body AS body FROM idempotency_keys
           WHERE tenant_id = $1 AND key = $2"#,
        tenant.as_str(),
        key.as_str(),
    )
    .fetch_optional(conn)
    .await?;
    Ok(stored)
}

/// Statements per round: a larger backlog takes several rounds.
const EXPIRY_STATEMENTS: u32 = 100;

/// Removes keys older than `ttl`, the oldest first on the `created_at` index, in batches
/// ([`service_kit::prune`]; rows another replica is removing are skipped), until none is left,
/// [`EXPIRY_STATEMENTS`] statements were run, or shutdown. Returns how many went.
pub async fn remove_expired(pool: &PgPool, ttl: Duration, shutdown: &Shutdown) -> Result<u64, sqlx::Error> {
    delete_in_batches(
        pool,
        "DELETE FROM idempotency_keys WHERE (tenant_id, key) IN ( \
           SELECT tenant_id, key FROM idempotency_keys WHERE created_at < now() - $1 * interval '1 millisecond' \
           ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        ttl,
        EXPIRY_STATEMENTS,
        shutdown,
    )
    .await
}

/// Removes expired keys every [`pass_interval`] of the TTL until shutdown, counting them in `expired`.
pub async fn expiry_loop(
    pool: PgPool,
    ttl: Duration,
    expired: prometheus_client::metrics::counter::Counter,
    shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(pass_interval(ttl)) => {}
        }
        match remove_expired(&pool, ttl, &shutdown).await {
            Ok(n) => {
                expired.inc_by(n);
                if n > 0 {
                    tracing::debug!(removed = n, "expired idempotency keys removed");
                }
            }
            Err(e) => tracing::debug!(error = %e, "removing expired idempotency keys failed; trying again next round"),
        }
    }
}
