//! The ledger checker: compares what the API acknowledged with what the orders database, the
//! stream and the inventory database hold after the drain.

use std::collections::{HashMap, HashSet};

use sqlx::PgPool;

use super::model::{expected_stock, judge_own_sku, reordering_explains, LedgerEntry, Step, Verdict};
use super::plan::PlannedOrder;
use super::FaultError;

/// Whether the consumers kept their dedupe record (`processed_messages`, checkpoints) for the
/// whole run, or pruned it as it aged (a `DEDUPE_RETENTION` shorter than the run).
///
/// Pruned, a missing `processed_messages` row or checkpoint says nothing: the stock alone
/// shows whether each event applied once (every order has a SKU of its own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DedupeRecord {
    #[default]
    Kept,
    Pruned,
}

/// What the checker found. Every `*_` count but the informational ones must be zero.
#[derive(Debug, Clone, Default)]
pub struct Findings {
    pub dedupe: DedupeRecord,
    pub orders_acknowledged: usize,
    pub orders_in_database: usize,
    pub events_published: usize,
    pub events_processed: usize,
    pub unknown_steps: usize,
    /// Acknowledged orders missing from the orders database.
    pub lost_orders: usize,
    /// Events an acknowledged step must have written that are not in `outbox_published`.
    pub missing_events: usize,
    /// Published events without a `processed_messages` row: inventory never applied them
    /// (not counted when the record is pruned).
    pub unapplied_events: usize,
    /// Orders whose own SKU shows one of their events applied more than once.
    pub double_applied: usize,
    /// Orders whose own SKU stands where an earlier event left it: a later one never applied.
    pub orders_missing_effects: usize,
    /// Orders whose own SKU matches no correct or partial outcome.
    pub orders_wrong_effects: usize,
    /// Orders whose events were applied out of seq order: an event applied under a seq other
    /// than its own, or an own SKU that only an out-of-order application explains.
    pub reordered: usize,
    /// Applications the consumers counted beyond one per applied event (their
    /// `consumer_events_total{result="applied"}`, summed over incarnations, a lower bound): the
    /// dedupe record let events apply again even where the effects did not show it.
    pub reapplied: u64,
    /// Orders whose checkpoint is not their last published seq (when pruned: whose checkpoint
    /// is kept and is not their last published seq).
    pub checkpoint_mismatches: usize,
    /// Orders whose status or events differ from the acknowledged steps.
    pub status_mismatches: usize,
    /// Events whose seqs are not 1..n or that no acknowledged step explains.
    pub sequence_errors: usize,
    /// Shared SKUs whose final stock differs from the model.
    pub inventory_mismatches: usize,
    /// `processed_messages` rows for events that were never published.
    pub phantom_events: usize,
    pub parked_left: i64,
    pub outbox_pending_left: i64,
    pub outbox_dead: i64,
    pub dead_letters: i64,
    /// The first few problems, for the reader.
    pub examples: Vec<String>,
}

impl Findings {
    /// Events or effects that should exist and do not.
    pub fn lost(&self) -> usize {
        self.lost_orders + self.missing_events + self.unapplied_events + self.orders_missing_effects
    }

    pub fn holds(&self) -> bool {
        self.lost() == 0
            && self.double_applied == 0
            && self.orders_wrong_effects == 0
            && self.reordered == 0
            && self.reapplied == 0
            && self.checkpoint_mismatches == 0
            && self.status_mismatches == 0
            && self.sequence_errors == 0
            && self.inventory_mismatches == 0
            && self.phantom_events == 0
            && self.parked_left == 0
            && self.outbox_pending_left == 0
            && self.outbox_dead == 0
            && self.dead_letters == 0
    }

    fn note(&mut self, what: String) {
        if self.examples.len() < 20 {
            self.examples.push(what);
        }
    }
}

fn pg(e: sqlx::Error) -> FaultError {
    FaultError::Postgres(e.to_string())
}

struct Published {
    event_id: String,
    seq: i64,
    event_type: String,
}

/// Checks the ledger against both databases (the stream only matters through them).
pub async fn check(
    plan: &[PlannedOrder],
    ledger: &[LedgerEntry],
    orders: &PgPool,
    inventory: &PgPool,
    initial: &[(String, i64)],
    dedupe: DedupeRecord,
) -> Result<Findings, FaultError> {
    let mut f = Findings { dedupe, ..Findings::default() };
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT id, customer_id, status FROM orders").fetch_all(orders).await.map_err(pg)?;
    f.orders_in_database = rows.len();
    let mut by_customer: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for (id, customer, status) in rows {
        by_customer.entry(customer).or_default().push((id, status));
    }
    let mut published: HashMap<String, Vec<Published>> = HashMap::new();
    let events: Vec<(String, String, i64, String)> = sqlx::query_as(
        "SELECT event_id, aggregate_id, seq, event_type FROM outbox_published ORDER BY aggregate_id, seq",
    )
    .fetch_all(orders)
    .await
    .map_err(pg)?;
    f.events_published = events.len();
    let mut published_ids = HashSet::new();
    for (event_id, aggregate, seq, event_type) in events {
        published_ids.insert(event_id.clone());
        published.entry(aggregate).or_default().push(Published { event_id, seq, event_type });
    }
    (f.outbox_pending_left, f.outbox_dead) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'dead') FROM outbox",
    )
    .fetch_one(orders)
    .await
    .map_err(pg)?;
    // Each applied event and the seq it was applied under.
    let processed: HashMap<String, i64> = sqlx::query_as("SELECT event_id, seq FROM processed_messages")
        .fetch_all(inventory)
        .await
        .map_err(pg)?
        .into_iter()
        .collect();
    f.events_processed = processed.len();
    f.phantom_events = processed.keys().filter(|e| !published_ids.contains(*e)).count();
    let checkpoints: HashMap<String, i64> = sqlx::query_as("SELECT aggregate_id, last_seq FROM aggregate_checkpoints")
        .fetch_all(inventory)
        .await
        .map_err(pg)?
        .into_iter()
        .collect();
    let stock: HashMap<String, (i64, i64)> =
        sqlx::query_as::<_, (String, i64, i64)>("SELECT sku, on_hand, reserved FROM inventory")
            .fetch_all(inventory)
            .await
            .map_err(pg)?
            .into_iter()
            .map(|(s, o, r)| (s, (o, r)))
            .collect();
    f.parked_left = sqlx::query_scalar("SELECT count(*) FROM parked_events").fetch_one(inventory).await.map_err(pg)?;
    f.dead_letters = sqlx::query_scalar("SELECT count(*) FROM dead_letters").fetch_one(inventory).await.map_err(pg)?;

    let mut paths = Vec::with_capacity(plan.len());
    for (order, entry) in plan.iter().zip(ledger) {
        let path = check_order(&mut f, order, entry, &by_customer, &published, &processed, &checkpoints, &stock);
        paths.push(path);
    }
    let expected = expected_stock(plan, &paths, initial);
    let own: HashSet<String> = plan.iter().map(PlannedOrder::own_sku).collect();
    let mut shared: Vec<&String> = expected.keys().filter(|s| !own.contains(*s)).collect();
    shared.sort();
    for sku in shared {
        let (want, got) = (expected[sku], stock.get(sku).copied().unwrap_or_default());
        if want != got {
            f.inventory_mismatches += 1;
            f.note(format!("{sku}: expected (on_hand, reserved) {want:?}, found {got:?}"));
        }
    }
    Ok(f)
}

/// Checks one planned order; returns the events it should have had applied, in seq order.
#[allow(clippy::too_many_arguments)]
fn check_order(
    f: &mut Findings,
    order: &PlannedOrder,
    entry: &LedgerEntry,
    by_customer: &HashMap<String, Vec<(String, String)>>,
    published: &HashMap<String, Vec<Published>>,
    processed: &HashMap<String, i64>,
    checkpoints: &HashMap<String, i64>,
    stock: &HashMap<String, (i64, i64)>,
) -> Vec<&'static str> {
    let found = by_customer.get(&order.customer_id()).map(Vec::as_slice).unwrap_or_default();
    if found.len() > 1 {
        f.status_mismatches += 1;
        f.note(format!("order {}: {} orders for one Idempotency-Key", order.index, found.len()));
    }
    if entry.order_id.is_some() {
        f.orders_acknowledged += 1;
    }
    if entry.unknown.is_some() {
        f.unknown_steps += 1;
    }
    let db = found.first();
    let (id, status) = match (&entry.order_id, db) {
        (Some(id), Some((db_id, status))) if id == db_id => (id.clone(), status.clone()),
        (Some(id), _) => {
            f.lost_orders += 1;
            f.missing_events += entry.acked.len();
            f.note(format!("order {} ({id}): acknowledged, not in the orders database", order.index));
            return Vec::new();
        }
        // Never acknowledged: it may exist, and then it counts like any other order.
        (None, Some((db_id, status))) => (db_id.clone(), status.clone()),
        (None, None) => return Vec::new(),
    };
    // The acknowledged steps happened; an unknown last step may have.
    let mut steps = entry.acked.clone();
    if steps.is_empty() {
        steps.push(Step::Create);
    }
    if let Some(step) =
        entry.unknown.filter(|s| s.status() == status && steps.last().map(|l| l.status()) != Some(status.as_str()))
    {
        steps.push(step);
    }
    let path: Vec<&'static str> = steps.iter().map(|s| s.event_type()).collect();
    if steps.last().map(|s| s.status()) != Some(status.as_str()) {
        f.status_mismatches += 1;
        f.note(format!("order {id}: status {status}, acknowledged steps {:?}", entry.acked));
    }
    let events = published.get(&id).map(Vec::as_slice).unwrap_or_default();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    if types.len() < path.len() && path.starts_with(&types) {
        f.missing_events += path.len() - types.len();
        f.note(format!("order {id}: published {types:?}, acknowledged {path:?}"));
    } else if types != path || events.iter().enumerate().any(|(i, e)| e.seq != i as i64 + 1) {
        f.sequence_errors += 1;
        f.note(format!(
            "order {id}: published {:?}, acknowledged {path:?}",
            events.iter().map(|e| (e.seq, &e.event_type)).collect::<Vec<_>>()
        ));
    }
    let pruned = f.dedupe == DedupeRecord::Pruned;
    let unapplied = if pruned { 0 } else { events.iter().filter(|e| !processed.contains_key(&e.event_id)).count() };
    if unapplied > 0 {
        f.unapplied_events += unapplied;
        f.note(format!("order {id}: {unapplied} of {} events never applied", events.len()));
    }
    let last_seq = events.last().map_or(0, |e| e.seq);
    let checkpoint = checkpoints.get(&id).copied().unwrap_or(0);
    // Pruned, an order without a checkpoint has had it removed (it was closed).
    let judged = !pruned || checkpoints.contains_key(&id);
    if judged && checkpoint != last_seq {
        f.checkpoint_mismatches += 1;
        f.note(format!("order {id}: checkpoint {checkpoint}, last published seq {last_seq}"));
    }
    let own = stock.get(&order.own_sku()).copied().unwrap_or_default();
    let verdict = judge_own_sku(order, &path, own);
    // Out of seq order: an event applied under another seq than the one it was published with,
    // or (every event applied) a stock only an out-of-order application leads to.
    let misnumbered = events.iter().any(|e| processed.get(&e.event_id).is_some_and(|applied| *applied != e.seq));
    let reordered = misnumbered || (unapplied == 0 && reordering_explains(order, &path, own));
    match verdict {
        Verdict::Exact if !reordered => {}
        Verdict::DoubleApplied => {
            f.double_applied += 1;
            f.note(format!(
                "order {id}: DoubleApplied: {} (on_hand, reserved) = {own:?} after {path:?}",
                order.own_sku()
            ));
        }
        _ if reordered => {
            f.reordered += 1;
            let applied: Vec<Option<&i64>> = events.iter().map(|e| processed.get(&e.event_id)).collect();
            f.note(format!(
                "order {id}: applied out of seq order: {} (on_hand, reserved) = {own:?} after {path:?}, applied under seqs {applied:?}",
                order.own_sku()
            ));
        }
        verdict => {
            match verdict {
                Verdict::Lost => f.orders_missing_effects += 1,
                _ => f.orders_wrong_effects += 1,
            }
            f.note(format!(
                "order {id}: {verdict:?}: {} (on_hand, reserved) = {own:?} after {path:?}, quantity {}",
                order.own_sku(),
                order.own_quantity()
            ));
        }
    }
    path
}
