//! The TCP link each consumer reaches nats-server through, when the broker is NATS.
//!
//! Redis can be asked what one consumer holds (`XPENDING … <consumer>`) and told to hold every
//! client's writes (`CLIENT PAUSE … WRITE`); JetStream can do neither. The link does both for
//! its consumer: it reads the deliveries it carries to the consumer and the acknowledgements it
//! carries back ([`wire`]), so it knows which messages the consumer holds unacknowledged and
//! which it was handed more than once; and it can hold the consumer's acknowledgements and
//! drop them, as a consumer that died after its commit and before its acknowledgement left
//! them unsent.

mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::FaultError;

/// What a link carried: the deliveries its consumer holds, and those it saw repeated.
#[derive(Debug, Default)]
pub struct Deliveries {
    ledger: Mutex<Ledger>,
}

#[derive(Debug, Default)]
struct Ledger {
    /// Stream sequences delivered and not acknowledged, with when they were delivered or last
    /// said to be worked on.
    unacked: HashMap<u64, Instant>,
    /// Stream sequences delivered more than once (by JetStream's count, to any consumer).
    redelivered: HashSet<u64>,
}

impl Deliveries {
    /// The stream sequences the consumer holds: handed to it and not acknowledged, and handed
    /// or said to be worked on (`+WPI`) within `within`. JetStream has handed older ones to
    /// another replica by now (`within` is `AckWait`, the consumers' `CLAIM_MIN_IDLE`).
    pub fn unacked(&self, within: Duration) -> Vec<u64> {
        let Ok(mut ledger) = self.ledger.lock() else { return Vec::new() };
        ledger.unacked.retain(|_, at| at.elapsed() < within);
        let mut seqs: Vec<u64> = ledger.unacked.keys().copied().collect();
        seqs.sort_unstable();
        seqs
    }

    /// The stream sequences seen delivered more than once.
    pub fn redelivered(&self) -> Vec<u64> {
        self.ledger.lock().map(|l| l.redelivered.iter().copied().collect()).unwrap_or_default()
    }

    fn delivered(&self, reply: &str) {
        let Some((seq, deliveries)) = wire::delivery(reply) else { return };
        if let Ok(mut ledger) = self.ledger.lock() {
            ledger.unacked.insert(seq, Instant::now());
            if deliveries > 1 {
                ledger.redelivered.insert(seq);
            }
        }
    }

    fn answered(&self, subject: &str, payload: &[u8]) {
        let Some((seq, _)) = wire::delivery(subject) else { return };
        let Ok(mut ledger) = self.ledger.lock() else { return };
        if wire::ends_delivery(payload) {
            ledger.unacked.remove(&seq);
        } else if let Some(at) = ledger.unacked.get_mut(&seq) {
            // Its AckWait starts over.
            *at = Instant::now();
        }
    }

    fn forget_unacked(&self) {
        if let Ok(mut ledger) = self.ledger.lock() {
            ledger.unacked.clear();
        }
    }
}

/// A listener on a free port that carries each connection to nats-server.
pub struct Link {
    pub port: u16,
    shared: Arc<Shared>,
    accepting: JoinHandle<()>,
}

struct Shared {
    server_port: u16,
    /// While true, the consumer's acknowledgements wait in the link, with all it sends after.
    held: watch::Sender<bool>,
    connections: Mutex<Vec<JoinHandle<()>>>,
    deliveries: Arc<Deliveries>,
}

impl Link {
    /// Opens a link to the nats-server on `server_port` (which may come and go: each
    /// connection is carried to it anew).
    pub async fn open(server_port: u16) -> Result<Self, FaultError> {
        let listener =
            TcpListener::bind("127.0.0.1:0").await.map_err(|e| FaultError::Setup(format!("link listener: {e}")))?;
        let port = listener.local_addr().map_err(|e| FaultError::Setup(format!("link listener: {e}")))?.port();
        let shared = Arc::new(Shared {
            server_port,
            held: watch::Sender::new(false),
            connections: Mutex::new(Vec::new()),
            deliveries: Arc::default(),
        });
        let accepting = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let carrying = tokio::spawn(carry(client, shared.clone()));
                    if let Ok(mut connections) = shared.connections.lock() {
                        connections.retain(|c| !c.is_finished());
                        connections.push(carrying);
                    }
                }
            }
        });
        Ok(Self { port, shared, accepting })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn deliveries(&self) -> Arc<Deliveries> {
        self.shared.deliveries.clone()
    }

    /// Holds the consumer's acknowledgements from its next one on, and everything it sends
    /// after that one. What it sends before goes through, so a pull it is in the middle of
    /// completes and the batch is applied and committed; the batch's acknowledgement waits.
    pub fn hold(&self) {
        self.shared.held.send_replace(true);
    }

    /// Lets what was held, and what follows, through.
    pub fn release(&self) {
        self.shared.held.send_replace(false);
    }

    /// Ends every connection the link carries now, dropping what it held: the consumer died
    /// with it. Its deliveries are no longer its own; JetStream hands them out again after
    /// `AckWait`.
    pub fn cut(&self) {
        if let Ok(mut connections) = self.shared.connections.lock() {
            for c in connections.drain(..) {
                c.abort();
            }
        }
        self.shared.deliveries.forget_unacked();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.accepting.abort();
        self.cut();
    }
}

/// Carries one connection until either side closes it.
async fn carry(client: TcpStream, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", shared.server_port)).await else { return };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (from_client, to_client) = client.into_split();
    let (from_server, to_server) = server.into_split();
    tokio::select! {
        ended = upstream(from_client, to_server, &shared) => {
            // The consumer is gone (a process has one connection): what it held is no longer
            // its own. A server gone is another matter: the consumer acknowledges what it
            // holds once it has connected again.
            if ended == Ended::ByConsumer {
                shared.deliveries.forget_unacked();
            }
        }
        () = downstream(from_server, to_client, &shared) => {}
    }
}

/// Which side ended a connection.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    ByConsumer,
    ByServer,
}

/// The consumer's side: acknowledgements pass (and are noted) unless the link holds them.
async fn upstream(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, shared: &Shared) -> Ended {
    let mut reader = wire::Reader::default();
    let mut held = shared.held.subscribe();
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return Ended::ByConsumer,
            Ok(n) => n,
        };
        let sent = reader.read(&buf[..n]);
        // Held, the first acknowledgement waits here with what follows it (the rest of these
        // bytes, and whatever the consumer sends next, unread). One whose operation began in
        // bytes already passed on cannot be held: it goes through, and the next one is held.
        let is_ack = |m: &wire::Carried| wire::ends_delivery(&m.payload) && wire::delivery(&m.subject).is_some();
        let holding = *held.borrow();
        let held_one = if holding { sent.iter().position(|m| is_ack(m) && m.start.is_some()) } else { None };
        let (passed, waiting) = sent.split_at(held_one.unwrap_or(sent.len()));
        let (now, later) = buf[..n].split_at(waiting.first().and_then(|m| m.start).unwrap_or(n));
        if to.write_all(now).await.is_err() {
            return Ended::ByServer;
        }
        for message in passed {
            shared.deliveries.answered(&message.subject, &message.payload);
        }
        if later.is_empty() {
            continue;
        }
        // The sender lives as long as the link: waiting ends with a release, or with a cut.
        let _ = held.wait_for(|held| !*held).await;
        if to.write_all(later).await.is_err() {
            return Ended::ByServer;
        }
        for message in waiting {
            shared.deliveries.answered(&message.subject, &message.payload);
        }
    }
}

/// The server's side: deliveries pass, and are noted.
async fn downstream(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, shared: &Shared) {
    let mut reader = wire::Reader::default();
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        for message in reader.read(&buf[..n]) {
            if let Some(reply) = &message.reply {
                shared.deliveries.delivered(reply);
            }
        }
    }
}
