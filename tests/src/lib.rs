//! Harness for system tests: runs the real service binaries as child processes.
