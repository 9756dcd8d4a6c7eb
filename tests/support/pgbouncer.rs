//! A throwaway PgBouncer in front of a Postgres, for tests.
//!
//! [`PgBouncer::start`] runs the system `pgbouncer` on a free port with a generated ini and
//! auth file (trust: the throwaway Postgres of `support/pg.rs` trusts its superuser on
//! loopback), in the pool mode asked for. PgBouncer refuses to run as root, so as root it is
//! started with `-u postgres` (it drops to that user itself, keeping its pid).
//!
//! A missing binary: under `CI=true` one `apt-get install -y pgbouncer` is tried (after
//! `apt-get update`), and if it is still missing this fails; otherwise it returns the reason
//! and the caller skips.
//!
//! The process runs under the same watchdog shell as `support/servers.rs`: it is killed once
//! its stdin, a pipe only this process holds, reaches EOF, so a dying test leaves none behind.
//!
//! Include it with `#[path = "support/pgbouncer.rs"] mod pgbouncer;`.

#![allow(dead_code)]

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// A running PgBouncer.
#[derive(Debug)]
pub struct PgBouncer {
    port: u16,
    dir: PathBuf,
    version: (u32, u32),
    watchdog: Option<(Child, ChildStdin)>,
}

impl PgBouncer {
    /// Starts PgBouncer on a free loopback port in front of `127.0.0.1:{pg_port}`, with
    /// `pool_mode` (`session`, `transaction`) and the extra `[pgbouncer]` settings given.
    pub fn start(pg_port: u16, pool_mode: &str, extra: &[(&str, &str)]) -> Result<Self, String> {
        let bin = find_binary()?;
        let version = version(&bin)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "broker-dispatch-pgbouncer-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {dir:?}: {e}"))?;
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        std::fs::write(dir.join("userlist.txt"), "\"postgres\" \"\"\n")
            .map_err(|e| format!("write the auth file: {e}"))?;
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let mut ini = format!(
                "[databases]\n* = host=127.0.0.1 port={pg_port}\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {}\npool_mode = {pool_mode}\n\
                 max_client_conn = 500\n\
                 ignore_startup_parameters = extra_float_digits,options\n",
                dir.join("userlist.txt").display()
            );
            if !extra.iter().any(|(k, _)| *k == "default_pool_size") {
                ini.push_str("default_pool_size = 40\n");
            }
            for (k, v) in extra {
                ini.push_str(&format!("{k} = {v}\n"));
            }
            let ini_path = dir.join("pgbouncer.ini");
            std::fs::write(&ini_path, ini).map_err(|e| format!("write the ini: {e}"))?;
            if as_root {
                let _ = Command::new("chown")
                    .arg("-R")
                    .arg("postgres:")
                    .arg(&dir)
                    .status();
            }
            let user = if as_root { "-u postgres " } else { "" };
            let log = dir.join("pgbouncer.log");
            let script = format!(
                "exec 3<&0; '{}' {user}'{}' </dev/null >>'{}' 2>&1 & pid=$!; \
                 {{ read _ <&3; kill -9 $pid 2>/dev/null; }} & wait $pid",
                bin.display(),
                ini_path.display(),
                log.display()
            );
            let mut child = Command::new("sh")
                .args(["-c", &script])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("spawn pgbouncer: {e}"))?;
            let stdin = child.stdin.take().ok_or("the watchdog has no stdin")?;
            let mut bouncer = PgBouncer {
                port,
                dir: dir.clone(),
                version,
                watchdog: Some((child, stdin)),
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(bouncer);
                }
                let exited = bouncer
                    .watchdog
                    .as_mut()
                    .and_then(|(c, _)| c.try_wait().ok().flatten());
                if exited.is_some() || Instant::now() > deadline {
                    let tail = std::fs::read_to_string(&log).unwrap_or_default();
                    last = format!("pgbouncer did not listen: {tail}");
                    bouncer.stop();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Err(last)
    }

    /// `postgres://postgres@127.0.0.1:{port}/postgres`.
    pub fn dsn(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The binary's version, (major, minor).
    pub fn version(&self) -> (u32, u32) {
        self.version
    }

    fn stop(&mut self) {
        if let Some((mut child, mut stdin)) = self.watchdog.take() {
            let _ = stdin.flush();
            drop(stdin);
            let _ = child.wait();
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The version the binary reports (`PgBouncer 1.18.0`), as (major, minor).
pub fn version(bin: &std::path::Path) -> Result<(u32, u32), String> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("{} --version: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| format!("unexpected version output: {text}"))?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    Ok((parts.next().unwrap_or(0), parts.next().unwrap_or(0)))
}

/// `pgbouncer` on PATH or in the system directories; under `CI`, one install attempt.
pub fn find_binary() -> Result<PathBuf, String> {
    if let Some(found) = locate() {
        return Ok(found);
    }
    if std::env::var_os("CI").is_some() {
        let _ = Command::new("apt-get")
            .arg("update")
            .stdin(Stdio::null())
            .output();
        let out = Command::new("apt-get")
            .args(["install", "-y", "pgbouncer"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output();
        if let Some(found) = locate() {
            return Ok(found);
        }
        return Err(format!(
            "pgbouncer is not installed, and `apt-get install -y pgbouncer` did not install it: {}",
            out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .unwrap_or_else(|e| e.to_string())
        ));
    }
    Err("pgbouncer is not installed (apt-get install pgbouncer), and PGBOUNCER_URL is unset".into())
}

fn locate() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|dir| dir.join("pgbouncer"))
        .find(|p| p.is_file())
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}
