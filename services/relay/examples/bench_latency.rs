//! Idle commit-to-publish latency, for scripts/bench-relay.
//!
//! Appends one event at a time, in its own transaction that wakes the relays at commit (as an
//! order-service write at rest does), and waits with `XREAD BLOCK` until a running relay has
//! put it on the stream.
//! Usage: bench_latency <database_url> <redis_url> <stream> <events>

use std::time::{Duration, Instant};

use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, database_url, redis_url, stream, events] = args.as_slice() else {
        return Err("usage: bench_latency <database_url> <redis_url> <stream> <events>".into());
    };
    let events: usize = events.parse()?;
    let pool = sqlx::PgPool::connect(database_url).await?;
    let mut redis = redis::Client::open(redis_url.as_str())?.get_multiplexed_async_connection().await?;
    let payload = r#"{"order_id":"latency"}"#;
    // The stream is new: start from its beginning and track the last entry seen, so an event
    // published before XREAD is issued is still found.
    let mut last_id = "0-0".to_owned();
    let mut micros = Vec::with_capacity(events);
    for i in 0..events {
        let aggregate_id = format!("latency-{i}");
        let mut tx = pool.begin().await?;
        let appended = outbox::append(
            &mut tx,
            outbox::NewEvent {
                aggregate_type: "order",
                aggregate_id: &aggregate_id,
                event_type: "OrderConfirmed",
                payload,
                occurred_at: chrono::Utc::now(),
                notify: true,
            },
        )
        .await?;
        tx.commit().await?;
        let committed = Instant::now();
        let wanted = appended.event_id.to_string();
        'wait: loop {
            let options = StreamReadOptions::default().block(5000).count(100);
            let reply: StreamReadReply = redis.xread_options(&[stream.as_str()], &[last_id.as_str()], &options).await?;
            let Some(key) = reply.keys.into_iter().next() else {
                return Err(format!("event {i} not published within 5 s").into());
            };
            for entry in key.ids {
                last_id = entry.id.clone();
                let id: Option<String> = entry.get("event_id");
                if id.as_deref() == Some(wanted.as_str()) {
                    break 'wait;
                }
            }
        }
        micros.push(committed.elapsed().as_micros() as u64);
        // Let the relay go idle again.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    micros.sort_unstable();
    let pct = |p: f64| micros[((micros.len() as f64 * p).ceil() as usize).clamp(1, micros.len()) - 1] as f64 / 1000.0;
    println!("latency_ms p50={:.2} p99={:.2} max={:.2} n={}", pct(0.50), pct(0.99), pct(1.0), micros.len());
    Ok(())
}
