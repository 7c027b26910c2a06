use anyhow::Context;
use clap::Parser;
use order_service::{Config, OrderService};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    service_kit::runner::serve(config.log_format, OrderService::bind(config)).await.context("order-service")
}
