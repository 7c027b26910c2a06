use anyhow::Context;
use clap::Parser;
use order_service::token::TokenArgs;
use order_service::{Config, OrderService};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `token` and `migrate` take the place of serving; the service's own settings are the
    // top-level flags.
    match std::env::args().nth(1).as_deref() {
        Some("token") => {
            let args = TokenArgs::parse_from(std::env::args_os().skip(1));
            println!("{}", order_service::token::run(&args)?);
            Ok(())
        }
        Some("migrate") => {
            let config = Config::parse_from(std::env::args_os().skip(1));
            order_service::migrate_once(&config).await.context("order-service migrate")?;
            println!("orders database migrated");
            Ok(())
        }
        _ => {
            let config = Config::parse();
            service_kit::runner::serve(config.log_format, OrderService::bind(config)).await.context("order-service")
        }
    }
}
