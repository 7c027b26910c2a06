//! inventory-consumer binary: parses settings and runs the service (or one of its commands).

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use inventory_consumer::{dead_letters, replay_demo, Cli, Command, DeadLetterCommand, InventoryConsumer, Shutdown};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let format = cli.config.log_format;
    match cli.command {
        None => {
            service_kit::runner::serve(format, InventoryConsumer::bind(cli.config)).await.context("inventory-consumer")
        }
        Some(command) => {
            let telemetry = telemetry::init("inventory-consumer", format).context("initialise telemetry")?;
            let result = run_command(cli.config, command).await;
            telemetry.shutdown();
            result
        }
    }
}

async fn run_command(config: inventory_consumer::Config, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            // As the tables' owner.
            let url = config.database_migration_url.as_deref().unwrap_or(&config.database_url);
            let owner =
                sqlx::PgPool::connect(url).await.context("connect to DATABASE_MIGRATION_URL (or DATABASE_URL)")?;
            inventory_consumer::MIGRATOR.run(&owner).await.context("apply migrations")?;
            println!("inventory database migrated");
        }
        Command::DeadLetters(DeadLetterCommand::List { all }) => {
            let pool = consumer_pool(&config).await?;
            for row in dead_letters::list(&pool, all).await? {
                println!("{}", serde_json::to_string(&row)?);
            }
        }
        Command::DeadLetters(DeadLetterCommand::Purge { older_than }) => {
            let pool = consumer_pool(&config).await?;
            let removed = dead_letters::purge(&pool, older_than, u32::MAX, &Shutdown::new()).await?;
            println!("{removed} dead letters removed");
        }
        Command::DeadLetters(DeadLetterCommand::Redrive { id, all }) => {
            let id = if all { None } else { id };
            let pool = consumer_pool(&config).await?;
            let partitions = config.topology.partitions(&config.redis_stream);
            let redriven = match config.broker.broker {
                broker::Kind::Nats => {
                    let client = broker::jetstream::connect(&config.broker.nats_url, &config.consumer_name)
                        .await
                        .context("NATS_URL")?;
                    let js = broker::jetstream::context(client);
                    let to = dead_letters::RedriveTo::<broker::redis::RedisConn>::Nats(&js);
                    dead_letters::redrive_to(&pool, to, &partitions, id).await?
                }
                broker::Kind::Redis => {
                    let mut redis = redis(&config).await?;
                    dead_letters::redrive(&pool, &mut redis, &partitions, id).await?
                }
            };
            for (dl, entry) in redriven {
                println!("dead letter {dl} re-driven as entry {entry}");
            }
        }
        Command::ReplayDemo { .. } if config.broker.broker == broker::Kind::Nats => {
            anyhow::bail!(
                "replay-demo re-adds a Redis stream entry; on NATS its equivalent is re-publishing the message"
            )
        }
        Command::ReplayDemo { entry_id, timeout } => {
            let pool = consumer_pool(&config).await?;
            let mut redis = redis(&config).await?;
            let report = replay_demo::run(&pool, &mut redis, &config, entry_id.as_deref(), timeout).await?;
            println!("{report}");
        }
    }
    Ok(())
}

/// A pool on `DATABASE_URL` as `DATABASE_CONSUMER_ROLE`: the commands work on every tenant's
/// rows, as the consumer does.
async fn consumer_pool(config: &inventory_consumer::Config) -> anyhow::Result<sqlx::PgPool> {
    let options = config.database_url.parse::<sqlx::postgres::PgConnectOptions>().context("DATABASE_URL")?;
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(config.database_consumer_role.session_role(options))
        .await
        .context("connect to DATABASE_URL as DATABASE_CONSUMER_ROLE")
}

async fn redis(config: &inventory_consumer::Config) -> anyhow::Result<broker::redis::target::RedisConn> {
    let target = config.topology.target(&config.redis_url).context("REDIS_URL or REDIS_CLUSTER_URLS")?;
    let timeouts = broker::redis::target::Timeouts::new(Duration::from_secs(5), Duration::from_secs(30));
    target.connect(timeouts).await.context("connect to Redis")
}
