//! Publishing to NATS JetStream ([`crate::jetstream::publish`]), judged as a Redis pipeline
//! is: JetStream failing any entry fails the batch, blaming no row; an entry that cannot be a
//! NATS message (too large for the server, a field no header can hold) is refused, blaming its
//! row.

use crate::jetstream::publish::{EntryError, Publisher};
use crate::jetstream::Layout;
use domain::{Partitions, StreamEntry};
use service_kit::failure::FailureClass;
use service_kit::messaging::MessagingPeer;

use super::{PublishError, Refusal};

pub struct NatsPublisher {
    inner: Publisher,
    peer: MessagingPeer,
}

impl NatsPublisher {
    pub fn new(client: async_nats::Client, partitions: &Partitions, peer: MessagingPeer) -> Self {
        Self { inner: Publisher::new(client, Layout::new(partitions)), peer }
    }

    pub fn partitions(&self) -> &Partitions {
        self.inner.layout().partitions()
    }

    pub fn subject_of(&self, aggregate_id: &str) -> &str {
        self.inner.layout().subject_of(aggregate_id)
    }

    pub fn peer(&self) -> &MessagingPeer {
        &self.peer
    }

    /// The stream sequences of `entries`, or why the batch is not published.
    pub async fn publish(&self, entries: &[StreamEntry]) -> Result<Vec<String>, PublishError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        judge(self.inner.publish(entries).await)
    }

    pub async fn ping(&self) -> Result<(), String> {
        self.inner.ping().await
    }
}

/// The batch's verdict from each entry's: JetStream's failure if any entry had one, else every
/// refused entry, else the sequences.
fn judge(results: Vec<Result<crate::jetstream::publish::Published, EntryError>>) -> Result<Vec<String>, PublishError> {
    let mut ids = Vec::with_capacity(results.len());
    let mut refused = Vec::new();
    let mut not_sent = 0;
    for (index, result) in results.into_iter().enumerate() {
        match result {
            Ok(published) => ids.push(published.sequence.to_string()),
            Err(EntryError::Broker(error)) => {
                return Err(PublishError::Broker { class: FailureClass::transient, error })
            }
            Err(EntryError::Refused(why)) => {
                refused.push(Refusal { index, class: FailureClass::permanent, error: why.to_string() })
            }
            // Held back by another entry's refusal, which the verdict is about.
            Err(EntryError::NotSent) => not_sent += 1,
        }
    }
    match (refused.is_empty(), not_sent) {
        (true, 0) => Ok(ids),
        (true, _) => Err(PublishError::Broker {
            class: FailureClass::bug,
            error: format!("{not_sent} entries not sent, and none refused or failed"),
        }),
        (false, _) => Err(PublishError::Refused(refused)),
    }
}

#[cfg(test)]
mod tests {
    use crate::entry::EncodeError;
    use crate::jetstream::publish::Published;

    use super::*;

    #[test]
    fn jetstream_failing_one_entry_fails_the_batch_and_a_refused_entry_blames_its_row() {
        let ok = |sequence| Ok(Published { sequence, duplicate: false });
        assert_eq!(judge(vec![ok(7), ok(8)]), Ok(vec!["7".to_owned(), "8".to_owned()]));
        let too_large = || Err(EntryError::Refused(EncodeError::TooLarge { size: 2, max: 1 }));
        assert_eq!(
            judge(vec![ok(7), too_large()]),
            Err(PublishError::Refused(vec![Refusal {
                index: 1,
                class: FailureClass::permanent,
                error: "the message is 2 bytes, more than the NATS server's max_payload of 1".to_owned()
            }]))
        );
        let down = || Err(EntryError::Broker("timed out".to_owned()));
        assert!(matches!(
            judge(vec![ok(7), down(), Err(EntryError::NotSent)]),
            Err(PublishError::Broker { class: FailureClass::transient, .. })
        ));
        assert!(matches!(
            judge(vec![too_large(), Err(EntryError::NotSent)]),
            Err(PublishError::Refused(refused)) if refused.len() == 1
        ));
    }
}
