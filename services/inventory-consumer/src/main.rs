//! inventory-consumer binary: parses settings and runs the library (or one of its commands).

use anyhow::Context;
use clap::Parser;
use inventory_consumer::{dead_letters, replay, Cli, Command, DeadLetterCommand, Service, Shutdown};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = telemetry::init("inventory-consumer", cli.config.log_format).context("initialise telemetry")?;
    let result = match cli.command {
        None => serve(cli.config).await,
        Some(command) => run_command(cli.config, command).await,
    };
    telemetry.shutdown();
    result
}

async fn serve(config: inventory_consumer::Config) -> anyhow::Result<()> {
    let service = Service::bind(config).await.context("start inventory-consumer")?;
    if let Some(addr) = service.local_addr() {
        println!("listening on {addr}");
    }
    let shutdown = Shutdown::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            service_kit::shutdown_signal().await;
            shutdown.cancel();
        }
    });
    service.run(shutdown).await.context("inventory-consumer stopped with an error")
}

async fn run_command(config: inventory_consumer::Config, command: Command) -> anyhow::Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&config.database_url)
        .await
        .context("connect to DATABASE_URL")?;
    inventory_consumer::MIGRATOR.run(&pool).await.context("apply migrations")?;
    let mut redis = redis::Client::open(config.redis_url.as_str())
        .context("REDIS_URL")?
        .get_multiplexed_async_connection()
        .await
        .context("connect to REDIS_URL")?;
    match command {
        Command::DeadLetters(DeadLetterCommand::List { all }) => {
            for row in dead_letters::list(&pool, all).await? {
                println!("{}", serde_json::to_string(&row)?);
            }
        }
        Command::DeadLetters(DeadLetterCommand::Redrive { id, all }) => {
            let id = if all { None } else { id };
            for (dl, entry) in dead_letters::redrive(&pool, &mut redis, &config.redis_stream, id).await? {
                println!("dead letter {dl} re-driven as entry {entry}");
            }
        }
        Command::ReplayDemo { entry_id, timeout } => {
            let report = replay::replay(&pool, &mut redis, &config, entry_id.as_deref(), timeout).await?;
            println!("{report}");
        }
    }
    Ok(())
}
