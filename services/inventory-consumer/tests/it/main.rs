//! Integration tests against the real Postgres and Redis.

mod common;
mod failures;
mod http_api;
mod ordering;
mod poison;
mod replicas;
mod rules;
