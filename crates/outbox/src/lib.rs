//! The write side of the transactional outbox.
//!
//! [`append`] records an event in the caller's transaction, so the state change and its event
//! commit or roll back together. [`Notifier`] decides which writes carry the relays' wake-up
//! (a `NOTIFY` at their commit) and notifies for the others, so that every event is followed by
//! a notification without serialising every writer's commit behind the lock a `NOTIFY` takes.

/// The notification channel's name, for SQL text built at compile time.
macro_rules! channel {
    () => {
        "outbox_events"
    };
}

mod append;
mod notify;

pub use append::{append, append_gated, append_with, Appended, NewEvent, OutboxError, FIRST_CALLER_PARAM};
pub use notify::{Notifier, Wake, CHANNEL, FALLBACK_DELAY};

/// Migrations of the orders database (orders, idempotency keys, outbox).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/orders");
