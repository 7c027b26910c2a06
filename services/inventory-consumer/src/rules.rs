//! The inventory rules of the contract, as pure functions over the rows a batch has locked.

use std::collections::{BTreeMap, HashMap};

use domain::{EventPayload, OrderCreated};
use serde::{Deserialize, Serialize};

/// One inventory row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stock {
    pub on_hand: i64,
    pub reserved: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationStatus {
    Reserved,
    Rejected,
    Confirmed,
    Cancelled,
}

impl ReservationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserved => "RESERVED",
            Self::Rejected => "REJECTED",
            Self::Confirmed => "CONFIRMED",
            Self::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Reserved, Self::Rejected, Self::Confirmed, Self::Cancelled].into_iter().find(|v| v.as_str() == s)
    }
}

/// A quantity per sku, summed over the order's lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservedItem {
    pub sku: String,
    pub quantity: i64,
}

/// What inventory did for one order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub status: ReservationStatus,
    pub items: Vec<ReservedItem>,
    pub reason: Option<String>,
}

/// Quantities per sku, summed, so an order listing a sku twice is checked against its total.
pub fn summed_items(created: &OrderCreated) -> Vec<ReservedItem> {
    let mut sums: BTreeMap<&str, i64> = BTreeMap::new();
    for item in &created.items {
        *sums.entry(item.sku.as_str()).or_default() += item.quantity.get();
    }
    sums.into_iter().map(|(sku, quantity)| ReservedItem { sku: sku.to_owned(), quantity }).collect()
}

/// Applies one event (already known to be next in its order's sequence) to `stock`. Returns
/// the order's new reservation when it changes, `None` when the event changes nothing.
/// Quantities only move within what is there (reserved ≤ on hand), and arithmetic saturates,
/// so no sequence of events can overflow a stock row.
pub fn apply(
    payload: &EventPayload,
    current: Option<&Reservation>,
    stock: &mut HashMap<String, Stock>,
) -> Option<Reservation> {
    match (payload, current) {
        (EventPayload::OrderCreated(created), None) => Some(reserve(created, stock)),
        (EventPayload::OrderConfirmed(_), Some(r)) if r.status == ReservationStatus::Reserved => {
            move_stock(&r.items, stock, |s, q| {
                s.on_hand = s.on_hand.saturating_sub(q);
                s.reserved = s.reserved.saturating_sub(q);
            });
            Some(Reservation { status: ReservationStatus::Confirmed, ..r.clone() })
        }
        (EventPayload::OrderCancelled(_), Some(r)) if r.status == ReservationStatus::Reserved => {
            move_stock(&r.items, stock, |s, q| s.reserved = s.reserved.saturating_sub(q));
            Some(Reservation { status: ReservationStatus::Cancelled, ..r.clone() })
        }
        (EventPayload::OrderCancelled(_), Some(r)) if r.status == ReservationStatus::Confirmed => {
            // Saturating: a restock on top of a `PUT` near the bound cannot wrap around.
            move_stock(&r.items, stock, |s, q| s.on_hand = s.on_hand.saturating_add(q));
            Some(Reservation { status: ReservationStatus::Cancelled, ..r.clone() })
        }
        // A rejected order never held stock; a second create or a transition the order
        // service cannot emit changes nothing.
        _ => None,
    }
}

/// All or nothing: every sku must exist with enough available stock.
fn reserve(created: &OrderCreated, stock: &mut HashMap<String, Stock>) -> Reservation {
    let items = summed_items(created);
    let shortage = items.iter().find_map(|item| match stock.get(&item.sku) {
        None => Some(format!("unknown sku {}", item.sku)),
        Some(s) if s.on_hand - s.reserved < item.quantity => Some(format!(
            "not enough stock for sku {}: {} available, {} wanted",
            item.sku,
            s.on_hand - s.reserved,
            item.quantity
        )),
        Some(_) => None,
    });
    if let Some(reason) = shortage {
        return Reservation { status: ReservationStatus::Rejected, items, reason: Some(reason) };
    }
    move_stock(&items, stock, |s, q| s.reserved = s.reserved.saturating_add(q));
    Reservation { status: ReservationStatus::Reserved, items, reason: None }
}

fn move_stock(items: &[ReservedItem], stock: &mut HashMap<String, Stock>, f: impl Fn(&mut Stock, i64)) {
    for item in items {
        // Present: the batch loads the row of every sku its reservations name, and inventory
        // rows are never deleted.
        if let Some(s) = stock.get_mut(&item.sku) {
            f(s, item.quantity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::{NewOrder, Order, OrderCancelled, OrderConfirmed};

    fn created(items: &[(&str, i64)]) -> EventPayload {
        let items: Vec<_> = items.iter().map(|(s, q)| (s.to_string(), *q, 100)).collect();
        EventPayload::created(&Order::create(NewOrder::parse("c", &items).unwrap(), chrono::Utc::now()))
    }

    fn stock(rows: &[(&str, i64, i64)]) -> HashMap<String, Stock> {
        rows.iter().map(|(s, o, r)| (s.to_string(), Stock { on_hand: *o, reserved: *r })).collect()
    }

    #[test]
    fn reserve_confirm_cancel() {
        let mut st = stock(&[("A", 10, 0), ("B", 5, 1)]);
        let r = apply(&created(&[("A", 3), ("B", 2), ("A", 1)]), None, &mut st).unwrap();
        assert_eq!(r.status, ReservationStatus::Reserved);
        assert_eq!(st, stock(&[("A", 10, 4), ("B", 5, 3)]));
        let id = domain::OrderId::new();
        let r = apply(&EventPayload::OrderConfirmed(OrderConfirmed { order_id: id }), Some(&r), &mut st).unwrap();
        assert_eq!(st, stock(&[("A", 6, 0), ("B", 3, 1)]));
        let r = apply(&EventPayload::OrderCancelled(OrderCancelled { order_id: id }), Some(&r), &mut st).unwrap();
        assert_eq!(r.status, ReservationStatus::Cancelled);
        assert_eq!(st, stock(&[("A", 10, 0), ("B", 5, 1)]));
    }

    #[test]
    fn a_restock_at_the_edge_of_i64_saturates_instead_of_wrapping() {
        let mut st = stock(&[("A", i64::MAX - 1, 0)]);
        let r = apply(&created(&[("A", 5)]), None, &mut st).unwrap();
        let id = domain::OrderId::new();
        let r = apply(&EventPayload::OrderConfirmed(OrderConfirmed { order_id: id }), Some(&r), &mut st).unwrap();
        assert_eq!(st, stock(&[("A", i64::MAX - 6, 0)]));
        // Stock set back up (a PUT) before the confirmed order is cancelled and restocked.
        st.insert("A".to_owned(), Stock { on_hand: i64::MAX - 1, reserved: 0 });
        apply(&EventPayload::OrderCancelled(OrderCancelled { order_id: id }), Some(&r), &mut st).unwrap();
        assert_eq!(st, stock(&[("A", i64::MAX, 0)]));
    }

    #[test]
    fn rejection_is_all_or_nothing() {
        let mut st = stock(&[("A", 10, 0), ("B", 5, 4)]);
        let r = apply(&created(&[("A", 3), ("B", 2)]), None, &mut st).unwrap();
        assert_eq!(r.status, ReservationStatus::Rejected);
        assert_eq!(st, stock(&[("A", 10, 0), ("B", 5, 4)]));
        let r = apply(&created(&[("A", 3), ("C", 1)]), None, &mut st).unwrap();
        assert_eq!(r.reason.as_deref(), Some("unknown sku C"));
        // The sum over lines counts: 6 + 6 > 10.
        let r = apply(&created(&[("A", 6), ("A", 6)]), None, &mut st).unwrap();
        assert_eq!(r.status, ReservationStatus::Rejected);
        let cancel = EventPayload::OrderCancelled(OrderCancelled { order_id: domain::OrderId::new() });
        assert_eq!(apply(&cancel, Some(&r), &mut st), None);
        assert_eq!(st, stock(&[("A", 10, 0), ("B", 5, 4)]));
    }
}
