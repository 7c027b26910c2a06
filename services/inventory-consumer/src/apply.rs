//! Applies a batch of decoded events in one transaction: exactly once (processed_messages,
//! checkpoints) and in seq order per order (early events are parked until the gap fills).
//!
//! Locks are taken in one global order — checkpoint rows by aggregate id, then inventory rows
//! by sku — so concurrent replicas wait for each other instead of deadlocking.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use domain::{Event, EventPayload};
use sqlx::{PgConnection, PgPool, Row};

use crate::rules::{self, Reservation, ReservationStatus, ReservedItem, Stock};

/// A decoded entry, with its fields as read (kept for parking).
#[derive(Debug, Clone)]
pub struct Incoming {
    pub stream_id: String,
    pub event: Event,
    pub fields: Vec<(String, Vec<u8>)>,
}

/// An entry that cannot be applied, recorded with its reason.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub stream_entry_id: String,
    pub event_id: Option<String>,
    pub aggregate_id: Option<String>,
    pub reason: String,
    pub fields: Vec<(String, Vec<u8>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
    /// Parked until its predecessor arrives.
    Deferred,
}

/// An event whose effect was committed (an incoming one or a parked one it released).
#[derive(Debug, Clone)]
pub struct Applied {
    pub event_id: String,
    pub occurred_at: DateTime<Utc>,
}

#[derive(Debug, Default)]
pub struct BatchResult {
    /// One per incoming event, in order.
    pub outcomes: Vec<Outcome>,
    pub applied: Vec<Applied>,
}

/// Fields as JSON `[[name, value], ...]` (values as UTF-8, lossily).
pub fn fields_json(fields: &[(String, Vec<u8>)]) -> serde_json::Value {
    fields.iter().map(|(k, v)| serde_json::json!([k, String::from_utf8_lossy(v)])).collect()
}

/// The inverse of [`fields_json`].
pub fn fields_from_json(value: &serde_json::Value) -> Vec<(String, Vec<u8>)> {
    let pairs = value.as_array().map(Vec::as_slice).unwrap_or_default();
    pairs
        .iter()
        .filter_map(|p| Some((p.get(0)?.as_str()?.to_owned(), p.get(1)?.as_str()?.as_bytes().to_vec())))
        .collect()
}

/// A parked event in memory; `stored` tells whether its row exists (it may have been parked by
/// this very batch).
struct Parked {
    incoming: Incoming,
    stored: bool,
}

#[tracing::instrument(name = "apply batch", skip_all, fields(events = events.len(), dead = dead.len()))]
pub async fn apply_batch(pool: &PgPool, events: &[Incoming], dead: &[DeadLetter]) -> Result<BatchResult, sqlx::Error> {
    let mut tx = pool.begin().await?;
    record_dead_letters(&mut tx, dead).await?;
    let result = if events.is_empty() { BatchResult::default() } else { apply_events(&mut tx, events).await? };
    tx.commit().await?;
    Ok(result)
}

async fn apply_events(tx: &mut PgConnection, events: &[Incoming]) -> Result<BatchResult, sqlx::Error> {
    let aggregates: Vec<String> =
        events.iter().map(|e| e.event.aggregate_id.to_string()).collect::<BTreeSet<_>>().into_iter().collect();
    sqlx::query(
        "INSERT INTO aggregate_checkpoints (aggregate_id, last_seq) SELECT id, 0 FROM unnest($1::text[]) AS id \
         ON CONFLICT (aggregate_id) DO NOTHING",
    )
    .bind(&aggregates)
    .execute(&mut *tx)
    .await?;
    let mut checkpoints: HashMap<String, i64> = sqlx::query(
        "SELECT aggregate_id, last_seq FROM aggregate_checkpoints WHERE aggregate_id = ANY($1) \
         ORDER BY aggregate_id FOR UPDATE",
    )
    .bind(&aggregates)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
    .collect::<Result<_, sqlx::Error>>()?;
    let original_checkpoints = checkpoints.clone();

    let event_ids: Vec<String> = events.iter().map(|e| e.event.event_id.to_string()).collect();
    let mut seen: HashSet<String> =
        sqlx::query_scalar("SELECT event_id FROM processed_messages WHERE event_id = ANY($1)")
            .bind(&event_ids)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
    let mut parked = load_parked(tx, &aggregates).await?;
    let mut reservations = load_reservations(tx, &aggregates).await?;
    let original_reservations = reservations.clone();
    let mut stock = lock_stock(tx, events, &parked, &reservations).await?;
    let original_stock = stock.clone();

    let mut result = BatchResult::default();
    let mut processed: Vec<ProcessedRow> = Vec::new();
    let mut released: Vec<(String, i64)> = Vec::new();
    let mut to_park: Vec<&Incoming> = Vec::new();
    for incoming in events {
        let event = &incoming.event;
        let aggregate = event.aggregate_id.to_string();
        let last = checkpoints.get(&aggregate).copied().unwrap_or(0);
        let outcome = if !seen.insert(event.event_id.to_string()) || event.seq <= last {
            Outcome::Duplicate
        } else if event.seq > last + 1 {
            match parked.entry((aggregate, event.seq)) {
                std::collections::btree_map::Entry::Occupied(_) => Outcome::Duplicate,
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(Parked { incoming: incoming.clone(), stored: false });
                    to_park.push(incoming);
                    Outcome::Deferred
                }
            }
        } else {
            effect(event, &mut reservations, &mut stock);
            processed.push(ProcessedRow::of(event));
            // The gap may have closed for events parked earlier.
            let mut next = event.seq + 1;
            while let Some(p) = parked.remove(&(aggregate.clone(), next)) {
                effect(&p.incoming.event, &mut reservations, &mut stock);
                seen.insert(p.incoming.event.event_id.to_string());
                result.applied.push(Applied {
                    event_id: p.incoming.event.event_id.to_string(),
                    occurred_at: p.incoming.event.occurred_at,
                });
                if p.stored {
                    released.push((aggregate.clone(), next));
                } else {
                    to_park.retain(|i| i.event.event_id != p.incoming.event.event_id);
                }
                processed.push(ProcessedRow::of(&p.incoming.event));
                next += 1;
            }
            checkpoints.insert(aggregate, next - 1);
            Outcome::Applied
        };
        if outcome == Outcome::Applied {
            result.applied.push(Applied { event_id: event.event_id.to_string(), occurred_at: event.occurred_at });
        }
        result.outcomes.push(outcome);
    }

    write_stock(tx, &stock, &original_stock).await?;
    write_reservations(tx, &reservations, &original_reservations).await?;
    let changed: Vec<(&String, &i64)> =
        checkpoints.iter().filter(|(k, v)| original_checkpoints.get(*k) != Some(*v)).collect();
    sqlx::query(
        "UPDATE aggregate_checkpoints c SET last_seq = u.last_seq, updated_at = now() \
         FROM unnest($1::text[], $2::bigint[]) AS u(aggregate_id, last_seq) WHERE c.aggregate_id = u.aggregate_id",
    )
    .bind(changed.iter().map(|(k, _)| (*k).clone()).collect::<Vec<_>>())
    .bind(changed.iter().map(|(_, v)| **v).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    record_processed(tx, &processed).await?;
    park(tx, &to_park).await?;
    sqlx::query(
        "DELETE FROM parked_events p USING unnest($1::text[], $2::bigint[]) AS r(aggregate_id, seq) \
         WHERE p.aggregate_id = r.aggregate_id AND p.seq = r.seq",
    )
    .bind(released.iter().map(|(a, _)| a.clone()).collect::<Vec<_>>())
    .bind(released.iter().map(|(_, s)| *s).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(result)
}

fn effect(event: &Event, reservations: &mut HashMap<String, Reservation>, stock: &mut HashMap<String, Stock>) {
    let order = event.aggregate_id.to_string();
    if let Some(next) = rules::apply(&event.payload, reservations.get(&order), stock) {
        reservations.insert(order, next);
    }
}

async fn load_parked(
    tx: &mut PgConnection,
    aggregates: &[String],
) -> Result<BTreeMap<(String, i64), Parked>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT aggregate_id, seq, stream_entry_id, fields FROM parked_events WHERE aggregate_id = ANY($1)",
    )
    .bind(aggregates)
    .fetch_all(&mut *tx)
    .await?;
    let mut out = BTreeMap::new();
    for row in rows {
        let (aggregate, seq): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
        let fields = fields_from_json(&row.try_get::<serde_json::Value, _>(3)?);
        // Parked entries decoded once already; a row that no longer does is left alone.
        let decoded =
            domain::StreamEntry::from_fields(fields.iter().map(|(k, v)| (k, v))).and_then(|e| Event::try_from(&e));
        match decoded {
            Ok(event) => {
                let incoming = Incoming { stream_id: row.try_get(2)?, event, fields };
                out.insert((aggregate, seq), Parked { incoming, stored: true });
            }
            Err(e) => tracing::error!(aggregate_id = %aggregate, seq, error = %e, "parked event no longer decodes"),
        }
    }
    Ok(out)
}

async fn load_reservations(
    tx: &mut PgConnection,
    aggregates: &[String],
) -> Result<HashMap<String, Reservation>, sqlx::Error> {
    let rows = sqlx::query("SELECT order_id, status, items, reason FROM order_reservations WHERE order_id = ANY($1)")
        .bind(aggregates)
        .fetch_all(&mut *tx)
        .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for row in rows {
        let status: String = row.try_get(1)?;
        let status = ReservationStatus::parse(&status)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown reservation status {status}").into()))?;
        let items: Vec<ReservedItem> =
            serde_json::from_value(row.try_get(2)?).map_err(|e| sqlx::Error::Decode(e.into()))?;
        out.insert(row.try_get(0)?, Reservation { status, items, reason: row.try_get(3)? });
    }
    Ok(out)
}

/// Locks (sorted by sku) the inventory rows every event of the batch may touch.
async fn lock_stock(
    tx: &mut PgConnection,
    events: &[Incoming],
    parked: &BTreeMap<(String, i64), Parked>,
    reservations: &HashMap<String, Reservation>,
) -> Result<HashMap<String, Stock>, sqlx::Error> {
    let mut skus = BTreeSet::new();
    let created = events.iter().map(|i| &i.event).chain(parked.values().map(|p| &p.incoming.event));
    for event in created {
        if let EventPayload::OrderCreated(c) = &event.payload {
            skus.extend(c.items.iter().map(|i| i.sku.as_str().to_owned()));
        }
    }
    for r in reservations.values() {
        skus.extend(r.items.iter().map(|i| i.sku.clone()));
    }
    let skus: Vec<String> = skus.into_iter().collect();
    sqlx::query("SELECT sku, on_hand, reserved FROM inventory WHERE sku = ANY($1) ORDER BY sku FOR UPDATE")
        .bind(&skus)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| Ok((r.try_get(0)?, Stock { on_hand: r.try_get(1)?, reserved: r.try_get(2)? })))
        .collect()
}

async fn write_stock(
    tx: &mut PgConnection,
    stock: &HashMap<String, Stock>,
    original: &HashMap<String, Stock>,
) -> Result<(), sqlx::Error> {
    let changed: Vec<(&String, &Stock)> = stock.iter().filter(|(k, v)| original.get(*k) != Some(*v)).collect();
    if changed.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE inventory i SET on_hand = u.on_hand, reserved = u.reserved, updated_at = now() \
         FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS u(sku, on_hand, reserved) WHERE i.sku = u.sku",
    )
    .bind(changed.iter().map(|(k, _)| (*k).clone()).collect::<Vec<_>>())
    .bind(changed.iter().map(|(_, s)| s.on_hand).collect::<Vec<_>>())
    .bind(changed.iter().map(|(_, s)| s.reserved).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await
    .map(|_| ())
}

async fn write_reservations(
    tx: &mut PgConnection,
    now: &HashMap<String, Reservation>,
    original: &HashMap<String, Reservation>,
) -> Result<(), sqlx::Error> {
    let changed: Vec<(&String, &Reservation)> = now.iter().filter(|(k, v)| original.get(*k) != Some(*v)).collect();
    if changed.is_empty() {
        return Ok(());
    }
    let items = changed.iter().map(|(_, r)| serde_json::to_value(&r.items)).collect::<Result<Vec<_>, _>>();
    sqlx::query(
        "INSERT INTO order_reservations (order_id, status, items, reason) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::text[]) \
         ON CONFLICT (order_id) DO UPDATE SET status = excluded.status, updated_at = now()",
    )
    .bind(changed.iter().map(|(k, _)| (*k).clone()).collect::<Vec<_>>())
    .bind(changed.iter().map(|(_, r)| r.status.as_str()).collect::<Vec<_>>())
    .bind(items.map_err(|e| sqlx::Error::Encode(e.into()))?)
    .bind(changed.iter().map(|(_, r)| r.reason.clone()).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await
    .map(|_| ())
}

struct ProcessedRow {
    event_id: String,
    aggregate_id: String,
    seq: i64,
    event_type: &'static str,
}

impl ProcessedRow {
    fn of(e: &Event) -> Self {
        Self {
            event_id: e.event_id.to_string(),
            aggregate_id: e.aggregate_id.to_string(),
            seq: e.seq,
            event_type: e.event_type().as_str(),
        }
    }
}

async fn record_processed(tx: &mut PgConnection, applied: &[ProcessedRow]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO processed_messages (event_id, aggregate_id, seq, event_type) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(applied.iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>())
    .bind(applied.iter().map(|e| e.aggregate_id.as_str()).collect::<Vec<_>>())
    .bind(applied.iter().map(|e| e.seq).collect::<Vec<_>>())
    .bind(applied.iter().map(|e| e.event_type).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await
    .map(|_| ())
}

async fn park(tx: &mut PgConnection, parked: &[&Incoming]) -> Result<(), sqlx::Error> {
    if parked.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO parked_events (aggregate_id, seq, event_id, stream_entry_id, fields) \
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::jsonb[]) \
         ON CONFLICT ON CONSTRAINT parked_events_pkey DO NOTHING",
    )
    .bind(parked.iter().map(|i| i.event.aggregate_id.to_string()).collect::<Vec<_>>())
    .bind(parked.iter().map(|i| i.event.seq).collect::<Vec<_>>())
    .bind(parked.iter().map(|i| i.event.event_id.to_string()).collect::<Vec<_>>())
    .bind(parked.iter().map(|i| i.stream_id.clone()).collect::<Vec<_>>())
    .bind(parked.iter().map(|i| fields_json(&i.fields)).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await
    .map(|_| ())
}

async fn record_dead_letters(tx: &mut PgConnection, dead: &[DeadLetter]) -> Result<(), sqlx::Error> {
    if dead.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO dead_letters (stream_entry_id, event_id, aggregate_id, reason, fields) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[]) \
         ON CONFLICT ON CONSTRAINT dead_letters_stream_entry_unique DO NOTHING",
    )
    .bind(dead.iter().map(|d| d.stream_entry_id.clone()).collect::<Vec<_>>())
    .bind(dead.iter().map(|d| d.event_id.clone()).collect::<Vec<_>>())
    .bind(dead.iter().map(|d| d.aggregate_id.clone()).collect::<Vec<_>>())
    .bind(dead.iter().map(|d| d.reason.clone()).collect::<Vec<_>>())
    .bind(dead.iter().map(|d| fields_json(&d.fields)).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await
    .map(|_| ())
}
