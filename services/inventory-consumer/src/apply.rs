//! Applies a batch of decoded events in one transaction: exactly once (processed_messages,
//! checkpoints) and in seq order per order (early events are parked until the gap fills).
//!
//! Locks are taken in one global order — checkpoint rows by aggregate id, then inventory rows
//! by sku — so concurrent replicas wait for each other instead of deadlocking.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use domain::Event;
use sqlx::{Connection, PgConnection};

use crate::rows::{load_and_lock_stock, lock_checkpoints, record_dead_letters, write, Loaded, ProcessedRow, Writes};
use crate::rules::{self, Reservation, Stock};

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
pub(crate) struct Parked {
    pub(crate) incoming: Incoming,
    pub(crate) stored: bool,
}

#[tracing::instrument(name = "apply batch", skip_all, fields(events = events.len(), dead = dead.len()))]
pub async fn apply_batch(
    conn: &mut PgConnection,
    events: &[Incoming],
    dead: &[DeadLetter],
) -> Result<BatchResult, sqlx::Error> {
    let mut tx = conn.begin().await?;
    record_dead_letters(&mut tx, dead).await?;
    let result = if events.is_empty() { BatchResult::default() } else { apply_events(&mut tx, events).await? };
    tx.commit().await?;
    Ok(result)
}

async fn apply_events(tx: &mut PgConnection, events: &[Incoming]) -> Result<BatchResult, sqlx::Error> {
    let aggregates: Vec<String> =
        events.iter().map(|e| e.event.aggregate_id.to_string()).collect::<BTreeSet<_>>().into_iter().collect();
    let mut checkpoints = lock_checkpoints(tx, &aggregates).await?;
    let original_checkpoints = checkpoints.clone();

    let Loaded { mut seen, mut parked, mut reservations, mut stock } =
        load_and_lock_stock(tx, events, &aggregates).await?;
    let original_reservations = reservations.clone();
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

    let writes = Writes {
        stock: stock.iter().filter(|(k, v)| original_stock.get(*k) != Some(*v)).collect(),
        reservations: reservations.iter().filter(|(k, v)| original_reservations.get(*k) != Some(*v)).collect(),
        checkpoints: checkpoints.iter().filter(|(k, v)| original_checkpoints.get(*k) != Some(*v)).collect(),
        processed: &processed,
        parked: &to_park,
        released: &released,
    };
    write(tx, &writes).await?;
    Ok(result)
}

fn effect(event: &Event, reservations: &mut HashMap<String, Reservation>, stock: &mut HashMap<String, Stock>) {
    let order = event.aggregate_id.to_string();
    if let Some(next) = rules::apply(&event.payload, reservations.get(&order), stock) {
        reservations.insert(order, next);
    }
}
