//! Reading the stream into the [`History`]: at start its last entries (as many as the history
//! keeps, loaded, not sent), then every new one, with plain `XREAD` (no consumer group: every
//! replica reads everything).
//!
//! A lost connection is retried with backoff, and reading goes on after the last entry read.
//! Meanwhile the entry itself may have been trimmed, and newer ones with it (a replica away
//! longer than the stream's retention): the replica cannot know what it missed, so it forgets
//! its history and ends every client's stream, and each client, its cursor unknown, is told to
//! reload. Or the stream came back shorter, or not at all (Redis lost it): reading goes on
//! after its newest entry, or from its start, and the events the relays publish again are ones
//! the history knows.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use domain::entry_id_key;
use domain::StreamEntry;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use redis::{RedisError, Value};
use service_kit::messaging::MessagingPeer;
use service_kit::{Backoff, Shutdown};

use crate::history::{Appended, History};
use crate::metrics::Metrics;

/// Entries read per `XREAD`, and per page of the first load.
const PAGE: usize = 1000;

pub struct Tail {
    pub client: redis::Client,
    /// Redis and this replica, as its spans name them.
    pub peer: MessagingPeer,
    pub stream: String,
    pub history: Arc<History>,
    pub history_len: usize,
    pub block: Duration,
    pub metrics: Metrics,
    /// Set while the history holds the stream's recent entries and reading keeps up.
    pub caught_up: Arc<AtomicBool>,
}

impl Tail {
    /// Reads until `shutdown`.
    pub async fn run(self, shutdown: Shutdown) {
        let mut retry = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut last: Option<String> = None;
        loop {
            let error = tokio::select! {
                () = shutdown.cancelled() => return,
                error = self.follow(&mut last, &mut retry) => error,
            };
            self.caught_up.store(false, Ordering::Release);
            tracing::warn!(stream = self.stream, error = %error, "reading the stream failed; retrying");
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(retry.next_delay()) => {}
            }
        }
    }

    /// Connects and reads until reading fails: the error.
    async fn follow(&self, last: &mut Option<String>, retry: &mut Backoff) -> RedisError {
        let following: Result<Infallible, RedisError> = async {
            let mut conn = self.connect().await?;
            let from = match last.clone() {
                None => self.load(&mut conn).await?,
                Some(last) => self.resume_from(&mut conn, last).await?,
            };
            *last = Some(from);
            loop {
                let from = last.clone().unwrap_or_else(|| "0-0".to_owned());
                if let Some(id) = self.read(&mut conn, &from).await? {
                    *last = Some(id);
                }
                // Reading works: the replica keeps up, and a later failure starts its backoff anew.
                self.caught_up.store(true, Ordering::Release);
                retry.reset();
            }
        }
        .await;
        match following {
            Err(e) => e,
            Ok(never) => match never {},
        }
    }

    async fn connect(&self) -> Result<MultiplexedConnection, RedisError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Duration::from_secs(5))
            .set_response_timeout(self.block + Duration::from_secs(10));
        self.client.get_multiplexed_async_connection_with_config(&config).await
    }

    /// Loads the stream's last `history_len` entries, newest page first; reading goes on after
    /// the newest (from the start of an empty stream).
    async fn load(&self, conn: &mut MultiplexedConnection) -> Result<String, RedisError> {
        let mut pages: Vec<Vec<StreamId>> = Vec::new();
        let mut loaded = 0;
        let mut before = "+".to_owned();
        while loaded < self.history_len {
            let count = PAGE.min(self.history_len - loaded);
            let page: StreamRangeReply = redis::cmd("XREVRANGE")
                .arg(&self.stream)
                .arg(&before)
                .arg("-")
                .arg("COUNT")
                .arg(count)
                .query_async(conn)
                .await?;
            let Some(oldest) = page.ids.last() else { break };
            before = format!("({}", oldest.id);
            loaded += page.ids.len();
            let full = page.ids.len() == count;
            pages.push(page.ids);
            if !full {
                break;
            }
        }
        let newest = pages.first().and_then(|p| p.first()).map_or_else(|| "0-0".to_owned(), |e| e.id.clone());
        for entry in pages.iter().rev().flat_map(|page| page.iter().rev()) {
            if let Some(decoded) = self.decode(entry) {
                self.history.load(decoded);
            }
        }
        self.metrics.history_events.set(i64::try_from(self.history.len()).unwrap_or(i64::MAX));
        tracing::info!(stream = self.stream, loaded, "history loaded");
        Ok(newest)
    }

    /// Where reading goes on after a lost connection (see the module's opening comment).
    async fn resume_from(&self, conn: &mut MultiplexedConnection, last: String) -> Result<String, RedisError> {
        let info = match redis::cmd("XINFO").arg("STREAM").arg(&self.stream).query_async::<Value>(conn).await {
            Ok(info) => info,
            Err(e) if e.to_string().contains("no such key") => {
                // Redis lost it: the relays publish again what it held, which the history
                // knows (or, for an order with later events kept, drops as stale).
                tracing::warn!(
                    stream = self.stream,
                    last,
                    "the stream is gone: reading it from its start when it is back"
                );
                return Ok("0-0".to_owned());
            }
            Err(e) => return Err(e),
        };
        let newest = stream_info_field(&info, "last-generated-id").unwrap_or_else(|| "0-0".to_owned());
        if entry_id_key(&newest) < entry_id_key(&last) {
            tracing::warn!(
                stream = self.stream,
                last,
                newest,
                "the stream came back shorter: reading on after its newest entry"
            );
            return Ok(newest);
        }
        if newest == last {
            return Ok(last);
        }
        // Trimming removes the oldest entries first: while the last entry read is still there,
        // every later one is too. Once it is gone, later ones may have gone unread.
        let held: StreamRangeReply =
            redis::cmd("XRANGE").arg(&self.stream).arg(&last).arg(&last).query_async(conn).await?;
        if held.ids.is_empty() {
            self.metrics.gaps.inc();
            tracing::warn!(
                stream = self.stream,
                last,
                "entries after the last one read may have been trimmed unread: every client is told to reload"
            );
            self.history.reset();
        }
        Ok(last)
    }

    /// One `XREAD` after `from`: the id of the last entry read, if any.
    async fn read(&self, conn: &mut MultiplexedConnection, from: &str) -> Result<Option<String>, RedisError> {
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(PAGE)
            .arg("BLOCK")
            .arg(u64::try_from(self.block.as_millis()).unwrap_or(u64::MAX).max(1))
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(from)
            .query_async(conn)
            .await?;
        let Some(reply) = reply else { return Ok(None) };
        let mut last = None;
        for key in reply.keys {
            for entry in &key.ids {
                self.take(entry);
                last = Some(entry.id.clone());
            }
        }
        Ok(last)
    }

    /// An entry as an event the feed can send; `None` (counted) for anything else.
    fn decode(&self, entry: &StreamId) -> Option<StreamEntry> {
        let fields = entry.map.iter().map(|(k, v)| (k.as_str(), bytes(v)));
        let decoded = match StreamEntry::from_fields(fields) {
            // A line break would end the `event:` line of the message early.
            Ok(e) if e.event_type.contains(['\r', '\n']) => Err("event_type holds a line break".to_owned()),
            Ok(e) => Ok(e),
            Err(e) => Err(e.to_string()),
        };
        match decoded {
            Ok(e) => Some(e),
            Err(why) => {
                self.metrics.entries_skipped.inc();
                tracing::debug!(entry_id = entry.id, error = why, "not an event; skipped");
                None
            }
        }
    }

    /// Adds a new stream entry to the history, which sends it to the clients.
    fn take(&self, entry: &StreamId) {
        let Some(decoded) = self.decode(entry) else { return };
        // `process <stream>`: the feed's handling of the event (to every client following it),
        // a child of its publication.
        let peer = &self.peer;
        let span = tracing::info_span!(
            "process",
            otel.name = %format_args!("process {}", self.stream),
            otel.kind = "consumer",
            messaging.system = "redis",
            messaging.operation.name = "process",
            messaging.operation.type = "process",
            messaging.destination.name = %self.stream,
            messaging.message.id = %decoded.event_id,
            messaging.client.id = %peer.client_id,
            server.address = %peer.server_address,
            server.port = peer.server_port,
            aggregate_id = %decoded.aggregate_id,
            seq = decoded.seq,
        );
        telemetry::propagation::set_remote_parent(&span, decoded.traceparent.as_deref(), decoded.tracestate.as_deref());
        let _entered = span.enter();
        match self.history.push(decoded) {
            Appended::New => {
                self.metrics.events_read.inc();
                self.metrics.history_events.set(i64::try_from(self.history.len()).unwrap_or(i64::MAX));
            }
            Appended::Duplicate | Appended::Stale => {
                self.metrics.duplicates.inc();
            }
        }
    }
}

/// A field of an `XINFO STREAM` reply (a map in RESP3, a flat array in RESP2), as text.
fn stream_info_field(info: &Value, name: &str) -> Option<String> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    match info {
        Value::Array(flat) => {
            flat.chunks(2).find(|kv| text(&kv[0]).as_deref() == Some(name)).and_then(|kv| kv.get(1).and_then(text))
        }
        Value::Map(map) => map.iter().find(|(k, _)| text(k).as_deref() == Some(name)).and_then(|(_, v)| text(v)),
        _ => None,
    }
}

fn bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b.clone(),
        Value::SimpleString(s) => s.clone().into_bytes(),
        Value::Int(n) => n.to_string().into_bytes(),
        _ => Vec::new(),
    }
}
