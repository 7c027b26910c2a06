//! Load through the HTTP API, recording every acknowledged answer in the ledger.
//!
//! A call that fails or times out is retried (creates with the same Idempotency-Key, and
//! confirm/cancel are idempotent by the contract) until it is acknowledged or its deadline
//! passes; then the step is recorded as unknown and the checker accepts either outcome.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use super::model::{LedgerEntry, Step};
use super::plan::{Fate, PlannedOrder};

/// Couples load and faults: orders are started in index order, and no order past the next
/// unfired fault's position starts until that fault has fired.
pub struct Gate {
    pub started: AtomicUsize,
    limit: watch::Sender<usize>,
}

impl Gate {
    pub fn new(first_limit: usize) -> Arc<Self> {
        Arc::new(Self { started: AtomicUsize::new(0), limit: watch::Sender::new(first_limit) })
    }

    /// Lets orders up to (not including) `limit` start.
    pub fn open_to(&self, limit: usize) {
        self.limit.send_replace(limit);
    }

    /// Waits until the load has started `n` orders; panics after `within`.
    pub async fn reached(&self, n: usize, within: Duration) {
        test_support::eventually("the load to reach its mark", within, || async {
            (self.started.load(Ordering::SeqCst) >= n).then_some(())
        })
        .await
    }

    async fn admit(&self, index: usize) {
        let mut rx = self.limit.subscribe();
        // Bounded by the fault executor: it raises the limit after every fault, then to MAX.
        let _ = rx.wait_for(|limit| index < *limit).await;
    }
}

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub seed: u64,
    pub concurrency: usize,
    /// A step not acknowledged within this is given up on (recorded as unknown).
    pub step_deadline: Duration,
    /// Spread the orders evenly over this long (soak); `None`: as fast as the system goes.
    pub spread_over: Option<Duration>,
}

#[derive(Debug, Default)]
pub struct LoadOutcome {
    pub ledger: Vec<LedgerEntry>,
    pub requests: u64,
    pub retries: u64,
    /// Answers the contract rules out (e.g. 409 on a legal transition, a second order id for
    /// one Idempotency-Key).
    pub anomalies: Vec<String>,
    pub elapsed: Duration,
}

enum Answer {
    Acked(Value),
    Refused(u16, String),
    Unknown,
}

struct Worker {
    http: reqwest::Client,
    api: String,
    deadline: Duration,
    requests: u64,
    retries: u64,
}

impl Worker {
    async fn call(&mut self, path: &str, key: Option<&str>, body: Option<&Value>) -> Answer {
        let give_up = Instant::now() + self.deadline;
        let mut backoff = Duration::from_millis(50);
        loop {
            self.requests += 1;
            let mut req = self.http.post(format!("{}{path}", self.api)).timeout(Duration::from_secs(5));
            if let Some(k) = key {
                req = req.header("Idempotency-Key", k);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => {
                    // A body cut off mid-way leaves the outcome unknown: retry.
                    if let Ok(v) = r.json::<Value>().await {
                        return Answer::Acked(v);
                    }
                }
                Ok(r) if r.status().is_client_error() && ![408, 429].contains(&r.status().as_u16()) => {
                    let status = r.status().as_u16();
                    return Answer::Refused(status, r.text().await.unwrap_or_default());
                }
                _ => {}
            }
            if Instant::now() + backoff > give_up {
                return Answer::Unknown;
            }
            self.retries += 1;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Runs one planned order's steps, stopping at the first one not acknowledged.
    async fn order(&mut self, seed: u64, order: &PlannedOrder, anomalies: &Mutex<Vec<String>>) -> LedgerEntry {
        let mut entry = LedgerEntry::default();
        let key = format!("faults-{seed}-{}", order.index);
        let items: Vec<Value> =
            order.items.iter().map(|(sku, q)| json!({"sku": sku, "quantity": q, "unit_price_cents": 100})).collect();
        let body = json!({"customer_id": order.customer_id(), "items": items});
        let anomaly = |what: String| anomalies.lock().map(|mut a| a.push(what)).unwrap_or(());
        let creates = if order.retry_create { 2 } else { 1 };
        for _ in 0..creates {
            match self.call("/orders", Some(&key), Some(&body)).await {
                Answer::Acked(v) => {
                    let id = v["id"].as_str().unwrap_or_default().to_owned();
                    match &entry.order_id {
                        Some(first) if *first != id => {
                            anomaly(format!("order {}: Idempotency-Key retry gave id {id}, first {first}", order.index))
                        }
                        _ => entry.order_id = Some(id),
                    }
                    if entry.acked.is_empty() {
                        entry.acked.push(Step::Create);
                    }
                }
                Answer::Refused(status, text) => {
                    anomaly(format!("order {}: create refused {status}: {text}", order.index));
                    return entry;
                }
                Answer::Unknown if entry.acked.is_empty() => {
                    entry.unknown = Some(Step::Create);
                    return entry;
                }
                Answer::Unknown => {}
            }
        }
        let Some(id) = entry.order_id.clone() else { return entry };
        let steps: &[Step] = match order.fate {
            Fate::StayPending => &[],
            Fate::Confirm => &[Step::Confirm],
            Fate::Cancel => &[Step::Cancel],
            Fate::ConfirmThenCancel => &[Step::Confirm, Step::Cancel],
        };
        for step in steps {
            let path = match step {
                Step::Confirm => format!("/orders/{id}/confirm"),
                _ => format!("/orders/{id}/cancel"),
            };
            match self.call(&path, None, None).await {
                Answer::Acked(v) if v["status"] == step.status() => entry.acked.push(*step),
                Answer::Acked(v) => {
                    anomaly(format!("order {id}: {step:?} answered status {}", v["status"]));
                    return entry;
                }
                Answer::Refused(status, text) => {
                    anomaly(format!("order {id}: {step:?} refused {status}: {text}"));
                    return entry;
                }
                Answer::Unknown => {
                    entry.unknown = Some(*step);
                    return entry;
                }
            }
        }
        entry
    }
}

/// Drives `plan` through the API at `api`.
pub async fn drive(
    http: reqwest::Client,
    api: String,
    plan: Arc<Vec<PlannedOrder>>,
    spec: LoadSpec,
    gate: Arc<Gate>,
) -> LoadOutcome {
    let began = Instant::now();
    let ledger = Arc::new(Mutex::new(vec![LedgerEntry::default(); plan.len()]));
    let anomalies = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..spec.concurrency.max(1) {
        let (plan, gate, ledger, anomalies, spec) =
            (plan.clone(), gate.clone(), ledger.clone(), anomalies.clone(), spec.clone());
        let mut worker =
            Worker { http: http.clone(), api: api.clone(), deadline: spec.step_deadline, requests: 0, retries: 0 };
        tasks.push(tokio::spawn(async move {
            loop {
                let index = gate.started.fetch_add(1, Ordering::SeqCst);
                let Some(order) = plan.get(index) else { break };
                gate.admit(index).await;
                if let Some(total) = spec.spread_over {
                    let due = began + total.mul_f64(index as f64 / plan.len() as f64);
                    tokio::time::sleep_until(due).await;
                }
                let entry = worker.order(spec.seed, order, &anomalies).await;
                if let Ok(mut l) = ledger.lock() {
                    l[index] = entry;
                }
            }
            (worker.requests, worker.retries)
        }));
    }
    let mut outcome = LoadOutcome::default();
    for t in tasks {
        if let Ok((requests, retries)) = t.await {
            outcome.requests += requests;
            outcome.retries += retries;
        }
    }
    outcome.ledger = ledger.lock().map(|l| l.clone()).unwrap_or_default();
    outcome.anomalies = anomalies.lock().map(|a| a.clone()).unwrap_or_default();
    outcome.elapsed = began.elapsed();
    outcome
}
