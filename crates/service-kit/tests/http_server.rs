//! The accept loop and the body middleware on a real socket: slow and idle connections are
//! cut off, the connection cap answers 503, slow bodies 408, in-flight requests finish on
//! shutdown, and `/healthz` reports a stalled loop.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use prometheus_client::registry::Registry;
use service_kit::http::body::{read_within, BodyLimits};
use service_kit::http::server::{serve, ServerMetrics, REJECTING_AT_ONCE};
use service_kit::http::HttpSettings;
use service_kit::{ops_router, Liveness, Readiness, Shutdown};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

struct Server {
    addr: SocketAddr,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    registry: Arc<Mutex<Registry>>,
}

fn settings() -> HttpSettings {
    HttpSettings {
        max_connections: 64,
        header_timeout: Duration::from_millis(400),
        idle_timeout: Duration::from_millis(800),
        body_timeout: Duration::from_millis(400),
        write_timeout: Duration::from_millis(400),
    }
}

async fn start(settings: HttpSettings, liveness: Liveness) -> Server {
    let registry = Arc::new(Mutex::new(Registry::default()));
    let metrics = ServerMetrics::register(&mut registry.lock().expect("registry"));
    let limits = BodyLimits { timeout: settings.body_timeout, max_bytes: 1024 };
    let router = Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route("/echo", post(|body: String| async move { body }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(600)).await;
                "done"
            }),
        )
        .route(
            "/endless",
            get(|| async {
                let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
                axum::body::Body::from_stream(futures::stream::repeat_with(move || {
                    Ok::<_, std::io::Error>(chunk.clone())
                }))
            }),
        )
        .merge(ops_router(Readiness::new(), liveness, registry.clone()))
        .layer(axum::middleware::from_fn_with_state(limits, read_within));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = Shutdown::new();
    let task = tokio::spawn(serve(listener, router, settings, metrics, shutdown.clone(), Duration::from_secs(5)));
    Server { addr, shutdown, task, registry }
}

/// Sends `request` raw and reads until the server closes or `within` passes.
async fn exchange(addr: SocketAddr, request: &str, within: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the server closed `stream` within `within` (a read returns 0 or fails).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0_u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

fn metrics(server: &Server) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &server.registry.lock().expect("registry")).expect("encode");
    text
}

#[tokio::test]
async fn headers_trickled_slower_than_the_header_timeout_are_cut_off_and_others_served() {
    let server = start(settings(), Liveness::new()).await;
    let mut slow = TcpStream::connect(server.addr).await.expect("connect");
    slow.write_all(b"GET /hello HTTP/1.1\r\n").await.expect("write");
    let started = Instant::now();
    // One header byte every 100 ms: always active, never finished.
    let trickle = tokio::spawn(async move {
        for _ in 0..30 {
            if slow.write_all(b"x").await.is_err() {
                return (slow, true);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (slow, false)
    });
    let answer =
        exchange(server.addr, "GET /hello HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", Duration::from_secs(2))
            .await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"), "{answer}");
    let (mut slow, write_failed) = trickle.await.expect("trickle");
    assert!(write_failed || closed_within(&mut slow, Duration::from_millis(200)).await);
    assert!(started.elapsed() < Duration::from_millis(1500), "closed after {:?}", started.elapsed());
    assert!(
        metrics(&server).contains(r#"http_server_timed_out_connections_total{reason="header"} 1"#),
        "{}",
        metrics(&server)
    );
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout_and_kept_alive_before() {
    let server = start(settings(), Liveness::new()).await;
    let mut conn = TcpStream::connect(server.addr).await.expect("connect");
    for _ in 0..3 {
        // Each request well within the idle timeout: the connection serves them all.
        conn.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("write");
        let mut buf = [0_u8; 512];
        let n = conn.read(&mut buf).await.expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let idle_from = Instant::now();
    assert!(closed_within(&mut conn, Duration::from_secs(3)).await, "idle connection left open");
    let idle = idle_from.elapsed();
    assert!(idle >= Duration::from_millis(400) && idle < Duration::from_millis(1500), "closed after {idle:?} idle");
    assert!(metrics(&server).contains(r#"http_server_timed_out_connections_total{reason="idle"} 1"#));
}

/// A connection asking for `/endless`; with a small receive buffer if `small`.
async fn endless_response(addr: SocketAddr, small: bool) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    if small {
        socket.set_recv_buffer_size(4096).expect("buffer size");
    }
    let mut stream = socket.connect(addr).await.expect("connect");
    stream.write_all(b"GET /endless HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("write");
    stream
}

/// A client that reads nothing of a response that never ends is disconnected once the
/// server's writes have been stuck for the write timeout (and reset: what it never read is
/// not left queued); one that reads in bursts, pausing for less than the timeout, is served
/// on. Control: with a write timeout far off, the stuck client is still connected
/// when the first one was cut off, so the cut-off is the timeout's doing.
#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_after_the_write_timeout() {
    let server = start(settings(), Liveness::new()).await;
    let lenient = start(HttpSettings { write_timeout: Duration::from_secs(30), ..settings() }, Liveness::new()).await;
    let mut stuck = endless_response(server.addr, true).await;
    let mut stuck_on_lenient = endless_response(lenient.addr, true).await;
    let steady = tokio::spawn({
        let addr = server.addr;
        async move {
            let stream = endless_response(addr, false).await;
            let mut buf = vec![0_u8; 64 * 1024];
            let mut read = 0;
            let until = Instant::now() + Duration::from_millis(2500);
            while Instant::now() < until {
                // Everything there is, then a pause well within the timeout.
                loop {
                    match stream.try_read(&mut buf) {
                        Ok(0) => return Err(read),
                        Ok(n) => read += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(_) => return Err(read),
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(read)
        }
    });

    let timed_out = r#"http_server_timed_out_connections_total{reason="write"} 1"#;
    test_support::eventually("the stuck client cut off", Duration::from_secs(5), || async {
        metrics(&server).contains(timed_out).then_some(())
    })
    .await;
    // Reset: the client's next read fails (a plain close would let it read the megabytes the
    // server had queued, then the end).
    let mut buf = vec![0_u8; 64 * 1024];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stuck.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.kind()),
            }
        }
    })
    .await;
    assert_eq!(ended, Ok(Err(std::io::ErrorKind::ConnectionReset)), "the stuck client was not reset");
    let read = steady.await.expect("steady reader");
    assert!(matches!(read, Ok(n) if n > 0), "a steady reader was cut off or got nothing: {read:?}");
    let lenient_metrics = metrics(&lenient);
    assert!(
        lenient_metrics.contains("http_server_timed_out_connections_total{reason=\"write\"} 0"),
        "{lenient_metrics}"
    );
    assert!(
        lenient_metrics.contains("http_server_open_connections 1\n"),
        "the control's connection ended: {lenient_metrics}"
    );
    let mut probe = [0_u8; 1];
    let still_open = tokio::time::timeout(Duration::from_millis(100), stuck_on_lenient.read(&mut probe)).await;
    assert!(matches!(still_open, Ok(Ok(1))), "the control's connection ended: {still_open:?}");
}

#[tokio::test]
async fn connections_over_the_cap_get_503_and_the_cap_frees_when_they_close() {
    let server = start(HttpSettings { max_connections: 2, ..settings() }, Liveness::new()).await;
    let held: Vec<TcpStream> = futures::future::join_all((0..2).map(|_| TcpStream::connect(server.addr)))
        .await
        .into_iter()
        .map(|c| c.expect("connect"))
        .collect();
    let open = |n: usize| {
        let expected = format!("http_server_open_connections {n}\n");
        let server = &server;
        test_support::eventually("the connections served", Duration::from_secs(5), move || {
            let found = metrics(server).contains(&expected);
            async move { found.then_some(()) }
        })
    };
    open(2).await;
    let answer = exchange(server.addr, "GET /hello HTTP/1.1\r\nhost: x\r\n\r\n", Duration::from_secs(2)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("application/problem+json") && answer.contains("retry-after: 1"), "{answer}");
    assert!(metrics(&server).contains("http_server_rejected_connections_total 1"));
    drop(held);
    open(0).await;
    let answer =
        exchange(server.addr, "GET /hello HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", Duration::from_secs(2))
            .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn a_flood_over_the_cap_is_answered_by_a_bounded_number_of_tasks_and_the_rest_closed() {
    let server = start(HttpSettings { max_connections: 1, ..settings() }, Liveness::new()).await;
    let _held = TcpStream::connect(server.addr).await.expect("connect");
    test_support::eventually("the first connection served", Duration::from_secs(5), || {
        let found = metrics(&server).contains("http_server_open_connections 1\n");
        async move { found.then_some(()) }
    })
    .await;
    // Clients that never close: each one answered holds its task for up to a second.
    let flood_size = REJECTING_AT_ONCE + 20;
    let mut flood = Vec::new();
    for _ in 0..flood_size {
        flood.push(TcpStream::connect(server.addr).await.expect("connect"));
    }
    let mut answered = 0;
    for mut connection in flood {
        let mut buf = [0_u8; 64];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), connection.read(&mut buf)).await {
            answered += usize::from(buf[..n].starts_with(b"HTTP/1.1 503"));
        }
    }
    assert_eq!(answered, REJECTING_AT_ONCE, "503s written while the answered ones were still open");
    assert!(metrics(&server).contains(&format!("http_server_rejected_connections_total {flood_size}\n")));
}

#[tokio::test]
async fn a_body_slower_than_the_body_timeout_gets_408_and_a_large_one_413() {
    let server = start(settings(), Liveness::new()).await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nab").await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut out)).await;
    let answer = String::from_utf8_lossy(&out);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2));

    let big = "x".repeat(2000);
    let answer = exchange(
        server.addr,
        &format!("POST /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{big}", big.len()),
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let answer = exchange(
        server.addr,
        "POST /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 5\r\n\r\nhello",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"), "{answer}");
}

#[tokio::test]
async fn shutdown_lets_the_request_in_flight_finish_and_closes_idle_connections() {
    let server = start(settings(), Liveness::new()).await;
    let mut idle = TcpStream::connect(server.addr).await.expect("connect");
    let slow = tokio::spawn(exchange(server.addr, "GET /slow HTTP/1.1\r\nhost: x\r\n\r\n", Duration::from_secs(3)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.shutdown.cancel();
    assert!(closed_within(&mut idle, Duration::from_millis(300)).await, "idle connection closed at once");
    let answer = slow.await.expect("slow request");
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("done"), "{answer}");
    tokio::time::timeout(Duration::from_secs(2), server.task)
        .await
        .expect("server stops")
        .expect("task")
        .expect("serve");
}

const GET_HEALTHZ: &str = "GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

#[tokio::test]
async fn healthz_fails_while_a_work_loop_is_stalled() {
    let liveness = Liveness::new();
    let heartbeat = liveness.register("consumer loop", Duration::from_millis(200));
    let server = start(settings(), liveness).await;
    let healthz = || exchange(server.addr, GET_HEALTHZ, Duration::from_secs(2));
    assert!(healthz().await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answer = healthz().await;
    assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("consumer loop: no progress for"), "{answer}");
    heartbeat.beat();
    assert!(healthz().await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn connections_still_busy_after_the_grace_period_are_closed() {
    let registry = Arc::new(Mutex::new(Registry::default()));
    let metrics = ServerMetrics::register(&mut registry.lock().expect("registry"));
    let router = Router::new().route("/forever", get(std::future::pending::<&'static str>));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = Shutdown::new();
    let task = tokio::spawn(serve(listener, router, settings(), metrics, shutdown.clone(), Duration::from_millis(300)));
    let mut stuck = TcpStream::connect(addr).await.expect("connect");
    stuck.write_all(b"GET /forever HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = Instant::now();
    shutdown.cancel();
    assert!(closed_within(&mut stuck, Duration::from_secs(2)).await);
    tokio::time::timeout(Duration::from_secs(2), task).await.expect("server stops").expect("task").expect("serve");
    let took = stopping.elapsed();
    assert!(took >= Duration::from_millis(250) && took < Duration::from_millis(1500), "{took:?}");
}
