//! One service binary run as a child process that the suite may kill, freeze and restart.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

use super::FaultError;

/// Finds a workspace binary next to the running executable (`target/<profile>/`, or its
/// parent when running from `target/<profile>/deps/`).
pub fn binary(name: &str) -> Result<PathBuf, FaultError> {
    let exe = std::env::current_exe().map_err(|e| FaultError::Setup(format!("current_exe: {e}")))?;
    let dir = exe.parent();
    for d in [dir, dir.and_then(Path::parent)].into_iter().flatten() {
        let candidate = d.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(FaultError::Setup(format!(
        "binary `{name}` not found next to {} (run `cargo build --workspace --bins` first)",
        exe.display()
    )))
}

/// A service process: its command line stays the same across restarts.
pub struct Service {
    pub name: String,
    bin: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    /// Per-start environment, e.g. a consumer name that changes per incarnation.
    per_start: fn(&str, u32) -> Vec<(String, String)>,
    child: Option<Child>,
    pub incarnation: u32,
    pub http_port: u16,
}

fn nothing(_: &str, _: u32) -> Vec<(String, String)> {
    Vec::new()
}

impl Service {
    pub fn new(name: &str, bin: PathBuf, env: Vec<(String, String)>, log_dir: &Path, http_port: u16) -> Self {
        Self {
            name: name.to_owned(),
            bin,
            env,
            log: log_dir.join(format!("{name}.log")),
            per_start: nothing,
            child: None,
            incarnation: 0,
            http_port,
        }
    }

    pub fn with_per_start(mut self, f: fn(&str, u32) -> Vec<(String, String)>) -> Self {
        self.per_start = f;
        self
    }

    /// Sets (or replaces) an environment variable for the next start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    pub fn remove_env(&mut self, key: &str) {
        self.env.retain(|(k, _)| k != key);
    }

    pub fn start(&mut self) -> Result<(), FaultError> {
        if self.child.is_some() {
            return Ok(());
        }
        self.incarnation += 1;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| FaultError::Setup(format!("log {}: {e}", self.log.display())))?;
        let err = log.try_clone().map_err(|e| FaultError::Setup(e.to_string()))?;
        let child = Command::new(&self.bin)
            .envs(self.env.iter().cloned())
            .envs((self.per_start)(&self.name, self.incarnation))
            .env("HTTP_ADDR", format!("127.0.0.1:{}", self.http_port))
            // `/metrics` on the same listener, where the checks read it.
            .env("ADMIN_ADDR", format!("127.0.0.1:{}", self.http_port))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| FaultError::Setup(format!("spawn {}: {e}", self.bin.display())))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// `kill -9` and reap.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Sends `SIGSTOP` (`freeze`) or `SIGCONT`.
    pub fn signal(&self, signal: &str) -> Result<(), FaultError> {
        let pid = self.pid().ok_or_else(|| FaultError::Setup(format!("{} is not running", self.name)))?;
        let status = std::process::Command::new("kill")
            .args(["-s", signal, &pid.to_string()])
            .status()
            .map_err(|e| FaultError::Setup(format!("kill: {e}")))?;
        if status.success() {
            Ok(())
        } else {
            Err(FaultError::Setup(format!("kill -s {signal} {pid} failed")))
        }
    }

    /// The exit status if the process has exited by itself within `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = tokio::time::timeout(timeout, child.wait()).await.ok()?.ok()?;
        self.child = None;
        Some(status)
    }

    /// Restarts the process if it exited by itself (a crash is a finding: it is logged).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Polls `/readyz` until it answers 200.
    pub async fn wait_ready(&self, http: &reqwest::Client, timeout: Duration) -> Result<(), FaultError> {
        let url = format!("http://127.0.0.1:{}/readyz", self.http_port);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(r) = http.get(&url).timeout(Duration::from_secs(1)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(FaultError::Setup(format!(
                    "{} not ready after {timeout:?} (log: {})",
                    self.name,
                    self.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
