//! Pre-loads a stream with valid order events for `scripts/bench-consumer`.
//!
//! Usage: bench_load <redis-url> <stream> <events> <skus>
//! Orders are written in windows of 1000: their creates, then confirms, then (for every other
//! order) cancels, so each order's events are spread over the stream as they would be live.

use anyhow::Context;
use chrono::Utc;
use domain::{Event, EventPayload, NewOrder, OrderCancelled, OrderConfirmed, OrderCreated, OrderId};
use ulid::Ulid;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, stream, events, skus] = args.as_slice() else {
        anyhow::bail!("usage: bench_load <redis-url> <stream> <events> <skus>");
    };
    let total: usize = events.parse().context("events")?;
    let skus: usize = skus.parse().context("skus")?;
    let mut conn = redis::Client::open(url.as_str())?.get_multiplexed_async_connection().await?;
    let mut written = 0usize;
    let mut window = 0usize;
    while written < total {
        let mut batch: Vec<Event> = Vec::new();
        let orders: Vec<OrderId> = (0..1000).map(|_| OrderId::new()).collect();
        for (i, order) in orders.iter().enumerate() {
            let a = format!("SKU-{}", (window * 7 + i) % skus);
            let b = format!("SKU-{}", (window * 13 + i * 3 + 1) % skus);
            let new = NewOrder::parse("bench", &[(a, 1 + (i % 3) as i64, 500), (b, 1, 250)])?;
            let total_cents = new.total_cents();
            let created =
                OrderCreated { order_id: *order, customer_id: new.customer_id, items: new.items, total_cents };
            batch.push(event(*order, 1, EventPayload::OrderCreated(created)));
        }
        for order in &orders {
            batch.push(event(*order, 2, EventPayload::OrderConfirmed(OrderConfirmed { order_id: *order })));
        }
        for order in orders.iter().step_by(2) {
            batch.push(event(*order, 3, EventPayload::OrderCancelled(OrderCancelled { order_id: *order })));
        }
        batch.truncate(total - written);
        for chunk in batch.chunks(500) {
            let mut pipe = redis::pipe();
            for e in chunk {
                let cmd = pipe.cmd("XADD").arg(stream).arg("*");
                for (k, v) in e.to_entry().to_fields() {
                    cmd.arg(k).arg(v);
                }
                cmd.ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        written += batch.len();
        window += 1;
    }
    println!("{written}");
    Ok(())
}

fn event(order: OrderId, seq: i64, payload: EventPayload) -> Event {
    Event {
        event_id: Ulid::new(),
        aggregate_id: order,
        seq,
        occurred_at: Utc::now(),
        payload,
        traceparent: None,
        tracestate: None,
        tenant_id: domain::TenantId::default_tenant(),
    }
}
