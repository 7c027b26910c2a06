use anyhow::Context;
use clap::Parser;
use relay::{Cli, Command, DeadCommand};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = telemetry::init("relay", cli.config.log_format).context("initialising telemetry")?;
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let shutdown = service_kit::Shutdown::new();
            let trigger = shutdown.clone();
            tokio::spawn(async move {
                service_kit::shutdown_signal().await;
                trigger.cancel();
            });
            relay::run(cli.config, shutdown).await.context("relay failed")
        }
        Command::Replay { since, aggregate_id } => replay(&cli.config, since, aggregate_id.as_deref()).await,
        Command::Dead(DeadCommand::List) => dead_list(&cli.config).await,
        Command::Dead(DeadCommand::Retry { event_id, all: _ }) => dead_retry(&cli.config, event_id.as_deref()).await,
    };
    telemetry.shutdown();
    result
}

async fn connect(config: &relay::Config) -> anyhow::Result<sqlx::PgPool> {
    sqlx::PgPool::connect(&config.database_url).await.context("connecting to DATABASE_URL")
}

async fn replay(config: &relay::Config, since: relay::config::Since, aggregate_id: Option<&str>) -> anyhow::Result<()> {
    let pool = connect(config).await?;
    let mut publisher =
        relay::publish::Publisher::new(&config.redis_url, config.redis_stream.clone()).context("REDIS_URL")?;
    let since = since.resolve(chrono::Utc::now());
    let n = relay::replay::replay(&pool, &mut publisher, since, aggregate_id, config.batch_size).await?;
    println!("replayed {n} events published since {since} to {}", config.redis_stream);
    Ok(())
}

async fn dead_list(config: &relay::Config) -> anyhow::Result<()> {
    let pool = connect(config).await?;
    println!("event_id\taggregate_id\tseq\tattempts\tlast_error");
    for d in relay::dead::list_dead(&pool).await.context("listing dead events")? {
        println!("{}\t{}\t{}\t{}\t{}", d.event_id, d.aggregate_id, d.seq, d.attempts, d.last_error.unwrap_or_default());
    }
    Ok(())
}

async fn dead_retry(config: &relay::Config, event_id: Option<&str>) -> anyhow::Result<()> {
    let pool = connect(config).await?;
    let which = event_id.map_or(relay::dead::Retry::All, relay::dead::Retry::One);
    let n = relay::dead::retry_dead(&pool, which).await.context("retrying dead events")?;
    if n == 0 && event_id.is_some() {
        anyhow::bail!("no dead event with that event_id");
    }
    println!("{n} dead events made pending again");
    Ok(())
}
