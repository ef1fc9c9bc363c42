//! A fleet of `reauth serve` replicas for tests and benchmarks: one config with
//! a `[fleet]` section (or without, to compare), replicas started (optionally
//! with a shifted clock, through faketime), killed and restarted, and the
//! sidecar's HTTP API as a client.

use crate::peers::{Peer, free_port, http};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's libfaketime (package `faketime`).
fn libfaketime() -> PathBuf {
    std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
        .expect("libfaketime not found (install Debian's `faketime`)")
}

/// The key ring every replica of the test fleets shares.
pub const FLEET_KEY: &str =
    "v1 fleet1 5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

/// Refresh-ahead for tokens of a few seconds (the defaults assume minutes).
pub const SHORT_CACHE: &str = "min_period_secs = 0\nbuffer_secs = 0\nskew_secs = 1\nmin_interval_ms = 100\nbackoff_initial_ms = 200\nbackoff_max_ms = 1000\n";

/// One fleet of `reauth serve` replicas on one config.
pub struct Replicas {
    dir: tempfile::TempDir,
    config: PathBuf,
    url: String,
    binary: PathBuf,
    log: String,
    log_level: &'static str,
    running: Vec<Option<(Peer, u16)>>,
}

impl Replicas {
    /// Replicas of fleet `payments` on `backend` (`redis`, `postgres`) at `url`
    /// serving `providers` (TOML sections); `backend` `none` leaves `[fleet]`
    /// out (every replica on its own). `binary` is the `reauth` to run; replica
    /// logs go to `<log_dir>/<log>/replica-<i>.log`.
    pub fn new(backend: &str, url: &str, providers: &str, binary: PathBuf, log: &str) -> Replicas {
        Replicas::named("payments", backend, url, providers, binary, log)
    }

    /// [`Replicas::new`] for fleet `name` (a fresh name: a cold fleet on a
    /// backend that served others). Without a fleet (`none`), the replicas do
    /// not share the machine-local token cache either: each is on its own, as
    /// on separate machines.
    pub fn named(
        name: &str,
        backend: &str,
        url: &str,
        providers: &str,
        binary: PathBuf,
        log: &str,
    ) -> Replicas {
        if let Some(key) = FLEET_KEY.split_whitespace().last() {
            crate::record_secret(key);
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("reauth.toml");
        let fleet = if backend == "none" {
            "[runtime.shared_cache]\nenabled = false\n".to_string()
        } else {
            format!(
                r#"[fleet]
name = "{name}"
backend = "{backend}"
url = {{ env = "REAUTH_FLEET_URL" }}
key = {{ env = "REAUTH_FLEET_KEY" }}
lease_ms = 3000
timeout_ms = 500
"#
            )
        };
        std::fs::write(
            &config,
            format!("[runtime]\ncache_dir = \"artifacts\"\n{fleet}\n{providers}"),
        )
        .unwrap();
        Replicas {
            dir,
            config,
            url: url.to_string(),
            binary,
            log: log.to_string(),
            log_level: "info",
            running: Vec::new(),
        }
    }

    /// Log only warnings and errors (`RUST_LOG=warn`; default `info`).
    pub fn quiet(mut self) -> Self {
        self.log_level = "warn";
        self
    }

    /// Start replica `i` (again) and wait until it accepts connections.
    pub fn start(&mut self, i: usize) {
        self.start_shifted(i, None);
    }

    /// Start replica `i` with its clock shifted by `shift` (libfaketime's
    /// `FAKETIME` syntax, e.g. `+300s`).
    pub fn start_shifted(&mut self, i: usize, shift: Option<&str>) {
        let port = free_port();
        let log_dir = crate::log_dir().join(&self.log);
        std::fs::create_dir_all(&log_dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir.join(format!("replica-{i}.log")))
            .unwrap();
        let reauth = self.binary.clone();
        let mut cmd = Command::new(&reauth);
        if let Some(shift) = shift {
            // libfaketime preloaded into reauth itself (the `faketime` wrapper
            // forks: a signal to it would not reach reauth).
            cmd.env("LD_PRELOAD", libfaketime())
                .env("FAKETIME", shift)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let child = cmd
            .args(["serve", "--config"])
            .arg(&self.config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("REAUTH_FLEET_URL", &self.url)
            .env("REAUTH_FLEET_KEY", FLEET_KEY)
            .env(
                "RUST_LOG",
                std::env::var("REAUTH_REPLICA_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting reauth serve");
        let peer = Peer::new(child, "-TERM", Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(90);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "replica {i} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.running.len() <= i {
            self.running.resize_with(i + 1, || None);
        }
        self.running[i] = Some((peer, port));
    }

    /// Start replicas `0..n`.
    pub fn start_all(&mut self, n: usize) {
        // The first compiles the plugin into the artifact cache; the others load it.
        self.start(0);
        for i in 1..n {
            self.start(i);
        }
    }

    /// Replicas `0..n`, the last two with their clocks 5 minutes behind and
    /// ahead of the others'.
    pub fn start_all_skewed(&mut self, n: usize) {
        self.start(0);
        for i in 1..n {
            let shift = match n - i {
                2 => Some("-300s"),
                1 => Some("+300s"),
                _ => None,
            };
            self.start_shifted(i, shift);
        }
    }

    /// Replica `i`'s port, while it runs.
    pub fn port(&self, i: usize) -> Option<u16> {
        self.running.get(i)?.as_ref().map(|(_, p)| *p)
    }

    /// Replica `i`'s process id, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.running.get(i)?.as_ref()?.0.id()
    }

    /// SIGKILL replica `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some((peer, _)) = self.running.get_mut(i).and_then(Option::take) {
            if let Some(pid) = peer.id() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            drop(peer);
        }
    }

    /// Stop every replica (SIGTERM).
    pub fn stop_all(&mut self) {
        for slot in &mut self.running {
            if let Some((mut peer, _)) = slot.take() {
                peer.stop();
            }
        }
    }

    /// Lines of every replica's log containing `needle`.
    pub fn log_lines(&self, needle: &str) -> usize {
        let dir = crate::log_dir().join(&self.log);
        (0..self.running.len())
            .map(|i| {
                std::fs::read_to_string(dir.join(format!("replica-{i}.log")))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(needle))
                    .count()
            })
            .sum()
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        self.stop_all();
        let _ = &self.dir;
    }
}

/// `POST /v1/providers/<provider>/credentials` on replica port `port`: the
/// token, or (status, body).
pub async fn get(port: u16, provider: &str) -> Result<String, (u16, String)> {
    match http(
        &format!("http://127.0.0.1:{port}"),
        "POST",
        &format!("/v1/providers/{provider}/credentials"),
        &[("content-type", "application/json")],
        Some(b"{}".to_vec()),
    )
    .await
    {
        Ok((200, _, body)) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let token = v["credential"]["token"]
                .as_str()
                .or(v["token"].as_str())
                .unwrap_or_else(|| panic!("no token in {v}"))
                .to_string();
            crate::record_secret(&token);
            Ok(token)
        }
        Ok((status, _, body)) => Err((status, String::from_utf8_lossy(&body).into_owned())),
        Err(e) => Err((0, e.to_string())),
    }
}

/// Report that a server rejected `token` (RFC 6750 invalid_token).
pub async fn report_401(port: u16, provider: &str, token: &str) -> u16 {
    let body = serde_json::json!({
        "credential": { "kind": "bearer", "token": token },
        "error": { "kind": "unauthorized", "status": 401, "code": "invalid_token" }
    });
    http(
        &format!("http://127.0.0.1:{port}"),
        "POST",
        &format!("/v1/providers/{provider}/security-errors"),
        &[("content-type", "application/json")],
        Some(serde_json::to_vec(&body).unwrap()),
    )
    .await
    .map(|(s, _, _)| s)
    .unwrap_or(0)
}
