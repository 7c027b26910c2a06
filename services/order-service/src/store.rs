//! SQL on the `orders` table and the outbox write of an order event.

use chrono::{DateTime, Utc};
use domain::{
    EventPayload, LineItem, Order, OrderCancelled, OrderConfirmed, OrderId, OrderStatus, TenantId, Transition,
};
use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor};

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
    /// The database driver's error, if the failure came from it.
    pub fn database(&self) -> Option<&sqlx::Error> {
        match self {
            Self::Database(e) | Self::Outbox(outbox::OutboxError::Database(e)) => Some(e),
            Self::Corrupt { .. } | Self::Encode(_) => None,
        }
    }

    /// The failure's class ([`service_kit::failure`]): transient ones (the database
    /// unreachable, overloaded, a lock or statement timeout, a conflict) are worth a retry by
    /// the client; others are faults of this service.
    pub fn class(&self) -> service_kit::FailureClass {
        match self.database() {
            Some(e) => service_kit::failure::of_postgres(e),
            None => service_kit::FailureClass::bug,
        }
    }
}

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

/// The outbox event of `payload`, for the order `aggregate_id`, its JSON being `json`.
fn order_event<'a>(
    payload: &EventPayload,
    aggregate_id: &'a str,
    json: &'a str,
    occurred_at: DateTime<Utc>,
    notify: bool,
) -> outbox::Stamped<'a> {
    outbox::NewEvent {
        aggregate_type: domain::AGGREGATE_TYPE,
        aggregate_id,
        event_type: payload.event_type().as_str(),
        payload: json,
        occurred_at,
        notify,
    }
    .stamp()
}

/// Inserts a new order of `tenant` and its `OrderCreated` event in one statement, in a
/// transaction of that tenant ([`service_kit::tenancy`]; the event takes its tenant from it).
/// `notify`: the transaction wakes the relays at its commit.
#[tracing::instrument(skip_all, fields(order_id = %order.id, db.system = "postgresql"))]
pub async fn insert_order<'c>(
    executor: impl PgExecutor<'c>,
    tenant: &TenantId,
    order: &Order,
    notify: bool,
) -> Result<outbox::Appended, StoreError> {
    let payload = EventPayload::created(order);
    let aggregate_id = order.id.to_string();
    let json = payload.to_json();
    let event = order_event(&payload, &aggregate_id, &json, order.created_at, notify);
    // The order row and its first event, `outbox_append`ed with the order's `version` (1) as seq.
    let insert = sqlx::query_scalar!(
        "WITH created AS (
           INSERT INTO orders (id, customer_id, status, items, total_cents, created_at, updated_at, tenant_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $9)
           RETURNING version)
         SELECT outbox_append($8, created.version) AS seq FROM created",
        &aggregate_id,
        order.customer_id.as_str(),
        order.status.as_str(),
        Json(&order.items) as _,
        order.total_cents,
        order.created_at,
        order.updated_at,
        &event as _,
        tenant.as_str(),
    );
    let seq = event.run(insert.fetch_one(executor)).await?;
    // The statement returns the event's seq: a created order always has its event.
    event.appended(seq).ok_or(StoreError::Database(sqlx::Error::RowNotFound))
}

#[tracing::instrument(skip_all, fields(%order_id, db.system = "postgresql"))]
pub async fn find_order(
    conn: &mut PgConnection,
    tenant: &TenantId,
    order_id: OrderId,
) -> Result<Option<Order>, StoreError> {
    let row = sqlx::query_as!(
        OrderRow,
        r#"SELECT id, customer_id, status, items AS "items: Json<Vec<LineItem>>", total_cents, created_at, updated_at
           FROM orders WHERE id = $1 AND tenant_id = $2"#,
        order_id.to_string(),
        tenant.as_str(),
    )
    .fetch_optional(conn)
    .await?;
    row.map(Order::try_from).transpose()
}

/// What [`transition_order`] found and did.
pub struct Transitioned {
    /// The order as it was, locked, before the statement changed it.
    pub before: Order,
    /// The event, if the order moved.
    pub appended: Option<outbox::Appended>,
}

/// Moves the order along `transition` and appends its event, in one statement (in a
/// transaction of `tenant`): the order row is locked, updated if its status allows, and the
/// event written only if it was (`notify`: with the relays' wake-up).
/// `None` if the tenant has no such order. The caller checks `before` against the state machine: a
/// transition that should have happened but did not means `at` is older than the order's
/// `updated_at`, and is retried with a later time.
#[tracing::instrument(skip_all, fields(%order_id, db.system = "postgresql"))]
pub async fn transition_order(
    conn: &mut PgConnection,
    tenant: &TenantId,
    order_id: OrderId,
    transition: Transition,
    at: DateTime<Utc>,
    notify: bool,
) -> Result<Option<Transitioned>, StoreError> {
    let (from, next): (Vec<&str>, Vec<&str>) = OrderStatus::ALL
        .iter()
        .filter_map(|s| match s.apply(transition) {
            Ok(Some(next)) => Some((s.as_str(), next.as_str())),
            _ => None,
        })
        .unzip();
    let payload = match transition {
        Transition::Confirm => EventPayload::OrderConfirmed(OrderConfirmed { order_id }),
        Transition::Cancel => EventPayload::OrderCancelled(OrderCancelled { order_id }),
    };
    let aggregate_id = order_id.to_string();
    let json = payload.to_json();
    let event = order_event(&payload, &aggregate_id, &json, at, notify);
    // Lock the order (`cur`, as last committed), and move it to the status its current one
    // leads to (`$3` from-statuses, `$4` their next statuses) and its next version, unless its
    // `updated_at` is later than the new one (`$2`, the event time; a clock behind the last
    // writer's). If it moved, its event is written with the new version as seq. Returns the
    // order as locked, and the seq if the event was written.
    let transition = sqlx::query!(
        r#"WITH cur AS (
             SELECT id, customer_id, status, items, total_cents, created_at, updated_at
             FROM orders WHERE id = $1 AND tenant_id = $6 FOR UPDATE),
           moved AS (
             UPDATE orders o SET status = m.next, updated_at = $2, version = o.version + 1
             FROM cur JOIN unnest($3::text[], $4::text[]) AS m(from_status, next) ON m.from_status = cur.status
             WHERE o.id = cur.id AND cur.updated_at <= $2
             RETURNING o.version)
           SELECT id AS "id!", customer_id AS "customer_id!", status AS "status!",
                  items AS "items!: Json<Vec<LineItem>>", total_cents AS "total_cents!",
                  created_at AS "created_at!", updated_at AS "updated_at!",
                  (SELECT outbox_append($5, moved.version) FROM moved) AS seq
           FROM cur"#,
        &aggregate_id,
        at,
        &from as _,
        &next as _,
        &event as _,
        tenant.as_str(),
    );
    let Some(row) = event.run(transition.fetch_optional(conn)).await? else {
        return Ok(None);
    };
    let before = Order::try_from(OrderRow {
        id: row.id,
        customer_id: row.customer_id,
        status: row.status,
        items: row.items,
        total_cents: row.total_cents,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })?;
    Ok(Some(Transitioned { before, appended: event.appended(row.seq) }))
}
