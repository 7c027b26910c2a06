//! NATS JetStream as the broker.
//!
//! - **One stream** (`REDIS_STREAM` with every character a stream name may not hold made `_`:
//!   `orders_events`) with **a subject per partition**: `REDIS_STREAM` itself with one
//!   partition, `<REDIS_STREAM>.p<i>` with more. Each order's events go to one subject, in seq
//!   order. The stream's subjects are its partitions: a relay or consumer configured with
//!   another number of partitions finds them different and does no work
//!   ([`SetupError::Partitions`]).
//! - **Publishing** ([`publish`]) names every message by its event id (`Nats-Msg-Id`): inside
//!   the stream's duplicate window JetStream stores a republished event once.
//! - **The consumer group** ([`group`]) is a durable pull consumer per partition, explicit
//!   acknowledgement, `AckWait` = `CLAIM_MIN_IDLE` (an entry unacknowledged that long goes to
//!   another replica, as Redis's claim after idle does).
//! - **Dead letters** go to the subject `<REDIS_STREAM>.dlq` in a stream of their own, capped
//!   like the Redis one; the `dead_letters` table stays the record.
//! - **Retention** ([`trim`]): what every group acknowledged and is older than the retention is
//!   purged, per partition, as the relay trims Redis.

pub mod group;
pub mod member;
pub mod publish;
pub mod tail;
pub mod trim;

use std::time::Duration;

use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::Context;
use async_nats::Client;
use domain::Partitions;

/// How long JetStream remembers a message id: a relay's republish of a batch (after it
/// published and could not record it, or after a lease ran out) comes within seconds; a
/// replay or a republish after a long outage may come later, and the consumers' dedupe catches
/// it then.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// How long a request to JetStream (a publish's acknowledgement, a setup call) may take
/// before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where events and dead letters are, for `REDIS_STREAM` split into partitions.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The events' stream.
    pub stream: String,
    /// The subject of each partition, by index.
    pub subjects: Vec<String>,
    /// The dead letters' stream and subject.
    pub dlq_stream: String,
    pub dlq_subject: String,
    partitions: Partitions,
}

impl Layout {
    pub fn new(partitions: &Partitions) -> Self {
        let base = partitions.base();
        let subjects = match partitions.count() {
            1 => vec![base.to_owned()],
            n => (0..n).map(|i| format!("{base}.p{i}")).collect(),
        };
        let stream = stream_name(base);
        Self {
            dlq_stream: format!("{stream}_dlq"),
            stream,
            subjects,
            dlq_subject: format!("{base}.dlq"),
            partitions: partitions.clone(),
        }
    }

    pub fn partitions(&self) -> &Partitions {
        &self.partitions
    }

    /// The subject the events of the order `aggregate_id` go to.
    pub fn subject_of(&self, aggregate_id: &str) -> &str {
        &self.subjects[self.partitions.of(aggregate_id)]
    }

    /// The durable consumer of `group` on partition `index`.
    pub fn durable(&self, group: &str, index: usize) -> String {
        let group = stream_name(group);
        match self.subjects.len() {
            1 => group,
            _ => format!("{group}-p{index}"),
        }
    }
}

/// `name` as a stream or consumer name may spell it: letters, digits, `-` and `_`.
fn stream_name(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// Why the stream could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The stream exists with other subjects: another number of partitions.
    #[error(
        "the JetStream stream {stream} has the subjects {found:?}, not {expected:?}: it was made for another \
         STREAM_PARTITIONS"
    )]
    Partitions { stream: String, found: Vec<String>, expected: Vec<String> },
    #[error("JetStream: {0}")]
    JetStream(String),
}

impl SetupError {
    /// A configuration to fix, not an outage to wait out.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Partitions { .. })
    }
}

/// A client that connects in the background and reconnects for as long as it is used: an
/// outage at start or later is waited out, never a reason to exit.
/// Credentials in the URL (`nats://user:password@host`, or `nats://token@host`) are used:
/// the client does not take them from the URL by itself.
pub async fn connect(url: &str, name: &str) -> Result<Client, async_nats::ConnectError> {
    let mut options = async_nats::ConnectOptions::new();
    let first = url.split(',').next().unwrap_or_default();
    if let Ok(addr) = first.parse::<async_nats::ServerAddr>() {
        options = match (addr.username(), addr.password()) {
            (Some(user), Some(password)) => options.user_and_password(decode(user), decode(password)),
            (Some(token), None) => options.token(decode(token)),
            _ => options,
        };
    }
    options
        .name(name)
        .connection_timeout(Duration::from_secs(2))
        .request_timeout(Some(REQUEST_TIMEOUT))
        .retry_on_initial_connect()
        .connect(url)
        .await
}

/// `%xx` escapes of a URL's user info, undone.
fn decode(part: &str) -> String {
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// JetStream on `client`.
pub fn context(client: Client) -> Context {
    let mut js = async_nats::jetstream::new(client);
    js.set_timeout(REQUEST_TIMEOUT);
    js
}

/// Whether the client is connected now.
pub fn is_connected(client: &Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

/// Whether JetStream answers and holds the events' stream (a stream lost is made again by the
/// relays' recovery, and until then nothing can be published or read).
pub async fn ping(js: &Context, layout: &Layout) -> Result<(), String> {
    js.get_stream(&layout.stream).await.map(|_| ()).map_err(|e| format!("stream {}: {e}", layout.stream))
}

/// Creates the events' stream if there is none (file storage, limits retention: only
/// [`trim`] removes events), and checks its subjects if there is one.
pub async fn ensure_stream(js: &Context, layout: &Layout) -> Result<(), SetupError> {
    let config = Config {
        name: layout.stream.clone(),
        subjects: layout.subjects.clone(),
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        duplicate_window: DUPLICATE_WINDOW,
        allow_direct: true,
        description: Some("order events, one subject per partition (written by the relays)".to_owned()),
        ..Default::default()
    };
    let stream = js.get_or_create_stream(config).await.map_err(|e| SetupError::JetStream(e.to_string()))?;
    check_subjects(stream.cached_info(), layout)
}

/// Whether the stream `info` describes has `layout`'s subjects (its partitions).
pub fn check_subjects(info: &async_nats::jetstream::stream::Info, layout: &Layout) -> Result<(), SetupError> {
    let found = &info.config.subjects;
    if found != &layout.subjects {
        return Err(SetupError::Partitions {
            stream: layout.stream.clone(),
            found: found.clone(),
            expected: layout.subjects.clone(),
        });
    }
    Ok(())
}

/// [`prepare`], for a service that may not work on a stream that is not its own: whether it may
/// work (false if `shutdown` came first, or with the reason in `unfit`, for `/readyz` to say).
pub async fn agree(
    js: &Context,
    layout: &Layout,
    dlq_max_len: Option<u64>,
    unfit: &std::sync::OnceLock<String>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> bool {
    match prepare(js, layout, dlq_max_len, shutdown).await {
        Some(Ok(())) => true,
        Some(Err(e)) => {
            let _ = unfit.set(e.to_string());
            false
        }
        None => false,
    }
}

/// [`check_subjects`] of the stream, once it is there (for a reader, which makes nothing):
/// `None` if `shutdown` came first.
pub async fn agree_on_subjects(
    js: &Context,
    layout: &Layout,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<Result<(), SetupError>> {
    let mut delay = Duration::from_millis(100);
    loop {
        match js.get_stream(&layout.stream).await {
            Ok(stream) => return Some(check_subjects(stream.cached_info(), layout)),
            Err(e) => tracing::info!(error = %e, stream = layout.stream, retry_in_ms = delay.as_millis() as u64,
                "waiting for the JetStream stream (the relays make it)"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Creates the dead letters' stream if there is none: at most `max_len` letters, the oldest
/// dropped first (the `dead_letters` table keeps them all).
pub async fn ensure_dlq(js: &Context, layout: &Layout, max_len: u64) -> Result<(), SetupError> {
    let config = Config {
        name: layout.dlq_stream.clone(),
        subjects: vec![layout.dlq_subject.clone()],
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        max_messages: i64::try_from(max_len).unwrap_or(i64::MAX),
        duplicate_window: DUPLICATE_WINDOW,
        description: Some("dead letters of the inventory consumers".to_owned()),
        ..Default::default()
    };
    js.get_or_create_stream(config).await.map_err(|e| SetupError::JetStream(e.to_string()))?;
    Ok(())
}

/// [`ensure_stream`] (and [`ensure_dlq`] with its cap, if given) until JetStream answers:
/// `None` if `shutdown` came first, the permanent error if the stream is not this service's to
/// use (logged, and for `/readyz` to say).
pub async fn prepare(
    js: &Context,
    layout: &Layout,
    dlq_max_len: Option<u64>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<Result<(), SetupError>> {
    let mut delay = Duration::from_millis(100);
    loop {
        let mut done = ensure_stream(js, layout).await;
        if let (Ok(()), Some(max_len)) = (&done, dlq_max_len) {
            done = ensure_dlq(js, layout, max_len).await;
        }
        match done {
            Ok(()) => return Some(Ok(())),
            Err(e) if e.is_permanent() => {
                tracing::error!(error = %e, "refusing to work on the JetStream stream");
                return Some(Err(e));
            }
            Err(e) => tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                stream = layout.stream, "JetStream is not ready; trying again"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_user_info_is_undone() {
        assert_eq!(decode("p%40ss%3Aword"), "p@ss:word");
        assert_eq!(decode("plain"), "plain");
        assert_eq!(decode("bad%zz%4"), "bad%zz%4");
    }

    #[test]
    fn one_partition_is_the_stream_name_itself_and_more_get_a_subject_each() {
        let one = Layout::new(&Partitions::single("orders.events"));
        assert_eq!(
            (one.stream.as_str(), one.subjects.as_slice()),
            ("orders_events", &["orders.events".to_owned()][..])
        );
        assert_eq!((one.dlq_stream.as_str(), one.dlq_subject.as_str()), ("orders_events_dlq", "orders.events.dlq"));
        assert_eq!(one.durable("inventory", 0), "inventory");
        let three = Layout::new(&Partitions::new("orders.events", 3).expect("3 partitions"));
        assert_eq!(three.subjects, ["orders.events.p0", "orders.events.p1", "orders.events.p2"]);
        assert_eq!(three.durable("inventory.v2", 2), "inventory_v2-p2");
        let id = "01JBENCHAGGR00000000000000";
        assert_eq!(three.subject_of(id), three.subjects[three.partitions().of(id)]);
    }
}
