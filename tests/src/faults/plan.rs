//! The seeded load plan: what each order contains and what happens to it after creation.
//!
//! Every order carries a SKU of its own, so the final stock of that SKU shows exactly which of
//! the order's events inventory applied, and how often (see `model`). Most orders also take
//! from a few shared "hot" SKUs so that replicas contend on the same rows. Some orders are
//! built to be rejected whatever the interleaving: an unknown SKU, or more of a scarce SKU
//! than was ever on hand. Stock elsewhere is ample, so no outcome depends on the order in
//! which different orders happen to be applied.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Stock of each order's own SKU.
pub const OWN_STOCK: i64 = 100;
/// Stock of the scarce SKU: every order asking for it wants more than this.
pub const SCARCE_STOCK: i64 = 5;
pub const SCARCE_SKU: &str = "SCARCE-1";
/// Never stocked.
pub const UNKNOWN_SKU: &str = "NO-SUCH-SKU";
pub const HOT_SKUS: usize = 4;

/// What the load does to an order after creating it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    StayPending,
    Confirm,
    Cancel,
    ConfirmThenCancel,
}

#[derive(Debug, Clone)]
pub struct PlannedOrder {
    pub index: usize,
    pub items: Vec<(String, i64)>,
    pub fate: Fate,
    /// Sends the create twice with the same Idempotency-Key.
    pub retry_create: bool,
}

impl PlannedOrder {
    /// `customer_id`: names the plan entry, so an order found in the database maps back to it.
    pub fn customer_id(&self) -> String {
        format!("c-{}", self.index)
    }

    pub fn own_sku(&self) -> String {
        own_sku(self.index)
    }

    pub fn own_quantity(&self) -> i64 {
        self.items.iter().find(|(s, _)| *s == self.own_sku()).map_or(0, |(_, q)| *q)
    }

    /// Inventory rejects it whatever else happens.
    pub fn doomed(&self) -> bool {
        self.items.iter().any(|(s, _)| s == UNKNOWN_SKU || s == SCARCE_SKU)
    }
}

pub fn own_sku(index: usize) -> String {
    format!("OWN-{index}")
}

pub fn hot_sku(i: usize) -> String {
    format!("HOT-{i}")
}

/// The plan for `seed`: the same seed always gives the same orders and fates.
pub fn generate(seed: u64, orders: usize) -> Vec<PlannedOrder> {
    // A different stream from the fault schedule's, so changing one does not shift the other.
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_0f0b_de75);
    (0..orders)
        .map(|index| {
            let mut items = vec![(own_sku(index), rng.random_range(1..=20))];
            if rng.random_bool(0.6) {
                items.push((hot_sku(rng.random_range(0..HOT_SKUS)), rng.random_range(1..=3)));
            }
            match rng.random_range(0..100) {
                0..=2 => items.push((UNKNOWN_SKU.to_owned(), 1)),
                3..=5 => items.push((SCARCE_SKU.to_owned(), rng.random_range(SCARCE_STOCK + 1..=SCARCE_STOCK + 5))),
                _ => {}
            }
            let fate = match rng.random_range(0..100) {
                0..=34 => Fate::Confirm,
                35..=54 => Fate::Cancel,
                55..=69 => Fate::ConfirmThenCancel,
                _ => Fate::StayPending,
            };
            PlannedOrder { index, items, fate, retry_create: rng.random_bool(0.05) }
        })
        .collect()
}

/// Initial stock: each order's own SKU, the scarce SKU, and hot SKUs with more than the whole
/// plan could ever take.
pub fn initial_stock(plan: &[PlannedOrder]) -> Vec<(String, i64)> {
    let mut hot = vec![1_000_i64; HOT_SKUS];
    for order in plan {
        for (sku, q) in &order.items {
            if let Some(i) = sku.strip_prefix("HOT-").and_then(|i| i.parse::<usize>().ok()) {
                hot[i] += q;
            }
        }
    }
    let mut stock: Vec<(String, i64)> = plan.iter().map(|o| (o.own_sku(), OWN_STOCK)).collect();
    stock.push((SCARCE_SKU.to_owned(), SCARCE_STOCK));
    stock.extend(hot.into_iter().enumerate().map(|(i, q)| (hot_sku(i), q)));
    stock
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_and_varied() {
        let a = generate(3, 2_000);
        let b = generate(3, 2_000);
        assert_eq!(
            a.iter().map(|o| (&o.items, o.fate)).collect::<Vec<_>>(),
            b.iter().map(|o| (&o.items, o.fate)).collect::<Vec<_>>()
        );
        for fate in [Fate::StayPending, Fate::Confirm, Fate::Cancel, Fate::ConfirmThenCancel] {
            assert!(a.iter().any(|o| o.fate == fate), "{fate:?} planned");
        }
        assert!(a.iter().any(PlannedOrder::doomed) && a.iter().any(|o| !o.doomed()));
        assert!(a.iter().any(|o| o.retry_create));
    }

    #[test]
    fn skus_are_valid_and_own_stock_covers_the_order() {
        for o in generate(9, 500) {
            assert!(o.own_quantity() >= 1 && o.own_quantity() <= OWN_STOCK);
            for (sku, q) in &o.items {
                assert!(
                    sku.len() <= 32 && sku.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-')
                );
                assert!((1..=1000).contains(q));
            }
        }
    }
}
