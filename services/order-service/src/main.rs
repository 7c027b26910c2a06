use anyhow::Context;
use clap::Parser;
use order_service::{Config, Shutdown};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let telemetry = telemetry::init("order-service", config.log_format).context("initialising telemetry")?;
    let shutdown = Shutdown::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        service_kit::shutdown_signal().await;
        signal.cancel();
    });
    let result = order_service::run(config, shutdown).await;
    if let Err(e) = &result {
        tracing::error!(error = ?e, "order-service stopped with an error");
    }
    // Flushing spans blocks; keep it off the async workers.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    result.context("order-service")
}
