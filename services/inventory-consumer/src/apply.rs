//! Applies a batch of decoded events in one transaction: exactly once (processed_messages,
//! checkpoints) and in seq order per order (early events are parked until the gap fills).
//! An event that occurred longer than `DEDUPE_RETENTION` ago (by the database's clock) is
//! never applied: it is dead-lettered as expired, since the state that would show it applied
//! already may have been pruned ([`crate::retention`]).
//!
//! Locks are taken in one global order — checkpoint rows by aggregate id, then inventory rows
//! by sku — so concurrent replicas wait for each other instead of deadlocking.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::Event;
use sqlx::{Connection, PgConnection};

use crate::entries::{DeadLetter, Incoming, Parked};
use crate::rules::{self, Reservation};
use crate::store::batch::{
    load_and_lock_stock, lock_checkpoints, record_dead_letters, write, Loaded, Locked, Mark, ProcessedRow, TenantStock,
    Writes,
};
use crate::store::entry_failures;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
    /// Parked until its predecessor arrives.
    Deferred,
    /// Older than `DEDUPE_RETENTION`: dead-lettered, not applied.
    Expired,
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
    /// The letters of the expired events, recorded in the same transaction.
    pub expired: Vec<DeadLetter>,
}

#[tracing::instrument(name = "apply batch", skip_all, fields(events = events.len(), dead = dead.len()))]
pub async fn apply_batch(
    conn: &mut PgConnection,
    events: &[Incoming],
    dead: &[DeadLetter],
    retention: Duration,
) -> Result<BatchResult, sqlx::Error> {
    let mut tx = conn.begin().await?;
    if !dead.is_empty() {
        record_dead_letters(&mut tx, dead).await?;
        let ids: Vec<&str> = dead.iter().map(|d| d.stream_entry_id.as_str()).collect();
        entry_failures::forget(&mut tx, &ids).await?;
    }
    let result =
        if events.is_empty() { BatchResult::default() } else { apply_events(&mut tx, events, retention).await? };
    tx.commit().await?;
    Ok(result)
}

async fn apply_events(
    tx: &mut PgConnection,
    events: &[Incoming],
    retention: Duration,
) -> Result<BatchResult, sqlx::Error> {
    let aggregates: Vec<String> =
        events.iter().map(|e| e.event.aggregate_id.to_string()).collect::<BTreeSet<_>>().into_iter().collect();
    let Locked { last_seq: mut checkpoints, now } = lock_checkpoints(tx, &aggregates).await?;
    let original_checkpoints = checkpoints.clone();
    let expired_before = expiry_cutoff(now.unwrap_or_else(Utc::now), retention);
    let mut marks: HashMap<String, Mark> = HashMap::new();

    let Loaded { mut seen, mut parked, mut reservations, mut owners, mut stock } =
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
        } else if event.occurred_at < expired_before {
            result.expired.push(expired_letter(incoming, retention));
            Outcome::Expired
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
            effect(event, &mut reservations, &mut owners, &mut stock);
            Mark::add(&mut marks, event);
            processed.push(ProcessedRow::of(event));
            // The gap may have closed for events parked earlier.
            let mut next = event.seq + 1;
            while let Some(p) = parked.remove(&(aggregate.clone(), next)) {
                effect(&p.incoming.event, &mut reservations, &mut owners, &mut stock);
                Mark::add(&mut marks, &p.incoming.event);
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

    // Orders whose every event here expired leave no checkpoint behind (one with parked
    // events, or anything applied, stays).
    let empty: Vec<String> = if result.expired.is_empty() {
        Vec::new()
    } else {
        aggregates
            .iter()
            .filter(|a| checkpoints.get(*a).copied().unwrap_or(0) == 0)
            // `parked` holds the events parked before and by this batch, less those released.
            .filter(|a| !parked.keys().any(|(agg, _)| agg == *a))
            .cloned()
            .collect()
    };
    let writes = Writes {
        stock: stock
            .iter()
            .flat_map(|(tenant, rows)| rows.iter().map(move |(sku, row)| (tenant, sku, row)))
            .filter(|(tenant, sku, row)| original_stock.get(*tenant).and_then(|rows| rows.get(*sku)) != Some(*row))
            .collect(),
        reservations: reservations
            .iter()
            .filter(|(k, v)| original_reservations.get(*k) != Some(*v))
            // Every reservation has its owner: loaded with it, or set by the create that made it.
            .filter_map(|(k, v)| Some((k, owners.get(k)?, v)))
            .collect(),
        checkpoints: checkpoints.iter().filter(|(k, v)| original_checkpoints.get(*k) != Some(*v)).collect(),
        marks: &marks,
        processed: &processed,
        parked: &to_park,
        released: &released,
        empty: &empty,
    };
    record_dead_letters(tx, &result.expired).await?;
    write(tx, &writes).await?;
    Ok(result)
}

/// Events that occurred before this are expired.
fn expiry_cutoff(now: DateTime<Utc>, retention: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(retention)
        .ok()
        .and_then(|r| now.checked_sub_signed(r))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn expired_letter(incoming: &Incoming, retention: Duration) -> DeadLetter {
    let event = &incoming.event;
    DeadLetter {
        stream_entry_id: incoming.stream_id.clone(),
        event_id: Some(event.event_id.to_string()),
        aggregate_id: Some(event.aggregate_id.to_string()),
        reason: format!(
            "expired: occurred at {} (more than DEDUPE_RETENTION, {retention:?}, ago); never applied, since \
             whether it was applied already may no longer be known",
            event.occurred_at.to_rfc3339(),
        ),
        fields: incoming.fields.clone(),
    }
}

/// Applies `event` to its order's reservation and its tenant's stock. An order's stock is
/// that of the tenant of the event that created it (its reservation's owner), whatever tenant
/// later events name.
fn effect(
    event: &Event,
    reservations: &mut HashMap<String, Reservation>,
    owners: &mut HashMap<String, String>,
    stock: &mut TenantStock,
) {
    let order = event.aggregate_id.to_string();
    let tenant = owners.entry(order.clone()).or_insert_with(|| event.tenant_id.as_str().to_owned());
    let tenant_stock = stock.entry(tenant.clone()).or_default();
    if let Some(next) = rules::apply(&event.payload, reservations.get(&order), tenant_stock) {
        reservations.insert(order, next);
    }
}
