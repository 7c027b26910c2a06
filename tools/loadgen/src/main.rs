use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = loadgen::Config::parse();
    let json = config.json;
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        service_kit::shutdown_signal().await;
        on_signal.cancel();
    });
    let report = loadgen::run(config, shutdown).await.context("load run failed")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report).context("encode the report")?);
    } else {
        print!("{report}");
    }
    if report.requests_ok == 0 {
        anyhow::bail!("no request succeeded (is the order-service at --order-url?)");
    }
    if let Some(e) = &report.end_to_end_error {
        anyhow::bail!("end-to-end latency could not be measured: {e}");
    }
    Ok(())
}
