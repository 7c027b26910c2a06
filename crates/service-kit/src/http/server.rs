//! The accept loop: HTTP/1.1 connections, bounded in number (`max_connections`; one over the
//! cap is answered `503` and closed, by at most [`REJECTING_AT_ONCE`] tasks) and in time (headers within `header_timeout` of their
//! first byte, checked as bytes arrive, so trickling them gets a client cut off; an idle
//! connection closed after `idle_timeout`; one whose client stops reading closed once its
//! writes have made no progress for `write_timeout`). On shutdown nothing new is accepted, idle
//! connections close, in-flight requests finish, and stragglers are closed after a grace.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::HttpSettings;
use crate::Shutdown;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// What the accept loop counts.
#[derive(Clone, Default)]
pub struct ServerMetrics {
    open: Gauge,
    rejected: Counter,
    timed_out: Family<ReasonLabel, Counter>,
}

impl ServerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        for reason in ["header", "idle", "write"] {
            let _ = m.timed_out.get_or_create(&ReasonLabel { reason });
        }
        registry.register("http_server_open_connections", "Connections being served", m.open.clone());
        registry.register(
            "http_server_rejected_connections",
            "Connections answered 503 and closed because the connection cap was reached",
            m.rejected.clone(),
        );
        registry.register(
            "http_server_timed_out_connections",
            "Connections closed for sending a request's headers too slowly (header), for staying idle (idle) \
             or for reading nothing of a response (write)",
            m.timed_out.clone(),
        );
        m
    }
}

/// Connections the kernel holds for the accept loop (it caps this at `net.core.somaxconn`).
/// A burst beyond the queue has its handshakes dropped and retried a second or more later,
/// which a client sees as a slow server; tokio's own `bind` asks for 1 024.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Listens on `addr` (port 0 picks a free one) with a queue of [`LISTEN_BACKLOG`].
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves `router` on `listener` until `shutdown`, then waits up to `grace` for the
/// connections to finish their requests, and closes those that have not.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: HttpSettings,
    metrics: ServerMetrics,
    shutdown: Shutdown,
    grace: Duration,
) -> io::Result<()> {
    warn_if_descriptors_run_short(settings.max_connections);
    let permits = Arc::new(Semaphore::new(settings.max_connections as usize));
    let rejecting = Arc::new(Semaphore::new(REJECTING_AT_ONCE));
    let tracker = TaskTracker::new();
    let close_all = Shutdown::new();
    let settings = Arc::new(settings);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning on the error.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let connection = Connection {
                    router: router.clone(),
                    settings: settings.clone(),
                    metrics: metrics.clone(),
                    shutdown: shutdown.clone(),
                    close: close_all.clone(),
                    _permit: permit,
                };
                tracker.spawn(connection.serve(stream));
            }
            Err(_) => {
                metrics.rejected.inc();
                // Past the cap a flood is answered too, but by a bounded number of tasks: a
                // connection beyond them is closed at once.
                if let Ok(answering) = rejecting.clone().try_acquire_owned() {
                    tracker.spawn(async move {
                        reject(stream).await;
                        drop(answering);
                    });
                }
            }
        }
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            open = tracker.len(),
            "connections still open after the grace period; closing them"
        );
        close_all.cancel();
        tracker.wait().await;
    }
    Ok(())
}

/// Connections over the cap answered `503` at once; each is held for at most a second.
pub const REJECTING_AT_ONCE: usize = 64;

/// Answers a connection over the cap with 503 and closes it.
async fn reject(mut stream: TcpStream) {
    const BODY: &str = r#"{"type":"about:blank","title":"Service Unavailable","status":503,"detail":"too many open connections; retry later"}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let answered = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent until it closes: closing with unread data would reset the
        // connection, and the client might lose the answer.
        let mut sink = [0_u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answered).await;
}

/// One accepted connection and what it holds.
struct Connection {
    router: Router,
    settings: Arc<HttpSettings>,
    metrics: ServerMetrics,
    shutdown: Shutdown,
    /// Closes the connection whatever it is doing (the shutdown grace period is over).
    close: Shutdown,
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    async fn serve(self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        self.metrics.open.inc();
        let watch = Arc::new(Watch::new(self.settings.header_timeout));
        let write_timeout = self.settings.write_timeout;
        // Checked twice a timeout: a stalled connection is closed between one and one and a
        // half timeouts after its last write.
        let check_every = (write_timeout / 2).max(Duration::from_millis(10));
        let mut write_check = tokio::time::interval_at(Instant::now() + check_every, check_every);
        write_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let io = TokioIo::new(WatchedIo { inner: stream, watch: watch.clone() });
        let router = self.router.clone();
        let requests = watch.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let in_flight = InFlight::start(&requests);
            let response = router.clone().oneshot(request.map(Body::new));
            async move {
                let response = response.await?;
                Ok::<_, std::convert::Infallible>(
                    response.map(|body| Body::new(Guarded { body, _in_flight: in_flight })),
                )
            }
        });
        let mut builder = http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(self.settings.idle_timeout).keep_alive(true);
        let mut conn = builder.serve_connection(io, service);
        let mut draining = false;
        loop {
            tokio::select! {
                served = &mut conn => {
                    if let Err(e) = served {
                        if watch.head_too_slow() {
                            self.metrics.timed_out.get_or_create(&ReasonLabel { reason: "header" }).inc();
                        } else if e.is_timeout() {
                            self.metrics.timed_out.get_or_create(&ReasonLabel { reason: "idle" }).inc();
                        } else {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    }
                    break;
                }
                () = self.shutdown.cancelled(), if !draining => {
                    Pin::new(&mut conn).graceful_shutdown();
                    draining = true;
                }
                () = self.close.cancelled() => break,
                _ = write_check.tick() => {
                    if watch.write_stalled_for() >= write_timeout {
                        self.metrics.timed_out.get_or_create(&ReasonLabel { reason: "write" }).inc();
                        // Reset, not closed: a close would leave what the client never read
                        // queued in the kernel, retried for minutes.
                        let socket = conn.into_parts().io.into_inner().inner;
                        let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
                        break;
                    }
                }
            }
        }
        self.metrics.open.dec();
    }
}

/// Where a connection stands: requests in flight, and when the head of the next one began to
/// arrive (its first byte while none was in flight). Atomics: touched on every read.
struct Watch {
    opened: Instant,
    header_timeout: Duration,
    in_flight: AtomicUsize,
    /// Nanoseconds after `opened` at which the pending head's first byte came; 0: none.
    head_started: AtomicU64,
    /// Set once a head took too long: the connection is being closed for it.
    too_slow: AtomicBool,
    /// Nanoseconds after `opened` at which a write found the socket full; 0: writes go.
    write_stalled_since: AtomicU64,
}

impl Watch {
    fn new(header_timeout: Duration) -> Self {
        Self {
            opened: Instant::now(),
            header_timeout,
            in_flight: AtomicUsize::new(0),
            head_started: AtomicU64::new(0),
            too_slow: AtomicBool::new(false),
            write_stalled_since: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1)
    }

    /// Bytes arrived: a head starts, or one in progress may have run out of time.
    fn bytes_read(&self) -> io::Result<()> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Ok(());
        }
        let started = self.head_started.load(Ordering::Acquire);
        if started == 0 {
            self.head_started.store(self.now(), Ordering::Release);
            return Ok(());
        }
        if Duration::from_nanos(self.now().saturating_sub(started)) > self.header_timeout {
            self.too_slow.store(true, Ordering::Release);
            return Err(io::Error::new(io::ErrorKind::TimedOut, "request headers too slow"));
        }
        Ok(())
    }

    fn head_too_slow(&self) -> bool {
        self.too_slow.load(Ordering::Acquire)
    }

    /// A write went (`Ready`) or found the socket full (`Pending`).
    fn wrote<T>(&self, polled: &Poll<T>) {
        if polled.is_pending() {
            let _ = self.write_stalled_since.compare_exchange(0, self.now(), Ordering::AcqRel, Ordering::Acquire);
        } else {
            self.write_stalled_since.store(0, Ordering::Release);
        }
    }

    /// How long writes have been waiting for the client to read; zero while they go.
    fn write_stalled_for(&self) -> Duration {
        match self.write_stalled_since.load(Ordering::Acquire) {
            0 => Duration::ZERO,
            since => Duration::from_nanos(self.now().saturating_sub(since)),
        }
    }
}

/// A request from its head (complete) to the end of its response body.
struct InFlight(Arc<Watch>);

impl InFlight {
    fn start(watch: &Arc<Watch>) -> Self {
        watch.in_flight.fetch_add(1, Ordering::AcqRel);
        watch.head_started.store(0, Ordering::Release);
        Self(watch.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request in flight until it is sent (or dropped).
struct Guarded {
    body: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The socket, telling the watch when bytes arrive and when writes stall.
struct WatchedIo {
    inner: TcpStream,
    watch: Arc<Watch>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.bytes_read()?;
        }
        polled
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Says so at start when the process may run out of file descriptors before the cap.
fn warn_if_descriptors_run_short(max_connections: u32) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else { return };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse::<u64>().ok());
    if let Some(soft) = soft {
        // Connections being answered 503, database and Redis connections, log files, the
        // listener.
        if soft < u64::from(max_connections) + 256 {
            tracing::warn!(
                open_files_limit = soft,
                max_connections,
                "the open-files limit is below the connection cap; raise it (ulimit -n) or lower HTTP_MAX_CONNECTIONS"
            );
        }
    }
}
