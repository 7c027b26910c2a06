//! The order workflows: each state change and its event in one transaction.

use chrono::{SubsecRound, Utc};
use domain::{NewOrder, Order, OrderId, Transition, ValidationError};
use sqlx::PgPool;

use crate::error::ApiError;
use crate::idempotency::{self, IdempotencyKey};
use crate::store;

/// The result of a create request.
pub enum Created {
    /// A new order, committed with its `OrderCreated` event.
    New(Order),
    /// A retry of a keyed request: the first response, unchanged.
    Replayed { order_id: String, body: serde_json::Value },
}

/// Postgres keeps microseconds; truncating up front makes the response equal to later reads.
fn now() -> chrono::DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// Creates an order, or replays the stored response of an earlier request with the same key.
#[tracing::instrument(skip_all, fields(order_id = tracing::field::Empty, idempotency_key = tracing::field::Empty))]
pub async fn create(pool: &PgPool, new: NewOrder, key: Option<(IdempotencyKey, String)>) -> Result<Created, ApiError> {
    let order = Order::create(new, now());
    let span = tracing::Span::current();
    let appended = match &key {
        Some((key, hash)) => {
            span.record("idempotency_key", key.as_str());
            let mut tx = pool.begin().await.map_err(store::StoreError::from)?;
            let body = serde_json::to_value(&order).map_err(store::StoreError::from)?;
            if !idempotency::claim(&mut tx, key, hash, &order.id.to_string(), &body).await? {
                tx.rollback().await.map_err(store::StoreError::from)?;
                return replay(pool, key, hash).await;
            }
            span.record("order_id", tracing::field::display(order.id));
            let appended = store::insert_order(&mut *tx, &order).await?;
            tx.commit().await.map_err(store::StoreError::from)?;
            appended
        }
        None => {
            span.record("order_id", tracing::field::display(order.id));
            // One statement: the order and its event commit together, in one round trip.
            store::insert_order(pool, &order).await?
        }
    };
    tracing::debug!(order_id = %order.id, event_id = %appended.event_id, seq = appended.seq, "order created");
    Ok(Created::New(order))
}

async fn replay(pool: &PgPool, key: &IdempotencyKey, hash: &str) -> Result<Created, ApiError> {
    let stored = idempotency::stored(pool, key).await?.ok_or_else(|| {
        // Keys are never deleted, so a conflict without a committed row cannot happen.
        ApiError::Internal(store::StoreError::Corrupt { id: key.as_str().to_owned(), reason: "key vanished".into() })
    })?;
    if stored.request_hash != hash {
        return Err(ApiError::Invalid(ValidationError::new(
            idempotency::HEADER,
            "was already used for a different request body",
        )));
    }
    tracing::info!(order_id = %stored.order_id, "idempotent retry: replaying the first response");
    Ok(Created::Replayed { order_id: stored.order_id, body: stored.body })
}

/// Applies `transition` under the order's row lock, in one statement. Returns the order and
/// whether it changed (a no-op transition writes nothing).
#[tracing::instrument(skip(pool, order_id), fields(%order_id))]
pub async fn transition(pool: &PgPool, order_id: OrderId, transition: Transition) -> Result<(Order, bool), ApiError> {
    let mut at = now();
    // Bounded: a second round runs at a time no earlier than the order's `updated_at`, which
    // only a transition of this very order (serialised by its row lock) could move on.
    for _ in 0..3 {
        let found = store::transition_order(pool, order_id, transition, at).await?.ok_or(ApiError::OrderNotFound)?;
        let mut order = found.before;
        let Some(next) = order.status.apply(transition)? else {
            return Ok((order, false));
        };
        let Some(appended) = found.appended else {
            // The order's `updated_at` is later than `at` (this clock is behind the last
            // writer's): keep time moving forward for the order, as the event's time.
            at = at.max(order.updated_at);
            continue;
        };
        tracing::debug!(
            %order_id, from = order.status.as_str(), to = next.as_str(), event_id = %appended.event_id, seq = appended.seq,
            "order transitioned"
        );
        order.status = next;
        order.updated_at = at;
        return Ok((order, true));
    }
    Err(ApiError::Internal(store::StoreError::Corrupt {
        id: order_id.to_string(),
        reason: "transition kept finding a newer updated_at".into(),
    }))
}
