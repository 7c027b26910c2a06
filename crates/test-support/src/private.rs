//! Private server instances that a test may kill, stop and restart.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free local port")
}

fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A `redis-server` on a free port with its own data directory.
pub struct PrivateRedis {
    pub port: u16,
    pub dir: PathBuf,
    appendonly: bool,
    /// The primary's port, for a replica.
    replica_of: Option<u16>,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts Redis; with `appendonly`, every write is fsynced to the AOF before it is acked.
    pub fn start(appendonly: bool) -> Self {
        let mut redis = Self { port: free_port(), dir: temp_dir("redis"), appendonly, replica_of: None, child: None };
        redis.restart();
        redis
    }

    /// Starts a replica of `primary` and waits until it has synchronised.
    pub fn start_replica_of(primary: &PrivateRedis) -> Self {
        let mut redis = Self {
            port: free_port(),
            dir: temp_dir("redis"),
            appendonly: false,
            replica_of: Some(primary.port),
            child: None,
        };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and data directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis already running");
        let aof = if self.appendonly { "yes" } else { "no" };
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", aof])
            .args(["--appendfsync", "always", "--dir"])
            .arg(&self.dir);
        if let Some(primary) = self.replica_of {
            command.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        let child =
            command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start redis-server (is it installed?)");
        self.child = Some(child);
        assert!(wait_for_port(self.port, Duration::from_secs(10)), "private redis did not start");
        if self.replica_of.is_some() {
            assert!(self.wait_synced(Duration::from_secs(10)), "private redis replica did not synchronise");
        }
    }

    /// Whether this replica reports its link to the primary up within `timeout`.
    fn wait_synced(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let info = Command::new("redis-cli").args(["-p", &self.port.to_string(), "INFO", "replication"]).output();
            if info.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("master_link_status:up")) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Postgres cluster of its own (`initdb` + `pg_ctl`) on a free port.
///
/// Postgres refuses to run as root; when the tests run as root the server runs as the
/// `postgres` user.
pub struct PrivatePostgres {
    pub port: u16,
    pub dir: PathBuf,
    running: bool,
}

impl PrivatePostgres {
    pub fn start() -> Self {
        let dir = temp_dir("pg");
        let as_root = std::env::var("USER").map(|u| u == "root").unwrap_or(false) || is_root();
        if as_root {
            run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir));
        }
        let data = dir.join("data");
        run(pg_command("initdb", as_root)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "-D"])
            .arg(&data));
        let mut pg = Self { port: free_port(), dir, running: false };
        pg.restart();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Admin URL (database `postgres`).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn restart(&mut self) {
        let opts = format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on", self.port, self.dir.display());
        run(pg_command("pg_ctl", is_root())
            .args(["-w", "-l"])
            .arg(self.dir.join("log"))
            .args(["-o", &opts, "-D"])
            .arg(self.data())
            .arg("start"));
        self.running = true;
    }

    /// `pg_ctl stop -m immediate`: like a crash, no checkpoint.
    pub fn stop_immediate(&mut self) {
        if self.running {
            run(pg_command("pg_ctl", is_root()).args(["-w", "-m", "immediate", "-D"]).arg(self.data()).arg("stop"));
            self.running = false;
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop_immediate();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

fn pg_command(tool: &str, as_root: bool) -> Command {
    let path = pg_bin(tool);
    if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

/// Finds a Postgres server tool on PATH or under /usr/lib/postgresql.
fn pg_bin(tool: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(tool))
        .find(|p| p.exists());
    on_path
        .or_else(|| {
            let mut versions: Vec<_> =
                std::fs::read_dir("/usr/lib/postgresql").ok()?.flatten().map(|e| e.path()).collect();
            versions.sort();
            versions.into_iter().rev().map(|v| v.join("bin").join(tool)).find(|p| Path::new(p).exists())
        })
        .unwrap_or_else(|| PathBuf::from(tool))
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}
