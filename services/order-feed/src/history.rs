//! The events a replica has read from the stream, in stream order, and the live feed of the
//! next ones.
//!
//! Each event gets a position: the order this replica took it from the stream, which is the
//! order the relays published it in (not the order of event ids, which is the order the
//! events' rows were numbered, not committed). Every replica reads the same stream, so all of
//! them order events alike, and a cursor (an event id) names the same place on each. (With
//! partitions, each replica takes the events in the one order [`crate::merge`] gives them.) An
//! event seen again (a relay published it twice) keeps its first position and is not sent
//! again.
//!
//! Subscribing takes the events after a cursor and a receiver of the later ones under the same
//! lock that appending holds while it sends: no event falls between the two, and none is in
//! both.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use domain::StreamEntry;
use tokio::sync::broadcast;
use ulid::Ulid;

/// One event as the feed sends it.
#[derive(Debug)]
pub struct FeedEvent {
    pub entry: StreamEntry,
    /// The `data:` line: `{"event_id", "aggregate_id", "seq", "occurred_at", "payload"}`.
    pub data: String,
}

impl FeedEvent {
    pub fn new(entry: StreamEntry) -> Self {
        // A payload that is not JSON (the relay publishes what was written) is sent as a string.
        let payload = serde_json::from_str::<serde_json::Value>(&entry.payload)
            .unwrap_or_else(|_| serde_json::Value::String(entry.payload.clone()));
        let data = serde_json::json!({
            "event_id": entry.event_id.to_string(),
            "aggregate_id": entry.aggregate_id,
            "seq": entry.seq,
            "occurred_at": StreamEntry::format_time(&entry.occurred_at),
            "payload": payload,
        })
        .to_string();
        Self { entry, data }
    }
}

/// Where a subscription starts.
pub enum Start {
    /// No cursor: from the next event on.
    Live,
    /// After the cursor, which was found.
    Resumed,
    /// The cursor is not among the events kept (too old, or never seen here): the client must
    /// reload its state; the subscription goes on from the next event.
    Unknown,
}

/// A client's view: the events after its cursor, then the live ones.
pub struct Subscription {
    pub start: Start,
    pub backlog: Vec<Arc<FeedEvent>>,
    pub live: broadcast::Receiver<Arc<FeedEvent>>,
}

/// What appending an entry came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    /// A new event, now kept (and sent, if live).
    New,
    /// Its event is kept already (published twice): not sent again.
    Duplicate,
    /// An event of an order that has later events kept (a copy of one no longer kept):
    /// sending it would break the order's seq order, and no cursor that needs it is kept.
    Stale,
}

pub struct History {
    inner: Mutex<Inner>,
    capacity: usize,
    client_lag: usize,
}

struct Inner {
    events: VecDeque<Arc<FeedEvent>>,
    /// Event id → position.
    positions: HashMap<Ulid, u64>,
    /// Per order with events kept: how many, and the highest seq.
    orders: HashMap<String, (usize, i64)>,
    /// The position of `events[0]`.
    first: u64,
    live: broadcast::Sender<Arc<FeedEvent>>,
}

impl History {
    /// Keeps `capacity` events; a client may lag `client_lag` events behind the live ones.
    pub fn new(capacity: usize, client_lag: usize) -> Self {
        let client_lag = client_lag.max(1);
        let inner = Inner {
            events: VecDeque::new(),
            positions: HashMap::new(),
            orders: HashMap::new(),
            first: 0,
            live: broadcast::channel(client_lag).0,
        };
        Self { inner: Mutex::new(inner), capacity: capacity.max(1), client_lag }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `entry` and sends it to the subscribers.
    pub fn push(&self, entry: StreamEntry) -> Appended {
        self.append(entry, true)
    }

    /// Appends `entry` without sending it: the events a replica loads as it starts are history,
    /// not news.
    pub fn load(&self, entry: StreamEntry) -> Appended {
        self.append(entry, false)
    }

    fn append(&self, entry: StreamEntry, send: bool) -> Appended {
        let mut inner = self.lock();
        if inner.positions.contains_key(&entry.event_id) {
            return Appended::Duplicate;
        }
        if inner.orders.get(&entry.aggregate_id).is_some_and(|(_, max_seq)| entry.seq <= *max_seq) {
            return Appended::Stale;
        }
        let position = inner.first + inner.events.len() as u64;
        let event = Arc::new(FeedEvent::new(entry));
        inner.positions.insert(event.entry.event_id, position);
        let order = inner.orders.entry(event.entry.aggregate_id.clone()).or_insert((0, 0));
        *order = (order.0 + 1, order.1.max(event.entry.seq));
        inner.events.push_back(event.clone());
        while inner.events.len() > self.capacity {
            let Some(old) = inner.events.pop_front() else { break };
            inner.positions.remove(&old.entry.event_id);
            inner.first += 1;
            if let Some(order) = inner.orders.get_mut(&old.entry.aggregate_id) {
                order.0 -= 1;
                if order.0 == 0 {
                    inner.orders.remove(&old.entry.aggregate_id);
                }
            }
        }
        if send {
            // Under the lock: see the module's opening comment. No subscriber is not an error.
            let _ = inner.live.send(event);
        }
        Appended::New
    }

    /// Forgets every event and ends every subscription: after a gap in what this replica read
    /// (entries trimmed while it was away), so every client reconnects and, its cursor unknown,
    /// is told to reload.
    pub fn reset(&self) {
        let mut inner = self.lock();
        inner.events.clear();
        inner.positions.clear();
        inner.orders.clear();
        inner.first = 0;
        // Dropping the old sender closes every receiver.
        inner.live = broadcast::channel(self.client_lag).0;
    }

    /// The events after `cursor` (an event id; `None`: none) that `wanted` keeps, and a
    /// receiver of the later ones.
    pub fn subscribe(&self, cursor: Option<&str>, wanted: impl Fn(&FeedEvent) -> bool) -> Subscription {
        let inner = self.lock();
        let live = inner.live.subscribe();
        let Some(cursor) = cursor else { return Subscription { start: Start::Live, backlog: Vec::new(), live } };
        let found = Ulid::from_string(cursor.trim()).ok().and_then(|id| inner.positions.get(&id).copied());
        match found {
            Some(position) => {
                let skip = usize::try_from(position - inner.first + 1).unwrap_or(usize::MAX);
                let backlog = inner.events.iter().skip(skip).filter(|e| wanted(e)).cloned().collect();
                Subscription { start: Start::Resumed, backlog, live }
            }
            None => Subscription { start: Start::Unknown, backlog: Vec::new(), live },
        }
    }

    /// Events kept.
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use domain::TenantId;

    fn entry(event_id: Ulid, aggregate: &str, seq: i64) -> StreamEntry {
        StreamEntry {
            event_id,
            event_type: "OrderConfirmed".into(),
            aggregate_type: "order".into(),
            aggregate_id: aggregate.into(),
            seq,
            occurred_at: Utc::now(),
            payload: "{}".into(),
            traceparent: None,
            tracestate: None,
            tenant_id: TenantId::default_tenant(),
        }
    }

    fn ids(events: &[Arc<FeedEvent>]) -> Vec<Ulid> {
        events.iter().map(|e| e.entry.event_id).collect()
    }

    #[test]
    fn resumes_after_the_cursor_in_stream_order_not_id_order() {
        let history = History::new(10, 10);
        let (a, b, c) = (Ulid::new(), Ulid::new(), Ulid::new());
        // c's id is the newest, but it reached the stream first: a late commit of a and b.
        for (seq, id) in [c, a, b].into_iter().enumerate() {
            history.push(entry(id, "o-1", seq as i64 + 1));
        }
        let sub = history.subscribe(Some(&c.to_string()), |_| true);
        assert!(matches!(sub.start, Start::Resumed));
        assert_eq!(ids(&sub.backlog), vec![a, b]);
        let sub = history.subscribe(Some(&b.to_string()), |_| true);
        assert!(sub.backlog.is_empty());
    }

    #[test]
    fn an_event_seen_again_is_not_sent_again() {
        let history = History::new(10, 10);
        let a = Ulid::new();
        let mut live = history.subscribe(None, |_| true).live;
        assert_eq!(history.push(entry(a, "o-1", 1)), Appended::New);
        assert_eq!(history.push(entry(a, "o-1", 1)), Appended::Duplicate);
        assert_eq!(live.try_recv().map(|e| e.entry.event_id).ok(), Some(a));
        assert!(live.try_recv().is_err());
        assert_eq!(history.len(), 1);
    }

    #[test]
    fn a_cursor_older_than_what_is_kept_is_unknown() {
        let history = History::new(2, 10);
        let (a, b, c) = (Ulid::new(), Ulid::new(), Ulid::new());
        for (seq, id) in [a, b, c].into_iter().enumerate() {
            history.push(entry(id, "o-1", seq as i64 + 1));
        }
        assert!(matches!(history.subscribe(Some(&a.to_string()), |_| true).start, Start::Unknown));
        assert!(matches!(history.subscribe(Some("not-an-id"), |_| true).start, Start::Unknown));
        let sub = history.subscribe(Some(&b.to_string()), |_| true);
        assert!(matches!(sub.start, Start::Resumed));
        assert_eq!(ids(&sub.backlog), vec![c]);
    }

    #[test]
    fn nothing_falls_between_the_backlog_and_the_live_events() {
        let history = History::new(100, 100);
        let first = Ulid::new();
        history.push(entry(first, "o-1", 1));
        let mut sub = history.subscribe(Some(&first.to_string()), |_| true);
        let next = Ulid::new();
        history.push(entry(next, "o-1", 2));
        assert!(sub.backlog.is_empty());
        assert_eq!(sub.live.try_recv().map(|e| e.entry.event_id).ok(), Some(next));
    }

    #[test]
    fn an_older_copy_of_an_order_s_event_no_longer_kept_is_stale_not_new() {
        let history = History::new(2, 10);
        let (a1, a2, b1) = (Ulid::new(), Ulid::new(), Ulid::new());
        history.push(entry(a1, "o-a", 1));
        history.push(entry(a2, "o-a", 2));
        history.push(entry(b1, "o-b", 1));
        // a1 was evicted; a copy of it arrives (a relay published it again).
        assert_eq!(history.push(entry(a1, "o-a", 1)), Appended::Stale);
        // Control: an order with nothing kept takes its first event.
        assert_eq!(history.push(entry(Ulid::new(), "o-c", 1)), Appended::New);
    }

    #[test]
    fn loading_sends_nothing_and_reset_ends_every_subscription() {
        let history = History::new(10, 10);
        let mut live = history.subscribe(None, |_| true).live;
        let loaded = Ulid::new();
        history.load(entry(loaded, "o-1", 1));
        assert!(live.try_recv().is_err(), "a loaded event is not sent");
        assert!(matches!(history.subscribe(Some(&loaded.to_string()), |_| true).start, Start::Resumed));
        history.reset();
        assert!(matches!(live.try_recv(), Err(broadcast::error::TryRecvError::Closed)));
        assert!(matches!(history.subscribe(Some(&loaded.to_string()), |_| true).start, Start::Unknown));
    }
}
