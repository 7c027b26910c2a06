//! A member of the consumer group on one JetStream partition subject
//! ([`crate::group::Member`]): it pulls from the group's durable consumer ([`super::group`]),
//! renews the `AckWait` of the batch being worked on, and dead-letters to the dead letters'
//! stream, making it again if JetStream lost it.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::Context;
use async_nats::Client;

use super::group::{self, GroupSettings};
use super::Layout;
use crate::group::{fields_json, GroupError, Letter, MemberSettings, Received};
use crate::Delivery;

/// How many unacknowledged messages the whole group may have out at once on a partition, in
/// batches: room for 8 replicas working on a batch each (a ninth waits for one to finish), and
/// a bound on what a dead replica leaves for `AckWait` to return.
const MAX_ACK_PENDING_BATCHES: i64 = 8;

pub struct Member {
    client: Client,
    js: Context,
    layout: Layout,
    /// The partition.
    index: usize,
    settings: MemberSettings,
    group: GroupSettings,
    bound: Option<PullConsumer>,
    /// The batch last handed over, until it is settled.
    working: Vec<group::Delivery>,
}

impl Member {
    /// A member on partition `index` of `layout`, on `client`.
    pub fn new(client: Client, layout: Layout, index: usize, settings: MemberSettings) -> Self {
        let group = GroupSettings {
            group: settings.group.clone(),
            ack_wait: settings.claim_min_idle,
            batch: settings.batch_size as usize,
            max_ack_pending: i64::from(settings.batch_size) * MAX_ACK_PENDING_BATCHES,
        };
        let js = super::context(client.clone());
        Self { client, js, layout, index, settings, group, bound: None, working: Vec::new() }
    }

    /// The group's consumer, bound to (made, or updated to the settings) if it is not.
    async fn consumer(&mut self) -> Result<&mut PullConsumer, GroupError> {
        if self.bound.is_none() {
            let consumer = group::ensure_consumer(&self.js, &self.layout, self.index, &self.group)
                .await
                .map_err(GroupError::of_nats)?;
            let s = &self.settings;
            tracing::info!(subject = %self.layout.subjects[self.index], group = %s.group, consumer = %s.consumer,
                "consuming");
            self.bound = Some(consumer);
        }
        match self.bound.as_mut() {
            Some(consumer) => Ok(consumer),
            None => unreachable!("the consumer was just bound"),
        }
    }

    /// Pulls a batch. Messages pulled are this member's until acknowledged or `AckWait`
    /// passes; `BLOCK` bounds how long it waits.
    pub async fn next(&mut self) -> Result<Received, GroupError> {
        let (batch, block) = (self.group.batch, self.settings.block);
        let consumer = self.consumer().await?;
        let pulled = match group::pull(consumer, batch, block).await {
            Ok(pulled) => pulled,
            Err(e) => {
                self.bound = None;
                return Err(GroupError::of_nats(e));
            }
        };
        let deliveries = pulled.iter().map(|p| Delivery { id: p.id(), fields: Some(p.fields.clone()) }).collect();
        // Counted only when they matter, as on Redis: a batch with a message delivered before.
        let redelivered = pulled.iter().any(|p| p.delivered > 1);
        let delivery_counts = if redelivered {
            pulled.iter().map(|p| (p.id(), u64::try_from(p.delivered).unwrap_or(0))).collect()
        } else {
            Default::default()
        };
        self.working = pulled;
        Ok(Received { deliveries, redelivered, delivery_counts })
    }

    /// While `work` runs, renews the batch's `AckWait`, so that no other member gets it
    /// meanwhile (a member frozen or dead renews nothing, and its messages go to another
    /// after `AckWait`).
    pub async fn alongside<T>(&mut self, work: impl Future<Output = T>) -> (T, Result<(), GroupError>) {
        if self.working.is_empty() {
            return (work.await, Ok(()));
        }
        let renew_every = (self.settings.claim_min_idle / 3).max(Duration::from_millis(100));
        let working = &self.working;
        let renew = async {
            loop {
                tokio::time::sleep(renew_every).await;
                if let Err(e) = group::progress(working).await {
                    tracing::debug!(error = %e, "renewing the batch's AckWait failed");
                }
            }
        };
        tokio::select! {
            done = work => (done, Ok(())),
            () = renew => unreachable!("renewing never ends"),
        }
    }

    pub async fn settle(&mut self, letters: &[Letter], ack: &[String]) -> Result<(), GroupError> {
        for letter in letters {
            let body = serde_json::json!({
                "reason": letter.reason,
                "original_entry_id": letter.original_entry_id,
                "event_id": letter.event_id,
                "aggregate_id": letter.aggregate_id,
                "fields": fields_json(&letter.fields),
            });
            self.add_dead_letter(body.to_string()).await.map_err(GroupError::of_nats)?;
        }
        let ack: HashSet<&str> = ack.iter().map(String::as_str).collect();
        let ids: Vec<String> = self.working.iter().map(group::Delivery::id).collect();
        let done: Vec<&group::Delivery> =
            self.working.iter().zip(&ids).filter(|(_, id)| ack.contains(id.as_str())).map(|(p, _)| p).collect();
        group::ack(&self.client, &done).await.map_err(GroupError::of_nats)?;
        self.working.clear();
        Ok(())
    }

    /// Adds a letter to the dead letters' stream, making the stream again if JetStream lost it
    /// (the relays make the events' stream again, not this one): without it no letter could be
    /// added, and the entry, never acknowledged, would come back every `AckWait`.
    async fn add_dead_letter(&self, body: String) -> Result<(), String> {
        let subject = self.layout.dlq_subject.clone();
        let stored = match self.js.publish(subject.clone(), body.clone().into()).await {
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
        tracing::warn!(stream = self.layout.dlq_stream, "the dead letters' stream is gone: making it again");
        super::ensure_dlq(&self.js, &self.layout, self.settings.dlq_max_len).await.map_err(|e| e.to_string())?;
        let ack = self.js.publish(subject, body.into()).await.map_err(|e| e.to_string())?;
        ack.await.map(|_| ()).map_err(|e| format!("dead letter not stored: {e}"))
    }

    /// Messages the group's consumer on this partition has delivered and not had acknowledged
    /// (binding to it first); `None` when its info does not come (a sample, not worth a
    /// failure).
    pub async fn pending(&mut self) -> Result<Option<u64>, GroupError> {
        match self.consumer().await?.info().await {
            Ok(info) => Ok(Some(info.num_ack_pending as u64)),
            Err(e) => {
                tracing::debug!(error = %e, "the group's consumer info is not at hand");
                Ok(None)
            }
        }
    }
}
