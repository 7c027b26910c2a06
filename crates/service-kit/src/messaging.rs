//! Who talks to which broker, as the OpenTelemetry messaging semantic conventions name it on
//! every messaging span: `server.address`, `server.port` and `messaging.client.id`.

/// The broker a service's messaging spans name, and the service's own id there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessagingPeer {
    /// The broker's kind (`messaging.system`): `redis` or `nats`.
    pub system: &'static str,
    /// The broker's host (`server.address`); a Unix socket's path.
    pub server_address: String,
    /// The broker's port (`server.port`); 0 for a Unix socket.
    pub server_port: u16,
    /// This process among the broker's clients (`messaging.client.id`).
    pub client_id: String,
}

impl MessagingPeer {
    /// The NATS server `url` names (`nats://[user:pass@]host[:port]`, port 4222 unless given),
    /// and this process as `client_id`.
    pub fn nats(url: &str, client_id: impl Into<String>) -> Self {
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        // The first server of a list; past any credentials.
        let rest = rest.split(',').next().unwrap_or_default();
        let host_port = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        let host_port = host_port.split('/').next().unwrap_or_default();
        let (host, port) = match host_port.rsplit_once(':').map(|(host, port)| (host, port.parse())) {
            Some((host, Ok(port))) => (host, port),
            _ => (host_port, 4222),
        };
        Self { system: "nats", server_address: host.to_owned(), server_port: port, client_id: client_id.into() }
    }
}

/// This process: `<host name>-<pid>`. In a container the host name is the container's id, so
/// the name is unique among replicas and the same across restarts of the process's container
/// but for the pid.
pub fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nats_peer_is_the_first_servers_host_and_port() {
        let peer = MessagingPeer::nats("nats://relay:secret@nats.internal:4333", "relay-1");
        assert_eq!((peer.system, peer.server_address.as_str(), peer.server_port), ("nats", "nats.internal", 4333));
        let default_port = MessagingPeer::nats("nats://127.0.0.1", "x");
        assert_eq!((default_port.server_address.as_str(), default_port.server_port), ("127.0.0.1", 4222));
        let list = MessagingPeer::nats("nats://10.0.0.7:4223,nats://10.0.0.8:4224", "x");
        assert_eq!((list.server_address.as_str(), list.server_port), ("10.0.0.7", 4223));
    }

    #[test]
    fn the_instance_name_ends_with_the_pid() {
        assert!(instance_name().ends_with(&format!("-{}", std::process::id())));
    }
}
