//! Settling a batch: apply it in one transaction and, when that fails, act on the failure's
//! class ([`service_kit::failure`]):
//!
//! - Postgres unreachable, or a lock still held (by a replica frozen mid-batch, whose
//!   transaction the server ends within the idle-in-transaction timeout): wait and retry the
//!   whole batch, as long as it takes. Nothing is counted against the entries.
//! - A conflict or a statement timeout: retry a few times, then entry by entry.
//! - Anything else: entry by entry, so only the entry at fault is held back. An entry the
//!   database refuses (a permanent failure) has the failure counted in `entry_failures`;
//!   after `MAX_DELIVERIES` of them, and unless its event turns out to be applied already, it
//!   is dead-lettered. An entry that fails otherwise stays pending, uncounted.

use std::time::Duration;

use service_kit::connections::Ended;
use service_kit::{failure, Backoff, FailureClass};
use sqlx::PgConnection;

use crate::apply::{apply_batch, BatchResult, Outcome};
use crate::consumer::Consumer;
use crate::entries::{DeadLetter, Incoming};
use crate::store::{batch, entry_failures};

/// Conflicts (serialization, deadlock) or statement timeouts of one batch retried whole.
const CONFLICT_RETRIES: u32 = 3;

/// What a batch came to. Entries in neither list stay pending.
#[derive(Debug, Default)]
pub struct Settled {
    /// Committed outcomes of incoming entries.
    pub outcomes: Vec<Settlement>,
    /// Dead letters recorded: to be added to the dead-letter stream and acknowledged.
    pub dead: Vec<DeadLetter>,
}

/// The committed outcome of one incoming entry.
#[derive(Debug)]
pub struct Settlement {
    /// Its index among the batch's incoming entries.
    pub index: usize,
    pub outcome: Outcome,
    /// What its transaction did besides (events it released, letters of expired events); the
    /// whole batch's, on the first entry, when the batch was applied whole.
    pub result: BatchResult,
}

/// What to do after a batch failed.
enum Retry {
    Wait,
    Again,
    EntryByEntry,
}

fn retry(error: &sqlx::Error, class: FailureClass) -> Retry {
    match (class.is_transient(), failure::is_conflict(error)) {
        (false, _) => Retry::EntryByEntry,
        (true, true) => Retry::Again,
        (true, false) => Retry::Wait,
    }
}

impl Consumer {
    pub(crate) async fn settle(&self, incoming: &[Incoming], dead: Vec<DeadLetter>) -> Settled {
        let mut wait = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut conflicts = 0;
        loop {
            self.heartbeat.beat();
            let error = match self.apply_batch(incoming, &dead).await {
                Ok(mut result) => {
                    let outcomes = std::mem::take(&mut result.outcomes);
                    let mut out: Vec<_> = outcomes
                        .into_iter()
                        .enumerate()
                        .map(|(index, outcome)| Settlement { index, outcome, result: BatchResult::default() })
                        .collect();
                    if let Some(first) = out.first_mut() {
                        first.result = result;
                    }
                    return Settled { outcomes: out, dead };
                }
                Err(e) => e,
            };
            let class = failure::of_postgres(&error);
            self.metrics.failure(class, "postgres");
            match retry(&error, class) {
                Retry::Wait if !self.shutdown.is_cancelled() => {
                    let delay = wait.next_delay();
                    tracing::warn!(error = %error, failure_class = %class, retry_in_ms = delay.as_millis() as u64,
                        "batch not applied; retrying it whole");
                    tokio::select! {
                        () = self.shutdown.cancelled() => return Settled::default(),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                Retry::Again if conflicts < CONFLICT_RETRIES => {
                    conflicts += 1;
                    tracing::info!(error = %error, failure_class = %class, attempt = conflicts, "batch conflicted; retrying");
                }
                Retry::Wait => return Settled::default(),
                Retry::Again | Retry::EntryByEntry => {
                    tracing::warn!(error = %error, failure_class = %class, entries = incoming.len(),
                        "batch failed; applying entry by entry");
                    return self.entry_by_entry(incoming, dead).await;
                }
            }
        }
    }

    async fn entry_by_entry(&self, incoming: &[Incoming], dead: Vec<DeadLetter>) -> Settled {
        let mut settled = Settled::default();
        if !dead.is_empty() {
            match self.apply_batch(&[], &dead).await {
                Ok(_) => settled.dead = dead,
                Err(e) => tracing::error!(error = %e, failure_class = %failure::of_postgres(&e),
                    "dead letters not recorded; left pending"),
            }
        }
        for (i, entry) in incoming.iter().enumerate() {
            self.heartbeat.beat();
            let error = match self.apply_batch(std::slice::from_ref(entry), &[]).await {
                Ok(mut r) => {
                    let outcome = r.outcomes.pop().unwrap_or(Outcome::Duplicate);
                    settled.outcomes.push(Settlement { index: i, outcome, result: r });
                    continue;
                }
                Err(e) => e,
            };
            let class = failure::of_postgres(&error);
            self.metrics.failure(class, "entry");
            let event = &entry.event;
            match class {
                FailureClass::permanent => match self.count_failure(entry, &error).await {
                    Ok(Some(Counted::Duplicate)) => settled.outcomes.push(Settlement {
                        index: i,
                        outcome: Outcome::Duplicate,
                        result: BatchResult::default(),
                    }),
                    Ok(Some(Counted::Dead(letter))) => settled.dead.push(letter),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(entry_id = %entry.stream_id, error = %e,
                        "failure not counted; the entry stays pending"),
                },
                FailureClass::bug => tracing::error!(entry_id = %entry.stream_id, event_id = %event.event_id,
                    aggregate_id = %event.aggregate_id, seq = event.seq, error = %error, failure_class = %class,
                    "entry not applied; left pending (not counted against it)"),
                FailureClass::transient => tracing::warn!(entry_id = %entry.stream_id, event_id = %event.event_id,
                    aggregate_id = %event.aggregate_id, seq = event.seq, error = %error, failure_class = %class,
                    "entry not applied; left pending"),
            }
        }
        settled
    }

    /// Counts a failure that is the entry's own; past `MAX_DELIVERIES` of them the entry is
    /// dead-lettered, unless its event was applied already (then it is a duplicate).
    async fn count_failure(&self, entry: &Incoming, error: &sqlx::Error) -> Result<Option<Counted>, sqlx::Error> {
        let event = &entry.event;
        let reason = error.to_string();
        let event_id = event.event_id.to_string();
        let failures = self
            .on_connection(async |c| entry_failures::record(c, &entry.stream_id, Some(&event_id), &reason).await)
            .await?;
        let max = self.config.max_deliveries;
        tracing::warn!(entry_id = %entry.stream_id, event_id = %event.event_id, aggregate_id = %event.aggregate_id,
            seq = event.seq, failures, max_deliveries = max, error = %reason, failure_class = "permanent",
            "the database refused the entry");
        if u32::try_from(failures).unwrap_or(0) < max {
            return Ok(None);
        }
        if self.on_connection(async |c| batch::already_applied(c, event).await).await? {
            return Ok(Some(Counted::Duplicate));
        }
        let letter = DeadLetter {
            stream_entry_id: entry.stream_id.clone(),
            event_id: Some(event_id),
            aggregate_id: Some(event.aggregate_id.to_string()),
            reason: format!("failed {failures} times (MAX_DELIVERIES is {max}): {reason}"),
            fields: entry.fields.clone(),
        };
        self.apply_batch(&[], std::slice::from_ref(&letter)).await?;
        Ok(Some(Counted::Dead(letter)))
    }

    /// [`apply_batch`] on a connection of `db`.
    async fn apply_batch(&self, incoming: &[Incoming], dead: &[DeadLetter]) -> Result<BatchResult, sqlx::Error> {
        let retention = self.config.dedupe_retention;
        self.on_connection(async |c| apply_batch(c, incoming, dead, retention).await).await
    }

    /// `work` on a connection of `db` (kept unless it failed itself), bounded in time: a server
    /// or network that stops answering costs the connection, not the loop.
    pub(crate) async fn on_connection<T>(
        &self,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        let bounded = async {
            let mut conn = self.db.acquire().await?;
            let done = work(&mut conn).await;
            conn.put_back(Ended::from(&done)).await;
            done
        };
        match tokio::time::timeout(self.apply_deadline, bounded).await {
            Ok(done) => done,
            Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("Postgres did not answer within {:?}; connection closed", self.apply_deadline),
            ))),
        }
    }
}

/// What counting a failure led to.
enum Counted {
    Duplicate,
    Dead(DeadLetter),
}
