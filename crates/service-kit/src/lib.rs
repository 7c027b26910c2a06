//! Pieces every service shares: one way to start and stop ([`runner`]), graceful shutdown,
//! `/healthz` `/readyz` `/metrics` (on an admin listener of their own),
//! RFC 9457 problem responses, start-up that waits for its dependencies instead of
//! crash-looping, upkeep of the busiest tables, the classes of failure, the limits of every
//! database session and every HTTP connection.

pub mod admin;
pub mod auth;
pub mod backoff;
pub mod connections;
pub mod duration;
pub mod failure;
pub mod health;
pub mod http;
pub mod integer;
pub mod liveness;
pub mod messaging;
pub mod openapi;
pub mod problem;
pub mod prune;
pub mod runner;
pub mod session;
pub mod shutdown;
pub mod startup;
pub mod tenancy;
pub mod upkeep;

pub use auth::{Authenticator, Principal, Scope};
pub use backoff::Backoff;
pub use duration::parse_duration;
pub use failure::FailureClass;
pub use health::{ops_router, Readiness};
pub use liveness::{Heartbeat, Liveness};
pub use problem::Problem;
pub use runner::{Service, StartError, TaskTracker};
pub use session::SessionLimits;
pub use shutdown::{shutdown_signal, Shutdown};
