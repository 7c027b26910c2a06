//! The transactional outbox: the only code that reads or writes `outbox`, `outbox_published`
//! and `outbox_sequences`.
//!
//! Writing: [`append`] records an event in the caller's transaction, so the state change and
//! its event commit or roll back together; [`Notifier`] decides which writes carry the relays'
//! wake-up (a `NOTIFY` at their commit). Relaying: [`claim`] takes due rows and moves them to
//! `outbox_published` in a transaction that commits once they are published; [`failures`]
//! records what went wrong with a row; [`dead`] lists, retries and purges rows given up on;
//! [`published`] reads published events back and trims them; [`stats`] is what the relays
//! watch.

/// The notification channel's name, for SQL text built at compile time.
macro_rules! channel {
    () => {
        "outbox_events"
    };
}

mod append;
pub mod claim;
pub mod dead;
pub mod failures;
mod notify;
pub mod published;
pub mod row;
pub mod stats;

pub use append::{append, append_gated, append_with, Appended, NewEvent, OutboxError, FIRST_CALLER_PARAM};
pub use notify::{Notifier, Wake, CHANNEL, FALLBACK_DELAY};

/// Migrations of the orders database (orders, idempotency keys, outbox).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/orders");
