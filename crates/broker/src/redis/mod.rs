//! Redis Streams' side of the broker: where Redis is ([`target`]), how its failures are
//! classed ([`failure`]), and what the relay, the consumer and the feed do on its streams.

use service_kit::messaging::MessagingPeer;

pub use ::redis::aio::ConnectionLike;
pub use ::redis::RedisError;

pub mod failure;
pub mod group;
pub mod marker;
pub mod member;
pub mod merge;
pub mod partitioned;
pub mod publish;
pub mod reads;
pub mod tail;
pub mod tails;
pub mod target;
pub mod trim;

pub use failure::{of_redis, of_redis_code};
pub use target::{RedisConn, RedisTarget, Timeouts, Topology};

/// Whether Redis answers `PING` within `within`, connecting included (for `/readyz`).
pub async fn ping(target: &RedisTarget, within: std::time::Duration) -> Result<(), RedisError> {
    let ping = async {
        let mut conn = target.connect(Timeouts::new(within, within)).await?;
        ::redis::cmd("PING").query_async::<()>(&mut conn).await
    };
    match tokio::time::timeout(within, ping).await {
        Ok(pinged) => pinged,
        Err(_) => Err(RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))),
    }
}

/// Sets `key` for `ttl` unless it is set: whether this call set it (the first of several
/// processes to ask).
pub async fn set_once(
    conn: &mut (impl ConnectionLike + Send),
    key: &str,
    ttl: std::time::Duration,
) -> Result<bool, RedisError> {
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
    let set: Option<String> = ::redis::cmd("SET").arg(key).arg(1).arg("NX").arg("PX").arg(ms).query_async(conn).await?;
    Ok(set.is_some())
}

/// The Redis server `target` is (a cluster's first seed node), and this process as
/// `client_id`, as messaging spans name them.
pub fn peer(target: &RedisTarget, client_id: impl Into<String>) -> MessagingPeer {
    let (server_address, server_port) = match target.first_node().map(|info| &info.addr) {
        Some(::redis::ConnectionAddr::Tcp(host, port) | ::redis::ConnectionAddr::TcpTls { host, port, .. }) => {
            (host.clone(), *port)
        }
        Some(::redis::ConnectionAddr::Unix(path)) => (path.display().to_string(), 0),
        None => (String::new(), 0),
    };
    MessagingPeer { system: "redis", server_address, server_port, client_id: client_id.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_is_the_urls_host_and_port() {
        let target = RedisTarget::new("redis://relay:secret@redis.internal:6380/0", &[]).expect("url");
        let relay = peer(&target, "relay-1");
        assert_eq!(
            relay,
            MessagingPeer {
                system: "redis",
                server_address: "redis.internal".into(),
                server_port: 6380,
                client_id: "relay-1".into()
            }
        );
        let default_port = peer(&RedisTarget::new("redis://127.0.0.1", &[]).expect("url"), "x");
        assert_eq!((default_port.server_address.as_str(), default_port.server_port), ("127.0.0.1", 6379));
        let seeds = ["redis://10.0.0.7:7001".to_owned(), "redis://10.0.0.8:7002".to_owned()];
        let cluster = peer(&RedisTarget::new("redis://unused", &seeds).expect("urls"), "x");
        assert_eq!((cluster.server_address.as_str(), cluster.server_port), ("10.0.0.7", 7001));
    }
}
