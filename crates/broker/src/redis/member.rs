//! A member of the consumer group on one Redis stream ([`crate::group::Member`]).
//!
//! After each (re)connection it reads its own pending entries first (left by a previous run
//! or a broken connection), from the start of its pending list. Then, in turn: it removes the
//! group's departed members every `departed_after / 2`, scans the group's pending list for
//! entries idle past `CLAIM_MIN_IDLE` every `CLAIM_MIN_IDLE / 2` (`XAUTOCLAIM`, a step per
//! call), and reads new entries, blocking up to `BLOCK`.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::group as stream;
use super::target::{RedisConn, RedisTarget, Timeouts};
use super::RedisError;
use crate::group::{GroupError, Letter, MemberSettings, Note, Received};
use crate::Delivery;

/// Steps of one scan for idle entries at most; the next scan starts over.
const CLAIM_STEPS: u32 = 10_000;

pub struct Member {
    target: RedisTarget,
    settings: MemberSettings,
    /// The partition stream, and its dead letters' stream.
    stream: String,
    dlq: String,
    conn: Option<RedisConn>,
    /// Where reading this member's own pending entries goes on (`0`: from the start).
    own_pending: Option<String>,
    /// The scan for idle entries under way: its cursor and steps taken.
    claiming: Option<(String, u32)>,
    next_claim: Instant,
    next_sweep: Instant,
    /// The batch last handed over was a full one of new entries: more are likely waiting.
    read_ahead: bool,
    /// New entries read while the previous batch was applied: delivered to this member.
    prefetched: Option<Vec<Delivery>>,
    /// What it noticed, until the consumer takes it.
    notes: Vec<Note>,
}

impl Member {
    pub fn new(target: RedisTarget, stream: String, dlq: String, settings: MemberSettings) -> Self {
        let now = Instant::now();
        Self {
            target,
            settings,
            stream,
            dlq,
            conn: None,
            own_pending: None,
            claiming: None,
            next_claim: now,
            next_sweep: now,
            read_ahead: false,
            prefetched: None,
            notes: Vec::new(),
        }
    }

    /// The connection, made (with the group, and reading its own pending entries first) if
    /// there is none.
    async fn connection(&mut self) -> Result<&mut RedisConn, GroupError> {
        if self.conn.is_none() {
            // Bounded waits: a read blocks at most BLOCK on the server; a Redis that stops
            // answering is taken for down after a further 10 s.
            let limits = Timeouts::new(Duration::from_secs(5), self.settings.block + Duration::from_secs(10));
            let mut conn = self.target.connect(limits).await.map_err(|e| GroupError::of_redis(&e))?;
            let s = &self.settings;
            stream::ensure_group(&mut conn, &self.stream, &s.group).await.map_err(|e| GroupError::of_redis(&e))?;
            tracing::info!(stream = %self.stream, group = %s.group, consumer = %s.consumer, "consuming");
            // A new session: its own pending entries first, then the housekeeping at once.
            self.own_pending = Some("0".to_owned());
            self.claiming = None;
            self.prefetched = None;
            self.next_claim = Instant::now();
            self.next_sweep = Instant::now();
            self.conn = Some(conn);
        }
        match self.conn.as_mut() {
            Some(conn) => Ok(conn),
            None => unreachable!("the connection was just set"),
        }
    }

    /// A failure: the connection is given up, and the next call starts over (what was read
    /// ahead stays pending, and is read again with this member's own pending entries).
    fn failed(&mut self, e: &RedisError) -> GroupError {
        self.conn = None;
        self.prefetched = None;
        self.read_ahead = false;
        GroupError::of_redis(e)
    }

    pub fn take_notes(&mut self) -> Vec<Note> {
        std::mem::take(&mut self.notes)
    }

    pub async fn next(&mut self) -> Result<Received, GroupError> {
        let mut conn = self.connection().await?.clone();
        match self.step(&mut conn).await {
            Ok(received) => Ok(received),
            Err(e) => Err(self.failed(&e)),
        }
    }

    async fn step(&mut self, conn: &mut RedisConn) -> Result<Received, RedisError> {
        self.read_ahead = false;
        let s = self.settings.clone();
        if let Some(cursor) = self.own_pending.take() {
            let batch =
                stream::read_group(conn, &self.stream, &s.group, &s.consumer, &cursor, s.batch_size, None).await?;
            if let Some(last) = batch.last() {
                self.own_pending = Some(last.id.clone());
                return self.redelivered(conn, batch).await;
            }
        }
        if Instant::now() >= self.next_sweep {
            match stream::remove_departed(conn, &self.stream, &s.group, &s.consumer, s.departed_after).await {
                Ok(removed) if removed.is_empty() => {}
                Ok(removed) => self.notes.push(Note::Departed(removed)),
                Err(e) if super::of_redis(&e).is_transient() => return Err(e),
                // Housekeeping: a refusal (a server that runs no scripts for this user, say)
                // is told, and reading goes on.
                Err(e) => self.notes.push(Note::Refused(GroupError::of_redis(&e))),
            }
            self.next_sweep =
                Instant::now() + (s.departed_after / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
        }
        if self.claiming.is_none() && Instant::now() >= self.next_claim {
            self.claiming = Some(("0-0".to_owned(), 0));
        }
        if let Some((cursor, steps)) = self.claiming.take() {
            let claimed =
                stream::autoclaim(conn, &self.stream, &s.group, &s.consumer, s.claim_min_idle, &cursor, s.batch_size)
                    .await?;
            if !claimed.deleted.is_empty() {
                self.notes.push(Note::Gone(claimed.deleted));
            }
            if claimed.next == "0-0" || steps + 1 >= CLAIM_STEPS {
                self.next_claim =
                    Instant::now() + (s.claim_min_idle / 2).clamp(Duration::from_millis(50), Duration::from_secs(5));
            } else {
                self.claiming = Some((claimed.next, steps + 1));
            }
            if !claimed.entries.is_empty() {
                tracing::info!(claimed = claimed.entries.len(), "claimed idle entries");
            }
            // A step at a time, found or not: the scan goes on at the next call.
            return self.redelivered(conn, claimed.entries).await;
        }
        // Not raced against shutdown by the caller: an interrupted read could lose track of
        // entries it delivered. BLOCK bounds how long it waits.
        let deliveries = match self.prefetched.take() {
            Some(batch) => batch,
            None => {
                stream::read_group(conn, &self.stream, &s.group, &s.consumer, ">", s.batch_size, Some(s.block)).await?
            }
        };
        self.read_ahead = deliveries.len() >= s.batch_size as usize;
        Ok(Received { deliveries, ..Received::default() })
    }

    /// The entries read ahead and not handed over yet.
    pub fn held(&mut self) -> Received {
        self.read_ahead = false;
        Received { deliveries: self.prefetched.take().unwrap_or_default(), ..Received::default() }
    }

    /// A batch of entries delivered before, with how often each was.
    async fn redelivered(&self, conn: &mut RedisConn, deliveries: Vec<Delivery>) -> Result<Received, RedisError> {
        let delivery_counts =
            if deliveries.is_empty() { Default::default() } else { self.delivery_counts(conn, &deliveries).await? };
        Ok(Received { deliveries, redelivered: true, delivery_counts })
    }

    /// How often each entry of `batch` has been delivered (read from this consumer's pending
    /// list over the batch's id range, which may hold other entries: those are left out).
    async fn delivery_counts(
        &self,
        conn: &mut RedisConn,
        batch: &[Delivery],
    ) -> Result<std::collections::HashMap<String, u64>, RedisError> {
        let s = &self.settings;
        let min = batch.iter().map(|d| domain::entry_id_key(&d.id)).min().unwrap_or_default();
        let max = batch.iter().map(|d| domain::entry_id_key(&d.id)).max().unwrap_or_default();
        let (min, max) = (format!("{}-{}", min.0, min.1), format!("{}-{}", max.0, max.1));
        let limit = (batch.len() * 4).max(s.batch_size as usize);
        let mut counts =
            stream::delivery_counts(conn, &self.stream, &s.group, &s.consumer, (&min, &max), limit).await?;
        let ids: HashSet<&str> = batch.iter().map(|d| d.id.as_str()).collect();
        counts.retain(|id, _| ids.contains(id.as_str()));
        Ok(counts)
    }

    /// After a full batch of new entries more are likely waiting: the next is read (without
    /// blocking, so the connection is never held up) while `work` runs.
    pub async fn alongside<T>(&mut self, work: impl Future<Output = T>) -> (T, Result<(), GroupError>) {
        let Some(mut reader) = self.conn.clone().filter(|_| self.read_ahead) else { return (work.await, Ok(())) };
        let s = &self.settings;
        let read = stream::read_group(&mut reader, &self.stream, &s.group, &s.consumer, ">", s.batch_size, None);
        let (next, done) = tokio::join!(read, work);
        // Entries read are this member's to hand over, whatever happens to the batch.
        match next {
            Ok(next) => {
                if !next.is_empty() {
                    self.prefetched = Some(next);
                }
                (done, Ok(()))
            }
            Err(e) => (done, Err(self.failed(&e))),
        }
    }

    pub async fn settle(&mut self, letters: &[Letter], ack: &[String]) -> Result<(), GroupError> {
        let mut conn = self.connection().await?.clone();
        let settled: Result<(), RedisError> = async {
            for letter in letters {
                let mut fields = letter.fields.clone();
                fields.push(("reason".to_owned(), letter.reason.clone().into_bytes()));
                fields.push(("original_entry_id".to_owned(), letter.original_entry_id.clone().into_bytes()));
                stream::add_capped(&mut conn, &self.dlq, self.settings.dlq_max_len, &fields).await?;
            }
            let ack: Vec<&str> = ack.iter().map(String::as_str).collect();
            stream::ack(&mut conn, &self.stream, &self.settings.group, &ack).await
        }
        .await;
        settled.map_err(|e| self.failed(&e))
    }

    pub async fn pending(&mut self) -> Result<u64, GroupError> {
        let mut conn = self.connection().await?.clone();
        let s = &self.settings;
        let pending = stream::pending_count(&mut conn, &self.stream, &s.group, &s.consumer).await;
        pending.map_err(|e| self.failed(&e))
    }
}
