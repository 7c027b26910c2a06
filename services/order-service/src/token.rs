//! `order-service token`: mints a bearer token, for development and scripts.

use std::path::PathBuf;
use std::time::Duration;

use domain::TenantId;
use service_kit::auth::{mint, Scope, SigningKey};
use service_kit::parse_duration;

/// Mint a bearer token for the order API and the inventory API.
#[derive(Debug, clap::Parser)]
#[command(name = "order-service token")]
pub struct TokenArgs {
    /// The token's tenant: [a-z0-9][a-z0-9-]{0,63}.
    #[arg(long, value_parser = parse_tenant)]
    pub tenant: TenantId,
    /// Space-separated scopes: orders:read orders:write inventory:read inventory:write admin.
    #[arg(long, value_parser = parse_scopes)]
    pub scope: String,
    /// How long the token is valid ("30m", "1h", "7d").
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// HS256 secret, as the services are given it.
    #[arg(long, env = "AUTH_JWT_SECRET", hide_env_values = true, required_unless_present = "private_key")]
    pub secret: Option<String>,
    /// Private key in PEM (RSA: RS256, P-256: ES256), matching the services' AUTH_JWT_PUBLIC_KEY.
    #[arg(long, conflicts_with = "secret")]
    pub private_key: Option<PathBuf>,
}

fn parse_tenant(s: &str) -> Result<TenantId, String> {
    TenantId::parse(s).map_err(|e| e.message)
}

fn parse_scopes(s: &str) -> Result<String, String> {
    match s.split(' ').find(|scope| Scope::parse(scope).is_none()) {
        Some(unknown) => Err(format!("unknown scope `{unknown}`")),
        None => Ok(s.to_owned()),
    }
}

/// The token `args` ask for.
pub fn run(args: &TokenArgs) -> anyhow::Result<String> {
    let pem;
    let key = match (&args.secret, &args.private_key) {
        (_, Some(path)) => {
            pem = std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            SigningKey::PrivatePem(&pem)
        }
        (Some(secret), None) => SigningKey::Secret(secret),
        (None, None) => anyhow::bail!("set AUTH_JWT_SECRET or --private-key"),
    };
    let now = chrono::Utc::now().timestamp().max(0).unsigned_abs();
    Ok(mint(key, &args.tenant, &args.scope, now + args.ttl.as_secs())?)
}
