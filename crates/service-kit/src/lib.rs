//! Pieces every service shares: graceful shutdown, `/healthz` `/readyz` `/metrics`,
//! RFC 9457 problem responses, and start-up that waits for its dependencies instead of
//! crash-looping, and upkeep of the busiest tables.

pub mod connections;
pub mod duration;
pub mod health;
pub mod problem;
pub mod shutdown;
pub mod startup;
pub mod upkeep;

pub use duration::parse_duration;
pub use health::{ops_router, Readiness};
pub use problem::Problem;
pub use shutdown::{shutdown_signal, Shutdown};
