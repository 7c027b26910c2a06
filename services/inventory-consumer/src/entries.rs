//! What a batch is made of, shared by the code that applies it ([`crate::apply`]) and the
//! statements that read and write its rows ([`crate::store::batch`]): entries as read, dead letters,
//! parked events, and the JSON form in which an entry's fields are kept.

use domain::Event;

/// A decoded entry, with its fields as read (kept for parking).
#[derive(Debug, Clone)]
pub struct Incoming {
    pub stream_id: String,
    pub event: Event,
    pub fields: Vec<(String, Vec<u8>)>,
}

/// An entry that cannot be applied, recorded with its reason.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub stream_entry_id: String,
    pub event_id: Option<String>,
    pub aggregate_id: Option<String>,
    pub reason: String,
    pub fields: Vec<(String, Vec<u8>)>,
}

pub use broker::group::{fields_from_json, fields_json};

impl DeadLetter {
    /// The letter as the broker's dead-letter stream takes it.
    pub fn to_letter(&self) -> broker::group::Letter {
        broker::group::Letter {
            fields: self.fields.clone(),
            reason: self.reason.clone(),
            original_entry_id: self.stream_entry_id.clone(),
            event_id: self.event_id.clone(),
            aggregate_id: self.aggregate_id.clone(),
        }
    }
}

/// A parked event in memory; `stored` tells whether its row exists (it may have been parked by
/// this very batch).
pub(crate) struct Parked {
    pub(crate) incoming: Incoming,
    pub(crate) stored: bool,
}
