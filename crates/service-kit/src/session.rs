//! Server-side limits every Postgres session of a service runs with.
//!
//! A session that waits forever holds whatever it locked for as long: a replica frozen in the
//! middle of a transaction, or cut off from the database, would stall every other session
//! that needs the same rows. Each connection therefore starts with a statement timeout, a
//! lock timeout, an idle-in-transaction timeout (the server ends a transaction its client
//! stopped driving, releasing its locks), TCP keepalives (the server notices a client that
//! vanished) and a client connection check (a statement whose client closed the connection,
//! say a request abandoned at its timeout, is cancelled instead of committing later; this
//! needs Postgres 14 or later), and names itself (`application_name`) so `pg_stat_activity`
//! shows who is who.

use std::time::Duration;

use sqlx::postgres::PgConnectOptions;

/// TCP keepalives the server sends on an idle connection: after 10 s idle, every 5 s, 3 times,
/// so a client that vanished is noticed within about 25 s.
const KEEPALIVE_IDLE_SECS: u32 = 10;
const KEEPALIVE_INTERVAL_SECS: u32 = 5;
const KEEPALIVE_COUNT: u32 = 3;

/// How often the server checks, while a statement runs, that its client is still connected.
const CLIENT_CHECK_MS: u32 = 1_000;

/// The limits of one service's sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// `statement_timeout`: no statement runs longer.
    pub statement: Duration,
    /// `lock_timeout`: no statement waits longer for a lock.
    pub lock: Duration,
    /// `idle_in_transaction_session_timeout`: a transaction whose client sends nothing for this
    /// long is ended by the server (its session too), and its locks released.
    pub idle_in_transaction: Duration,
}

impl SessionLimits {
    /// `options` with these limits, server-side TCP keepalives and `application_name`.
    pub fn apply(&self, options: PgConnectOptions, application_name: &str) -> PgConnectOptions {
        let ms = |d: Duration| d.as_millis().clamp(1, i32::MAX as u128).to_string();
        options.application_name(application_name).options([
            ("statement_timeout", ms(self.statement)),
            ("lock_timeout", ms(self.lock)),
            ("idle_in_transaction_session_timeout", ms(self.idle_in_transaction)),
            ("tcp_keepalives_idle", KEEPALIVE_IDLE_SECS.to_string()),
            ("tcp_keepalives_interval", KEEPALIVE_INTERVAL_SECS.to_string()),
            ("tcp_keepalives_count", KEEPALIVE_COUNT.to_string()),
            ("client_connection_check_interval", CLIENT_CHECK_MS.to_string()),
        ])
    }

    /// How long a client waits for a piece of work of `statements` statements before giving
    /// up on the connection itself (a server or network that stopped answering): the server's
    /// own limits plus a margin, so the server's timeout normally fires first.
    pub fn client_deadline(&self, statements: u32) -> Duration {
        (self.statement + self.lock).saturating_mul(statements.max(1)) + Duration::from_secs(5)
    }
}

/// A Postgres role a service switches to (`SET LOCAL ROLE`): `[a-z_][a-z0-9_]{0,62}`, so it
/// can be written into a statement as a quoted identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleName(String);

impl RoleName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut bytes = s.bytes();
        let first_ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
        let rest_ok = bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if first_ok && rest_ok && s.len() <= 63 {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!("`{s}` is not a role name of the form [a-z_][a-z0-9_]{{0,62}}"))
        }
    }

    /// `options` whose sessions run as this role from the start (the startup parameter
    /// `role`, as if each began with `SET ROLE`; `RESET ROLE` comes back to it). Connecting
    /// fails while the role does not exist or the user may not switch to it.
    pub fn session_role(&self, options: PgConnectOptions) -> PgConnectOptions {
        options.options([("role", self.as_str())])
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RoleName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for RoleName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_deadline_outlasts_the_server_limits() {
        let limits = SessionLimits {
            statement: Duration::from_secs(10),
            lock: Duration::from_secs(2),
            idle_in_transaction: Duration::from_secs(5),
        };
        assert_eq!(limits.client_deadline(1), Duration::from_secs(17));
        assert_eq!(limits.client_deadline(0), Duration::from_secs(17));
        assert_eq!(limits.client_deadline(3), Duration::from_secs(41));
    }
}
