//! A service binary running as a child process: started with its environment on a free
//! port, waited for through `GET /readyz`, stopped with SIGTERM or SIGKILL, its output kept.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

/// Output lines kept per process; older lines are dropped first.
const MAX_LOG_LINES: usize = 50_000;
/// Lines printed when a test panics while the process is alive.
const LINES_SHOWN_ON_FAILURE: usize = 200;

/// Variables the services read. They are removed from the inherited environment so a
/// developer's shell cannot change what a test runs; tests set the ones they need.
const SERVICE_VARIABLES: &[&str] = &[
    "DATABASE_URL",
    "DATABASE_MIGRATION_URL",
    "DATABASE_RUNTIME_ROLE",
    "DATABASE_CONSUMER_ROLE",
    "DATABASE_KEY_EXPIRY_ROLE",
    "REDIS_URL",
    "REDIS_STREAM",
    "CONSUMER_GROUP",
    "CONSUMER_NAME",
    "HTTP_ADDR",
    "ADMIN_ADDR",
    "LOG_FORMAT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_SDK_DISABLED",
];

/// Path of the cargo binary `name`, built next to the running test executable
/// (`target/<profile>/<name>`).
pub fn binary_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("test executable lives in target/<profile>/deps");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "binary `{name}` not found at {}; build it first: cargo build --workspace --bins",
        path.display()
    );
    path
}

/// A local address nobody listens on right now ([`test_support::free_port`]).
pub fn free_local_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], test_support::free_port()))
}

type Lines = Arc<Mutex<VecDeque<String>>>;

/// A running (or stopped) service binary. Killed with SIGKILL when dropped; if the test is
/// panicking, its last output lines are printed to help find out why.
pub struct ServiceProcess {
    name: String,
    binary: PathBuf,
    envs: Vec<(String, String)>,
    addr: SocketAddr,
    child: Child,
    lines: Lines,
    http: reqwest::Client,
}

impl ServiceProcess {
    /// Starts `binary` (a cargo bin name) with `envs` on a free port (unless `envs` sets
    /// `HTTP_ADDR`, which must then name a fixed port), `/metrics` there too (unless `envs`
    /// sets `ADMIN_ADDR`), without waiting for it to be ready.
    /// Needs a tokio runtime.
    pub fn spawn<K: Into<String>, V: Into<String>>(binary: &str, envs: impl IntoIterator<Item = (K, V)>) -> Self {
        let mut envs: Vec<(String, String)> = envs.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        let addr = match envs.iter().find(|(k, _)| k == "HTTP_ADDR") {
            Some((_, v)) => {
                let addr: SocketAddr = v.parse().expect("HTTP_ADDR given to the harness is an ip:port");
                assert_ne!(
                    addr.port(),
                    0,
                    "the harness needs a fixed HTTP_ADDR port (omit HTTP_ADDR to get a free one)"
                );
                addr
            }
            None => {
                let addr = free_local_addr();
                envs.push(("HTTP_ADDR".to_owned(), addr.to_string()));
                addr
            }
        };
        // `/metrics` on the same listener, unless the test asks for an admin listener apart.
        if !envs.iter().any(|(k, _)| k == "ADMIN_ADDR") {
            envs.push(("ADMIN_ADDR".to_owned(), addr.to_string()));
        }
        let lines: Lines = Arc::default();
        let child = launch(binary, &binary_path(binary), &envs, &lines);
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("HTTP client");
        Self { name: binary.to_owned(), binary: binary_path(binary), envs, addr, child, lines, http }
    }

    /// [`spawn`](Self::spawn), then [`wait_ready`](Self::wait_ready) for up to 30 s.
    pub async fn start<K: Into<String>, V: Into<String>>(binary: &str, envs: impl IntoIterator<Item = (K, V)>) -> Self {
        let mut process = Self::spawn(binary, envs);
        process.wait_ready(Duration::from_secs(30)).await;
        process
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://{addr}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A client with a 5 s request timeout.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits until `GET /readyz` answers 200. Panics, showing the output, if the process
    /// exits or `timeout` passes first.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        self.wait_for_status("/readyz", timeout).await;
    }

    /// Waits until `GET /healthz` answers 200 (the process serves HTTP; its dependencies may
    /// still be unreachable).
    pub async fn wait_healthy(&mut self, timeout: Duration) {
        self.wait_for_status("/healthz", timeout).await;
    }

    async fn wait_for_status(&mut self, path: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the child process") {
                panic!(
                    "{} exited with {status} before {path} answered 200\n{}",
                    self.name,
                    self.tail(LINES_SHOWN_ON_FAILURE)
                );
            }
            if let Ok(resp) = self.http.get(self.url(path)).send().await {
                if resp.status() == reqwest::StatusCode::OK {
                    return;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "{}: {path} did not answer 200 within {timeout:?}\n{}",
                    self.name,
                    self.tail(LINES_SHOWN_ON_FAILURE)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM (graceful shutdown) without waiting.
    pub fn terminate(&self) {
        let Some(pid) = self.child.id() else { return };
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run `kill` to send SIGTERM");
        assert!(status.success() || self.exited_already(), "sending SIGTERM to {} ({pid}) failed", self.name);
    }

    fn exited_already(&self) -> bool {
        self.child.id().is_none()
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait()).await.ok().map(|r| r.expect("wait for the child process"))
    }

    /// SIGTERM, then waits up to `timeout` for the exit. Panics (after SIGKILL) if the
    /// process does not stop in time: graceful shutdown is part of the contract.
    pub async fn stop(&mut self, timeout: Duration) -> ExitStatus {
        self.terminate();
        match self.wait_exit(timeout).await {
            Some(status) => status,
            None => {
                self.kill().await;
                panic!(
                    "{} did not exit within {timeout:?} of SIGTERM\n{}",
                    self.name,
                    self.tail(LINES_SHOWN_ON_FAILURE)
                );
            }
        }
    }

    /// SIGKILL (`kill -9`): no chance to clean up. Returns once the process is gone.
    pub async fn kill(&mut self) -> ExitStatus {
        // An error here means the process has already exited, which `wait` reports.
        let _ = self.child.start_kill();
        self.child.wait().await.expect("wait for the killed child process")
    }

    /// Starts the binary again with the same environment and address (killing it first if
    /// it still runs), without waiting for it to be ready. Output goes on in the same log.
    pub async fn restart(&mut self) {
        if self.child.try_wait().expect("poll the child process").is_none() {
            self.kill().await;
        }
        push_line(&self.lines, format!("--- {} restarted ---", self.name));
        self.child = launch(&self.name, &self.binary, &self.envs, &self.lines);
    }

    /// Every output line (stdout and stderr, in arrival order) kept so far.
    pub fn logs(&self) -> Vec<String> {
        self.lines.lock().expect("log buffer lock").iter().cloned().collect()
    }

    /// The last `n` output lines, one per line.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines.lock().expect("log buffer lock");
        let skip = lines.len().saturating_sub(n);
        lines.iter().skip(skip).map(String::as_str).collect::<Vec<_>>().join("\n")
    }

    /// Waits until an output line satisfies `matches`, and returns it.
    pub async fn wait_for_log(&self, what: &str, timeout: Duration, matches: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(line) = self.lines.lock().expect("log buffer lock").iter().find(|l| matches(l)) {
                return line.clone();
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "{}: no output line {what} within {timeout:?}\n{}",
                    self.name,
                    self.tail(LINES_SHOWN_ON_FAILURE)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!("--- last output of {} ---\n{}", self.name, self.tail(LINES_SHOWN_ON_FAILURE));
        }
    }
}

fn launch(name: &str, binary: &PathBuf, envs: &[(String, String)], lines: &Lines) -> Child {
    let mut command = Command::new(binary);
    for var in SERVICE_VARIABLES {
        command.env_remove(var);
    }
    command
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
    let echo = std::env::var_os("SYSTEM_TESTS_ECHO").is_some();
    if let Some(out) = child.stdout.take() {
        tokio::spawn(collect(out, name.to_owned(), lines.clone(), echo));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(collect(err, name.to_owned(), lines.clone(), echo));
    }
    child
}

/// Reads lines until the pipe closes (the process exited).
async fn collect(pipe: impl AsyncRead + Unpin, name: String, lines: Lines, echo: bool) {
    let mut reader = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = reader.next_line().await {
        if echo {
            eprintln!("[{name}] {line}");
        }
        push_line(&lines, line);
    }
}

fn push_line(lines: &Lines, line: String) {
    let mut lines = lines.lock().expect("log buffer lock");
    if lines.len() == MAX_LOG_LINES {
        lines.pop_front();
    }
    lines.push_back(line);
}
