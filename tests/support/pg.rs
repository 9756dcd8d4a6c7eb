//! A throwaway Postgres for tests and examples.
//!
//! - [`fresh`]: a DSN and a schema name nobody else uses. The DSN is `DATABASE_URL` if set,
//!   else the test binary's own throwaway server, started on first use from the system's
//!   binaries (on `PATH`, or under `/usr/lib/postgresql/*/bin`), on a free port, with a data
//!   directory under the temp dir. Every test isolates itself with its own schema.
//! - [`private`]: a server of the caller's own, for tests that stop or restart the database.
//!   Never the shared one, and never a server this module did not start.
//! - [`durable`]: like [`private`], but with fsync on, for benchmarks (tests run with fsync off).
//!
//! `initdb` refuses to run as root, so as root every server command runs as the `postgres`
//! user (`runuser -u postgres --`), in directories that user owns.
//!
//! Without binaries and without `DATABASE_URL` these return `None` after printing why, and the
//! test returns early (skips); when the `CI` environment variable is set they panic instead, so
//! a CI run cannot pass by skipping.
//!
//! Servers are stopped, and their directories removed, when dropped, and in any case when the
//! test process exits: each server has a watchdog shell that waits for EOF on a pipe only this
//! process holds, so even a killed test binary leaves no server behind.
//!
//! Include it with `#[path = "support/pg.rs"] mod pg;` (from `tests/`) or
//! `#[path = "../tests/support/pg.rs"] mod pg;` (from `examples/`).

#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// A database to test against: where, and the schema to isolate in.
#[derive(Debug, Clone)]
pub struct TestDb {
    /// A `postgres://` URL.
    pub dsn: String,
    /// A fresh schema name (not yet created: `PgStore::migrate` creates it). Also usable as a
    /// channel prefix.
    pub schema: String,
}

/// A DSN plus a schema no other test uses; `None` (after printing why) when no Postgres can be
/// had here and `CI` is unset.
pub fn fresh() -> Option<TestDb> {
    let dsn = shared_dsn()?;
    Some(TestDb {
        dsn,
        schema: unique_name("bdt"),
    })
}

/// A name unique within this machine run: `{prefix}_{pid}_{counter}_{micros}`, lowercase,
/// well under the 40-byte channel prefix limit.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() % 1_000_000)
        .unwrap_or(0);
    format!("{prefix}_{}_{n}_{micros}", std::process::id())
}

/// The shared DSN: `DATABASE_URL`, or this binary's throwaway server.
pub fn shared_dsn() -> Option<String> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        if !url.is_empty() {
            return Some(url);
        }
    }
    static SHARED: OnceLock<Result<PgServer, String>> = OnceLock::new();
    match SHARED.get_or_init(PgServer::start) {
        Ok(server) => Some(server.dsn()),
        Err(reason) => skip(reason),
    }
}

/// A server of the caller's own (stop it, restart it, kill it); `None` (after printing why)
/// when there are no binaries and `CI` is unset.
pub fn private() -> Option<PgServer> {
    match PgServer::start() {
        Ok(server) => Some(server),
        Err(reason) => skip(&reason),
    }
}

/// A server of the caller's own that flushes like production (`fsync`, `synchronous_commit`
/// and `full_page_writes` on), for benchmarks whose figures must be honest; `None` (after
/// printing why) when there are no binaries and `CI` is unset.
pub fn durable() -> Option<PgServer> {
    match PgServer::start_durable() {
        Ok(server) => Some(server),
        Err(reason) => skip(&reason),
    }
}

fn skip<T>(reason: &str) -> Option<T> {
    if std::env::var_os("CI").is_some() {
        panic!("no Postgres for this test, and CI is set (a skip would hide it): {reason}");
    }
    eprintln!("skipping a Postgres test: {reason}");
    None
}

/// A Postgres server in a temporary directory, trust auth on 127.0.0.1.
#[derive(Debug)]
pub struct PgServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
    /// Whether the server flushes to disk (benchmarks) or skips it (tests: faster, and a
    /// throwaway server has nothing to keep).
    durable: bool,
    running: Mutex<bool>,
    /// Closing this pipe (drop, or process exit) makes the watchdog stop the server.
    watchdog: Mutex<Option<(Child, ChildStdin)>>,
}

impl PgServer {
    /// initdb + start, with fsync off. The error says what is missing or what failed.
    pub fn start() -> Result<PgServer, String> {
        Self::start_with(false)
    }

    /// As [`start`](Self::start), but with the server's durability settings at their defaults
    /// (fsync on), so commit latencies are the real ones.
    pub fn start_durable() -> Result<PgServer, String> {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Result<PgServer, String> {
        let bin = find_bin_dir().ok_or_else(|| {
            "no Postgres server binaries (initdb, pg_ctl, postgres) on PATH or under \
             /usr/lib/postgresql/*/bin, and DATABASE_URL is unset"
                .to_owned()
        })?;
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(unique_name("broker-dispatch-pg"));
        std::fs::create_dir_all(dir.join("sock")).map_err(|e| format!("mkdir {dir:?}: {e}"))?;
        if as_postgres {
            run(Command::new("chown").arg("-R").arg("postgres:").arg(&dir))?;
        }
        let mut server = PgServer {
            bin,
            dir,
            port: 0,
            as_postgres,
            durable,
            running: Mutex::new(false),
            watchdog: Mutex::new(None),
        };
        server.spawn_watchdog()?;
        let data = server.dir.join("data");
        run(server.command("initdb").arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]))?;
        // Trust for the superuser, passwords for everyone else (tests of authentication
        // failures create their own role).
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
        )
        .map_err(|e| format!("write pg_hba.conf: {e}"))?;
        // A free port can be taken by someone else before the server binds it: try a few.
        let mut last = String::new();
        for _ in 0..5 {
            server.port = free_port()?;
            match server.start_again() {
                Ok(()) => return Ok(server),
                Err(e) => last = e,
            }
        }
        Err(format!("could not start postgres: {last}"))
    }

    /// `postgres://postgres@127.0.0.1:{port}/postgres` (trust auth).
    pub fn dsn(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the (stopped) server again on the same port, waiting until it accepts connections.
    pub fn start_again(&self) -> Result<(), String> {
        let durability = if self.durable {
            "-c fsync=on -c synchronous_commit=on -c full_page_writes=on"
        } else {
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        };
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 {durability}",
            self.port,
            self.dir.join("sock").display()
        );
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "30", "-o", &opts, "start"]))
        .map_err(|e| format!("{e}\n{}", self.log_tail()))?;
        *self.running.lock().unwrap() = true;
        Ok(())
    }

    /// Stops the server (fast shutdown: clients are disconnected), waiting until it is down.
    pub fn stop(&self) -> Result<(), String> {
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "-t", "30", "stop"]))?;
        *self.running.lock().unwrap() = false;
        Ok(())
    }

    /// Stops and starts the server; every client connection is lost.
    pub fn restart(&self) -> Result<(), String> {
        self.stop()?;
        self.start_again()
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        cmd.stdin(Stdio::null());
        cmd
    }

    /// A shell that, once stdin reaches EOF, stops the server and removes its directory.
    fn spawn_watchdog(&mut self) -> Result<(), String> {
        let runas = if self.as_postgres {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let script = format!(
            "read _; {runas}'{}' -D '{}' -m immediate -w stop >/dev/null 2>&1; rm -rf '{}'",
            self.bin.join("pg_ctl").display(),
            self.dir.join("data").display(),
            self.dir.display()
        );
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn watchdog: {e}"))?;
        let stdin = child.stdin.take().ok_or("watchdog has no stdin")?;
        *self.watchdog.lock().unwrap() = Some((child, stdin));
        Ok(())
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some((mut child, mut stdin)) = self.watchdog.lock().unwrap().take() {
            let _ = stdin.flush();
            drop(stdin);
            let _ = child.wait();
        }
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("could not run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn has_server_tools(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|t| dir.join(t).is_file())
}

/// A directory holding initdb, pg_ctl and postgres: from PATH (symlinks resolved, so the
/// tools of one installation are used together), else the newest /usr/lib/postgresql/N/bin.
fn find_bin_dir() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("initdb"))
            .find(|p| p.is_file())
            .and_then(|p| std::fs::canonicalize(p).ok())
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .filter(|d| has_server_tools(d))
    });
    on_path.or_else(|| {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                Some((v, e.path().join("bin")))
            })
            .filter(|(_, bin)| has_server_tools(bin))
            .collect();
        versions.sort();
        versions.pop().map(|(_, bin)| bin)
    })
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// A plain client on `dsn` (its connection driven by a spawned task), for test set-up and for
/// poking at the server behind the store's back.
pub async fn client(dsn: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}
