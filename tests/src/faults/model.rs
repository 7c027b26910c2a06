//! The ledger of what the API acknowledged, and the inventory the contract's rules predict
//! from it.

use std::collections::HashMap;

use super::plan::{PlannedOrder, OWN_STOCK};

/// An API call the load makes on an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Create,
    Confirm,
    Cancel,
}

impl Step {
    /// The event an acknowledged step leaves in the outbox (the load never repeats a transition).
    pub fn event_type(self) -> &'static str {
        match self {
            Self::Create => "OrderCreated",
            Self::Confirm => "OrderConfirmed",
            Self::Cancel => "OrderCancelled",
        }
    }

    /// The order status after this step.
    pub fn status(self) -> &'static str {
        match self {
            Self::Create => "PENDING",
            Self::Confirm => "CONFIRMED",
            Self::Cancel => "CANCELLED",
        }
    }
}

/// What the API told the load about one planned order.
#[derive(Debug, Clone, Default)]
pub struct LedgerEntry {
    /// From the acknowledged create.
    pub order_id: Option<String>,
    /// Steps acknowledged with a 2xx, in order.
    pub acked: Vec<Step>,
    /// A step given up on without an answer: it may or may not have happened.
    pub unknown: Option<Step>,
}

impl LedgerEntry {
    pub fn acked_status(&self) -> Option<&'static str> {
        self.acked.last().map(|s| s.status())
    }
}

/// Stock of one SKU: `(on_hand, reserved)`.
pub type Stock = (i64, i64);

/// Replays the contract's inventory rules over each order's applied events (`paths[i]` for
/// `plan[i]`, event types in seq order) on top of `initial`.
///
/// The plan keeps outcomes independent of how orders interleave (see `plan`), so applying
/// each order's events in turn gives the one correct final stock.
pub fn expected_stock(
    plan: &[PlannedOrder],
    paths: &[Vec<&'static str>],
    initial: &[(String, i64)],
) -> HashMap<String, Stock> {
    let mut stock: HashMap<String, Stock> = initial.iter().map(|(s, q)| (s.clone(), (*q, 0))).collect();
    for (order, path) in plan.iter().zip(paths) {
        if order.doomed() {
            continue;
        }
        let mut reserved = false;
        let mut confirmed = false;
        for event in path {
            for (sku, q) in &order.items {
                let Some((on_hand, res)) = stock.get_mut(sku) else { continue };
                match *event {
                    "OrderCreated" => *res += q,
                    "OrderConfirmed" if reserved && !confirmed => {
                        *on_hand -= q;
                        *res -= q;
                    }
                    "OrderCancelled" if confirmed => *on_hand += q,
                    "OrderCancelled" if reserved => *res -= q,
                    _ => {}
                }
            }
            match *event {
                "OrderCreated" => reserved = true,
                "OrderConfirmed" => confirmed = reserved,
                _ => {
                    reserved = false;
                    confirmed = false;
                }
            }
        }
    }
    stock
}

/// What an order's own SKU says about how inventory applied its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Exact,
    /// The stock of an earlier point of the order's path: later events never took effect.
    Lost,
    /// More stock moved than one application of each event can move.
    DoubleApplied,
    /// Neither: e.g. a rejected order that reserved, or events applied out of order.
    Wrong,
}

/// Judges the own SKU of `order` (whose applied events should be `path`) from its final stock.
pub fn judge_own_sku(order: &PlannedOrder, path: &[&'static str], observed: Stock) -> Verdict {
    let q = order.own_quantity();
    let states = |upto: usize| -> Stock {
        if order.doomed() {
            return (OWN_STOCK, 0);
        }
        let own = [(order.own_sku(), q)];
        let single = PlannedOrder { index: order.index, items: own.to_vec(), fate: order.fate, retry_create: false };
        let stock =
            expected_stock(std::slice::from_ref(&single), &[path[..upto].to_vec()], &[(order.own_sku(), OWN_STOCK)]);
        stock.get(&order.own_sku()).copied().unwrap_or((OWN_STOCK, 0))
    };
    if observed == states(path.len()) {
        return Verdict::Exact;
    }
    if (0..path.len()).any(|upto| states(upto) == observed) {
        return Verdict::Lost;
    }
    let (on_hand, reserved) = observed;
    if reserved > q || on_hand > OWN_STOCK || on_hand < OWN_STOCK - q {
        return Verdict::DoubleApplied;
    }
    Verdict::Wrong
}

/// Whether the own SKU of `order` stands where its events applied in some other order than
/// `path`'s (seq order) would leave it, and not where seq order leaves it.
pub fn reordering_explains(order: &PlannedOrder, path: &[&'static str], observed: Stock) -> bool {
    let own = [(order.own_sku(), order.own_quantity())];
    let single = PlannedOrder { index: order.index, items: own.to_vec(), fate: order.fate, retry_create: false };
    let after = |events: &[&'static str]| -> Stock {
        if order.doomed() {
            return (OWN_STOCK, 0);
        }
        let stock = expected_stock(std::slice::from_ref(&single), &[events.to_vec()], &[(order.own_sku(), OWN_STOCK)]);
        stock.get(&order.own_sku()).copied().unwrap_or((OWN_STOCK, 0))
    };
    if after(path) == observed {
        return false;
    }
    permutations(path).iter().any(|p| p.as_slice() != path && after(p) == observed)
}

fn permutations(items: &[&'static str]) -> Vec<Vec<&'static str>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for i in 0..items.len() {
        let mut rest = items.to_vec();
        let first = rest.remove(i);
        for mut tail in permutations(&rest) {
            tail.insert(0, first);
            out.push(tail);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::plan::Fate;
    use super::*;

    fn order(items: &[(&str, i64)]) -> PlannedOrder {
        PlannedOrder {
            index: 0,
            items: items.iter().map(|(s, q)| ((*s).to_owned(), *q)).collect(),
            fate: Fate::Confirm,
            retry_create: false,
        }
    }

    const C: &str = "OrderCreated";
    const OK: &str = "OrderConfirmed";
    const X: &str = "OrderCancelled";

    #[test]
    fn rules_per_path() {
        let o = order(&[("OWN-0", 3), ("HOT-0", 2)]);
        let init = vec![("OWN-0".to_owned(), 100), ("HOT-0".to_owned(), 50)];
        let run = |path: Vec<&'static str>| expected_stock(std::slice::from_ref(&o), &[path], &init);
        assert_eq!(run(vec![])["HOT-0"], (50, 0));
        assert_eq!(run(vec![C])["HOT-0"], (50, 2));
        assert_eq!(run(vec![C, OK])["HOT-0"], (48, 0));
        assert_eq!(run(vec![C, X])["HOT-0"], (50, 0));
        assert_eq!(run(vec![C, OK, X])["OWN-0"], (100, 0));
        let doomed = order(&[("OWN-0", 3), ("NO-SUCH-SKU", 1)]);
        assert_eq!(expected_stock(std::slice::from_ref(&doomed), &[vec![C, OK]], &init)["OWN-0"], (100, 0));
    }

    #[test]
    fn verdicts() {
        let o = order(&[("OWN-0", 3)]);
        assert_eq!(judge_own_sku(&o, &[C, OK], (97, 0)), Verdict::Exact);
        assert_eq!(judge_own_sku(&o, &[C, OK], (100, 3)), Verdict::Lost);
        assert_eq!(judge_own_sku(&o, &[C, OK], (100, 0)), Verdict::Lost);
        assert_eq!(judge_own_sku(&o, &[C], (100, 6)), Verdict::DoubleApplied);
        assert_eq!(judge_own_sku(&o, &[C, OK], (94, 0)), Verdict::DoubleApplied);
        assert_eq!(judge_own_sku(&o, &[C, OK, X], (103, 0)), Verdict::DoubleApplied);
        assert_eq!(judge_own_sku(&o, &[C, OK], (97, 3)), Verdict::Wrong);
        let doomed = order(&[("OWN-0", 3), ("SCARCE-1", 9)]);
        assert_eq!(judge_own_sku(&doomed, &[C, OK], (100, 0)), Verdict::Exact);
        assert_eq!(judge_own_sku(&doomed, &[C], (100, 3)), Verdict::Wrong);
    }

    #[test]
    fn reorderings() {
        let o = order(&[("OWN-0", 3)]);
        // Confirm before create: the confirm finds no reservation, the create reserves.
        assert!(reordering_explains(&o, &[C, OK], (100, 3)));
        // Cancel before create, and cancel-confirm-create.
        assert!(reordering_explains(&o, &[C, X], (100, 3)));
        assert!(reordering_explains(&o, &[C, OK, X], (100, 3)));
        // In order is not a reordering, and neither is a stock no order of events gives.
        assert!(!reordering_explains(&o, &[C, OK], (97, 0)));
        assert!(!reordering_explains(&o, &[C, OK], (94, 0)));
        assert!(!reordering_explains(&o, &[C], (100, 3)));
    }
}
