//! Closed-loop load on the order API, each scenario beside a baseline (`GET /healthz`) measured
//! in the same run, so the figures say what the database work costs on this machine.
//!
//! Runs the service in-process (its own runtime and worker threads) on a fresh database of the
//! Postgres at `TEST_POSTGRES_URL`:
//!
//! ```text
//! cargo run --release -p order-service --example bench_api
//! BENCH_SECONDS=10 BENCH_CONCURRENCY=32 BENCH_SERVER_THREADS=2 cargo run --release -p order-service --example bench_api
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails loudly

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use order_service::{Application, Config, Shutdown};
use serde_json::json;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Clone, Copy)]
enum Scenario {
    Healthz,
    GetOrder,
    Create,
    CreateWithKey,
    ReplayKey,
    ConfirmCancel,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::Healthz => "GET /healthz (baseline)",
            Self::GetOrder => "GET /orders/{id}",
            Self::Create => "POST /orders",
            Self::CreateWithKey => "POST /orders + new Idempotency-Key",
            Self::ReplayKey => "POST /orders, replayed key",
            Self::ConfirmCancel => "create, confirm, cancel (3 requests)",
        }
    }
}

fn main() {
    let seconds: u64 = env_or("BENCH_SECONDS", 5);
    let concurrency: usize = env_or("BENCH_CONCURRENCY", 16);
    let server_threads: usize = env_or("BENCH_SERVER_THREADS", 2);

    // The service on runtime of its own, like a separate process.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let shutdown = Shutdown::new();
    let server_shutdown = shutdown.clone();
    let server = std::thread::spawn(move || {
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(server_threads).enable_all().build().unwrap();
        rt.block_on(async move {
            let db = test_support::fresh_database("bench_api").await;
            let mut config = Config::new(&db.url, "127.0.0.1:0".parse().unwrap());
            config.database_max_connections = 16;
            let app = Application::build(&config, server_shutdown).await.unwrap();
            addr_tx.send(app.local_addr()).unwrap();
            app.run().await.unwrap();
        });
    });
    let addr = addr_rx.recv().unwrap();
    let base = format!("http://{addr}");

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build().unwrap();
        test_support::eventually("ready", Duration::from_secs(30), || async {
            let r = client.get(format!("{base}/readyz")).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
        let body =
            json!({"customer_id": "bench", "items": [{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1250}]});
        let seed: serde_json::Value =
            client.post(format!("{base}/orders")).json(&body).send().await.unwrap().json().await.unwrap();
        let seed_id = seed["id"].as_str().unwrap().to_owned();
        client.post(format!("{base}/orders")).header("idempotency-key", "replayed").json(&body).send().await.unwrap();

        println!("concurrency {concurrency}, {seconds} s per scenario, {server_threads} server threads\n");
        println!("{:<40} {:>10} {:>10} {:>10} {:>8}", "scenario", "req/s", "p50 ms", "p99 ms", "errors");
        let scenarios = [
            Scenario::Healthz,
            Scenario::GetOrder,
            Scenario::Create,
            Scenario::CreateWithKey,
            Scenario::ReplayKey,
            Scenario::ConfirmCancel,
            Scenario::Healthz,
        ];
        for scenario in scenarios {
            let key_counter = Arc::new(AtomicU64::new(0));
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let workers = (0..concurrency).map(|_| {
                let (client, base, body, seed_id, keys) =
                    (client.clone(), base.clone(), body.clone(), seed_id.clone(), key_counter.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut errors = 0u64;
                    while Instant::now() < deadline {
                        let started = Instant::now();
                        let ok = match scenario {
                            Scenario::Healthz => {
                                client.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status() == 200)
                            }
                            Scenario::GetOrder => client
                                .get(format!("{base}/orders/{seed_id}"))
                                .send()
                                .await
                                .is_ok_and(|r| r.status() == 200),
                            Scenario::Create => client
                                .post(format!("{base}/orders"))
                                .json(&body)
                                .send()
                                .await
                                .is_ok_and(|r| r.status() == 201),
                            Scenario::CreateWithKey => {
                                let key = format!("k-{}", keys.fetch_add(1, Ordering::Relaxed));
                                let r =
                                    client.post(format!("{base}/orders")).header("idempotency-key", key).json(&body);
                                r.send().await.is_ok_and(|r| r.status() == 201)
                            }
                            Scenario::ReplayKey => {
                                let r = client
                                    .post(format!("{base}/orders"))
                                    .header("idempotency-key", "replayed")
                                    .json(&body);
                                r.send().await.is_ok_and(|r| r.status() == 201)
                            }
                            Scenario::ConfirmCancel => confirm_cancel(&client, &base, &body).await,
                        };
                        latencies.push(started.elapsed());
                        errors += u64::from(!ok);
                    }
                    (latencies, errors)
                })
            });
            let started = Instant::now();
            let mut latencies = Vec::new();
            let mut errors = 0;
            for worker in futures::future::join_all(workers).await {
                let (l, e) = worker.unwrap();
                latencies.extend(l);
                errors += e;
            }
            let elapsed = started.elapsed().as_secs_f64();
            latencies.sort_unstable();
            let pct = |p: f64| {
                latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64() * 1e3
            };
            let rate = latencies.len() as f64 / elapsed;
            println!("{:<40} {:>10.0} {:>10.2} {:>10.2} {:>8}", scenario.name(), rate, pct(0.5), pct(0.99), errors);
        }
    });
    shutdown.cancel();
    server.join().unwrap();
}

async fn confirm_cancel(client: &reqwest::Client, base: &str, body: &serde_json::Value) -> bool {
    let Ok(r) = client.post(format!("{base}/orders")).json(body).send().await else { return false };
    let Ok(order) = r.json::<serde_json::Value>().await else { return false };
    let id = order["id"].as_str().unwrap_or_default();
    let mut ok = true;
    for action in ["confirm", "cancel"] {
        ok &= client.post(format!("{base}/orders/{id}/{action}")).send().await.is_ok_and(|r| r.status() == 200);
    }
    ok
}
