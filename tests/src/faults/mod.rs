//! The fault-injection suite: attacks a running system and checks a ledger.
//!
//! A run starts its own Postgres and broker (Redis, or nats-server with JetStream), the
//! order-service, relays and consumers as real processes ([`cluster`]), drives a seeded plan of
//! orders through the HTTP API ([`plan`], [`load`]) while a seeded schedule kills, freezes and
//! crashes processes and servers ([`schedule`], [`inject`]), waits for the pipeline to drain
//! ([`drain`], reading the broker through [`stream`]) and checks every acknowledged answer
//! against both databases ([`checker`], [`model`]). See `docs/RELIABILITY.md`.

pub mod checker;
pub mod cluster;
pub mod drain;
pub mod inject;
pub mod link;
pub mod load;
pub mod misnumbering;
pub mod model;
pub mod plan;
pub mod process;
pub mod run;
pub mod schedule;
pub mod stream;

pub use run::{run, seed_from_env, Report, RunSpec};

/// Why a run could not be carried out (as opposed to what it found).
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error("setting up the run: {0}")]
    Setup(String),
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("redis: {0}")]
    Redis(String),
    #[error("nats: {0}")]
    Nats(String),
}
