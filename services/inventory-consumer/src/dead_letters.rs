//! Dead letters: listing and purging them ([`crate::store::dead_letters`]), and re-driving
//! them to the stream.

use broker::redis::group as stream;
use broker::redis::ConnectionLike;
use domain::Partitions;
use sqlx::PgPool;

use crate::entries::fields_from_json;
use crate::store;

pub use crate::store::dead_letters::{list, purge, DeadLetterRow};

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] broker::redis::RedisError),
    #[error("nats: {0}")]
    Nats(String),
    #[error("no dead letter {0} waiting to be re-driven")]
    NotFound(i64),
}

/// Re-adds the original fields of dead letter `id` (or of all not yet re-driven) to the
/// stream of their order's partition and marks them re-driven. Returns (dead letter id, new entry id) pairs.
///
/// The row is locked while its entry is added, so two operators cannot re-drive it twice; if
/// the mark fails after the XADD the entry is on the stream once more, which the consumer's
/// deduplication absorbs.
pub async fn redrive(
    pool: &PgPool,
    conn: &mut (impl ConnectionLike + Send),
    partitions: &Partitions,
    id: Option<i64>,
) -> Result<Vec<(i64, String)>, DeadLetterError> {
    redrive_to(pool, RedriveTo::Redis(conn), partitions, id).await
}

/// Where re-driven letters go.
pub enum RedriveTo<'a, C> {
    /// The Redis stream of their order's partition.
    Redis(&'a mut C),
    /// The JetStream subject of their order's partition. Without a `Nats-Msg-Id`: a letter
    /// re-driven inside the duplicate window must not be taken for the original.
    Nats(&'a broker::async_nats::jetstream::Context),
}

/// [`redrive`] to the broker `to`.
pub async fn redrive_to<C: ConnectionLike + Send>(
    pool: &PgPool,
    mut to: RedriveTo<'_, C>,
    partitions: &Partitions,
    id: Option<i64>,
) -> Result<Vec<(i64, String)>, DeadLetterError> {
    let layout = broker::jetstream::Layout::new(partitions);
    let mut tx = pool.begin().await?;
    let rows = store::dead_letters::lock_waiting(&mut tx, id).await?;
    if let (Some(id), true) = (id, rows.is_empty()) {
        return Err(DeadLetterError::NotFound(id));
    }
    let mut out = Vec::with_capacity(rows.len());
    for (dl_id, fields) in rows {
        let fields = fields_from_json(&fields);
        // An entry without an order (it was dead-lettered for that) goes to the first partition.
        let aggregate_id = fields.iter().find(|(k, _)| k == domain::fields::AGGREGATE_ID).map(|(_, v)| v.as_slice());
        let partition = aggregate_id.map_or(0, |id| partitions.of(&String::from_utf8_lossy(id)));
        let new_id = match &mut to {
            RedriveTo::Redis(conn) => stream::add(*conn, partitions.stream(partition), &fields).await?,
            RedriveTo::Nats(js) => {
                let (headers, body) =
                    broker::entry::message_of_fields(&fields).map_err(|e| DeadLetterError::Nats(e.to_string()))?;
                let subject = layout.subjects[partition].clone();
                let sent = js
                    .publish_with_headers(subject, headers, body)
                    .await
                    .map_err(|e| DeadLetterError::Nats(e.to_string()))?;
                sent.await.map_err(|e| DeadLetterError::Nats(e.to_string()))?.sequence.to_string()
            }
        };
        store::dead_letters::mark_redriven(&mut tx, dl_id).await?;
        tracing::info!(dead_letter = dl_id, entry_id = %new_id, "re-driven");
        out.push((dl_id, new_id));
    }
    tx.commit().await?;
    Ok(out)
}
