//! Noticing that Redis lost the stream's data, and republishing what it lost, by itself.
//!
//! Each partition stream is looked after on its own. A lost stream is noticed by its marker
//! (`<stream>:relay-epoch`, in the stream's cluster slot; also kept in
//! `stream_positions`) being gone: the one relay whose `SET NX` of a new marker wins records the
//! retained events owed since the last point every group had acknowledged, less [`MARGIN`];
//! whichever relay leases that owed republishing does it. Lost tail entries under a kept marker
//! are noticed by [`crate::tails`]. The argument for why nothing is skipped, and what is not
//! noticed: docs/RELIABILITY.md, "Bounded state".

use std::time::Duration;

pub use broker::redis::marker::{marker_key, StreamKeys};

use broker::redis::marker::{self, Looked};
use broker::redis::target::{RedisConn, RedisTarget, Timeouts};
use broker::redis::{ConnectionLike, RedisError};
use chrono::{DateTime, Utc};
use service_kit::Shutdown;
use sqlx::PgPool;

use crate::metrics::Metrics;
use broker::publish::Publisher;
use broker::redis::tails::Tails;

/// How often the marker is checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Republishing starts at least this much before the recorded point (clocks of Redis and
/// Postgres).
pub const MARGIN: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("republishing: {0}")]
    Replay(#[from] crate::replay::ReplayError),
}

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The marker is where it was (or another relay has just replaced it).
    Intact,
    /// First check ever for this stream: the marker was set and recorded.
    Started,
    /// The marker was gone: this relay set a new one and recorded that events published since
    /// `since` are owed (republished by whichever relay claims them first).
    Lost { since: DateTime<Utc> },
}

/// The marker recorded for `stream`, and the point below which every group had acknowledged
/// everything (ms), if any was recorded.
async fn recorded(pool: &PgPool, stream: &str) -> Result<Option<(String, Option<i64>)>, sqlx::Error> {
    let row = sqlx::query!("SELECT epoch, acked_below_ms FROM stream_positions WHERE stream = $1", stream)
        .fetch_optional(pool)
        .await?;
    Ok(row.map(|r| (r.epoch, r.acked_below_ms)))
}

/// Looks at the marker, setting it (and recording what to republish) if it is gone.
pub async fn check(
    conn: &mut (impl ConnectionLike + Send),
    pool: &PgPool,
    keys: &StreamKeys,
    retention: Duration,
    margin: Duration,
) -> Result<Check, RecoveryError> {
    let stream = keys.stream.as_str();
    let recorded = recorded(pool, stream).await?;
    let token = ulid::Ulid::new().to_string();
    if !marker::set_if_none(conn, keys, &token).await? {
        if recorded.is_none() {
            // Set before this database knew of it (a database restored or replaced): record it.
            let current = marker::get(conn, keys).await?;
            if let Some(current) = current {
                sqlx::query!(
                    "INSERT INTO stream_positions (stream, epoch) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    stream,
                    current,
                )
                .execute(pool)
                .await?;
            }
        }
        return Ok(Check::Intact);
    }
    let since = recorded.as_ref().map(|(_, acked_below_ms)| owed_from(*acked_below_ms, retention, margin));
    // The marker and what is owed are recorded together; a second loss before the first is
    // republished owes from the earlier point.
    let recorded_now = sqlx::query!(
        "INSERT INTO stream_positions (stream, epoch, recover_since) VALUES ($1, $2, $3)
         ON CONFLICT (stream) DO UPDATE SET epoch = EXCLUDED.epoch, updated_at = now(),
           recover_since = LEAST(COALESCE(stream_positions.recover_since, EXCLUDED.recover_since),
                                 EXCLUDED.recover_since)",
        stream,
        &token,
        since,
    )
    .execute(pool)
    .await;
    if let Err(e) = recorded_now {
        // Not recorded: take the marker back (if still ours), so the loss is noticed again.
        marker::release(conn, keys, &token).await;
        return Err(e.into());
    }
    Ok(since.map_or(Check::Started, |since| Check::Lost { since }))
}

/// The database's side of noticing a loss by an epoch the broker keeps itself (JetStream's
/// stream creation time: a stream lost and made again is another): the first epoch seen is
/// recorded; another than the one recorded means the stream's data was lost, and the one relay
/// whose update wins records that the events published since the last point every group had
/// acknowledged (less `margin`) are owed.
pub async fn note_epoch(
    pool: &PgPool,
    stream: &str,
    epoch: &str,
    retention: Duration,
    margin: Duration,
) -> Result<Check, sqlx::Error> {
    let Some((recorded, acked_below_ms)) = recorded(pool, stream).await? else {
        sqlx::query!(
            "INSERT INTO stream_positions (stream, epoch) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            stream,
            epoch,
        )
        .execute(pool)
        .await?;
        return Ok(Check::Started);
    };
    if recorded == epoch {
        return Ok(Check::Intact);
    }
    let since = owed_from(acked_below_ms, retention, margin);
    let replaced = sqlx::query!(
        "UPDATE stream_positions SET epoch = $3, updated_at = now(),
           recover_since = LEAST(COALESCE(recover_since, $4), $4)
         WHERE stream = $1 AND epoch = $2",
        stream,
        &recorded,
        epoch,
        since,
    )
    .execute(pool)
    .await?
    .rows_affected();
    // Another relay noticed it first.
    Ok(if replaced == 1 { Check::Lost { since } } else { Check::Intact })
}

/// Where republishing starts for a loss of what came after `point_ms` (entry-id time; `None`:
/// unknown): `margin` before it, and never before the oldest retained event.
fn owed_from(point_ms: Option<i64>, retention: Duration, margin: Duration) -> DateTime<Utc> {
    let oldest_retained = Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    point_ms
        .and_then(DateTime::<Utc>::from_timestamp_millis)
        .map(|at| at - chrono::Duration::from_std(margin).unwrap_or_default())
        .map_or(oldest_retained, |at| at.max(oldest_retained))
}

/// What checking the entries a relay had added found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailCheck {
    /// Each is held, or too old to judge.
    Held,
    /// The marker is not the one recorded: the marker's check comes first.
    MarkerChanged,
    /// The marker is another than the one seen when the entries were added: their stream was
    /// lost whole and replaced, which its marker's loss covers.
    Replaced,
    /// One was gone: recorded that events published since `since` are owed.
    Lost { since: DateTime<Utc> },
}

/// Checks that Redis still holds each of `ids` (entries this relay had added before Redis went
/// away, to the stream whose marker was `seen`). One gone while younger than
/// `stream_retention` (less a second) was lost, with everything after the newest entry still
/// held before it: records that the events published since then are owed.
pub async fn check_tails(
    conn: &mut (impl ConnectionLike + Send),
    pool: &PgPool,
    keys: &StreamKeys,
    ids: &[String],
    seen: Option<&str>,
    settings: &RecoverySettings,
) -> Result<TailCheck, RecoveryError> {
    let stream = keys.stream.as_str();
    let recorded = recorded(pool, stream).await?;
    let Some((epoch, acked_below_ms)) = recorded else { return Ok(TailCheck::MarkerChanged) };
    let young = settings.stream_retention.saturating_sub(Duration::from_secs(1));
    let mut since: Option<DateTime<Utc>> = None;
    for id in ids {
        let (current, looked) = marker::look_for(conn, keys, id, young).await?;
        if current.as_deref() != Some(epoch.as_str()) {
            return Ok(TailCheck::MarkerChanged);
        }
        if seen.is_some_and(|seen| seen != epoch) {
            return Ok(TailCheck::Replaced);
        }
        if let Looked::Gone { before } = looked {
            let from = owed_from(
                before.as_deref().and_then(marker::id_ms).or(acked_below_ms),
                settings.retention,
                settings.margin,
            );
            since = Some(since.map_or(from, |s| s.min(from)));
        }
    }
    let Some(since) = since else { return Ok(TailCheck::Held) };
    let owed = sqlx::query!(
        "UPDATE stream_positions SET recover_since = LEAST(COALESCE(recover_since, $3), $3), updated_at = now()
         WHERE stream = $1 AND epoch = $2",
        stream,
        &epoch,
        since,
    )
    .execute(pool)
    .await?
    .rows_affected();
    Ok(if owed == 1 { TailCheck::Lost { since } } else { TailCheck::MarkerChanged })
}

/// The republishing owed for `stream`, if any and no other relay holds it: held by this relay
/// for [`LEASE`] (renew it while republishing).
pub async fn claim_owed(pool: &PgPool, stream: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar!(
        "UPDATE stream_positions SET recovering_until = now() + $2 * interval '1 millisecond'
         WHERE stream = $1 AND recover_since IS NOT NULL AND (recovering_until IS NULL OR recovering_until < now())
         RETURNING recover_since",
        stream,
        service_kit::prune::millis(LEASE),
    )
    .fetch_optional(pool)
    .await
    .map(Option::flatten)
}

/// Keeps holding the owed republishing.
async fn renew(pool: &PgPool, stream: &str) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE stream_positions SET recovering_until = now() + $2 * interval '1 millisecond' WHERE stream = $1",
        stream,
        service_kit::prune::millis(LEASE),
    )
    .execute(pool)
    .await
    .map(|_| ())
}

/// The republishing owed from `since` is done (unless a later loss owes from an earlier point
/// meanwhile, which stays owed).
async fn owed_done(pool: &PgPool, stream: &str, since: DateTime<Utc>) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE stream_positions SET recover_since = NULL, recovering_until = NULL
         WHERE stream = $1 AND recover_since = $2",
        stream,
        since,
    )
    .execute(pool)
    .await
    .map(|_| ())
}

/// Lets the owed republishing go, for the next relay to look (this one included) to take over.
async fn let_owed_go(pool: &PgPool, stream: &str) -> Result<(), sqlx::Error> {
    sqlx::query!("UPDATE stream_positions SET recovering_until = NULL WHERE stream = $1", stream)
        .execute(pool)
        .await
        .map(|_| ())
}

/// How long a relay holds an owed republishing without renewing it.
const LEASE: Duration = Duration::from_secs(60);

/// Records the point below which every group has acknowledged everything, while the marker
/// is the one recorded (`epoch`: the marker's value as the point was measured; a point
/// measured on a stream that has lost its data, before the loss is noticed, is not taken);
/// it only moves on.
pub async fn record_acked_below(
    pool: &PgPool,
    stream: &str,
    epoch: &str,
    acked_below_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE stream_positions SET acked_below_ms = GREATEST(acked_below_ms, $2), updated_at = now()
         WHERE stream = $1 AND epoch = $3",
        stream,
        acked_below_ms,
        epoch,
    )
    .execute(pool)
    .await
    .map(|_| ())
}

/// Checks each partition's marker at start and every [`CHECK_EVERY`] until shutdown, and
/// after Redis went away the entries this relay had added (`tails`, one per partition), and
/// republishes what a loss owes (whichever relay noticed it). Failures (Redis or Postgres
/// down) are logged and tried again.
pub async fn recovery_loop(
    target: RedisTarget,
    pool: PgPool,
    mut publisher: Publisher,
    tails: Vec<Tails>,
    settings: RecoverySettings,
    metrics: Metrics,
    shutdown: Shutdown,
) {
    let timeouts = Timeouts::new(Duration::from_secs(2), Duration::from_secs(10));
    let mut conn: Option<RedisConn> = None;
    let mut connected_before = false;
    let went_away = || tails.iter().for_each(Tails::redis_went_away);
    loop {
        if conn.is_none() {
            conn = target.connect(timeouts).await.ok();
            if conn.is_none() && connected_before {
                went_away();
            }
        }
        for (index, keys) in settings.partitions.iter().enumerate() {
            let Some(c) = conn.as_mut() else { break };
            connected_before = true;
            let looked =
                recover_once(c, &pool, &mut publisher, (index, keys), &tails[index], &settings, &metrics, &shutdown)
                    .await;
            if let Err(e) = looked {
                tracing::warn!(stream = keys.stream, error = %e,
                    "checking the stream's marker, or republishing after a loss, failed; trying again");
                if matches!(e, RecoveryError::Redis(_) | RecoveryError::Replay(_)) {
                    conn = None;
                    went_away();
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
}

/// What the recovery loop needs of the relay's settings.
#[derive(Debug, Clone)]
pub struct RecoverySettings {
    /// Each partition's keys, partition 0 first.
    pub partitions: Vec<StreamKeys>,
    /// `OUTBOX_RETENTION`: how far back events are retained to republish.
    pub retention: Duration,
    /// `REDIS_STREAM_RETENTION`: no entry younger than this is trimmed.
    pub stream_retention: Duration,
    pub batch_size: u32,
    /// Republishing starts this much before the recorded point: [`MARGIN`] for the clocks,
    /// plus the longest a batch takes from its claim (`published_at`) to its `XADD`s.
    pub margin: Duration,
}

#[allow(clippy::too_many_arguments)]
async fn recover_once(
    conn: &mut RedisConn,
    pool: &PgPool,
    publisher: &mut Publisher,
    (partition, keys): (usize, &StreamKeys),
    tails: &Tails,
    settings: &RecoverySettings,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> Result<(), RecoveryError> {
    let stream = keys.stream.as_str();
    match check(conn, pool, keys, settings.retention, settings.margin).await? {
        Check::Lost { since } => {
            // Republishing from the last point every group had acknowledged covers what the
            // entries this relay had added could show.
            tails.take();
            metrics.stream_recoveries.inc();
            tracing::warn!(stream, since = %since.to_rfc3339(),
                "Redis lost the stream's data (its marker is gone); republishing the events published since");
        }
        Check::Started => {
            tails.take();
        }
        Check::Intact => {
            let ids = tails.take();
            if !ids.is_empty() {
                let seen = tails.marker_seen();
                let checked = check_tails(conn, pool, keys, &ids, seen.as_deref(), settings).await;
                match checked {
                    Ok(TailCheck::Lost { since }) => {
                        metrics.stream_recoveries.inc();
                        tracing::warn!(stream, since = %since.to_rfc3339(),
                            "Redis lost the latest entries (one this relay had added is gone, as after a failover \
                             to a replica that had not received it); republishing the events published since");
                    }
                    Ok(TailCheck::Held | TailCheck::Replaced) => {}
                    Ok(TailCheck::MarkerChanged) | Err(_) => tails.put_back(ids),
                }
                checked?;
            }
        }
    }
    tails.saw_marker(marker::get(conn, keys).await?);
    republish_owed(
        pool,
        publisher,
        stream,
        crate::replay::Only::Partition(partition),
        settings.batch_size,
        metrics,
        shutdown,
    )
    .await
}

/// Republishes what a loss of `stream` owes (`only` those events), if any is owed and no other
/// relay holds it, renewing the hold meanwhile; stopped half-way (shutdown), or failed, it lets
/// the hold go for the next relay to look (this one included) to start over.
pub(crate) async fn republish_owed(
    pool: &PgPool,
    publisher: &mut Publisher,
    stream: &str,
    only: crate::replay::Only<'_>,
    batch_size: u32,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> Result<(), RecoveryError> {
    let Some(since) = claim_owed(pool, stream).await? else { return Ok(()) };
    let renewing = async {
        loop {
            tokio::time::sleep(LEASE / 3).await;
            if let Err(e) = renew(pool, stream).await {
                tracing::debug!(stream, error = %e, "renewing the republishing lease failed");
            }
        }
    };
    let republished = tokio::select! {
        done = crate::replay::replay(pool, publisher, since, only, batch_size) => Some(done),
        () = renewing => None,
        () = shutdown.cancelled() => None,
    };
    match republished {
        Some(Ok(n)) => {
            owed_done(pool, stream, since).await?;
            metrics.stream_recovered_events.inc_by(n);
            tracing::warn!(stream, republished = n, "events republished after the broker lost data");
            Ok(())
        }
        Some(Err(e)) => {
            let_owed_go(pool, stream).await?;
            Err(e.into())
        }
        None => {
            // Stopped half-way: the next relay to look takes it over from the start.
            let _ = let_owed_go(pool, stream).await;
            Ok(())
        }
    }
}
