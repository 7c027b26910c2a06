//! Load generator for the order API.
//!
//! `concurrency` clients take order slots from a shared [`schedule::Schedule`] (fixed rate,
//! open-loop, or as fast as possible), run each slot's session (create, then maybe confirm,
//! then maybe cancel) and record latencies; at the end the run's events are traced through the
//! databases for end-to-end latency, and the relays' counters show how they shared the work.

pub mod client;
pub mod config;
pub mod e2e;
pub mod mix;
mod progress;
pub mod relays;
pub mod report;
pub mod schedule;
pub mod stats;

use std::sync::Arc;

use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use report::Report;

use client::{Api, OrderConnection};
use mix::Mix;
use schedule::Schedule;
use stats::{Kind, Live, Recorder};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("--{field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("cannot build the HTTP client")]
    Client(#[from] reqwest::Error),
    #[error("seeding stock of {sku} failed: {reason} (is the inventory-consumer at --inventory-url?)")]
    Seed { sku: String, reason: String },
    #[error("a load client failed")]
    ClientTask(#[from] tokio::task::JoinError),
}

/// Runs the load until the duration or order count is reached, or `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<Report, LoadError> {
    config.validate()?;
    let api = Api::new(&config.inventory_url, config.request_timeout)?.with_token(config.token.as_deref());
    let mix = Arc::new(Mix {
        sku_prefix: config.sku_prefix.clone(),
        skus: config.skus,
        max_items: config.max_items,
        confirm_ratio: config.confirm_ratio,
        cancel_ratio: config.cancel_ratio,
    });
    if let Some(on_hand) = config.seed_stock {
        seed_stock(&api, &mix, on_hand).await?;
    }
    // Checked once here: every client connects to the same URL.
    OrderConnection::new(&config.order_url, config.request_timeout)
        .map_err(|reason| LoadError::Config { field: "order-url", reason })?
        .with_token(config.token.as_deref())
        .map_err(|reason| LoadError::Config { field: "token", reason })?;
    let relays_before = relays::snapshot(&api, &config.relay_metrics).await;

    let schedule = Arc::new(Schedule::new(Instant::now(), config.duration, config.orders, config.rate));
    let live = Arc::new(Live::default());
    let ticker = CancellationToken::new();
    if !config.quiet {
        tokio::spawn(progress::tick(schedule.clone(), live.clone(), ticker.clone()));
    }
    // Idempotency keys must differ between runs against the same database.
    let run_id = chrono::Utc::now().timestamp_micros();
    let clients: Vec<_> = (0..config.concurrency)
        .map(|k| {
            let client = Client {
                index: k,
                order_url: config.order_url.clone(),
                token: config.token.clone(),
                request_timeout: config.request_timeout,
                mix: mix.clone(),
                schedule: schedule.clone(),
                live: live.clone(),
                seed: config.seed,
                idempotency_run: config.idempotency_keys.then_some(run_id),
            };
            tokio::spawn(client.run(shutdown.clone()))
        })
        .collect();
    let mut recorder = Recorder::default();
    let mut order_ids = Vec::new();
    for handle in clients {
        let (r, ids) = handle.await?;
        recorder.merge(r);
        order_ids.extend(ids);
    }
    let elapsed = schedule.start().elapsed();
    ticker.cancel();

    let relays_after = relays::snapshot(&api, &config.relay_metrics).await;
    let end_to_end = match (&config.orders_database_url, &config.inventory_database_url) {
        (Some(orders), Some(inventory)) => Some(
            e2e::measure(orders, inventory, &order_ids, config.e2e_wait, &shutdown).await.map_err(|e| e.to_string()),
        ),
        _ => None,
    };
    Ok(Report::new(
        &config,
        elapsed,
        schedule.taken(),
        &recorder,
        end_to_end,
        relays::shares(&config.relay_metrics, &relays_before, &relays_after),
    ))
}

async fn seed_stock(api: &Api, mix: &Mix, on_hand: i64) -> Result<(), LoadError> {
    let mut puts = futures::stream::iter(mix.all_skus())
        .map(|sku| async move { api.set_stock(&sku, on_hand).await.map_err(|f| (sku, f)) })
        .buffer_unordered(16);
    while let Some(result) = puts.next().await {
        result.map_err(|(sku, f)| LoadError::Seed { sku, reason: f.0 })?;
    }
    Ok(())
}

struct Client {
    index: usize,
    order_url: String,
    token: Option<String>,
    request_timeout: std::time::Duration,
    mix: Arc<Mix>,
    schedule: Arc<Schedule>,
    live: Arc<Live>,
    seed: u64,
    idempotency_run: Option<i64>,
}

impl Client {
    /// Takes slots until the schedule is exhausted or shutdown; a request in flight finishes
    /// (it is bounded by the request timeout).
    async fn run(self, shutdown: CancellationToken) -> (Recorder, Vec<String>) {
        let mut recorder = Recorder::default();
        let mut order_ids = Vec::new();
        let mut sessions = self.mix.sessions(self.seed, self.index);
        let conn = OrderConnection::new(&self.order_url, self.request_timeout)
            .and_then(|conn| conn.with_token(self.token.as_deref()));
        let Ok(mut conn) = conn else {
            return (recorder, order_ids);
        };
        while !shutdown.is_cancelled() {
            let Some(slot) = self.schedule.take(Instant::now()) else { break };
            let session = sessions.next_session();
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(slot.due) => {}
            }
            let key = self.idempotency_run.map(|run| format!("load-{run}-{}", slot.index));
            let id = match conn.create(&session.body, key.as_deref()).await {
                Ok(id) => {
                    recorder.success(Kind::Create, slot.due.elapsed(), &self.live);
                    id
                }
                Err(f) => {
                    recorder.failure(Kind::Create, &f.0, &self.live);
                    continue;
                }
            };
            for (wanted, kind, action) in
                [(session.confirm, Kind::Confirm, "confirm"), (session.cancel, Kind::Cancel, "cancel")]
            {
                if !wanted {
                    continue;
                }
                let sent = Instant::now();
                match conn.transition(&id, action).await {
                    Ok(()) => recorder.success(kind, sent.elapsed(), &self.live),
                    Err(f) => recorder.failure(kind, &f.0, &self.live),
                }
            }
            order_ids.push(id);
        }
        (recorder, order_ids)
    }
}
