//! The rows a batch touches, read and written set-based (`unnest` arrays) so a batch costs
//! the same three statements whatever its size: lock checkpoints; read and lock stock; write.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use domain::{Event, EventPayload};
use sqlx::{PgConnection, Postgres, QueryBuilder};

use crate::entries::{fields_from_json, fields_json, DeadLetter, Incoming, Parked};
use crate::rules::{Reservation, ReservationStatus, ReservedItem, Stock};

/// Locks the checkpoints of `aggregates` (sorted), creating those that do not exist yet, and
/// returns their `last_seq`, in one statement, with the database's clock read once every lock
/// is held (see [`Locked::now`]). An existing row is locked by a no-op update, which (unlike a
/// read) acts on the latest committed version even if it was created after the statement's
/// snapshot, by another replica applying the same new order. Rows are locked in the array's
/// order, so replicas lock in one order and wait for each other rather than deadlock.
pub(crate) async fn lock_checkpoints(tx: &mut PgConnection, aggregates: &[String]) -> Result<Locked, sqlx::Error> {
    let rows = sqlx::query!(
        r#"INSERT INTO aggregate_checkpoints (aggregate_id, last_seq) SELECT id, 0 FROM unnest($1::text[]) AS id
           ON CONFLICT (aggregate_id) DO UPDATE SET last_seq = aggregate_checkpoints.last_seq
           RETURNING aggregate_id, last_seq, clock_timestamp() AS "now!""#,
        aggregates,
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut locked = Locked { last_seq: HashMap::with_capacity(rows.len()), now: None };
    for row in rows {
        locked.last_seq.insert(row.aggregate_id, row.last_seq);
        locked.now = locked.now.max(Some(row.now));
    }
    Ok(locked)
}

/// The locked checkpoints of a batch.
pub(crate) struct Locked {
    pub(crate) last_seq: HashMap<String, i64>,
    /// The database's clock after the last lock was taken: later than the start of any
    /// transaction that removed one of these orders' checkpoints before (it waited for that
    /// one), so an event judged by it is expired if that removal relied on it being so.
    pub(crate) now: Option<DateTime<Utc>>,
}

/// Stock rows by tenant, then sku.
pub(crate) type TenantStock = HashMap<String, HashMap<String, Stock>>;

/// What a batch reads once its checkpoints are locked.
pub(crate) struct Loaded {
    /// Event ids of the batch already applied.
    pub(crate) seen: HashSet<String>,
    pub(crate) parked: BTreeMap<(String, i64), Parked>,
    pub(crate) reservations: HashMap<String, Reservation>,
    /// The tenant of each order with a reservation: whose stock it holds.
    pub(crate) owners: HashMap<String, String>,
    /// The inventory rows the batch may touch, locked.
    pub(crate) stock: TenantStock,
}

/// Reads, in one statement, which of `event_ids` were applied already, the parked events and
/// reservations of `aggregates`, and locks (sorted by tenant and sku) the inventory rows of the
/// batch's orders: the tenants' skus of `events` and of the reservations read. Runs after the
/// aggregates' checkpoints are locked, which guard their parked events and reservations; the
/// stock rows' values are the latest committed, as rows locked by the statement are re-read.
pub(crate) async fn load_and_lock_stock(
    tx: &mut PgConnection,
    events: &[Incoming],
    aggregates: &[String],
) -> Result<Loaded, sqlx::Error> {
    let event_ids: Vec<String> = events.iter().map(|e| e.event.event_id.to_string()).collect();
    let wanted = created_skus(events.iter().map(|i| &i.event));
    let (tenants, skus): (Vec<String>, Vec<String>) = wanted.iter().cloned().unzip();
    // One row shape for the four tables: kind, key, seq, text, jsonb, text, tenant, bigint, bigint.
    let rows = sqlx::query!(
        r#"WITH loaded AS (
             SELECT 0 AS kind, event_id AS key, NULL::bigint AS seq, NULL::text AS a, NULL::jsonb AS j,
                    NULL::text AS b, NULL::text AS t
               FROM processed_messages WHERE event_id = ANY($1)
             UNION ALL SELECT 1, aggregate_id, seq, stream_entry_id, fields, NULL, NULL FROM parked_events
               WHERE aggregate_id = ANY($2)
             UNION ALL SELECT 2, order_id, NULL, status, items, reason, tenant_id FROM order_reservations
               WHERE order_id = ANY($2)),
           stock AS (
             SELECT i.tenant_id, i.sku, i.on_hand, i.reserved FROM inventory i
             WHERE (i.tenant_id, i.sku) IN (
                     SELECT * FROM unnest($3::text[], $4::text[])
                     UNION SELECT l.t, item->>'sku' FROM loaded l, jsonb_array_elements(l.j) AS item
                     WHERE l.kind = 2)
             ORDER BY i.tenant_id, i.sku FOR UPDATE OF i)
           SELECT kind AS "kind!", key AS "key!", seq, a, j, b, t, NULL::bigint AS on_hand, NULL::bigint AS reserved
           FROM loaded
           UNION ALL SELECT 3, sku, NULL, NULL, NULL, NULL, tenant_id, on_hand, reserved FROM stock"#,
        &event_ids,
        aggregates,
        &tenants,
        &skus,
    )
    .fetch_all(&mut *tx)
    .await?;
    // Each kind's columns are not null in its table.
    let missing = |column: &str| sqlx::Error::Decode(format!("`{column}` is null in a loaded row").into());
    let mut loaded = Loaded {
        seen: HashSet::new(),
        parked: BTreeMap::new(),
        reservations: HashMap::new(),
        owners: HashMap::new(),
        stock: HashMap::new(),
    };
    for row in rows {
        let key = row.key;
        match row.kind {
            0 => {
                loaded.seen.insert(key);
            }
            1 => {
                let seq = row.seq.ok_or_else(|| missing("seq"))?;
                let fields = fields_from_json(&row.j.ok_or_else(|| missing("j"))?);
                // Parked entries decoded once already; a row that no longer does is left alone.
                let decoded = domain::StreamEntry::from_fields(fields.iter().map(|(k, v)| (k, v)))
                    .and_then(|e| Event::try_from(&e));
                match decoded {
                    Ok(event) => {
                        let incoming = Incoming { stream_id: row.a.ok_or_else(|| missing("a"))?, event, fields };
                        loaded.parked.insert((key, seq), Parked { incoming, stored: true });
                    }
                    Err(e) => tracing::error!(aggregate_id = %key, seq, error = %e, "parked event no longer decodes"),
                }
            }
            2 => {
                let status = row.a.ok_or_else(|| missing("a"))?;
                let status = ReservationStatus::parse(&status)
                    .ok_or_else(|| sqlx::Error::Decode(format!("unknown reservation status {status}").into()))?;
                let items: Vec<ReservedItem> = serde_json::from_value(row.j.ok_or_else(|| missing("j"))?)
                    .map_err(|e| sqlx::Error::Decode(e.into()))?;
                loaded.owners.insert(key.clone(), row.t.ok_or_else(|| missing("t"))?);
                loaded.reservations.insert(key, Reservation { status, items, reason: row.b });
            }
            _ => {
                let on_hand = row.on_hand.ok_or_else(|| missing("on_hand"))?;
                let reserved = row.reserved.ok_or_else(|| missing("reserved"))?;
                let tenant = row.t.ok_or_else(|| missing("t"))?;
                loaded.stock.entry(tenant).or_default().insert(key, Stock { on_hand, reserved });
            }
        }
    }
    // A parked event is a confirm or a cancel, whose skus are its reservation's; one that
    // creates an order (a producer numbering it past 1) brings skus of its own.
    let reserved: BTreeSet<(String, String)> = loaded
        .reservations
        .iter()
        .filter_map(|(order, r)| Some((loaded.owners.get(order)?, r)))
        .flat_map(|(tenant, r)| r.items.iter().map(move |i| (tenant.clone(), i.sku.clone())))
        .collect();
    let parked_skus: Vec<(String, String)> = created_skus(loaded.parked.values().map(|p| &p.incoming.event))
        .into_iter()
        .filter(|key| !wanted.contains(key) && !reserved.contains(key))
        .collect();
    if !parked_skus.is_empty() {
        for (tenant, sku, stock) in lock_stock(tx, &parked_skus).await? {
            loaded.stock.entry(tenant).or_default().insert(sku, stock);
        }
    }
    Ok(loaded)
}

/// The (tenant, sku) pairs of the orders `events` create, sorted.
fn created_skus<'a>(events: impl Iterator<Item = &'a Event>) -> BTreeSet<(String, String)> {
    let mut skus = BTreeSet::new();
    for event in events {
        if let EventPayload::OrderCreated(c) = &event.payload {
            let tenant = event.tenant_id.as_str();
            skus.extend(c.items.iter().map(|i| (tenant.to_owned(), i.sku.as_str().to_owned())));
        }
    }
    skus
}

/// Locks (sorted by tenant and sku) the inventory rows `keys` (tenant, sku).
async fn lock_stock(
    tx: &mut PgConnection,
    keys: &[(String, String)],
) -> Result<Vec<(String, String, Stock)>, sqlx::Error> {
    let (tenants, skus): (Vec<String>, Vec<String>) = keys.iter().cloned().unzip();
    let rows = sqlx::query!(
        "SELECT tenant_id, sku, on_hand, reserved FROM inventory
         WHERE (tenant_id, sku) IN (SELECT * FROM unnest($1::text[], $2::text[]))
         ORDER BY tenant_id, sku FOR UPDATE",
        &tenants,
        &skus,
    )
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.into_iter().map(|r| (r.tenant_id, r.sku, Stock { on_hand: r.on_hand, reserved: r.reserved })).collect())
}

/// What the applied events of one order say of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark {
    pub(crate) latest: DateTime<Utc>,
    pub(crate) closed: bool,
}

impl Mark {
    /// Takes `event`, applied, into account.
    pub(crate) fn add(marks: &mut HashMap<String, Mark>, event: &Event) {
        let closed = matches!(event.payload, EventPayload::OrderCancelled(_));
        let mark = marks.entry(event.aggregate_id.to_string()).or_insert(Mark { latest: event.occurred_at, closed });
        mark.latest = mark.latest.max(event.occurred_at);
        mark.closed |= closed;
    }
}

pub(crate) struct ProcessedRow {
    event_id: String,
    aggregate_id: String,
    seq: i64,
    event_type: &'static str,
}

impl ProcessedRow {
    pub(crate) fn of(e: &Event) -> Self {
        Self {
            event_id: e.event_id.to_string(),
            aggregate_id: e.aggregate_id.to_string(),
            seq: e.seq,
            event_type: e.event_type().as_str(),
        }
    }
}

/// Everything a batch writes besides dead letters.
pub(crate) struct Writes<'a> {
    /// Changed stock rows: tenant, sku, values.
    pub(crate) stock: Vec<(&'a String, &'a String, &'a Stock)>,
    /// Changed reservations: order, its tenant, the reservation.
    pub(crate) reservations: Vec<(&'a String, &'a String, &'a Reservation)>,
    pub(crate) checkpoints: Vec<(&'a String, &'a i64)>,
    /// Of each order with events applied: the latest `occurred_at` among them, and whether one
    /// closed the order (no event can follow it).
    pub(crate) marks: &'a HashMap<String, Mark>,
    pub(crate) processed: &'a [ProcessedRow],
    pub(crate) parked: &'a [&'a Incoming],
    /// Parked events applied by this batch, whose rows go.
    pub(crate) released: &'a [(String, i64)],
    /// Checkpoints locked (created) by this batch that still say nothing was applied and
    /// guard no parked event: every event of theirs was expired. They go again.
    pub(crate) empty: &'a [String],
}

/// Writes a batch's changes in one statement, one data-modifying CTE per table with something
/// to write (a table with nothing costs the statement its opening all the same): the stock rows
/// and checkpoints were locked earlier in the transaction, and no two CTEs touch the same row
/// (an event parked and released by the same batch is never written). A batch of duplicates
/// writes nothing and sends no statement.
pub(crate) async fn write(tx: &mut PgConnection, w: &Writes<'_>) -> Result<(), sqlx::Error> {
    let mut q = Ctes::default();
    if !w.stock.is_empty() {
        q.open(
            "stock AS (UPDATE inventory i SET on_hand = u.on_hand, reserved = u.reserved, updated_at = now(), \
                                version = i.version + 1 FROM unnest(",
        );
        q.sql.push_bind(w.stock.iter().map(|(t, _, _)| t.as_str()).collect::<Vec<_>>()).push("::text[], ");
        q.sql.push_bind(w.stock.iter().map(|(_, k, _)| k.as_str()).collect::<Vec<_>>()).push("::text[], ");
        q.sql.push_bind(w.stock.iter().map(|(_, _, st)| st.on_hand).collect::<Vec<_>>()).push("::bigint[], ");
        q.sql.push_bind(w.stock.iter().map(|(_, _, st)| st.reserved).collect::<Vec<_>>());
        q.sql.push(
            "::bigint[]) AS u(tenant_id, sku, on_hand, reserved) WHERE i.tenant_id = u.tenant_id AND i.sku = u.sku)",
        );
    }
    if !w.reservations.is_empty() {
        let items =
            w.reservations.iter().map(|(_, _, r)| serde_json::to_value(&r.items)).collect::<Result<Vec<_>, _>>();
        let items = items.map_err(|e| sqlx::Error::Encode(e.into()))?;
        q.open(
            "reservations AS (INSERT INTO order_reservations (order_id, tenant_id, status, items, reason) \
                SELECT * FROM unnest(",
        );
        q.sql.push_bind(w.reservations.iter().map(|(k, _, _)| k.as_str()).collect::<Vec<_>>()).push("::text[], ");
        q.sql.push_bind(w.reservations.iter().map(|(_, t, _)| t.as_str()).collect::<Vec<_>>()).push("::text[], ");
        q.sql
            .push_bind(w.reservations.iter().map(|(_, _, r)| r.status.as_str()).collect::<Vec<_>>())
            .push("::text[], ");
        q.sql.push_bind(items).push("::jsonb[], ");
        q.sql.push_bind(w.reservations.iter().map(|(_, _, r)| r.reason.clone()).collect::<Vec<_>>());
        q.sql.push("::text[]) ON CONFLICT (order_id) DO UPDATE SET status = excluded.status, updated_at = now())");
    }
    if !w.checkpoints.is_empty() {
        let mark = |k: &String| w.marks.get(k).copied();
        q.open(
            "checkpoints AS (UPDATE aggregate_checkpoints c SET last_seq = u.last_seq, updated_at = now(), \
                    last_occurred_at = GREATEST(c.last_occurred_at, u.occurred_at), closed = c.closed OR u.closed \
                FROM unnest(",
        );
        q.sql.push_bind(w.checkpoints.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>()).push("::text[], ");
        q.sql.push_bind(w.checkpoints.iter().map(|(_, v)| **v).collect::<Vec<_>>()).push("::bigint[], ");
        q.sql.push_bind(w.checkpoints.iter().map(|(k, _)| mark(k).map(|m| m.latest)).collect::<Vec<_>>());
        q.sql.push("::timestamptz[], ");
        q.sql.push_bind(w.checkpoints.iter().map(|(k, _)| mark(k).is_some_and(|m| m.closed)).collect::<Vec<_>>());
        q.sql
            .push("::bool[]) AS u(aggregate_id, last_seq, occurred_at, closed) WHERE c.aggregate_id = u.aggregate_id)");
    }
    if !w.processed.is_empty() {
        q.open(
            "processed AS (INSERT INTO processed_messages (event_id, aggregate_id, seq, event_type) \
                SELECT * FROM unnest(",
        );
        q.sql.push_bind(w.processed.iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>()).push("::text[], ");
        q.sql.push_bind(w.processed.iter().map(|e| e.aggregate_id.as_str()).collect::<Vec<_>>()).push("::text[], ");
        q.sql.push_bind(w.processed.iter().map(|e| e.seq).collect::<Vec<_>>()).push("::bigint[], ");
        q.sql.push_bind(w.processed.iter().map(|e| e.event_type).collect::<Vec<_>>());
        q.sql.push("::text[]) ON CONFLICT (event_id) DO NOTHING)");
    }
    if !w.parked.is_empty() {
        q.open(
            "parked AS (INSERT INTO parked_events (aggregate_id, seq, event_id, stream_entry_id, fields) \
                SELECT * FROM unnest(",
        );
        q.sql
            .push_bind(w.parked.iter().map(|i| i.event.aggregate_id.to_string()).collect::<Vec<_>>())
            .push("::text[], ");
        q.sql.push_bind(w.parked.iter().map(|i| i.event.seq).collect::<Vec<_>>()).push("::bigint[], ");
        q.sql.push_bind(w.parked.iter().map(|i| i.event.event_id.to_string()).collect::<Vec<_>>()).push("::text[], ");
        q.sql.push_bind(w.parked.iter().map(|i| i.stream_id.as_str()).collect::<Vec<_>>()).push("::text[], ");
        q.sql.push_bind(w.parked.iter().map(|i| fields_json(&i.fields)).collect::<Vec<_>>());
        q.sql.push("::jsonb[]) ON CONFLICT ON CONSTRAINT parked_events_pkey DO NOTHING)");
    }
    if !w.released.is_empty() {
        q.open("released AS (DELETE FROM parked_events p USING unnest(");
        q.sql.push_bind(w.released.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>()).push("::text[], ");
        q.sql.push_bind(w.released.iter().map(|(_, sq)| *sq).collect::<Vec<_>>());
        q.sql.push("::bigint[]) AS r(aggregate_id, seq) WHERE p.aggregate_id = r.aggregate_id AND p.seq = r.seq)");
    }
    if !w.empty.is_empty() {
        q.open("empty AS (DELETE FROM aggregate_checkpoints WHERE aggregate_id = ANY(");
        q.sql.push_bind(w.empty.iter().map(String::as_str).collect::<Vec<_>>());
        q.sql.push("::text[]) AND last_seq = 0)");
    }
    if q.parts == 0 {
        return Ok(());
    }
    q.sql.push(" SELECT 1");
    q.sql.build().execute(&mut *tx).await.map(|_| ())
}

/// `WITH a AS (…), b AS (…) …`, one common table expression per part a batch needs
/// ([`QueryBuilder`] numbers the parameters).
struct Ctes<'a> {
    sql: QueryBuilder<'a, Postgres>,
    parts: usize,
}

impl Default for Ctes<'_> {
    fn default() -> Self {
        Self { sql: QueryBuilder::new("WITH "), parts: 0 }
    }
}

impl Ctes<'_> {
    /// Starts the next part with `opening`.
    fn open(&mut self, opening: &str) {
        if self.parts > 0 {
            self.sql.push(", ");
        }
        self.sql.push(opening);
        self.parts += 1;
    }
}

/// Whether `event` was applied already: its event id is recorded, or its order's checkpoint
/// is at or past its seq.
pub(crate) async fn already_applied(conn: &mut PgConnection, event: &Event) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM processed_messages WHERE event_id = $1)
               OR EXISTS (SELECT 1 FROM aggregate_checkpoints WHERE aggregate_id = $2 AND last_seq >= $3)
             AS "applied!""#,
        event.event_id.to_string(),
        event.aggregate_id.to_string(),
        event.seq,
    )
    .fetch_one(conn)
    .await
}

pub(crate) async fn record_dead_letters(tx: &mut PgConnection, dead: &[DeadLetter]) -> Result<(), sqlx::Error> {
    if dead.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        "INSERT INTO dead_letters (stream_entry_id, event_id, aggregate_id, reason, fields)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[])
         ON CONFLICT ON CONSTRAINT dead_letters_stream_entry_unique DO NOTHING",
        &dead.iter().map(|d| d.stream_entry_id.clone()).collect::<Vec<_>>(),
        &dead.iter().map(|d| d.event_id.clone()).collect::<Vec<_>>() as _,
        &dead.iter().map(|d| d.aggregate_id.clone()).collect::<Vec<_>>() as _,
        &dead.iter().map(|d| d.reason.clone()).collect::<Vec<_>>(),
        &dead.iter().map(|d| fields_json(&d.fields)).collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await
    .map(|_| ())
}
