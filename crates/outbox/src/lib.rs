//! The transactional outbox: the only code that reads or writes `outbox`, `outbox_published`
//! and `outbox_counters`, and the SQL function `outbox_append` (migration 0011) through which
//! other tables' owners write events.
//!
//! Writing: an owner's statement changes its rows and calls `outbox_append`, so the change and
//! its event commit or roll back together; [`Stamped::run`] runs such a statement, [`append`]
//! appends alone; [`Notifier`] decides which writes carry the relays' wake-up (a `NOTIFY` at
//! their commit). Relaying: [`claim`] takes due rows and moves them to `outbox_published` in a
//! transaction that commits once they are published; [`failures`] records what went wrong with
//! a row; [`dead`] lists, retries and purges rows given up on; [`published`] reads published
//! events back and trims them; [`stats`] is what the relays watch.

mod append;
pub mod claim;
pub mod dead;
pub mod failures;
mod notify;
pub mod published;
pub mod row;
pub mod stats;

pub use append::{append, Appended, NewEvent, OutboxError, Stamped};
pub use notify::{Notifier, Wake, CHANNEL, FALLBACK_DELAY};

/// Migrations of the orders database (orders, idempotency keys, outbox).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/orders");
