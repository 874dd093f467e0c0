//! Real `redis-server` processes for tests: single node, a three-node cluster, and TLS
//! with a CA generated at test time. Each listens on 127.0.0.1 only, on a free port, and
//! is killed on drop. A missing `redis-server` (or `openssl`) fails loudly.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

fn require(tool: &str, package: &str) {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "these tests need `{tool}`: install it (Debian: apt-get install {package}) and run again"
    );
}

/// Runs `redis-cli` with `args`, returning its stdout (trimmed).
pub fn redis_cli(args: &[&str]) -> String {
    require("redis-cli", "redis-tools");
    let output = Command::new("redis-cli").args(args).output().expect("redis-cli runs");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// TLS material: a test CA and a server certificate for 127.0.0.1 signed by it.
pub struct TlsFiles {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TlsFiles {
    fn generate(dir: &Path) -> Self {
        require("openssl", "openssl");
        let run = |args: &[&str]| {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl runs");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=api-key-server test CA",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write server.ext");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        Self {
            ca_cert: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
        }
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(&self.ca_cert).expect("read ca.crt")
    }
}

/// One `redis-server` on 127.0.0.1.
pub struct RedisServer {
    pub port: u16,
    args: Vec<String>,
    child: Option<Child>,
    pub tls: Option<TlsFiles>,
    password: Option<String>,
    dir: TempDir,
}

impl RedisServer {
    /// A plain node, no persistence.
    pub fn start() -> Self {
        Self::spawn(Vec::new(), false)
    }

    /// A plain node that writes every change to its append-only file before answering:
    /// killed and started again, it has everything it acknowledged.
    pub fn start_persistent() -> Self {
        Self::spawn(
            ["--appendonly", "yes", "--appendfsync", "always"]
                .map(str::to_owned)
                .to_vec(),
            false,
        )
    }

    /// A plain node that requires `password` (`AUTH`).
    pub fn start_with_password(password: &str) -> Self {
        let mut server = Self::spawn(vec!["--requirepass".to_owned(), password.to_owned()], false);
        server.password = Some(password.to_owned());
        server
    }

    /// A node serving TLS only, with a certificate from a CA made for this test.
    pub fn start_tls() -> Self {
        Self::spawn(Vec::new(), true)
    }

    fn spawn(extra: Vec<String>, tls: bool) -> Self {
        require("redis-server", "redis-server");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut args: Vec<String> = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        args.extend(["--dir".to_owned(), dir.path().display().to_string()]);
        let tls = tls.then(|| TlsFiles::generate(dir.path()));
        if let Some(files) = &tls {
            args.extend(
                [
                    "--port",
                    "0",
                    "--tls-port",
                    &port.to_string(),
                    "--tls-cert-file",
                    &files.server_cert.display().to_string(),
                    "--tls-key-file",
                    &files.server_key.display().to_string(),
                    "--tls-ca-cert-file",
                    &files.ca_cert.display().to_string(),
                    "--tls-auth-clients",
                    "no",
                ]
                .map(str::to_owned),
            );
        } else {
            args.extend(["--port".to_owned(), port.to_string()]);
        }
        args.extend(extra);
        let mut server = Self {
            port,
            args,
            child: None,
            tls,
            password: None,
            dir,
        };
        server.restart();
        server
    }

    /// `redis://127.0.0.1:<port>` (`rediss://` for a TLS node).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        let auth = self.password.as_ref().map(|p| format!(":{p}@")).unwrap_or_default();
        format!("{scheme}://{auth}127.0.0.1:{}", self.port)
    }

    /// Kills the server (as a crash would: SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty, unless it was started with
    /// [`RedisServer::start_persistent`]) and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on port {} within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status().expect("kill runs");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// `redis-cli` against this server (plain nodes only).
    pub fn cli(&self, args: &[&str]) -> String {
        assert!(self.tls.is_none(), "cli() speaks plain TCP");
        let port = self.port.to_string();
        let mut all = vec!["-p", &port];
        if let Some(password) = &self.password {
            all.extend(["--no-auth-warning", "-a", password]);
        }
        all.extend_from_slice(args);
        redis_cli(&all)
    }

    /// Every key of this server.
    pub fn keys(&self) -> Vec<String> {
        self.cli(&["--scan"])
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
            .collect()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A paused server ignores nothing but SIGKILL; resume anyway for a clean exit.
        if self.child.is_some() {
            self.resume();
        }
        self.kill();
    }
}

/// A three-master Redis Cluster on 127.0.0.1.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|n| {
                // Relative: it lands in the node's own `--dir`, removed with it.
                let config = format!("nodes-{n}.conf");
                RedisServer::spawn(
                    vec![
                        "--cluster-enabled".to_owned(),
                        "yes".to_owned(),
                        "--cluster-config-file".to_owned(),
                        config,
                        "--cluster-node-timeout".to_owned(),
                        "5000".to_owned(),
                    ],
                    false,
                )
            })
            .collect();
        let addresses: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let mut create = vec!["--cluster", "create"];
        create.extend(addresses.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let output = Command::new("redis-cli")
            .args(&create)
            .output()
            .expect("redis-cli runs");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &nodes {
            while !node.cli(&["cluster", "info"]).contains("cluster_state:ok") {
                assert!(
                    Instant::now() < deadline,
                    "the cluster did not reach cluster_state:ok within 20 s"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { nodes }
    }

    /// The URL of one node: the others are discovered.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// Every key of every node.
    pub fn keys(&self) -> Vec<String> {
        self.nodes.iter().flat_map(RedisServer::keys).collect()
    }
}
