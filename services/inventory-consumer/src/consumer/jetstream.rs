//! The read → apply → acknowledge loop on NATS JetStream (`BROKER=nats`): a member of the
//! group's durable pull consumer on one partition subject ([`broker::jetstream::group`]).
//!
//! The work is the same as on Redis ([`Consumer::process`]): decoding, the batch's one
//! transaction, dead letters recorded in `dead_letters`, failures counted per entry. What
//! differs is the broker's part: a pull instead of `XREADGROUP`, `AckWait` instead of a claim
//! after idle (kept from lapsing while a batch is worked on), and the dead-letter subject.

use std::collections::HashSet;
use std::time::Duration;

use broker::async_nats;
use broker::async_nats::jetstream::context::PublishErrorKind;
use broker::async_nats::jetstream::Context;
use broker::jetstream::group::{self, Delivery as Pulled, GroupSettings};
use broker::jetstream::Layout;
use service_kit::{Backoff, FailureClass};
use tokio::time::Instant;

use super::Consumer;
use crate::entries::fields_json;
use broker::Delivery;

/// Where a loop pulls from: partition `index` of `layout`, on `client`.
pub struct JetStreamMember {
    pub client: async_nats::Client,
    pub layout: Layout,
    pub index: usize,
    /// The dead letters' stream's cap, for making it again if it is gone.
    pub dlq_max_len: u64,
}

/// How many unacknowledged messages the whole group may have out at once on a partition, in
/// batches: room for 8 replicas working on a batch each (a ninth waits for one to finish), and
/// a bound on what a dead replica leaves for `AckWait` to return.
const MAX_ACK_PENDING_BATCHES: i64 = 8;

impl Consumer {
    /// Adds a letter to the dead letters' stream, making the stream again if JetStream lost it
    /// (the relays make the events' stream again, not this one): without it no letter could be
    /// added, and the entry, never acknowledged, would come back every `AckWait`.
    async fn add_dead_letter(&self, js: &Context, member: &JetStreamMember, body: String) -> Result<(), String> {
        let subject = member.layout.dlq_subject.clone();
        let stored = match js.publish(subject.clone(), body.clone().into()).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        let gone = match &stored {
            Ok(_) => return Ok(()),
            Err(e) => e.kind() == PublishErrorKind::StreamNotFound,
        };
        if !gone {
            return stored.map(|_| ()).map_err(|e| format!("dead letter not stored: {e}"));
        }
        tracing::warn!(stream = member.layout.dlq_stream, "the dead letters' stream is gone: making it again");
        broker::jetstream::ensure_dlq(js, &member.layout, member.dlq_max_len).await.map_err(|e| e.to_string())?;
        let ack = js.publish(subject, body.into()).await.map_err(|e| e.to_string())?;
        ack.await.map(|_| ()).map_err(|e| format!("dead letter not stored: {e}"))
    }

    /// Runs until shutdown; JetStream or Postgres outages are waited out with capped backoff.
    pub async fn run_on_jetstream(self, member: JetStreamMember) {
        let c = &self.config;
        let js = broker::jetstream::context(member.client.clone());
        let settings = GroupSettings {
            group: c.consumer_group.clone(),
            ack_wait: c.claim_min_idle,
            batch: c.batch_size as usize,
            max_ack_pending: i64::from(c.batch_size) * MAX_ACK_PENDING_BATCHES,
        };
        let mut retry = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut bound = None;
        let mut next_sample = Instant::now();
        while !self.shutdown.is_cancelled() {
            self.heartbeat.beat();
            let consumer = match &mut bound {
                Some(consumer) => consumer,
                None => match group::ensure_consumer(&js, &member.layout, member.index, &settings).await {
                    Ok(consumer) => {
                        tracing::info!(subject = %self.stream, group = %c.consumer_group, consumer = %c.consumer_name,
                            "consuming");
                        bound.insert(consumer)
                    }
                    Err(e) => {
                        self.interrupted(&e, retry.next_delay()).await;
                        continue;
                    }
                },
            };
            if Instant::now() >= next_sample {
                if let Ok(info) = consumer.info().await {
                    self.metrics.pending_entries(&self.stream).set(i64::try_from(info.num_ack_pending).unwrap_or(0));
                }
                next_sample = Instant::now() + Duration::from_secs(2);
            }
            // Not raced against shutdown: messages pulled are this replica's until acknowledged
            // or `AckWait` passes; BLOCK bounds how long shutdown waits.
            let pulled = match group::pull(consumer, settings.batch, c.block).await {
                Ok(pulled) => pulled,
                Err(e) => {
                    bound = None;
                    self.interrupted(&e, retry.next_delay()).await;
                    continue;
                }
            };
            match self.handle_pulled(&js, &member, pulled).await {
                Ok(()) => retry.reset(),
                Err(e) => self.interrupted(&e, retry.next_delay()).await,
            }
        }
        tracing::info!(consumer = %c.consumer_name, subject = self.stream, "consumer stopped");
    }

    async fn interrupted(&self, error: &str, delay: Duration) {
        self.metrics.failure(FailureClass::transient, "nats");
        tracing::warn!(error, failure_class = %FailureClass::transient, retry_in_ms = delay.as_millis() as u64,
            subject = self.stream, "consumer interrupted");
        tokio::select! {
            () = self.shutdown.cancelled() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }

    /// Applies a pulled batch, then dead-letters and acknowledges what it came to. While the
    /// batch is worked on, its `AckWait` is renewed, so that no other replica gets it meanwhile
    /// (a replica frozen or dead renews nothing, and its messages go to another after
    /// `AckWait`).
    async fn handle_pulled(&self, js: &Context, member: &JetStreamMember, pulled: Vec<Pulled>) -> Result<(), String> {
        if pulled.is_empty() {
            return Ok(());
        }
        let redelivered = pulled.iter().filter(|p| p.delivered > 1).count();
        self.metrics.redelivered.inc_by(redelivered as u64);
        let batch: Vec<Delivery> =
            pulled.iter().map(|p| Delivery { id: p.id(), fields: Some(p.fields.clone()) }).collect();
        let renew_every = (self.config.claim_min_idle / 3).max(Duration::from_millis(100));
        let renew = async {
            loop {
                tokio::time::sleep(renew_every).await;
                if let Err(e) = group::progress(&pulled).await {
                    tracing::debug!(error = %e, "renewing the batch's AckWait failed");
                }
            }
        };
        let handled = tokio::select! {
            handled = self.process(batch) => handled,
            () = renew => unreachable!("renewing never ends"),
        };
        for letter in &handled.letters {
            let body = serde_json::json!({
                "reason": letter.reason,
                "original_entry_id": letter.stream_entry_id,
                "event_id": letter.event_id,
                "aggregate_id": letter.aggregate_id,
                "fields": fields_json(&letter.fields),
            });
            self.add_dead_letter(js, member, body.to_string()).await?;
        }
        let ack: HashSet<&str> = handled.ack.iter().map(String::as_str).collect();
        let ids: Vec<String> = pulled.iter().map(Pulled::id).collect();
        let done: Vec<&Pulled> =
            pulled.iter().zip(&ids).filter(|(_, id)| ack.contains(id.as_str())).map(|(p, _)| p).collect();
        group::ack(&member.client, &done).await?;
        if redelivered > 0 {
            // An entry applied on a later try may have failures counted from earlier ones.
            let applied: Vec<&str> = handled.applied.iter().map(String::as_str).collect();
            self.forget_failures(&applied).await;
        }
        Ok(())
    }
}
