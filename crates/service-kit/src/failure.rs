//! Every failure is one of three classes, decided here for Postgres (and for Redis in
//! `broker::redis::failure`):
//!
//! - **transient**: retrying heals it (a dependency down, overloaded or restarting, a timeout, a
//!   lock or serialization conflict). Never counted against a row or an entry.
//! - **permanent**: retrying the same work cannot succeed (the data breaks a rule). Only this
//!   class is counted against the row or entry that caused it.
//! - **bug**: neither; the code or the deployment needs a look (an unexpected reply, a missing
//!   column). Retried, logged at `error`, never counted against data: a bug usually hits
//!   every row alike, and dead-lettering them all would turn it into an outage.
//!
//! Services show the class in their logs (`failure_class`) and in a `*_failures_total{class}`
//! metric.

use prometheus_client::encoding::EncodeLabelValue;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum FailureClass {
    transient,
    permanent,
    bug,
}

impl FailureClass {
    pub const ALL: [Self; 3] = [Self::transient, Self::permanent, Self::bug];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::transient => "transient",
            Self::permanent => "permanent",
            Self::bug => "bug",
        }
    }

    pub fn is_transient(self) -> bool {
        self == Self::transient
    }
}

impl std::fmt::Display for FailureClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The class of a Postgres (or driver) error.
pub fn of_postgres(error: &sqlx::Error) -> FailureClass {
    use sqlx::Error as E;
    match error {
        E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => FailureClass::transient,
        E::Database(db) => {
            let fatal = ends_session(db.as_ref());
            match db.code() {
                Some(code) => of_sqlstate(&code, fatal),
                None if fatal => FailureClass::transient,
                None => FailureClass::bug,
            }
        }
        _ => FailureClass::bug,
    }
}

/// Whether the server ended the session with this error (a `FATAL` or `PANIC` one, such as a
/// terminated backend or an idle-in-transaction timeout).
pub fn ends_session(error: &dyn sqlx::error::DatabaseError) -> bool {
    error.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some_and(|pg| {
        matches!(pg.severity(), sqlx::postgres::PgSeverity::Fatal | sqlx::postgres::PgSeverity::Panic)
    })
}

/// Whether a Postgres error is a conflict with other transactions (a serialization failure,
/// a deadlock) or a statement timeout: transient, and the same work may well succeed if tried
/// again at once, where other transient failures (the server gone, a lock held) call for a
/// wait.
pub fn is_conflict(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("40001" | "40P01" | "57014")),
        _ => false,
    }
}

/// The class of a SQLSTATE; `fatal`: the server ended the session with it.
pub fn of_sqlstate(code: &str, fatal: bool) -> FailureClass {
    let class = code.get(..2).unwrap_or_default();
    match (class, code) {
        // Connection exceptions; insufficient resources (too many connections, disk full, out of
        // memory); operator intervention: shutdown, crash recovery, start-up, statement timeout
        // (57014) and idle-session timeouts; lock_timeout (55P03); serialization failure and
        // deadlock (40001, 40P01); the idle-in-transaction timeout (25P03); system I/O errors; a
        // database or role not there yet, or a password being changed (the contract: keep
        // retrying, report not-ready).
        ("08" | "53" | "57" | "58", _) => FailureClass::transient,
        (_, "55P03" | "55006" | "40001" | "40P01" | "25P03" | "3D000" | "28000" | "28P01") => FailureClass::transient,
        // Data exceptions, integrity violations, check-option violations, and rules raised by
        // triggers: the data is refused.
        ("22" | "23" | "44", _) | (_, "P0001") => FailureClass::permanent,
        _ if fatal => FailureClass::transient,
        _ => FailureClass::bug,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates() {
        for code in ["08006", "08001", "53300", "53100", "57P01", "57P03", "57014", "55P03", "40001", "40P01", "25P03"]
        {
            assert_eq!(of_sqlstate(code, false), FailureClass::transient, "{code}");
        }
        for code in ["22021", "22003", "23505", "23514", "P0001"] {
            assert_eq!(of_sqlstate(code, false), FailureClass::permanent, "{code}");
        }
        for code in ["42P01", "42703", "XX000", "0A000"] {
            assert_eq!(of_sqlstate(code, false), FailureClass::bug, "{code}");
        }
        // Whatever its code, an error the server ends the session with is the connection's.
        assert_eq!(of_sqlstate("XX000", true), FailureClass::transient);
    }

    #[test]
    fn driver_errors() {
        assert_eq!(of_postgres(&sqlx::Error::PoolTimedOut), FailureClass::transient);
        assert_eq!(of_postgres(&sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into())), FailureClass::transient);
        assert_eq!(of_postgres(&sqlx::Error::RowNotFound), FailureClass::bug);
        assert_eq!(of_postgres(&sqlx::Error::ColumnNotFound("x".to_owned())), FailureClass::bug);
    }
}
