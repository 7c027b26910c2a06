//! The suite's questions, answered by NATS JetStream: one stream with a subject per partition,
//! the group a durable pull consumer on each.

use std::collections::HashSet;
use std::time::Duration;

use broker::async_nats;
use broker::async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use broker::async_nats::jetstream::Context;
use broker::jetstream::{group, Layout};

use super::super::FaultError;

fn nats(e: impl std::fmt::Display) -> FaultError {
    FaultError::Nats(e.to_string())
}

/// JetStream on the server at `url`; an error at once if it does not answer.
pub async fn connect(url: &str) -> Result<Context, FaultError> {
    let client = async_nats::ConnectOptions::new()
        .name("fault-suite")
        .connection_timeout(Duration::from_secs(2))
        .request_timeout(Some(Duration::from_secs(5)))
        .connect(url)
        .await
        .map_err(nats)?;
    let mut js = async_nats::jetstream::new(client);
    js.set_timeout(Duration::from_secs(5));
    Ok(js)
}

/// `(pending, undelivered)` of `group` over every partition: its durable consumers' messages
/// delivered and not acknowledged (`num_ack_pending`), and not yet delivered (`num_pending`).
pub async fn group_backlog(js: &Context, layout: &Layout, group: &str) -> Result<(i64, i64), FaultError> {
    let stream = js.get_stream_no_info(&layout.stream).await.map_err(nats)?;
    let (mut pending, mut undelivered) = (0, 0);
    for (index, subject) in layout.subjects.iter().enumerate() {
        let info = stream
            .consumer_info(layout.durable(group, index))
            .await
            .map_err(|e| FaultError::Nats(format!("the group {group} on {subject}: {e}")))?;
        pending += i64::try_from(info.num_ack_pending).unwrap_or(i64::MAX);
        undelivered += i64::try_from(info.num_pending).unwrap_or(i64::MAX);
    }
    Ok((pending, undelivered))
}

/// `(messages, distinct event_ids)` in the stream, read through a consumer of the suite's own
/// (ephemeral, nothing acknowledged), removed afterwards.
pub async fn census(js: &Context, layout: &Layout) -> Result<(usize, usize), FaultError> {
    let stream = js.get_stream(&layout.stream).await.map_err(nats)?;
    let state = &stream.cached_info().state;
    if state.messages == 0 {
        return Ok((0, 0));
    }
    let last = state.last_sequence;
    let config = pull::Config {
        description: Some("the fault suite's census".to_owned()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::None,
        inactive_threshold: Duration::from_secs(60),
        ..Default::default()
    };
    let reader = stream.create_consumer(config).await.map_err(nats)?;
    let (mut messages, mut distinct) = (0, HashSet::new());
    let read = async {
        loop {
            let batch = group::pull(&reader, 5_000, Duration::from_secs(1)).await.map_err(FaultError::Nats)?;
            let Some(highest) = batch.iter().map(|d| d.sequence).max() else { return Ok(()) };
            for delivery in &batch {
                messages += 1;
                if let Some((_, event_id)) = delivery.fields.iter().find(|(name, _)| name == "event_id") {
                    distinct.insert(event_id.clone());
                }
            }
            if highest >= last {
                return Ok(());
            }
        }
    };
    let read: Result<(), FaultError> = read.await;
    let _ = stream.delete_consumer(&reader.cached_info().name).await;
    read.map(|()| (messages, distinct.len()))
}

/// The event ids of the messages at `sequences`.
pub async fn event_ids(js: &Context, layout: &Layout, sequences: &[u64]) -> Result<Vec<String>, FaultError> {
    let stream = js.get_stream_no_info(&layout.stream).await.map_err(nats)?;
    let mut ids = Vec::with_capacity(sequences.len());
    for seq in sequences {
        let message = stream.get_raw_message(*seq).await.map_err(nats)?;
        if let Some(id) = message.headers.get("event_id") {
            ids.push(id.as_str().to_owned());
        }
    }
    Ok(ids)
}
