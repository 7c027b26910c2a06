//! The live order feed: the events of the stream as Server-Sent Events, resumable from any
//! replica.
//!
//! Every replica reads the whole stream itself ([`tail`]; with `STREAM_PARTITIONS` > 1 every
//! partition, merged in one order all replicas share: [`partitioned`], [`merge`]) into a
//! bounded [`history::History`] in that order, and serves `GET /events` from it ([`sse`]) and
//! the live page `GET /`. Replicas share nothing but the streams: a client's cursor (the last
//! event id it got) names the same place on each, so a client that reconnects anywhere
//! continues where it stopped.

pub mod config;
pub mod history;
pub mod intake;
pub mod metrics;
pub mod sse;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;
use broker::redis::target::RedisTarget;
use broker::tail::{Source, TailSettings};
use prometheus_client::registry::Registry;
use service_kit::admin::AdminListener;
use service_kit::http::server::{serve, ServerMetrics};
use service_kit::messaging::MessagingPeer;
use service_kit::runner::{drain, TaskTracker, TASKS_GRACE};
use service_kit::{Authenticator, Liveness, Problem, Readiness};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use config::Config;
pub use service_kit::{Service, Shutdown, StartError};

/// How long connections get to close at shutdown, once every stream has ended.
const HTTP_GRACE: Duration = Duration::from_secs(5);

/// A feed replica with its listeners bound.
pub struct OrderFeed {
    config: Config,
    redis: RedisTarget,
    auth: Authenticator,
    listener: TcpListener,
    local_addr: SocketAddr,
    admin: AdminListener,
}

impl OrderFeed {
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let auth = Authenticator::from_settings(&config.auth).map_err(|e| StartError::Config(e.to_string()))?;
        let redis = config.topology.target(&config.redis_url).map_err(|e| StartError::RedisUrl(e.into()))?;
        let listener = service_kit::http::server::bind(config.http_addr)
            .map_err(|source| StartError::Bind { addr: config.http_addr, source })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.http_addr, source })?;
        let admin = AdminListener::bind(config.admin_addr, config.http_addr)?;
        Ok(Self { config, redis, auth, listener, local_addr, admin })
    }

    /// Where `/metrics` is served apart (`None`: on the feed's own listener).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr()
    }
}

impl Service for OrderFeed {
    const NAME: &'static str = "order-feed";

    fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Reads the stream and serves clients until `shutdown`, which ends every client's stream.
    async fn run(self, shutdown: Shutdown) -> Result<(), StartError> {
        let Self { config, redis, auth, listener, local_addr, admin } = self;
        let mut registry = Registry::default();
        let metrics = metrics::Metrics::register(&mut registry);
        let server_metrics = ServerMetrics::register(&mut registry);
        let registry = Arc::new(Mutex::new(registry));
        let history_len = usize::try_from(config.history).unwrap_or(usize::MAX);
        let history = Arc::new(history::History::new(history_len, config.client_lag as usize));
        let caught_up = Arc::new(AtomicBool::new(false));
        let readiness = Readiness::new().check(config.broker.broker.as_str(), {
            let caught_up = caught_up.clone();
            move || {
                let reading = caught_up.load(Ordering::Acquire);
                std::future::ready(if reading { Ok(()) } else { Err("not reading the stream".to_owned()) })
            }
        });
        let unfit = Arc::new(OnceLock::<String>::new());
        let readiness = readiness.check("stream partitions", service_kit::tenancy::unfit_check(unfit.clone()));
        let readiness = service_kit::auth::announce(&auth, readiness);
        let liveness = Liveness::new();
        let feed = sse::Feed {
            history: history.clone(),
            caught_up: caught_up.clone(),
            auth,
            clients: Arc::new(Semaphore::new(config.max_clients as usize)),
            heartbeat: config.heartbeat,
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
        };
        let app = Router::new()
            .route("/events", get(sse::events))
            .route("/", get(page))
            .with_state(feed)
            .merge(admin.service_routes(readiness.clone(), liveness.clone(), registry.clone()))
            .merge(service_kit::openapi::route(&openapi()))
            .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "Not found").detail("no such route") });
        let admin_server = admin.spawn(readiness, liveness, registry, server_metrics.clone(), shutdown.clone());
        let tasks = TaskTracker::new();
        let client_id = format!("order-feed-{}", service_kit::messaging::instance_name());
        let peer = match config.broker.broker {
            broker::Kind::Redis => broker::redis::peer(&redis, client_id.clone()),
            broker::Kind::Nats => MessagingPeer::nats(&config.broker.nats_url, client_id.clone()),
        };
        let intake = intake::Intake { peer, history, metrics };
        let partitions = config.topology.partitions(&config.redis_stream);
        let source = match config.broker.nats_client(&client_id).await {
            Ok(Some(client)) => Source::Nats(client),
            Ok(None) => Source::Redis(redis),
            Err(e) => return Err(StartError::Config(format!("NATS_URL: {e}"))),
        };
        let settings = TailSettings { partitions, history: history_len, block: config.block };
        let reading = {
            let shutdown = shutdown.clone();
            async move { broker::tail::follow(source, settings, Arc::new(intake), caught_up, &unfit, shutdown).await }
        };
        tasks.spawn(reading);
        tracing::info!(
            addr = %local_addr,
            stream = config.redis_stream,
            partitions = config.topology.stream_partitions,
            "order-feed listening"
        );
        let served = serve(listener, app, config.http.clone(), server_metrics, shutdown, HTTP_GRACE)
            .await
            .map_err(StartError::Serve);
        admin_server.stopped().await;
        drain(&tasks, TASKS_GRACE).await;
        served
    }
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(sse::events, page),
    tags((name = "feed", description = "Events as they are published, to browsers and other clients")),
)]
struct Api;

/// order-feed's OpenAPI document (`GET /openapi.json`).
fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    service_kit::openapi::document(
        "order-feed",
        "The live order feed: the events of the caller's tenant as Server-Sent Events, resumable on any replica.",
        Api::openapi(),
    )
}

/// The live page: plain HTML and `EventSource`.
#[utoipa::path(get, path = "/", tag = "feed",
    responses((status = 200, description = "The page", body = String, content_type = "text/html")))]
async fn page() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-cache")], Html(include_str!("page.html")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn docs_api_md_has_every_operation_and_no_other() {
        let api_md = include_str!("../../../docs/API.md");
        assert_eq!(service_kit::openapi::undocumented(&super::openapi(), api_md, "order-feed"), Vec::<String>::new());
    }
}
