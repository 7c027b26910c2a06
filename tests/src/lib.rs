//! Harness for system tests: runs the real service binaries as child processes.
//!
//! The binaries are looked up next to the test executable (`target/<profile>/`), so
//! `cargo build --workspace --bins` must run before `cargo test` (as `scripts/test` does).

pub mod browser;
pub mod exposition;
pub mod faults;
pub mod feed;
pub mod nginx;
pub mod process;
pub mod semconv;
pub mod system;

pub use process::{binary_path, free_local_addr, ServiceProcess};
