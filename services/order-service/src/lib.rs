//! order-service: the orders HTTP API of the contract.
//!
//! Each state change of an order commits in one Postgres transaction with its event in the
//! outbox (see the `outbox` crate), so an order exists if and only if its `OrderCreated` event
//! does. Bodies are parsed by hand so every failure is an RFC 9457 problem naming the field.

mod app;
mod body;
mod config;
mod error;
mod idempotency;
mod metrics;
mod observe;
mod openapi;
mod orders;
mod routes;
mod store;
pub mod token;

pub use app::{migrate_once, OrderService};
pub use body::MAX_BODY_BYTES;
pub use config::Config;
pub use service_kit::{Service, Shutdown, StartError};
