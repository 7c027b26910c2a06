//! A deliberately broken relay, for the reordering control: it numbers each order's events
//! backwards on the stream (the last gets seq 1), so consumers, which apply in seq order,
//! apply them out of their true order. It records them as published under their true seqs,
//! as a relay that renumbered events while publishing would. It publishes to whichever broker
//! the cluster runs on.

use std::collections::HashMap;

use ::broker::jetstream::publish::Publisher;
use ::broker::jetstream::Layout;
use domain::StreamEntry;
use outbox::row::{OutboxRow, EVENT_COLUMNS};

use super::cluster::Cluster;
use super::FaultError;

/// Publishes every outbox row (none must have been published yet) with its seq reversed within
/// its order, and moves them all to `outbox_published`. Returns how many orders had more than
/// one event (those are applied out of order).
pub async fn publish_numbering_backwards(cluster: &Cluster) -> Result<usize, FaultError> {
    let pg = |e: sqlx::Error| FaultError::Postgres(e.to_string());
    let rows: Vec<OutboxRow> = sqlx::query_as(&format!("SELECT {EVENT_COLUMNS} FROM outbox ORDER BY id"))
        .fetch_all(&cluster.orders_db)
        .await
        .map_err(pg)?;
    let mut events_per_order: HashMap<&str, i64> = HashMap::new();
    for r in &rows {
        *events_per_order.entry(&r.aggregate_id).or_default() += 1;
    }
    let mut entries = Vec::with_capacity(rows.len());
    for r in &rows {
        let mut entry = r.to_entry(usize::MAX).map_err(FaultError::Setup)?;
        entry.seq = events_per_order[r.aggregate_id.as_str()] + 1 - r.seq;
        entries.push(entry);
    }
    match &cluster.nats {
        None => publish_to_redis(cluster, &entries).await?,
        Some(nats) => {
            let client = ::broker::jetstream::connect(&nats.url(), "misnumbering-relay")
                .await
                .map_err(|e| FaultError::Nats(e.to_string()))?;
            let partitions = domain::Partitions::new(&cluster.stream, cluster.spec.stream_partitions)
                .map_err(|e| FaultError::Setup(e.to_string()))?;
            for published in Publisher::new(client, Layout::new(&partitions)).publish(&entries).await {
                published.map_err(|e| FaultError::Nats(format!("{e:?}")))?;
            }
        }
    }
    sqlx::query(
        "WITH moved AS (DELETE FROM outbox \
           RETURNING id, event_id, aggregate_type, aggregate_id, seq, event_type, payload, occurred_at, \
                     traceparent, tracestate, attempts, created_at, tenant_id) \
         INSERT INTO outbox_published (id, event_id, aggregate_type, aggregate_id, seq, event_type, payload, \
                                       occurred_at, traceparent, tracestate, attempts, created_at, tenant_id) \
         SELECT * FROM moved",
    )
    .execute(&cluster.orders_db)
    .await
    .map_err(pg)?;
    Ok(events_per_order.values().filter(|n| **n > 1).count())
}

/// `XADD`s every entry to the one stream, in one pipeline.
async fn publish_to_redis(cluster: &Cluster, entries: &[StreamEntry]) -> Result<(), FaultError> {
    let client = cluster.redis_client()?;
    let mut conn = client.get_multiplexed_async_connection().await.map_err(|e| FaultError::Redis(e.to_string()))?;
    let mut pipe = redis::pipe();
    for entry in entries {
        let cmd = pipe.cmd("XADD").arg(&cluster.stream).arg("*");
        for (field, value) in entry.to_fields() {
            cmd.arg(field).arg(value);
        }
        cmd.ignore();
    }
    pipe.query_async::<()>(&mut conn).await.map_err(|e| FaultError::Redis(e.to_string()))
}
