//! Reading and writing the rows a batch touches, set-based (`unnest` arrays) so a batch costs
//! a dozen statements whatever its size.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use domain::{Event, EventPayload};
use sqlx::{PgConnection, Row};

use crate::apply::{fields_from_json, fields_json, DeadLetter, Incoming, Parked};
use crate::rules::{Reservation, ReservationStatus, ReservedItem, Stock};

pub(crate) async fn load_parked(
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

pub(crate) async fn load_reservations(
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
pub(crate) async fn lock_stock(
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

pub(crate) async fn write_stock(
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

pub(crate) async fn write_reservations(
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

pub(crate) async fn record_processed(tx: &mut PgConnection, applied: &[ProcessedRow]) -> Result<(), sqlx::Error> {
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

pub(crate) async fn park(tx: &mut PgConnection, parked: &[&Incoming]) -> Result<(), sqlx::Error> {
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

pub(crate) async fn record_dead_letters(tx: &mut PgConnection, dead: &[DeadLetter]) -> Result<(), sqlx::Error> {
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
