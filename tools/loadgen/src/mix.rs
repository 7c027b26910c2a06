//! What each simulated customer does: the order it places and what happens to it next.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// The catalogue and the shares of follow-up actions.
#[derive(Debug, Clone)]
pub struct Mix {
    pub sku_prefix: String,
    pub skus: u32,
    pub max_items: u32,
    pub confirm_ratio: f64,
    pub cancel_ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

/// The body of `POST /orders`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OrderBody {
    pub customer_id: String,
    pub items: Vec<Item>,
}

/// One customer's session: create, then optionally confirm, then optionally cancel (a cancel
/// after a confirm is a return, which restocks).
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub body: OrderBody,
    pub confirm: bool,
    pub cancel: bool,
}

impl Mix {
    pub fn sku(&self, n: u32) -> String {
        format!("{}-{n:05}", self.sku_prefix)
    }

    pub fn all_skus(&self) -> impl Iterator<Item = String> + '_ {
        (0..self.skus).map(|n| self.sku(n))
    }

    /// A deterministic source of sessions for one client.
    pub fn sessions(&self, seed: u64, client: usize) -> Sessions<'_> {
        Sessions { mix: self, rng: StdRng::seed_from_u64(seed ^ (client as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) }
    }
}

pub struct Sessions<'a> {
    mix: &'a Mix,
    rng: StdRng,
}

impl Sessions<'_> {
    pub fn next_session(&mut self) -> Session {
        let mix = self.mix;
        let rng = &mut self.rng;
        let count = rng.random_range(1..=mix.max_items);
        let items = (0..count)
            .map(|_| Item {
                sku: mix.sku(rng.random_range(0..mix.skus)),
                quantity: rng.random_range(1..=5),
                unit_price_cents: rng.random_range(100..=50_000),
            })
            .collect();
        let body = OrderBody { customer_id: format!("load-{}", rng.random_range(0..10_000)), items };
        Session { body, confirm: rng.random_bool(mix.confirm_ratio), cancel: rng.random_bool(mix.cancel_ratio) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mix() -> Mix {
        Mix { sku_prefix: "LOAD".into(), skus: 50, max_items: 3, confirm_ratio: 0.5, cancel_ratio: 0.2 }
    }

    #[test]
    fn every_body_is_a_valid_order() {
        let mix = Mix { max_items: 100, ..mix() };
        let mut sessions = mix.sessions(7, 0);
        for _ in 0..2_000 {
            let s = sessions.next_session();
            let items: Vec<(String, i64, i64)> =
                s.body.items.iter().map(|i| (i.sku.clone(), i.quantity, i.unit_price_cents)).collect();
            domain::NewOrder::parse(&s.body.customer_id, &items).expect("loadgen sends only valid orders");
        }
    }

    #[test]
    fn shares_follow_the_ratios() {
        let mix = mix();
        let mut sessions = mix.sessions(42, 3);
        let n = 20_000;
        let (mut confirmed, mut cancelled, mut returned) = (0, 0, 0);
        for _ in 0..n {
            let s = sessions.next_session();
            confirmed += usize::from(s.confirm);
            cancelled += usize::from(s.cancel);
            returned += usize::from(s.confirm && s.cancel);
        }
        let share = |k: usize| k as f64 / f64::from(n);
        assert!((share(confirmed) - 0.5).abs() < 0.02, "confirmed {confirmed}");
        assert!((share(cancelled) - 0.2).abs() < 0.02, "cancelled {cancelled}");
        assert!((share(returned) - 0.1).abs() < 0.02, "cancelled after confirm {returned}");
    }

    #[test]
    fn same_seed_same_sessions_other_client_other_sessions() {
        let mix = mix();
        let a: Vec<_> = (0..20)
            .map({
                let mut s = mix.sessions(1, 0);
                move |_| s.next_session()
            })
            .collect();
        let b: Vec<_> = (0..20)
            .map({
                let mut s = mix.sessions(1, 0);
                move |_| s.next_session()
            })
            .collect();
        let c: Vec<_> = (0..20)
            .map({
                let mut s = mix.sessions(1, 1);
                move |_| s.next_session()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn skus_cover_the_catalogue() {
        let mix = mix();
        let all: Vec<_> = mix.all_skus().collect();
        assert_eq!(all.len(), 50);
        assert_eq!(all[0], "LOAD-00000");
        assert!(all.iter().all(|s| domain::Sku::parse(s.clone()).is_ok()));
    }
}
