//! Trimming the events' stream: per partition, the messages that every group on it has
//! acknowledged and that are older than the retention are purged, as the relay trims a Redis
//! stream. A partition without a group keeps everything (nothing has read it). A group is a
//! durable consumer with explicit acknowledgement: a feed's ordered consumer, or anyone's
//! ephemeral one, acknowledges nothing and holds nothing back.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, Info};
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use async_nats::jetstream::Context;
use futures::TryStreamExt;

use super::Layout;

/// Purges what may go, partition by partition; the number of messages purged.
pub async fn trim(js: &Context, layout: &Layout, retention: Duration) -> Result<u64, String> {
    let stream = js.get_stream(&layout.stream).await.map_err(|e| e.to_string())?;
    let groups = groups(&stream).await?;
    let cutoff = time::OffsetDateTime::now_utc() - retention;
    let mut purged = 0;
    for subject in &layout.subjects {
        // Below every group's acknowledgement floor on this subject.
        let Some(floor) = floor(&groups, subject) else { continue };
        let before = first_newer_than(&stream, subject, cutoff, floor + 1).await?;
        if before <= 1 {
            continue;
        }
        let done = stream.purge().filter(subject).sequence(before).await.map_err(|e| e.to_string())?;
        purged += done.purged;
    }
    Ok(purged)
}

/// When the oldest message some group has not acknowledged was stored (now, if every group
/// acknowledged everything): `None` if a partition has no group yet (nothing is known).
pub async fn acked_below(js: &Context, layout: &Layout) -> Result<Option<time::OffsetDateTime>, String> {
    let stream = js.get_stream(&layout.stream).await.map_err(|e| e.to_string())?;
    let groups = groups(&stream).await?;
    let mut below = time::OffsetDateTime::now_utc();
    for subject in &layout.subjects {
        let Some(floor) = floor(&groups, subject) else { return Ok(None) };
        let next = stream.raw_message_builder().sequence(floor + 1).next_by_subject(subject.clone()).send().await;
        match next {
            Ok(m) => below = below.min(m.time),
            // Every message of the subject is acknowledged.
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {}
            // Not known: a point taken now would owe too little after a loss.
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(Some(below))
}

/// The stream's groups: durable consumers with explicit acknowledgement.
async fn groups(stream: &Stream) -> Result<Vec<Info>, String> {
    let consumers: Vec<Info> = stream.consumers().try_collect().await.map_err(|e| e.to_string())?;
    Ok(consumers
        .into_iter()
        .filter(|c| c.config.durable_name.is_some() && c.config.ack_policy == AckPolicy::Explicit)
        .collect())
}

/// The lowest acknowledgement floor of the groups on `subject`, if it has any.
fn floor(groups: &[Info], subject: &str) -> Option<u64> {
    groups.iter().filter(|c| c.config.filter_subject == subject).map(|c| c.ack_floor.stream_sequence).min()
}

/// The sequence of the first message of `subject` stored at or after `cutoff`, below `limit`
/// (`limit` itself if there is none): a binary search over sequences, whose times only grow.
async fn first_newer_than(
    stream: &Stream,
    subject: &str,
    cutoff: time::OffsetDateTime,
    limit: u64,
) -> Result<u64, String> {
    let (mut lo, mut hi) = (1u64, limit);
    // Each round halves [lo, hi): at most 64.
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match stream.raw_message_builder().sequence(mid).next_by_subject(subject.to_owned()).send().await {
            Ok(m) if m.sequence < hi && m.time < cutoff => lo = m.sequence + 1,
            Ok(m) if m.sequence < hi => hi = m.sequence,
            // None of the subject's messages from `mid` on is below `hi`: the answer is below.
            Ok(_) | Err(_) => hi = mid,
        }
    }
    Ok(lo)
}
