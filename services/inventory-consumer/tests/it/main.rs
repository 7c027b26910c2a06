//! Integration tests against the real Postgres and Redis.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod batch;
mod common;
mod failures;
mod housekeeping;
mod http_api;
mod nats;
mod ordering;
mod poison;
mod replicas;
mod retention;
mod rules;
mod tenants;
