//! A small Server-Sent Events client: connects, then reads message by message.

use std::time::Duration;

/// One Server-Sent Events message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// A connection to `/events`, read message by message.
pub struct SseClient {
    response: reqwest::Response,
    buffer: String,
    /// The last `id` the server sent, with an event or without (as `EventSource` keeps it).
    last_event_id: Option<String>,
}

impl SseClient {
    /// `GET url` with `headers`; panics unless the answer is a stream of events.
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> Self {
        let mut request = reqwest::Client::new().get(url);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.expect("GET /events");
        assert_eq!(response.status(), 200, "{url}");
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(content_type.starts_with("text/event-stream"), "{content_type}");
        Self { response, buffer: String::new(), last_event_id: None }
    }

    /// The next message with an event (comments and the `retry` hint skipped); `None` when the
    /// stream ended or nothing came within `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (id, message) = parse(&block);
                if id.is_some() {
                    self.last_event_id = id;
                }
                if message.is_some() {
                    return message;
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk()).await.ok()?.ok()??;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// The next `n` messages, each within 10 s.
    pub async fn take(&mut self, n: usize) -> Vec<Message> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let message = self.next(Duration::from_secs(10)).await;
            out.push(message.unwrap_or_else(|| panic!("message {} of {n} did not come; got {out:?}", i + 1)));
        }
        out
    }

    /// The id a reconnecting `EventSource` would send as `Last-Event-ID`: the last one the
    /// server sent, on an event or alone (on a heartbeat), among the messages read so far.
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_event_id.as_deref()
    }

    /// Whether the stream ends (the server closed it) within `within`.
    pub async fn ends_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Err(_) => return false,
                Ok(Ok(Some(_))) => continue,
                Ok(_) => return true,
            }
        }
    }
}

/// A block's id, and its message if it has an event (a block of comments and an id only
/// moves the last event id).
fn parse(block: &str) -> (Option<String>, Option<Message>) {
    let mut message = Message::default();
    let mut data = Vec::new();
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => message.id = Some(value.to_owned()),
            "event" => message.event = Some(value.to_owned()),
            "data" => data.push(value.to_owned()),
            _ => {}
        }
    }
    message.data = data.join("\n");
    let id = message.id.clone();
    (id, (message.event.is_some() || !message.data.is_empty()).then_some(message))
}

/// The event ids of `messages`.
pub fn ids(messages: &[Message]) -> Vec<String> {
    messages.iter().map(|m| m.id.clone().unwrap_or_default()).collect()
}
