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

/// Fields as JSON `[[name, value], ...]` (values as UTF-8, lossily).
pub fn fields_json(fields: &[(String, Vec<u8>)]) -> serde_json::Value {
    fields.iter().map(|(k, v)| serde_json::json!([k, String::from_utf8_lossy(v)])).collect()
}

/// The inverse of [`fields_json`].
pub fn fields_from_json(value: &serde_json::Value) -> Vec<(String, Vec<u8>)> {
    let pairs = value.as_array().map(Vec::as_slice).unwrap_or_default();
    pairs
        .iter()
        .filter_map(|p| Some((p.get(0)?.as_str()?.to_owned(), p.get(1)?.as_str()?.as_bytes().to_vec())))
        .collect()
}

/// A parked event in memory; `stored` tells whether its row exists (it may have been parked by
/// this very batch).
pub(crate) struct Parked {
    pub(crate) incoming: Incoming,
    pub(crate) stored: bool,
}
