//! The inventory database: the only code that reads or writes its tables (`inventory`,
//! `processed_messages`, `aggregate_checkpoints`, `order_reservations`, `parked_events`,
//! `dead_letters`, `entry_failures`). Each statement is whole in one place:
//!
//! - [`batch`]: a batch's reads, and its write in one statement (built with `QueryBuilder`,
//!   one part per table with something to write);
//! - [`stock`]: the stock API's reads and writes of `inventory`;
//! - [`dead_letters`]: listing, locking for a re-drive, marking re-driven, purging;
//! - [`entry_failures`]: counting the failures of entries;
//! - [`prune`]: removing dedupe state past its retention, and sampling the parked events;
//! - [`inspect`]: what the replay demo reads.

pub mod batch;
pub mod dead_letters;
pub mod entry_failures;
pub mod inspect;
pub mod prune;
pub mod stock;
