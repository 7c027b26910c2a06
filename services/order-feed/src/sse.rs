//! `GET /events`: the events of the caller's tenant (optionally of one order) as Server-Sent
//! Events, from a cursor on.
//!
//! The cursor is the `after` query parameter when it is not empty, else the `Last-Event-ID`
//! header (which `EventSource` sends by itself when it reconnects). With a cursor the client
//! first gets every later event the replica keeps, in stream order, then the live ones; a
//! cursor the replica does not keep gets an `event: reset` message (reload your state), then
//! the live events. A client that falls too far behind is disconnected and resumes the same
//! way. At shutdown every stream ends, so clients reconnect to another replica; so does a
//! stream whose token is no longer accepted (the client reconnects with a fresh one).
//!
//! A heartbeat comment comes every `FEED_HEARTBEAT`. To a client that follows one order it
//! also carries, as its `id`, the newest event of the client's tenant the stream has passed
//! over (`EventSource` keeps it as its last event id without firing an event): a client whose
//! order stays quiet while others change resumes from there, not from an event the feed may
//! no longer keep. Another tenant's event is never named.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use domain::OrderId;
use futures::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use service_kit::auth::{AuthError, Authenticator, Principal, Scope};
use service_kit::{Problem, Shutdown};
use tokio::sync::{broadcast, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use ulid::Ulid;

use crate::history::{FeedEvent, History, Start};
use crate::metrics::{Metrics, ResumeResult};

/// How long a browser waits before reconnecting (the SSE `retry:` field).
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Feed {
    pub history: Arc<History>,
    /// Whether this replica reads the stream and keeps up: until then it sends no one away
    /// with a `reset` it cannot know is due, and answers 503 (nginx tries another replica).
    pub caught_up: Arc<AtomicBool>,
    pub auth: Authenticator,
    pub clients: Arc<Semaphore>,
    pub heartbeat: Duration,
    pub metrics: Metrics,
    pub shutdown: Shutdown,
}

#[derive(Debug, Default, Deserialize)]
pub struct EventsQuery {
    after: Option<String>,
    aggregate_id: Option<String>,
    /// For clients that cannot set headers (`EventSource`); a cookie of the same name works too.
    access_token: Option<String>,
}

/// The events of the caller's tenant (or of one order), from a cursor on.
#[utoipa::path(get, path = "/events", tag = "feed",
    params(
        ("aggregate_id" = Option<String>, Query, nullable = false, description = "Only this order's events (a ULID)"),
        ("after" = Option<String>, Query, nullable = false, description = "The cursor: an event id; when not empty it wins over `Last-Event-ID`"),
        ("Last-Event-ID" = Option<String>, Header, nullable = false, description = "The cursor when `after` is absent or empty (`EventSource` sends it)"),
        ("access_token" = Option<String>, Query, nullable = false, description = "The bearer token, for clients that cannot send `Authorization` (a cookie of the same name works too)"),
    ),
    responses(
        (status = 200, description = "`id: <event_id>`, `event: <event_type>`, `data: {event_id, aggregate_id, seq, occurred_at, payload}`; `event: reset` for a cursor not kept; heartbeat comments", body = String, content_type = "text/event-stream"),
        (status = 400, description = "Malformed query string", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No token, or a bad one", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token lacks `orders:read`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`aggregate_id` is not an order id", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Not reading the stream yet, or at its client cap (`Retry-After: 1`): try another replica", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = ["orders:read"])))]
pub async fn events(
    State(feed): State<Feed>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return Problem::new(StatusCode::BAD_REQUEST, "Bad request").detail("malformed query string").into_response();
    };
    let principal = match authenticate(&feed.auth, &headers, query.access_token.as_deref()) {
        Ok(p) if p.scopes.contains(Scope::OrdersRead) => p,
        Ok(_) => return AuthError::Forbidden(Scope::OrdersRead).into_response(),
        Err(e) => return e.into_response(),
    };
    let order = match query.aggregate_id.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(id) => match id.parse::<OrderId>() {
            Ok(id) => Some(id.to_string()),
            Err(_) => {
                return Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid request")
                    .detail("aggregate_id is not an order id (ULID)")
                    .field("aggregate_id")
                    .into_response()
            }
        },
    };
    if !feed.caught_up.load(Ordering::Acquire) {
        let mut response = Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Service unavailable")
            .detail("this replica is not reading the stream yet; try again (another replica)")
            .into_response();
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    }
    let Ok(permit) = feed.clients.clone().try_acquire_owned() else {
        feed.metrics.rejected_clients.inc();
        let mut response = Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Service unavailable")
            .detail("this replica serves as many clients as it may; try again (another replica)")
            .into_response();
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    // A header that is not text is a cursor no replica knows: told to reload, not ignored.
    let last_event_id = headers.get("last-event-id").map(|v| v.to_str().unwrap_or("(not text)"));
    let cursor = query.after.as_deref().filter(|s| !s.is_empty()).or(last_event_id.filter(|s| !s.is_empty()));
    let client = Client { principal, order, metrics: feed.metrics.clone(), _permit: permit };
    // The tenant's events after the cursor: the client's own to send, the others' newest (after
    // the client's last) to name on the first heartbeat.
    let subscription = feed.history.subscribe(cursor, |e| client.same_tenant(e));
    let reset = match subscription.start {
        Start::Live => None,
        Start::Resumed => {
            feed.metrics.resumed(ResumeResult::resumed);
            None
        }
        Start::Unknown => {
            feed.metrics.resumed(ResumeResult::unknown);
            Some(reset_message(cursor.unwrap_or_default()))
        }
    };
    feed.metrics.clients.inc();
    let first =
        stream::iter(std::iter::once(Event::default().retry(RECONNECT_AFTER).comment("order-feed")).chain(reset));
    let mut passed_over = None;
    let mut backlog = Vec::with_capacity(subscription.backlog.len());
    for event in subscription.backlog {
        if client.wants(&event) {
            backlog.push(event);
            passed_over = None;
        } else {
            passed_over = Some(event.entry.event_id);
        }
    }
    let client = Arc::new(client);
    let token_lapses = token_lapses(client.principal.accepted_until);
    let backlog = {
        let client = client.clone();
        stream::iter(backlog).filter_map(move |e| std::future::ready(client.message(&e)))
    };
    let live = live_messages(Live::new(subscription.live, client, feed.heartbeat, passed_over));
    let events = first.chain(backlog).chain(live).map(Ok::<_, Infallible>);
    let ends = futures::future::select(Box::pin(feed.shutdown.clone().cancelled_owned()), Box::pin(token_lapses));
    Sse::new(events.take_until(ends)).into_response()
}

/// Resolves when a token accepted until `accepted_until` (Unix seconds) no longer is; never
/// without one.
async fn token_lapses(accepted_until: Option<u64>) {
    let Some(until) = accepted_until else { return std::future::pending().await };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    // Accepted through the second `until`: lapsed when the next one begins.
    let left = Duration::from_secs(until.saturating_add(1)).saturating_sub(now);
    tokio::time::sleep(left).await;
}

/// The caller: a bearer token in the `Authorization` header, else the `access_token` query
/// parameter, else the `access_token` cookie.
fn authenticate(auth: &Authenticator, headers: &HeaderMap, query_token: Option<&str>) -> Result<Principal, AuthError> {
    if headers.contains_key(header::AUTHORIZATION) {
        return auth.authenticate(headers.get(header::AUTHORIZATION));
    }
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix("access_token="));
    auth.verify(query_token.or(cookie))
}

/// Tells a client its cursor is not kept here: reload state, then follow the live events.
fn reset_message(cursor: &str) -> Event {
    let data = serde_json::json!({
        "reason": "the cursor is older than this feed keeps, or unknown: reload the state, then follow the events",
        "cursor": cursor,
    });
    Event::default().event("reset").data(data.to_string())
}

/// One connected client: whose events it gets, counted while connected.
struct Client {
    principal: Principal,
    /// Only this order's events.
    order: Option<String>,
    metrics: Metrics,
    _permit: OwnedSemaphorePermit,
}

impl Client {
    /// Whether `event` is this client's tenant's.
    fn same_tenant(&self, event: &FeedEvent) -> bool {
        event.entry.tenant_id == self.principal.tenant
    }

    /// Whether `event` is this client's: its tenant's, and of its order if it follows one.
    fn wants(&self, event: &FeedEvent) -> bool {
        self.same_tenant(event) && self.order.as_deref().is_none_or(|o| o == event.entry.aggregate_id)
    }

    /// The message for `event`, if it is this client's.
    fn message(&self, event: &FeedEvent) -> Option<Event> {
        if !self.wants(event) {
            return None;
        }
        let entry = &event.entry;
        self.metrics.events_sent.inc();
        Some(Event::default().id(entry.event_id.to_string()).event(&entry.event_type).data(&event.data))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.metrics.clients.dec();
    }
}

/// A client's live phase: the events as they are read, and heartbeats.
struct Live {
    receiver: broadcast::Receiver<Arc<FeedEvent>>,
    client: Arc<Client>,
    heartbeat: Interval,
    /// The newest event of the client's tenant passed over (not its order's) since the client
    /// was last given an id: where it may resume from.
    passed_over: Option<Ulid>,
}

impl Live {
    /// `passed_over`: the newest of the tenant's events the backlog held after the client's
    /// last one.
    fn new(
        receiver: broadcast::Receiver<Arc<FeedEvent>>,
        client: Arc<Client>,
        every: Duration,
        passed_over: Option<Ulid>,
    ) -> Self {
        let mut heartbeat = tokio::time::interval_at(Instant::now() + every, every);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self { receiver, client, heartbeat, passed_over }
    }

    /// The next message; `None` when the client fell too far behind (it resumes).
    async fn next(&mut self) -> Option<Event> {
        loop {
            tokio::select! {
                received = self.receiver.recv() => match received {
                    Ok(event) => {
                        if let Some(message) = self.client.message(&event) {
                            self.passed_over = None;
                            return Some(message);
                        }
                        if self.client.same_tenant(&event) {
                            self.passed_over = Some(event.entry.event_id);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        self.client.metrics.slow_clients.inc();
                        tracing::debug!(missed, "a client fell too far behind; disconnecting it (it resumes)");
                        return None;
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = self.heartbeat.tick() => {
                    let beat = Event::default().comment("heartbeat");
                    return Some(match self.passed_over.take() {
                        Some(id) => beat.id(id.to_string()),
                        None => beat,
                    });
                }
            }
        }
    }
}

/// The live messages of a client, until it falls too far behind.
fn live_messages(live: Live) -> impl Stream<Item = Event> {
    stream::unfold(live, |mut live| async move { live.next().await.map(|message| (message, live)) })
}
