//! The write side of the transactional outbox.
//!
//! [`append`] records an event in the caller's transaction, so the state change and its event
//! commit or roll back together. [`Notifier`] wakes idle relays after commit without putting a
//! `NOTIFY` inside the writer's transaction (a `NOTIFY` takes a database-wide lock at commit,
//! which would serialise every order transaction).

mod append;
mod notify;

pub use append::{append, append_gated, append_with, Appended, NewEvent, OutboxError, FIRST_CALLER_PARAM};
pub use notify::{Notifier, CHANNEL};

/// Migrations of the orders database (orders, idempotency keys, outbox).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/orders");
