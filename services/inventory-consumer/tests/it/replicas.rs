//! Several replicas sharing the group: every event applied once, in order, under contention.

use std::collections::HashMap;

use domain::{Event, OrderId};
use rand::seq::SliceRandom;
use rand::Rng;

use crate::common::{cancelled, confirmed, created, Harness, Running};

const SKUS: usize = 20;
const ORDERS: usize = 500;
const EVENTS_PER_ORDER: i64 = 10;

/// The expected end state, computed independently of the consumer: stock is ample, so only
/// unknown skus reject, and the result does not depend on the order orders are applied in.
#[derive(Default)]
struct Model {
    stock: HashMap<String, (i64, i64)>,
}

impl Model {
    fn apply(&mut self, items: &[(String, i64)], steps: &[bool]) {
        if items.iter().any(|(sku, _)| !self.stock.contains_key(sku)) {
            return; // rejected: nothing ever changes
        }
        #[derive(PartialEq)]
        enum S {
            Reserved,
            Confirmed,
            Cancelled,
        }
        let mut state = S::Reserved;
        for (sku, q) in items {
            self.stock.get_mut(sku).expect("known").1 += q;
        }
        for &confirm in steps {
            let next = match (&state, confirm) {
                (S::Reserved, true) => {
                    for (sku, q) in items {
                        let s = self.stock.get_mut(sku).expect("known");
                        s.0 -= q;
                        s.1 -= q;
                    }
                    S::Confirmed
                }
                (S::Reserved, false) => {
                    for (sku, q) in items {
                        self.stock.get_mut(sku).expect("known").1 -= q;
                    }
                    S::Cancelled
                }
                (S::Confirmed, false) => {
                    for (sku, q) in items {
                        self.stock.get_mut(sku).expect("known").0 += q;
                    }
                    S::Cancelled
                }
                _ => continue,
            };
            state = next;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_apply_shuffled_duplicated_events_exactly_once() {
    let h = Harness::new("replicas").await;
    let mut rng = rand::rng();
    let mut model = Model::default();
    for i in 0..SKUS {
        let sku = format!("SKU-{i}");
        h.set_stock(&sku, 1_000_000).await;
        model.stock.insert(sku, (1_000_000, 0));
    }
    let mut events: Vec<Event> = Vec::new();
    let mut orders = Vec::new();
    for n in 0..ORDERS {
        let order = OrderId::new();
        let mut items: Vec<(String, i64)> = (0..rng.random_range(1..4))
            .map(|_| (format!("SKU-{}", rng.random_range(0..SKUS)), rng.random_range(1..6)))
            .collect();
        if n % 25 == 0 {
            items.push(("SKU-UNKNOWN".to_owned(), 1));
        }
        let refs: Vec<(&str, i64)> = items.iter().map(|(s, q)| (s.as_str(), *q)).collect();
        events.push(created(order, &refs));
        let steps: Vec<bool> = (2..=EVENTS_PER_ORDER).map(|_| rng.random_bool(0.5)).collect();
        for (i, &confirm) in steps.iter().enumerate() {
            let seq = i as i64 + 2;
            events.push(if confirm { confirmed(order, seq) } else { cancelled(order, seq) });
        }
        model.apply(&items, &steps);
        orders.push(order);
    }
    let unique = events.len();
    assert_eq!(unique, 5_000);
    let duplicates: Vec<Event> = (0..1_000).map(|_| events[rng.random_range(0..unique)].clone()).collect();
    events.extend(duplicates);
    events.shuffle(&mut rng);

    let mut replicas = Vec::new();
    for name in ["r1", "r2", "r3"] {
        let mut config = h.config(name);
        config.batch_size = 64;
        replicas.push(Running::start(config).await);
    }
    for event in &events {
        h.xadd(event).await;
    }
    h.drained().await;

    for i in 0..SKUS {
        let sku = format!("SKU-{i}");
        assert_eq!(h.stock(&sku).await, model.stock[&sku], "{sku}");
    }
    assert_eq!(h.count("SELECT count(*) FROM processed_messages").await, unique as i64);
    assert_eq!(h.count("SELECT count(*) FROM parked_events").await, 0);
    let not_at_end =
        h.count(&format!("SELECT count(*) FROM aggregate_checkpoints WHERE last_seq <> {EVENTS_PER_ORDER}")).await;
    assert_eq!(not_at_end, 0);
    assert_eq!(h.count("SELECT count(*) FROM aggregate_checkpoints").await, ORDERS as i64);
    for r in replicas {
        r.stop().await;
    }
}
