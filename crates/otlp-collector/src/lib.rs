//! An OTLP trace receiver for tests. [`Collector::start`] listens on two free local ports,
//! one for OTLP/gRPC and one for OTLP/HTTP (`POST /v1/traces`, protobuf), and keeps every
//! span it receives, with its service name, ids, parent, kind and attributes.

mod span;

pub use span::{CollectedSpan, Kind};

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use prost::Message;
use tokio_util::sync::CancellationToken;

type Spans = Arc<Mutex<Vec<CollectedSpan>>>;

/// A running receiver; it stops when dropped.
pub struct Collector {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    spans: Spans,
    stop: CancellationToken,
}

impl Collector {
    /// Binds both listeners on 127.0.0.1 and serves them on the current tokio runtime.
    pub async fn start() -> std::io::Result<Self> {
        let spans = Spans::default();
        let stop = CancellationToken::new();

        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let grpc_addr = grpc.local_addr()?;
        let service = TraceServiceServer::new(GrpcReceiver { spans: spans.clone() });
        let until = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(grpc);
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, until)
                .await
            {
                eprintln!("otlp-collector: grpc server failed: {e}");
            }
        });

        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http_addr = http.local_addr()?;
        let app = axum::Router::new().route("/v1/traces", axum::routing::post(receive_http)).with_state(spans.clone());
        let until = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(http, app).with_graceful_shutdown(until).await {
                eprintln!("otlp-collector: http server failed: {e}");
            }
        });

        Ok(Self { grpc_addr, http_addr, spans, stop })
    }

    /// Value for `OTEL_EXPORTER_OTLP_ENDPOINT` with `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// Value for `OTEL_EXPORTER_OTLP_ENDPOINT` with `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`
    /// (the exporter appends `/v1/traces`).
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.spans.lock().expect("span list lock").clone()
    }

    /// Polls until `done` holds for the spans received, and returns them. Panics with `what`
    /// and the spans seen after `timeout`.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[CollectedSpan]) -> bool,
    ) -> Vec<CollectedSpan> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            if tokio::time::Instant::now() >= deadline {
                let list: Vec<String> = spans.iter().map(ToString::to_string).collect();
                panic!("timed out after {timeout:?} waiting for {what}; received spans:\n{}", list.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct GrpcReceiver {
    spans: Spans,
}

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = span::flatten(request.into_inner());
        self.spans.lock().expect("span list lock").extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

async fn receive_http(
    axum::extract::State(spans): axum::extract::State<Spans>,
    body: Bytes,
) -> axum::response::Response {
    match ExportTraceServiceRequest::decode(body) {
        Ok(request) => {
            spans.lock().expect("span list lock").extend(span::flatten(request));
            let response = ExportTraceServiceResponse { partial_success: None }.encode_to_vec();
            ([(header::CONTENT_TYPE, "application/x-protobuf")], response).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("not an ExportTraceServiceRequest: {e}")).into_response(),
    }
}
