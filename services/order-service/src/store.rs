//! SQL on the `orders` table and the outbox write of an order event.

use chrono::{DateTime, Utc};
use domain::{EventPayload, LineItem, Order, OrderId, OrderStatus};
use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor, PgPool};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("outbox append failed")]
    Outbox(#[from] outbox::OutboxError),
    #[error("stored order {id} is unreadable: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("encoding a response failed")]
    Encode(#[from] serde_json::Error),
}

impl StoreError {
    /// Whether the failure is the database being unreachable or overloaded (worth a retry by
    /// the client) rather than a fault in this service.
    pub fn is_unavailable(&self) -> bool {
        let e = match self {
            Self::Database(e) | Self::Outbox(outbox::OutboxError::Database(e)) => e,
            Self::Corrupt { .. } | Self::Encode(_) => return false,
        };
        match e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                // 08: connection exceptions; 57P0x: server shutting down / starting; 53300: too
                // many connections; 3D000: database missing; 40001/40P01: serialization failure
                // or deadlock; 57014: statement cancelled.
                code.starts_with("08")
                    || code.starts_with("57P0")
                    || ["53300", "3D000", "40001", "40P01", "57014"].contains(&code.as_ref())
            }),
            _ => false,
        }
    }
}

#[derive(sqlx::FromRow)]
struct OrderRow {
    id: String,
    customer_id: String,
    status: String,
    items: Json<Vec<LineItem>>,
    total_cents: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<OrderRow> for Order {
    type Error = StoreError;
    fn try_from(row: OrderRow) -> Result<Self, StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt { id: row.id.clone(), reason: reason.to_owned() };
        Ok(Order {
            id: row.id.parse().map_err(|_| corrupt("id is not a ULID"))?,
            customer_id: domain::CustomerId::parse(row.customer_id.as_str()).map_err(|_| corrupt("bad customer_id"))?,
            status: OrderStatus::parse(&row.status).ok_or_else(|| corrupt("unknown status"))?,
            items: row.items.0,
            total_cents: row.total_cents,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

const COLUMNS: &str = "id, customer_id, status, items, total_cents, created_at, updated_at";

/// The order row of [`insert_order`], written in the outbox append's statement; its
/// parameters follow the append's own.
const CREATED_CTE: &str = "created AS (INSERT INTO orders \
     (id, customer_id, status, items, total_cents, created_at, updated_at) \
     VALUES ($9, $10, $11, $12, $13, $14, $15))";
const _: () = assert!(outbox::FIRST_CALLER_PARAM == 9, "CREATED_CTE numbers its parameters from $9");

/// Inserts a new order and its `OrderCreated` event in one statement: atomic by itself, so
/// `executor` may be the pool (one round trip, no explicit transaction) or a transaction.
#[tracing::instrument(skip_all, fields(order_id = %order.id, db.system = "postgresql"))]
pub async fn insert_order<'c>(executor: impl PgExecutor<'c>, order: &Order) -> Result<outbox::Appended, StoreError> {
    let payload = EventPayload::created(order);
    let aggregate_id = order.id.to_string();
    let json = payload.to_json();
    let event = outbox::NewEvent {
        aggregate_type: domain::AGGREGATE_TYPE,
        aggregate_id: &aggregate_id,
        event_type: payload.event_type().as_str(),
        payload: &json,
        occurred_at: order.created_at,
    };
    let appended = outbox::append_with(executor, event, Some(CREATED_CTE), |q| {
        q.bind(order.id.to_string())
            .bind(order.customer_id.as_str().to_owned())
            .bind(order.status.as_str())
            .bind(Json(order.items.clone()))
            .bind(order.total_cents)
            .bind(order.created_at)
            .bind(order.updated_at)
    })
    .await?;
    Ok(appended)
}

#[tracing::instrument(skip_all, fields(%order_id, db.system = "postgresql"))]
pub async fn find_order(pool: &PgPool, order_id: OrderId) -> Result<Option<Order>, StoreError> {
    let row: Option<OrderRow> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM orders WHERE id = $1"))
        .bind(order_id.to_string())
        .fetch_optional(pool)
        .await?;
    row.map(Order::try_from).transpose()
}

/// Reads the order and locks its row until the transaction ends, so concurrent transitions of
/// one order run one after another, each seeing the status the previous one committed.
#[tracing::instrument(skip_all, fields(%order_id, db.system = "postgresql"))]
pub async fn lock_order(conn: &mut PgConnection, order_id: OrderId) -> Result<Option<Order>, StoreError> {
    let row: Option<OrderRow> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM orders WHERE id = $1 FOR UPDATE"))
        .bind(order_id.to_string())
        .fetch_optional(conn)
        .await?;
    row.map(Order::try_from).transpose()
}

#[tracing::instrument(skip_all, fields(%order_id, status = status.as_str(), db.system = "postgresql"))]
pub async fn update_status(
    conn: &mut PgConnection,
    order_id: OrderId,
    status: OrderStatus,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE orders SET status = $2, updated_at = $3 WHERE id = $1")
        .bind(order_id.to_string())
        .bind(status.as_str())
        .bind(at)
        .execute(conn)
        .await?;
    Ok(())
}

/// Appends the order event to the outbox in the caller's transaction.
pub async fn append_event(
    conn: &mut PgConnection,
    payload: &EventPayload,
    occurred_at: DateTime<Utc>,
) -> Result<outbox::Appended, StoreError> {
    let aggregate_id = payload.order_id().to_string();
    let json = payload.to_json();
    let appended = outbox::append(
        conn,
        outbox::NewEvent {
            aggregate_type: domain::AGGREGATE_TYPE,
            aggregate_id: &aggregate_id,
            event_type: payload.event_type().as_str(),
            payload: &json,
            occurred_at,
        },
    )
    .await?;
    Ok(appended)
}
