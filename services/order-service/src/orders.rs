//! The order workflows: each state change and its event in one transaction.

use std::time::Duration;

use chrono::{SubsecRound, Utc};
use domain::{NewOrder, Order, OrderId, TenantId, Transition, ValidationError};
use outbox::{Notifier, Wake};
use service_kit::connections::{keeps_connection, Connections, Ended, PooledConnection};
use service_kit::tenancy::Tenancy;
use sqlx::PgConnection;

use crate::error::ApiError;
use crate::idempotency::{self, IdempotencyKey};
use crate::store::{self, StoreError};

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

/// The order workflows on the API's connections, each in a transaction of the request's
/// tenant as the runtime role ([`Tenancy`]), waking relays after each event.
#[derive(Clone, Debug)]
pub struct Orders {
    db: Connections,
    tenancy: Tenancy,
    notifier: Notifier,
    /// How long an `Idempotency-Key` answers retries.
    key_ttl: Duration,
}

impl Orders {
    pub fn new(db: Connections, tenancy: Tenancy, notifier: Notifier, key_ttl: Duration) -> Self {
        Self { db, tenancy, notifier, key_ttl }
    }

    /// Creates an order of `tenant`, or replays the stored response of an earlier request of
    /// the tenant with the same key.
    #[tracing::instrument(skip_all, fields(order_id = tracing::field::Empty, %tenant, keyed = key.is_some()))]
    pub async fn create(
        &self,
        tenant: &TenantId,
        new: NewOrder,
        key: Option<(IdempotencyKey, String)>,
    ) -> Result<Created, ApiError> {
        let order = Order::create(new, now());
        let mut conn = self.db.acquire().await.map_err(StoreError::from)?;
        let wake = self.notifier.write();
        let write = Write { tenancy: &self.tenancy, tenant, notify: wake.carries() };
        let created = create_on(&mut conn, write, order, key, self.key_ttl).await;
        finish(wake, &created, |c| matches!(c, Created::New(_)));
        put_back(conn, &created).await;
        created
    }

    /// `tenant`'s order `order_id`; another tenant's is not found.
    pub async fn find(&self, tenant: &TenantId, order_id: OrderId) -> Result<Order, ApiError> {
        let mut conn = self.db.acquire().await.map_err(StoreError::from)?;
        let found = find_on(&mut conn, &self.tenancy, tenant, order_id).await;
        put_back(conn, &found).await;
        found
    }

    /// Applies `transition` to `tenant`'s order under its row lock, in one statement. Returns
    /// the order and whether it changed (a no-op transition writes nothing).
    #[tracing::instrument(skip(self, order_id), fields(%order_id))]
    pub async fn transition(
        &self,
        tenant: &TenantId,
        order_id: OrderId,
        transition: Transition,
    ) -> Result<(Order, bool), ApiError> {
        let mut conn = self.db.acquire().await.map_err(StoreError::from)?;
        let wake = self.notifier.write();
        let write = Write { tenancy: &self.tenancy, tenant, notify: wake.carries() };
        let moved = transition_on(&mut conn, write, order_id, transition).await;
        finish(wake, &moved, |(_, changed)| *changed);
        put_back(conn, &moved).await;
        moved
    }
}

/// How a write runs: in a transaction of `tenant` as the runtime role; `notify`: the event's
/// transaction wakes the relays.
#[derive(Clone, Copy)]
struct Write<'a> {
    tenancy: &'a Tenancy,
    tenant: &'a TenantId,
    notify: bool,
}

async fn find_on(
    conn: &mut PgConnection,
    tenancy: &Tenancy,
    tenant: &TenantId,
    order_id: OrderId,
) -> Result<Order, ApiError> {
    let mut tx = tenancy.begin(conn, tenant).await.map_err(StoreError::from)?;
    let order = store::find_order(&mut tx, tenant, order_id).await?;
    tx.commit().await.map_err(StoreError::from)?;
    order.ok_or(ApiError::OrderNotFound)
}

/// Tells `wake` whether the write that ended with `result` committed an event: `appended` for
/// a success, none for a statement the database refused; if the connection failed, the write
/// may have committed before it did, and `wake` is left to assume so.
fn finish<T>(wake: Wake, result: &Result<T, ApiError>, appended: impl FnOnce(&T) -> bool) {
    let connection_failed = matches!(
        result,
        Err(ApiError::Internal(e) | ApiError::Unavailable(e)) if e.database().is_some_and(|e| !keeps_connection(e))
    );
    match result {
        Ok(done) => wake.finished(appended(done)),
        Err(_) if connection_failed => drop(wake),
        Err(_) => wake.finished(false),
    }
}

/// Puts `conn` back after work that ended with `result`.
async fn put_back<T>(conn: PooledConnection, result: &Result<T, ApiError>) {
    let ended = match result {
        Ok(_) => Ended::Completed,
        Err(ApiError::Internal(e) | ApiError::Unavailable(e)) => e.database().map_or(Ended::Interrupted, Ended::Failed),
        Err(_) => Ended::Interrupted,
    };
    conn.put_back(ended).await;
}

async fn create_on(
    conn: &mut PgConnection,
    write: Write<'_>,
    order: Order,
    key: Option<(IdempotencyKey, String)>,
    key_ttl: Duration,
) -> Result<Created, ApiError> {
    let Write { tenancy, tenant, notify } = write;
    let span = tracing::Span::current();
    let appended = match &key {
        Some((key, hash)) => {
            let body = serde_json::to_value(&order).map_err(StoreError::from)?;
            // A key taken when claimed may expire and be removed before its response is read;
            // then it is free, and the second try takes it (or finds whoever did).
            let mut tries = 0;
            loop {
                tries += 1;
                let mut tx = tenancy.begin(conn, tenant).await.map_err(StoreError::from)?;
                if idempotency::claim(&mut tx, tenant, key, hash, &order.id.to_string(), &body, key_ttl).await? {
                    span.record("order_id", tracing::field::display(order.id));
                    let appended = store::insert_order(&mut *tx, tenant, &order, notify).await?;
                    tx.commit().await.map_err(StoreError::from)?;
                    break appended;
                }
                let replayed = replay(&mut tx, tenant, key, hash).await;
                tx.rollback().await.map_err(StoreError::from)?;
                match replayed? {
                    Some(replayed) => return Ok(replayed),
                    None if tries < 2 => continue,
                    None => {
                        return Err(ApiError::Unavailable(StoreError::Corrupt {
                            // Not the key itself: it may be a secret of the client's.
                            id: "an idempotency key".to_owned(),
                            reason: "key expired while it was being read twice in a row".into(),
                        }));
                    }
                }
            }
        }
        None => {
            span.record("order_id", tracing::field::display(order.id));
            // One statement: the order and its event commit together.
            let mut tx = tenancy.begin(conn, tenant).await.map_err(StoreError::from)?;
            let appended = store::insert_order(&mut *tx, tenant, &order, notify).await?;
            tx.commit().await.map_err(StoreError::from)?;
            appended
        }
    };
    tracing::debug!(order_id = %order.id, event_id = %appended.event_id, seq = appended.seq, "order created");
    Ok(Created::New(order))
}

/// The stored response of `tenant`'s `key`; `None` if the key was removed since it was found
/// taken.
async fn replay(
    conn: &mut PgConnection,
    tenant: &TenantId,
    key: &IdempotencyKey,
    hash: &str,
) -> Result<Option<Created>, ApiError> {
    let Some(stored) = idempotency::stored(conn, tenant, key).await? else { return Ok(None) };
    if stored.request_hash != hash {
        return Err(ApiError::Invalid(ValidationError::new(
            idempotency::HEADER,
            "was already used for a different request body",
        )));
    }
    tracing::info!(order_id = %stored.order_id, "idempotent retry: replaying the first response");
    Ok(Some(Created::Replayed { order_id: stored.order_id, body: stored.body }))
}

async fn transition_on(
    conn: &mut PgConnection,
    write: Write<'_>,
    order_id: OrderId,
    transition: Transition,
) -> Result<(Order, bool), ApiError> {
    let Write { tenancy, tenant, notify } = write;
    let mut at = now();
    // Bounded: a second round runs at a time no earlier than the order's `updated_at`, which
    // only a transition of this very order (serialised by its row lock) could move on.
    for _ in 0..3 {
        let mut tx = tenancy.begin(conn, tenant).await.map_err(StoreError::from)?;
        let found = store::transition_order(&mut tx, tenant, order_id, transition, at, notify).await?;
        tx.commit().await.map_err(StoreError::from)?;
        let found = found.ok_or(ApiError::OrderNotFound)?;
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
    Err(ApiError::Internal(StoreError::Corrupt {
        id: order_id.to_string(),
        reason: "transition kept finding a newer updated_at".into(),
    }))
}
