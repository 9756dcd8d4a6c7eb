//! Throwaway NATS and Redis servers for tests.
//!
//! - [`shared_url`]: the URL in `NATS_URL` / `REDIS_URL` if set, else the test binary's own
//!   throwaway server, started on first use from the system binary (`nats-server`,
//!   `redis-server`) on a free port. Tests sharing it isolate themselves with their own prefix.
//! - [`private`]: a server of the caller's own, for tests that kill and restart it. Never the
//!   shared one, and never a server this module did not start.
//!
//! A missing binary: under `CI=true` one `apt-get install` is tried (after `apt-get update`),
//! and if the binary is still missing the test panics, so a CI run cannot pass by skipping;
//! otherwise these return `None` after printing why, and the test returns early.
//!
//! Each server process runs under a watchdog shell that kills it once stdin reaches EOF, on a
//! pipe only this process holds: dropping the [`Server`], or the test process dying in any way,
//! leaves no server behind.
//!
//! Include it with `#[path = "support/servers.rs"] mod servers;`.

#![allow(dead_code)]

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `nats-server`.
    Nats,
    /// `redis-server`.
    Redis,
}

impl Kind {
    fn binary(self) -> &'static str {
        match self {
            Kind::Nats => "nats-server",
            Kind::Redis => "redis-server",
        }
    }

    /// The Debian package holding the binary.
    fn package(self) -> &'static str {
        match self {
            Kind::Nats => "nats-server",
            Kind::Redis => "redis-server",
        }
    }

    fn env_var(self) -> &'static str {
        match self {
            Kind::Nats => "NATS_URL",
            Kind::Redis => "REDIS_URL",
        }
    }

    fn url(self, port: u16) -> String {
        match self {
            Kind::Nats => format!("nats://127.0.0.1:{port}"),
            Kind::Redis => format!("redis://127.0.0.1:{port}/"),
        }
    }

    fn args(self, port: u16) -> Vec<String> {
        match self {
            Kind::Nats => vec![
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ],
            Kind::Redis => [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        }
    }
}

/// A name unique within this machine run: `{prefix}_{pid}_{counter}_{micros}`.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() % 1_000_000)
        .unwrap_or(0);
    format!("{prefix}_{}_{n}_{micros}", std::process::id())
}

/// The URL to test against: the environment variable, or this binary's throwaway server.
pub fn shared_url(kind: Kind) -> Option<String> {
    if let Ok(url) = std::env::var(kind.env_var()) {
        if !url.is_empty() {
            return Some(url);
        }
    }
    static NATS: OnceLock<Result<Server, String>> = OnceLock::new();
    static REDIS: OnceLock<Result<Server, String>> = OnceLock::new();
    let cell = match kind {
        Kind::Nats => &NATS,
        Kind::Redis => &REDIS,
    };
    match cell.get_or_init(|| Server::start(kind)) {
        Ok(server) => Some(server.url()),
        Err(reason) => skip(kind, reason),
    }
}

/// A server of the caller's own (kill it, restart it); `None` (after printing why) when the
/// binary is missing and `CI` is unset.
pub fn private(kind: Kind) -> Option<Server> {
    match Server::start(kind) {
        Ok(server) => Some(server),
        Err(reason) => skip(kind, &reason),
    }
}

fn skip<T>(kind: Kind, reason: &str) -> Option<T> {
    if std::env::var_os("CI").is_some() {
        panic!(
            "no {} for this test, and CI is set (a skip would hide it): {reason}",
            kind.binary()
        );
    }
    eprintln!("skipping a {} test: {reason}", kind.binary());
    None
}

/// A server process on 127.0.0.1, on a port that stays the same across restarts.
#[derive(Debug)]
pub struct Server {
    kind: Kind,
    bin: PathBuf,
    port: u16,
    log: PathBuf,
    /// The watchdog shell of the running process: closing its stdin kills the server.
    running: Mutex<Option<(Child, ChildStdin)>>,
}

impl Server {
    /// Starts a server on a free port, waiting until it accepts connections.
    pub fn start(kind: Kind) -> Result<Server, String> {
        let bin = find_binary(kind)?;
        let log = std::env::temp_dir().join(format!("{}.log", unique_name(kind.binary())));
        let mut last = String::new();
        // A free port can be taken by someone else before the server binds it: try a few.
        for _ in 0..5 {
            let server = Server {
                kind,
                bin: bin.clone(),
                port: free_port()?,
                log: log.clone(),
                running: Mutex::new(None),
            };
            match server.start_again() {
                Ok(()) => return Ok(server),
                Err(e) => last = e,
            }
        }
        Err(format!("could not start {}: {last}", kind.binary()))
    }

    /// The URL clients connect to.
    pub fn url(&self) -> String {
        self.kind.url(self.port)
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the (killed) server again on the same port, waiting until it accepts connections.
    pub fn start_again(&self) -> Result<(), String> {
        let mut running = self.running.lock().unwrap();
        if running.is_some() {
            return Ok(());
        }
        let quoted: Vec<String> = self
            .kind
            .args(self.port)
            .iter()
            .map(|a| format!("'{a}'"))
            .collect();
        let script = format!(
            "exec 3<&0; '{}' {} </dev/null >>'{}' 2>&1 & pid=$!; \
             {{ read _ <&3; kill -9 $pid 2>/dev/null; }} & wait $pid",
            self.bin.display(),
            quoted.join(" "),
            self.log.display()
        );
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.kind.binary()))?;
        let stdin = child.stdin.take().ok_or("the watchdog has no stdin")?;
        *running = Some((child, stdin));
        drop(running);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            let exited = match self.running.lock().unwrap().as_mut() {
                Some((child, _)) => child.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = exited {
                self.running.lock().unwrap().take();
                return Err(format!("exited with {status}: {}", self.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        Err(format!("did not listen within 10 s: {}", self.log_tail()))
    }

    /// Kills the server (SIGKILL: clients see their connections drop), waiting until it is gone.
    pub fn kill(&self) {
        if let Some((mut child, mut stdin)) = self.running.lock().unwrap().take() {
            let _ = stdin.flush();
            drop(stdin);
            let _ = child.wait();
        }
    }

    /// Kills the server and starts it again on the same port.
    pub fn restart(&self) -> Result<(), String> {
        self.kill();
        self.start_again()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The binary on PATH or in the usual system directories; under `CI`, one install attempt.
fn find_binary(kind: Kind) -> Result<PathBuf, String> {
    if let Some(found) = locate(kind.binary()) {
        return Ok(found);
    }
    if std::env::var_os("CI").is_some() {
        static APT_UPDATE: Once = Once::new();
        APT_UPDATE.call_once(|| {
            let _ = Command::new("apt-get")
                .arg("update")
                .stdin(Stdio::null())
                .output();
        });
        let out = Command::new("apt-get")
            .args(["install", "-y", kind.package()])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output();
        if let Some(found) = locate(kind.binary()) {
            return Ok(found);
        }
        return Err(format!(
            "{} is not installed, and `apt-get install -y {}` did not install it: {}",
            kind.binary(),
            kind.package(),
            out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .unwrap_or_else(|e| e.to_string())
        ));
    }
    Err(format!(
        "{} is not installed (apt-get install {}), and {} is unset",
        kind.binary(),
        kind.package(),
        kind.env_var()
    ))
}

fn locate(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// A TCP forwarder on loopback whose connections can be cut, as a network failure would: each
/// node of a test reaches the server through its own, so one node can lose its connections
/// while the others keep theirs. Connections made after a cut are forwarded as before.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    live: std::sync::Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards a fresh loopback port to `target` (`host:port`).
    pub async fn start(target: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let live = std::sync::Arc::new(Mutex::new(Vec::<tokio::task::AbortHandle>::new()));
        let conns = live.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut conns = conns.lock().unwrap();
                conns.retain(|c| !c.is_finished());
                conns.push(task.abort_handle());
            }
        });
        Proxy { port, live, accept }
    }

    /// The forwarded port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every connection forwarded so far (both ends see it drop).
    pub fn cut(&self) {
        for c in self.live.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
