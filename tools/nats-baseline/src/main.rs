//! The baseline scripts/bench-nats measures the relay against: the outbox's events, read into
//! memory first, published to a JetStream stream of their own by async-nats alone (each
//! message with its `Nats-Msg-Id`, batches of `--batch` sent at once and their
//! acknowledgements awaited, as the relay does), timed from the first message to the last
//! acknowledgement. No claim, no record, no retry: what the transport takes at most.
//!
//! Prints `<events> <seconds> <events per second>`.

use std::time::Instant;

use anyhow::Context;
use broker::async_nats;
use clap::Parser;
use futures::future::try_join_all;
use outbox::row::{OutboxRow, EVENT_COLUMNS};

#[derive(Parser)]
struct Args {
    /// The orders database, its outbox loaded.
    #[arg(long)]
    database_url: String,
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The stream's name and subject (made, or emptied, first).
    #[arg(long)]
    stream: String,
    #[arg(long, default_value_t = 1000)]
    batch: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pool = sqlx::PgPool::connect(&args.database_url).await.context("DATABASE_URL")?;
    let rows: Vec<OutboxRow> = sqlx::query_as(&format!("SELECT {EVENT_COLUMNS} FROM outbox ORDER BY id"))
        .fetch_all(&pool)
        .await
        .context("reading the outbox")?;
    let mut messages = Vec::with_capacity(rows.len());
    for row in rows {
        // As the relay makes an entry of a row (and a message of the entry).
        let entry = row.to_entry(usize::MAX).map_err(anyhow::Error::msg)?;
        messages.push(broker::entry::encode(&entry, 1 << 20).context("an event as a message")?);
    }

    let client = async_nats::connect(&args.nats_url).await.context("NATS_URL")?;
    let js = async_nats::jetstream::new(client);
    let name: String = args.stream.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    let _ = js.delete_stream(&name).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![args.stream.clone()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("making the stream")?;

    let started = Instant::now();
    for chunk in messages.chunks(args.batch) {
        let mut acks = Vec::with_capacity(chunk.len());
        for m in chunk {
            let publish = async_nats::jetstream::message::PublishMessage::build()
                .headers(m.headers.clone())
                .payload(m.body.clone());
            acks.push(js.send_publish(args.stream.clone(), publish).await.context("publishing")?);
        }
        try_join_all(acks.into_iter().map(std::future::IntoFuture::into_future)).await.context("an acknowledgement")?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let _ = js.delete_stream(&name).await;
    println!("{} {seconds:.3} {:.0}", messages.len(), messages.len() as f64 / seconds);
    Ok(())
}
