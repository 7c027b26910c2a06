//! Which stream an event goes to when the events are spread over `STREAM_PARTITIONS` streams,
//! and the names of those streams.
//!
//! An order's events all go to one partition: partition = FNV-1a (32-bit) of the
//! `aggregate_id`'s UTF-8 bytes, modulo the number of partitions. So each order's events stay
//! in one stream, in the order they were added.
//!
//! With one partition the stream is `REDIS_STREAM` itself. With N > 1, partition `i` is the
//! stream `<REDIS_STREAM>.p<i>{<tag>}`: `{<tag>}` is a Redis Cluster hash tag chosen so that
//! partition `i`'s slot lies in the `i`-th N-th of the 16 384 slots. A cluster whose slots are
//! split evenly over its shards (as `redis-cli --cluster create` splits them) therefore holds
//! the same number of partitions on each shard when N is a multiple of the shards. Every key
//! named after a partition stream (its dead letters `<stream>.dlq`, the relays' marker) shares
//! the tag, and so the slot.

/// Hash slots of a Redis Cluster.
pub const CLUSTER_SLOTS: u16 = 16_384;

/// The most partitions; more would not spread over any cluster this system is built for.
pub const MOST_PARTITIONS: u16 = 256;

/// The streams events are spread over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitions {
    stream: String,
    /// Each partition's stream, partition 0 first.
    names: Vec<String>,
}

/// Why a number of partitions is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("STREAM_PARTITIONS must be between 1 and {MOST_PARTITIONS}, not {0}")]
pub struct PartitionCountError(pub u64);

impl Partitions {
    /// `count` partitions of the stream `stream`.
    pub fn new(stream: impl Into<String>, count: u16) -> Result<Self, PartitionCountError> {
        if !(1..=MOST_PARTITIONS).contains(&count) {
            return Err(PartitionCountError(count.into()));
        }
        let stream = stream.into();
        let names = match count {
            1 => vec![stream.clone()],
            n => (0..usize::from(n)).map(|i| format!("{stream}.p{i}{{{}}}", slot_tag(i, usize::from(n)))).collect(),
        };
        Ok(Self { stream, names })
    }

    /// The one stream `stream`, as before there were partitions.
    pub fn single(stream: impl Into<String>) -> Self {
        let stream = stream.into();
        Self { names: vec![stream.clone()], stream }
    }

    /// `REDIS_STREAM`: the name the partitions are named after.
    pub fn base(&self) -> &str {
        &self.stream
    }

    pub fn count(&self) -> usize {
        self.names.len()
    }

    /// The partition of the order `aggregate_id`.
    pub fn of(&self, aggregate_id: &str) -> usize {
        (fnv1a32(aggregate_id.as_bytes()) as usize) % self.names.len()
    }

    /// Partition `index`'s stream.
    ///
    /// # Panics
    /// If there is no partition `index`.
    pub fn stream(&self, index: usize) -> &str {
        &self.names[index]
    }

    /// Every partition's stream, partition 0 first.
    pub fn streams(&self) -> &[String] {
        &self.names
    }

    /// The stream of the order `aggregate_id`.
    pub fn stream_of(&self, aggregate_id: &str) -> &str {
        self.stream(self.of(aggregate_id))
    }
}

/// A key named after `key` with `suffix` appended, in the same cluster slot as `key`: `key`
/// with a hash tag (every partition stream) keeps it; an untagged key (the single stream)
/// gets itself as the tag on a cluster, and is left as it is on one node, where slots do not
/// matter and the name stays the one it always was.
pub fn companion_key(key: &str, suffix: &str, cluster: bool) -> String {
    if cluster && hash_tag(key).is_none() {
        format!("{{{key}}}{suffix}")
    } else {
        format!("{key}{suffix}")
    }
}

/// FNV-1a, 32-bit: offset basis 2166136261, prime 16777619.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(2_166_136_261_u32, |hash, b| (hash ^ u32::from(*b)).wrapping_mul(16_777_619))
}

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its hash tag if it has one, else of the
/// whole key, modulo 16 384.
pub fn key_slot(key: &str) -> u16 {
    let hashed = hash_tag(key).unwrap_or(key);
    crc16(hashed.as_bytes()) % CLUSTER_SLOTS
}

/// The part of `key` Redis Cluster hashes when it has one: between the first `{` and the
/// next `}`, if not empty.
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let close = key[open + 1..].find('}')? + open + 1;
    (close > open + 1).then(|| &key[open + 1..close])
}

/// The smallest number (as text) whose slot lies in the `index`-th of `count` equal ranges
/// of the slots.
fn slot_tag(index: usize, count: usize) -> String {
    let slots = usize::from(CLUSTER_SLOTS);
    let (low, high) = (index * slots / count, (index + 1) * slots / count);
    // Each range holds at least 64 slots (at most 256 partitions), and CRC16 spreads the
    // numbers evenly: a few thousand tries at most.
    (0_u32..).map(|k| k.to_string()).find(|k| (low..high).contains(&usize::from(key_slot(k)))).unwrap_or_default()
}

/// CRC16-CCITT (XMODEM), as Redis Cluster computes it.
fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0_u16, |crc, b| {
        let mut crc = crc ^ (u16::from(*b) << 8);
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
        crc
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_partition_is_the_stream_itself() {
        let p = Partitions::new("orders", 1).unwrap();
        assert_eq!(p.streams(), ["orders"]);
        assert_eq!(p.stream_of("anything"), "orders");
        assert_eq!(Partitions::single("orders"), p);
    }

    #[test]
    fn the_hash_is_fnv1a_and_stable() {
        // Published FNV-1a 32-bit test vectors.
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
        let p = Partitions::new("orders", 6).unwrap();
        let id = "01JBZ8W3V6Q5X7K9M2N4P6R8T0";
        assert_eq!(p.of(id), (fnv1a32(id.as_bytes()) % 6) as usize);
        assert_eq!(p.stream_of(id), p.stream(p.of(id)));
    }

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("{user1000}.following"), key_slot("{user1000}.followers"));
        assert_eq!(key_slot("{}x"), key_slot("{}x"));
        assert_eq!(hash_tag("{}x"), None);
        assert_eq!(hash_tag("a{b}c{d}"), Some("b"));
    }

    #[test]
    fn partitions_spread_evenly_over_evenly_split_slots() {
        for count in [2_u16, 3, 6, 12, 256] {
            let p = Partitions::new("orders", count).unwrap();
            let streams = p.streams().to_vec();
            for (i, stream) in streams.iter().enumerate() {
                let slot = usize::from(key_slot(stream));
                assert_eq!(slot * p.count() / usize::from(CLUSTER_SLOTS), i, "{stream} (slot {slot}) of {count}");
                assert!(stream.starts_with(&format!("orders.p{i}{{")), "{stream}");
            }
            let mut unique = streams.clone();
            unique.dedup();
            assert_eq!(unique.len(), streams.len());
        }
    }

    #[test]
    fn companion_keys_share_the_slot_on_a_cluster() {
        let p = Partitions::new("orders", 6).unwrap();
        let stream = p.stream(3);
        let dlq = companion_key(stream, ".dlq", true);
        assert_eq!(dlq, format!("{stream}.dlq"));
        assert_eq!(key_slot(&dlq), key_slot(stream));
        assert_eq!(companion_key("orders", ":relay-epoch", false), "orders:relay-epoch");
        let marker = companion_key("orders", ":relay-epoch", true);
        assert_eq!(marker, "{orders}:relay-epoch");
        assert_eq!(key_slot(&marker), key_slot("orders"));
    }

    #[test]
    fn counts_out_of_range_are_refused() {
        assert!(Partitions::new("orders", 0).is_err());
        assert!(Partitions::new("orders", MOST_PARTITIONS + 1).is_err());
    }

    #[test]
    fn every_order_keeps_to_one_partition_and_all_are_used() {
        let p = Partitions::new("orders", 6).unwrap();
        let mut used = [0_u32; 6];
        for n in 0..6_000 {
            let id = ulid::Ulid::from_parts(n, u128::from(n) * 7919).to_string();
            assert_eq!(p.of(&id), p.of(&id));
            used[p.of(&id)] += 1;
        }
        assert!(used.iter().all(|n| (800..1200).contains(n)), "{used:?}");
    }
}
