//! A private nginx in front of order-feed replicas, configured from the template compose uses
//! (`deploy/nginx/order-feed.conf.template`), on a free port; stopped when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nginx {
    pub addr: SocketAddr,
    dir: PathBuf,
    child: Child,
}

impl Nginx {
    /// Starts nginx proxying to `upstreams`; panics if nginx is not installed (`.ci/run`
    /// installs Debian's).
    pub fn start(upstreams: &[SocketAddr]) -> Self {
        let addr = crate::free_local_addr();
        let dir = std::env::temp_dir().join(test_support::unique_name("nginx"));
        let temp = dir.join("temp");
        std::fs::create_dir_all(&temp).expect("nginx dir");
        // Workers run as an unprivileged user when the tests run as root.
        let _ = Command::new("chmod").arg("777").arg(&temp).status();
        let template = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/nginx/order-feed.conf.template");
        let template = std::fs::read_to_string(template).expect("read the nginx template");
        let servers: String = upstreams.iter().map(|u| format!("server {u} max_fails=1 fail_timeout=2s; ")).collect();
        let site = template
            .replace("${FEED_UPSTREAMS}", &servers)
            .replace("${FEED_LISTEN}", &addr.to_string())
            .replace("${FEED_RESOLVER}", "")
            .replace("${FEED_ACCESS_LOG}", &dir.join("access.log").display().to_string());
        std::fs::write(dir.join("site.conf"), site).expect("write site.conf");
        let d = dir.display();
        let main = format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\nhttp {{\n\
             client_body_temp_path {d}/temp/body;\nproxy_temp_path {d}/temp/proxy;\n\
             fastcgi_temp_path {d}/temp/fastcgi;\nuwsgi_temp_path {d}/temp/uwsgi;\nscgi_temp_path {d}/temp/scgi;\n\
             include {d}/site.conf;\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), main).expect("write nginx.conf");
        // Debian installs it in /usr/sbin, which is not on every user's PATH.
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().find(|p| std::path::Path::new(p).exists());
        let child = Command::new(nginx.unwrap_or("nginx"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx (apt-get install nginx)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "nginx did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { addr, dir, child }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The access log so far.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    /// SIGTERM, so the master stops its workers (a SIGKILL would leave them behind, holding the
    /// port); SIGKILL only if it has not exited within 5 s.
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
