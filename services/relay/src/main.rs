use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use relay::{Cli, Command, DeadCommand, StreamCommand};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = &cli.config;
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            service_kit::runner::serve(cli.config.log_format, relay::Relay::bind(cli.config)).await.context("relay")
        }
        Command::Replay { since, aggregate_id } => {
            one_off(config, replay(config, since, aggregate_id.as_deref())).await
        }
        Command::Dead(DeadCommand::List) => one_off(config, dead_list(config)).await,
        Command::Dead(DeadCommand::Retry { event_id, all: _ }) => {
            one_off(config, dead_retry(config, event_id.as_deref())).await
        }
        Command::Dead(DeadCommand::Purge { older_than }) => one_off(config, dead_purge(config, older_than)).await,
        Command::Stream(_) if config.broker.broker == broker::Kind::Nats => Err(anyhow::anyhow!(
            "relay stream works on Redis streams; on NATS a group is a durable consumer of the JetStream stream: \
             `nats consumer ls` / `nats consumer info` / `nats consumer rm` (as NATS's admin user)"
        )),
        Command::Stream(StreamCommand::Groups) => one_off(config, stream_groups(config)).await,
        Command::Stream(StreamCommand::DropGroup { group }) => one_off(config, drop_group(config, &group)).await,
    }
}

/// A one-off command, with the relay's telemetry.
async fn one_off(config: &relay::Config, command: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let telemetry = telemetry::init("relay", config.log_format).context("initialising telemetry")?;
    let result = command.await;
    telemetry.shutdown();
    result
}

/// A connection to `DATABASE_URL` as `DATABASE_RUNTIME_ROLE`, like the relay's own work.
async fn connect(config: &relay::Config) -> anyhow::Result<sqlx::PgPool> {
    let options = config.database_url.parse::<sqlx::postgres::PgConnectOptions>().context("DATABASE_URL")?;
    sqlx::PgPool::connect_with(config.database_runtime_role.session_role(options))
        .await
        .context("connecting to DATABASE_URL as DATABASE_RUNTIME_ROLE")
}

async fn replay(config: &relay::Config, since: relay::config::Since, aggregate_id: Option<&str>) -> anyhow::Result<()> {
    let pool = connect(config).await?;
    let mut publisher = relay::publisher(config).await?;
    let since = since.resolve(chrono::Utc::now());
    let only = aggregate_id.map_or(relay::replay::Only::All, relay::replay::Only::Aggregate);
    let n = relay::replay::replay(&pool, &mut publisher, since, only, config.batch_size).await?;
    println!("replayed {n} events published since {since} to {}", config.redis_stream);
    Ok(())
}

async fn dead_list(config: &relay::Config) -> anyhow::Result<()> {
    let pool = connect(config).await?;
    println!("event_id\taggregate_id\tseq\tattempts\tlast_error");
    for d in outbox::dead::list_dead(&pool).await.context("listing dead events")? {
        println!("{}\t{}\t{}\t{}\t{}", d.event_id, d.aggregate_id, d.seq, d.attempts, d.last_error.unwrap_or_default());
    }
    Ok(())
}

async fn dead_retry(config: &relay::Config, event_id: Option<&str>) -> anyhow::Result<()> {
    let pool = connect(config).await?;
    let which = event_id.map_or(outbox::dead::Retry::All, outbox::dead::Retry::One);
    let n = outbox::dead::retry_dead(&pool, which).await.context("retrying dead events")?;
    if n == 0 && event_id.is_some() {
        anyhow::bail!("no dead event with that event_id");
    }
    println!("{n} dead events made pending again");
    Ok(())
}

async fn dead_purge(config: &relay::Config, older_than: std::time::Duration) -> anyhow::Result<()> {
    let pool = connect(config).await?;
    let purged = outbox::dead::purge_dead(&pool, older_than).await.context("purging dead events")?;
    println!("event_id\taggregate_id\tseq\tstatus");
    for p in &purged {
        println!("{}\t{}\t{}\t{}", p.event_id, p.aggregate_id, p.seq, p.status);
    }
    let dead = purged.iter().filter(|p| p.status == "dead").count();
    println!("removed {dead} dead events and {} later events of their orders", purged.len() - dead);
    Ok(())
}

/// A connection to the relay's Redis, and the keys of every partition's stream.
async fn redis(
    config: &relay::Config,
) -> anyhow::Result<(broker::redis::target::RedisConn, Vec<relay::recovery::StreamKeys>)> {
    let target = config.topology.target(&config.redis_url).context("REDIS_URL or REDIS_CLUSTER_URLS")?;
    let timeouts = broker::redis::target::Timeouts::new(Duration::from_secs(5), Duration::from_secs(30));
    let conn = target.connect(timeouts).await.context("connecting to Redis")?;
    let partitions = config.topology.partitions(&config.redis_stream);
    Ok((conn, relay::recovery::StreamKeys::of_partitions(&partitions, target.is_cluster())))
}

async fn stream_groups(config: &relay::Config) -> anyhow::Result<()> {
    let (mut conn, partitions) = redis(config).await?;
    for keys in &partitions {
        let groups = broker::redis::trim::groups(&mut conn, keys).await?;
        let len = broker::redis::trim::length(&mut conn, &keys.stream).await?;
        println!("{}: {len} entries", keys.stream);
        println!("group\tpending\tlag");
        for g in groups {
            let lag = g.lag.map_or_else(|| "unknown".to_owned(), |n| n.to_string());
            println!("{}\t{}\t{lag}", g.name, g.pending);
        }
    }
    Ok(())
}

async fn drop_group(config: &relay::Config, group: &str) -> anyhow::Result<()> {
    let (mut conn, partitions) = redis(config).await?;
    let mut removed_from = Vec::new();
    for keys in &partitions {
        if broker::redis::group::destroy(&mut conn, &keys.stream, group).await? {
            removed_from.push(keys.stream.as_str());
        }
    }
    if removed_from.is_empty() {
        anyhow::bail!("no group {group} on {}", config.redis_stream);
    }
    println!("removed group {group} from {}", removed_from.join(", "));
    Ok(())
}
