use anyhow::Context;
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = order_feed::Config::parse();
    service_kit::runner::serve(config.log_format, order_feed::OrderFeed::bind(config)).await.context("order-feed")
}
