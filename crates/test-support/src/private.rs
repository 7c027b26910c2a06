//! Private server instances that a test may kill, stop and restart.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

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
    /// Further arguments of `redis-server` (a cluster node's).
    extra: Vec<String>,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts Redis; with `appendonly`, every write is fsynced to the AOF before it is acked.
    pub fn start(appendonly: bool) -> Self {
        let mut redis = Self {
            port: free_port(),
            dir: temp_dir("redis"),
            appendonly,
            replica_of: None,
            extra: Vec::new(),
            child: None,
        };
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
            extra: Vec::new(),
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
        command.args(&self.extra);
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
        kill(&mut self.child);
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Sends `signal` (`STOP`, `CONT`) to the server.
    pub fn signal(&self, signal: &str) {
        send_signal(self.child.as_ref(), signal);
    }

    /// `redis-cli` against this server; its output (Redis's error replies included: redis-cli
    /// exits 0 on them).
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default()
    }
}

/// A Redis Cluster of its own: `masters` primaries, each with `replicas` replicas, every node a
/// [`PrivateRedis`] on loopback. A node whose primary is gone for `node_timeout` is promoted.
pub struct PrivateRedisCluster {
    pub nodes: Vec<PrivateRedis>,
}

impl PrivateRedisCluster {
    /// Starts the nodes, joins them (`redis-cli --cluster create`, slots split evenly over the
    /// primaries) and waits until every node reports the cluster ok.
    pub fn start(masters: usize, replicas: usize, node_timeout: Duration) -> Self {
        let nodes: Vec<PrivateRedis> = (0..masters * (1 + replicas))
            .map(|_| {
                let mut node = PrivateRedis {
                    port: free_port(),
                    dir: temp_dir("redis-cluster"),
                    appendonly: false,
                    replica_of: None,
                    extra: Vec::new(),
                    child: None,
                };
                node.extra = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    &node_timeout.as_millis().to_string(),
                    "--cluster-port",
                    &free_port().to_string(),
                    // A replica's first copy starts at once (Redis waits 5 s for more replicas).
                    "--repl-diskless-sync-delay",
                    "0",
                ]
                .map(str::to_owned)
                .to_vec();
                node.restart();
                node
            })
            .collect();
        let addresses: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        run(Command::new("redis-cli").args(["--cluster", "create"]).args(&addresses).args([
            "--cluster-replicas",
            &replicas.to_string(),
            "--cluster-yes",
        ]));
        let cluster = Self { nodes };
        assert!(cluster.wait_ok(Duration::from_secs(30)), "private redis cluster did not come up");
        cluster
    }

    /// Seed URLs: every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(PrivateRedis::url).collect()
    }

    /// Whether, within `timeout`, every running node reports `cluster_state:ok` and every
    /// running replica has its copy of its primary (link up).
    pub fn wait_ok(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let ok = self.nodes.iter().filter(|n| n.is_running()).all(|n| {
                let replication = n.cli(&["INFO", "replication"]);
                n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
                    && (replication.contains("role:master") || replication.contains("master_link_status:up"))
            });
            if ok {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// `CLUSTER NODES` as a running node sees it: per node, its port, whether it is a
    /// primary (and not failed), the id of its primary (replicas), its own id, and its slots.
    fn view(&self) -> Vec<NodeView> {
        let Some(any) = self.nodes.iter().find(|n| n.is_running()) else { return Vec::new() };
        any.cli(&["CLUSTER", "NODES"])
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let port = f.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                let flags = f.get(2)?;
                let slots = f.iter().skip(8).filter_map(|r| {
                    let (a, b) = r.split_once('-').unwrap_or((r, r));
                    Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?))
                });
                Some(NodeView {
                    id: f[0].to_owned(),
                    port,
                    primary: flags.contains("master") && !flags.contains("fail"),
                    primary_id: f.get(3).filter(|m| **m != "-").map(|m| (*m).to_owned()),
                    slots: slots.collect(),
                })
            })
            .collect()
    }

    /// The node serving `slot` as primary now.
    pub fn primary_of(&self, slot: u16) -> Option<usize> {
        let view = self.view();
        let node = view.iter().find(|n| n.primary && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))?;
        self.nodes.iter().position(|n| n.port == node.port)
    }

    /// The replicas of node `index`, by index.
    pub fn replicas_of(&self, index: usize) -> Vec<usize> {
        let view = self.view();
        let Some(id) = view.iter().find(|n| n.port == self.nodes[index].port).map(|n| n.id.clone()) else {
            return Vec::new();
        };
        let ports: Vec<u16> =
            view.iter().filter(|n| n.primary_id.as_deref() == Some(id.as_str())).map(|n| n.port).collect();
        (0..self.nodes.len()).filter(|i| ports.contains(&self.nodes[*i].port)).collect()
    }
}

/// One line of `CLUSTER NODES`.
struct NodeView {
    id: String,
    port: u16,
    primary: bool,
    primary_id: Option<String>,
    slots: Vec<(u16, u16)>,
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A NATS server of its own with JetStream on file storage, on a free port: a test may
/// `kill -9` it and start it again on the same data.
pub struct PrivateNats {
    pub port: u16,
    pub dir: PathBuf,
    /// A configuration file of the test's own (with its environment), instead of flags.
    config: Option<(PathBuf, Vec<(String, String)>)>,
    child: Option<Child>,
}

impl PrivateNats {
    pub fn start() -> Self {
        let mut nats = Self { port: free_port(), dir: temp_dir("nats"), config: None, child: None };
        nats.restart();
        nats
    }

    /// Starts `nats-server -c` on the configuration `text`, whose `port:`, `http_port:` and
    /// `store_dir:` lines are made this server's, with `env` in its environment (the
    /// configuration's `$VARIABLES`).
    pub fn with_config(text: &str, env: &[(&str, &str)]) -> Self {
        let (port, dir) = (free_port(), temp_dir("nats"));
        let text: String = text
            .lines()
            .map(|line| match line.trim_start() {
                l if l.starts_with("port:") => format!("port: {port}"),
                l if l.starts_with("http_port:") => String::new(),
                l if l.starts_with("store_dir:") => format!("  store_dir: {:?}", dir.display().to_string()),
                _ => line.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let path = dir.join("nats.conf");
        std::fs::write(&path, text).expect("write the NATS configuration");
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let mut nats = Self { port, dir, config: Some((path, env)), child: None };
        nats.restart();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and storage directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "nats-server already running");
        let mut command = Command::new(nats_server());
        match &self.config {
            Some((path, env)) => {
                command.arg("-c").arg(path).args(["-a", "127.0.0.1"]).envs(env.iter().map(|(k, v)| (k, v)));
            }
            None => {
                command.args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"]).arg(&self.dir);
            }
        }
        let child = command
            .arg("-l")
            .arg(self.dir.join("nats.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server (is it installed?)");
        self.child = Some(child);
        assert!(wait_for_port(self.port, Duration::from_secs(10)), "private nats-server did not start");
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Sends `signal` (`STOP`, `CONT`) to the server.
    pub fn signal(&self, signal: &str) {
        send_signal(self.child.as_ref(), signal);
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default()
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `nats-server` binary: `NATS_SERVER`, else on the `PATH`, else Debian's.
fn nats_server() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file());
    on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/nats-server"))
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

/// `kill -9` of a server, waited for.
fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Sends `signal` to a server, if it runs.
fn send_signal(child: Option<&Child>, signal: &str) {
    if let Some(child) = child {
        run(Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]));
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}
