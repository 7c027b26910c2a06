//! How a Redis failure is classed: whether waiting helps (Redis away, loading, out of memory,
//! failing over), the command was refused for what it carries, or neither (a bug).

use service_kit::FailureClass;

/// The class of a Redis error, client- or server-side.
pub fn of_redis(error: &redis::RedisError) -> FailureClass {
    use redis::ErrorKind as K;
    if error.is_io_error() || error.is_timeout() || error.is_connection_dropped() || error.is_connection_refusal() {
        return FailureClass::transient;
    }
    match error.kind() {
        K::IoError
        | K::BusyLoadingError
        | K::TryAgain
        | K::ClusterDown
        | K::MasterDown
        | K::ReadOnly
        | K::Moved
        | K::Ask
        | K::AuthenticationFailed
        | K::ClusterConnectionNotFound => FailureClass::transient,
        K::ExtensionError | K::ResponseError => error.code().map_or(FailureClass::bug, of_redis_code),
        _ => FailureClass::bug,
    }
}

/// The class of a Redis error reply by its code (the first word: `OOM`, `ERR`, `WRONGTYPE` …).
pub fn of_redis_code(code: &str) -> FailureClass {
    match code {
        // Out of memory (maxmemory), loading its data, busy with a script, a replica cut off
        // from its master or a read-only replica after a failover, persistence failing (MISCONF),
        // too few replicas, authentication being changed.
        "OOM" | "LOADING" | "BUSY" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "READONLY" | "NOREPLICAS"
        | "MISCONF" | "MOVED" | "ASK" | "NOAUTH" | "WRONGPASS" => FailureClass::transient,
        // The command was refused for what it carries, or for what the key holds.
        "ERR" | "WRONGTYPE" | "NOPERM" | "EXECABORT" => FailureClass::permanent,
        _ => FailureClass::bug,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_errors() {
        let server = |kind, code: &'static str| redis::RedisError::from((kind, code, String::new()));
        let io = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(of_redis(&io), FailureClass::transient);
        assert_eq!(of_redis(&server(redis::ErrorKind::BusyLoadingError, "LOADING")), FailureClass::transient);
        assert_eq!(of_redis(&server(redis::ErrorKind::ReadOnly, "READONLY")), FailureClass::transient);
        assert_eq!(of_redis(&server(redis::ErrorKind::TypeError, "parse")), FailureClass::bug);
        assert_eq!(of_redis_code("OOM"), FailureClass::transient);
        assert_eq!(of_redis_code("MISCONF"), FailureClass::transient);
        assert_eq!(of_redis_code("WRONGTYPE"), FailureClass::permanent);
        assert_eq!(of_redis_code("ERR"), FailureClass::permanent);
        assert_eq!(of_redis_code("SOMETHINGNEW"), FailureClass::bug);
    }
}
