//! Postgres connections for the hot paths: a pool that trusts a connection whose last use
//! went well.
//!
//! sqlx's `PgPool` tests a connection with a round trip (a `Sync`, answered by the server)
//! every time it goes back to the pool, and by default every time it is taken: three round
//! trips for a one-statement request, each a wake-up of the server backend. Here a connection
//! is put back ([`PooledConnection::put_back`]) at no cost only when its user says its work
//! completed; after work that failed, only once a round trip has cleared what the work left
//! queued; one dropped (a cancelled future, a transaction left open) is closed,
//! so the server rolls back whatever it was doing and no later user can inherit the state. A
//! connection is tested only when it has been idle for a while, which is when a server
//! restart may have ended it unseen.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection as _, PgConnection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How long a connection may sit idle before it is tested on its next use.
pub const TEST_AFTER_IDLE: Duration = Duration::from_secs(1);
/// How long a connection may sit idle before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long [`PooledConnection::put_back`] waits for the server, after work that did not
/// complete, before closing the connection instead.
pub const RECYCLE_TIMEOUT: Duration = Duration::from_secs(2);

/// A bounded set of Postgres connections, opened on first use. Cloning is cheap.
#[derive(Clone)]
pub struct Connections {
    inner: Arc<Inner>,
}

struct Inner {
    options: PgConnectOptions,
    permits: Arc<Semaphore>,
    /// Most recently released last: taken from the back, aged out from the front.
    idle: Mutex<Vec<Idle>>,
    acquire_timeout: Duration,
}

struct Idle {
    conn: PgConnection,
    since: Instant,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("available", &self.inner.permits.available_permits())
            .field("idle", &self.inner.idle().len())
            .finish()
    }
}

impl Inner {
    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // The lock guards a plain Vec; a panic while holding it cannot leave it inconsistent.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used idle connection, after closing those idle past [`IDLE_TIMEOUT`].
    fn take_idle(&self) -> Option<Idle> {
        let mut idle = self.idle();
        let expired = idle.iter().take_while(|i| i.since.elapsed() >= IDLE_TIMEOUT).count();
        idle.drain(..expired);
        idle.pop()
    }
}

impl Connections {
    /// At most `max` connections to `options`; taking one waits at most `acquire_timeout`
    /// (including opening it).
    pub fn new(options: PgConnectOptions, max: u32, acquire_timeout: Duration) -> Self {
        let max = usize::try_from(max.max(1)).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        Self {
            inner: Arc::new(Inner {
                options,
                permits: Arc::new(Semaphore::new(max)),
                idle: Mutex::new(Vec::new()),
                acquire_timeout,
            }),
        }
    }

    /// Parses `url`; [`Connections::new`] with a 5 s acquire timeout.
    pub fn from_url(url: &str, max: u32) -> Result<Self, sqlx::Error> {
        Ok(Self::new(url.parse()?, max, Duration::from_secs(5)))
    }

    /// The options connections are opened with.
    pub fn options(&self) -> &PgConnectOptions {
        &self.inner.options
    }

    /// Takes a connection: an idle one (tested first if idle for [`TEST_AFTER_IDLE`] or more),
    /// else a new one. Fails with `PoolTimedOut` after the acquire timeout, `PoolClosed` after
    /// [`Connections::close`], or with the error of opening a connection.
    pub async fn acquire(&self) -> Result<PooledConnection, sqlx::Error> {
        let deadline = Instant::now() + self.inner.acquire_timeout;
        let permit = match tokio::time::timeout_at(deadline, self.inner.permits.clone().acquire_owned()).await {
            Err(_) => return Err(sqlx::Error::PoolTimedOut),
            Ok(Err(_)) => return Err(sqlx::Error::PoolClosed),
            Ok(Ok(permit)) => permit,
        };
        while let Some(Idle { mut conn, since }) = self.inner.take_idle() {
            if since.elapsed() < TEST_AFTER_IDLE {
                return Ok(self.lease(conn, permit));
            }
            // A failed or hung test only costs that connection.
            if let Ok(Ok(())) = tokio::time::timeout_at(deadline, conn.ping()).await {
                return Ok(self.lease(conn, permit));
            }
        }
        match tokio::time::timeout_at(deadline, PgConnection::connect_with(&self.inner.options)).await {
            Err(_) => Err(sqlx::Error::PoolTimedOut),
            Ok(Err(e)) => Err(e),
            Ok(Ok(conn)) => Ok(self.lease(conn, permit)),
        }
    }

    fn lease(&self, conn: PgConnection, permit: OwnedSemaphorePermit) -> PooledConnection {
        PooledConnection { conn: Some(conn), inner: self.inner.clone(), _permit: permit }
    }

    /// Refuses new acquisitions and closes the idle connections; connections in use are closed
    /// when they come back.
    pub async fn close(&self) {
        self.inner.permits.close();
        let idle: Vec<Idle> = std::mem::take(&mut *self.inner.idle());
        let closing =
            idle.into_iter().map(|Idle { conn, .. }| tokio::time::timeout(Duration::from_secs(1), conn.close()));
        futures::future::join_all(closing).await;
    }

    /// Connections open and not in use.
    pub fn idle_count(&self) -> usize {
        self.inner.idle().len()
    }
}

/// How the work done on a [`PooledConnection`] ended, which decides how it is put back.
#[derive(Debug, Clone, Copy)]
pub enum Ended<'a> {
    /// Completed, with no transaction left open and none dropped.
    Completed,
    /// Failed with this error from the database or the driver.
    Failed(&'a sqlx::Error),
    /// Stopped for another reason, perhaps with a transaction dropped.
    Interrupted,
}

impl<'a, T> From<&'a Result<T, sqlx::Error>> for Ended<'a> {
    fn from(result: &'a Result<T, sqlx::Error>) -> Self {
        match result {
            Ok(_) => Self::Completed,
            Err(e) => Self::Failed(e),
        }
    }
}

/// A connection taken from [`Connections`]. [`PooledConnection::put_back`] returns it; dropping
/// it closes it.
pub struct PooledConnection {
    conn: Option<PgConnection>,
    inner: Arc<Inner>,
    _permit: OwnedSemaphorePermit,
}

impl PooledConnection {
    /// Puts the connection back, as its work `ended`: at no cost after completed work; closed
    /// after a failure of the connection itself (a transport or protocol error, a `FATAL` one);
    /// otherwise (a database error such as a constraint, or work interrupted) once the server
    /// has answered a round trip. A sqlx `Transaction` dropped on an error only queues its
    /// `ROLLBACK`, to go out with the connection's next message: put back as it is, the
    /// transaction and its locks would live on until the connection's next user, however long
    /// that takes. The round trip sends the rollback and waits for it; a connection that fails
    /// it, or takes more than [`RECYCLE_TIMEOUT`], is closed.
    pub async fn put_back(self, ended: Ended<'_>) {
        match ended {
            Ended::Completed => self.release(),
            Ended::Failed(error) if keeps_connection(error) => self.recycle().await,
            Ended::Failed(_) => {}
            Ended::Interrupted => self.recycle().await,
        }
    }

    fn release(mut self) {
        if self.inner.permits.is_closed() {
            return;
        }
        if let Some(conn) = self.conn.take() {
            self.inner.idle().push(Idle { conn, since: Instant::now() });
        }
    }

    async fn recycle(mut self) {
        let Some(conn) = self.conn.as_mut() else { return };
        if let Ok(Ok(())) = tokio::time::timeout(RECYCLE_TIMEOUT, conn.ping()).await {
            self.release();
        }
    }
}

/// Whether a connection that returned `error` can serve the next user: not after a transport
/// or protocol error, nor after an error the server ends the session with (a `FATAL` one, such
/// as a terminated backend or an idle-in-transaction timeout).
pub fn keeps_connection(error: &sqlx::Error) -> bool {
    if let sqlx::Error::Database(e) = error {
        return !crate::failure::ends_session(e.as_ref());
    }
    matches!(
        error,
        sqlx::Error::RowNotFound
            | sqlx::Error::TypeNotFound { .. }
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnIndexOutOfBounds { .. }
            | sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::Encode(_)
    )
}

impl Deref for PooledConnection {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        match &self.conn {
            Some(conn) => conn,
            None => unreachable!("a pooled connection is only taken by release, which consumes it"),
        }
    }
}

impl DerefMut for PooledConnection {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match &mut self.conn {
            Some(conn) => conn,
            None => unreachable!("a pooled connection is only taken by release, which consumes it"),
        }
    }
}

impl std::fmt::Debug for PooledConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledConnection").finish_non_exhaustive()
    }
}
