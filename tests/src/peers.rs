//! Real peers on loopback, started and stopped by the tests: an OpenID Connect
//! provider (npm `oidc-provider`, `tests/peers/idp/`), a resource server that
//! verifies its JWTs through `reauth::verify`, PostgreSQL and Redis from Debian's
//! packages, and a Vault-shaped secrets endpoint. Every process is stopped by PID
//! (on `stop()` and on drop); every wait is bounded.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use bytes::Bytes;
use reauth::verify::Verifier;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral port")
        .port()
}

fn peer_log(name: &str) -> std::fs::File {
    let dir = crate::log_dir().join("peers");
    std::fs::create_dir_all(&dir).expect("creating target/test-logs/peers");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .expect("opening a peer log")
}

/// Stop a process: `signal` first, SIGKILL if it has not exited within `grace`.
/// Its exit status, unless it had to be killed.
fn stop_process(child: &mut Child, signal: &str, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A process the tests started: stopped by PID (`signal`, then SIGKILL after
/// `grace`) on [`Peer::stop`] or when dropped.
pub struct Peer {
    child: Option<Child>,
    signal: &'static str,
    grace: Duration,
}

impl Peer {
    /// Own `child`, to be stopped with `signal` (e.g. `"-TERM"`).
    pub fn new(child: Child, signal: &'static str, grace: Duration) -> Peer {
        Peer {
            child: Some(child),
            signal,
            grace,
        }
    }

    /// Its PID.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stop it; its exit status, unless it had to be killed (or was stopped before).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        stop_process(&mut child, self.signal, self.grace)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The JSON line a peer prints on stdout once it listens, within `wait`; the peer
/// is stopped and the test fails if none comes, with what it takes to tell why on a
/// machine one cannot log into (CI): how long it waited, the process's state and
/// kernel wait channel, and the end of its log.
fn ready_line(child: &mut Child, name: &str, wait: Duration) -> serde_json::Value {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let started = Instant::now();
    match rx.recv_timeout(wait) {
        Ok(line) if !line.is_empty() => serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{name}: not a JSON ready line ({e}): {line}")),
        other => {
            let pid = child.id();
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(") ")
                        .map(|(_, rest)| rest.chars().take(1).collect::<String>())
                })
                .unwrap_or_else(|| "gone".into());
            let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
            let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
            stop_process(child, "-TERM", Duration::from_secs(2));
            let log = crate::log_dir().join(format!("peers/{name}.log"));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "{name} did not start: {other:?} after {:.1?} (pid {pid}, state {state}, \
                 wchan {wchan:?}, loadavg {}); the end of {}:\n{}",
                started.elapsed(),
                load.trim(),
                log.display(),
                tail.join("\n")
            );
        }
    }
}

/// `tests/peers/idp`, with its npm dependencies installed (from the lockfile) once.
fn idp_dir() -> PathBuf {
    static READY: OnceLock<PathBuf> = OnceLock::new();
    READY
        .get_or_init(|| {
            let dir = crate::root().join("tests/peers/idp");
            if !dir.join("node_modules/oidc-provider").exists() {
                let status = Command::new("npm")
                    .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                    .current_dir(&dir)
                    .status()
                    .expect("running npm ci in tests/peers/idp (is Node.js installed?)");
                assert!(status.success(), "npm ci in tests/peers/idp failed");
            }
            dir
        })
        .clone()
}

/// One token-endpoint counter of the IdP (`GET /_stats`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct TokenStat {
    /// The client id.
    pub client: String,
    /// The grant type.
    pub grant: String,
    /// Successful token responses.
    pub ok: u64,
    /// Failed token requests.
    pub failed: u64,
}

/// The npm `oidc-provider` IdP, on 127.0.0.1.
pub struct Idp {
    process: Option<Peer>,
    port: u16,
    /// `http://127.0.0.1:<port>`.
    pub issuer: String,
    ttl: u64,
    client_jwk: Option<PathBuf>,
}

impl Idp {
    /// Start the IdP with signing keys from `keys` (generated there if missing),
    /// access tokens living `ttl` seconds, and optionally the `cc-jwt` client whose
    /// public JWK is in `client_jwk`.
    pub fn start(keys: &Path, ttl: u64, client_jwk: Option<&Path>) -> Idp {
        let mut idp = Idp {
            process: None,
            port: 0,
            issuer: String::new(),
            ttl,
            client_jwk: client_jwk.map(Path::to_path_buf),
        };
        idp.spawn(keys);
        idp
    }

    fn spawn(&mut self, keys: &Path) {
        let dir = idp_dir();
        let mut cmd = Command::new("node");
        cmd.arg(dir.join("idp.mjs"))
            .args(["--port", &self.port.to_string()])
            .arg("--keys")
            .arg(keys)
            .args(["--ttl", &self.ttl.to_string()]);
        if let Some(jwk) = &self.client_jwk {
            cmd.arg("--client-jwk").arg(jwk);
        }
        let mut log = peer_log("idp");
        let _ = writeln!(
            log,
            "--- reauth tests: starting the IdP (ttl {} s)",
            self.ttl
        );
        let mut child = cmd
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("starting node tests/peers/idp/idp.mjs");
        // Generous: Node.js loading oidc-provider and generating an RSA key on a
        // machine whose two cores are busy with replicas and databases.
        let ready = ready_line(&mut child, "idp", Duration::from_secs(120));
        self.issuer = ready["issuer"].as_str().expect("issuer").to_string();
        self.port = self
            .issuer
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("issuer port");
        self.process = Some(Peer::new(child, "-TERM", Duration::from_secs(5)));
    }

    /// The IdP's process id (to pause it with SIGSTOP in tests).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(Peer::id)
    }

    /// The `host:port` to allow for providers.
    pub fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stop the IdP process (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop();
        }
    }

    /// Start it again on the same port with the keys in `keys` (the same file keeps
    /// the signing key; another file rotates it). In-memory grants are lost.
    pub fn restart(&mut self, keys: &Path) {
        // stop() waits for the process to exit, so the port is free again (Node
        // listens with SO_REUSEADDR).
        self.stop();
        self.spawn(keys);
    }

    /// Token-endpoint counters.
    pub async fn stats(&self) -> Vec<TokenStat> {
        let (status, _, body) = http_get(&format!("{}/_stats", self.issuer), None)
            .await
            .expect("GET /_stats");
        assert_eq!(status, 200);
        serde_json::from_slice(&body).expect("stats JSON")
    }

    /// Successful and failed token requests of `client`, all grants.
    pub async fn token_requests(&self, client: &str) -> (u64, u64) {
        self.stats()
            .await
            .iter()
            .filter(|s| s.client == client)
            .fold((0, 0), |(ok, failed), s| (ok + s.ok, failed + s.failed))
    }

    /// Log in as `account` through the IdP's development interactions (plain HTTP,
    /// `tests/peers/idp/login.mjs`) and return the token response, with the offline
    /// refresh token.
    pub fn login(&self, account: &str) -> serde_json::Value {
        let output = Command::new("node")
            .arg(idp_dir().join("login.mjs"))
            .args([&self.issuer, account])
            .output()
            .expect("running login.mjs");
        assert!(
            output.status.success(),
            "login failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("login output JSON")
    }

    /// Log `alice` in and write her offline refresh token to
    /// `<dir>/offline-token` (recorded as a secret): the token and the file.
    pub fn offline_token(&self, dir: &Path) -> (String, PathBuf) {
        let login = self.login("alice");
        let seed = login["refresh_token"]
            .as_str()
            .expect("an offline refresh token")
            .to_string();
        crate::record_secret(&seed);
        let file = dir.join("offline-token");
        std::fs::write(&file, &seed).expect("writing the offline token");
        (seed, file)
    }

    /// A resource server verifying this IdP's tokens for `audience` strictly
    /// (no leeway, keys refetched at once).
    pub async fn resource_server(&self, audience: &str) -> ResourceServer {
        let verifier = Verifier::builder()
            .jwks_url(format!("{}/jwks", self.issuer))
            .issuer(&self.issuer)
            .audience(audience)
            .leeway(Duration::ZERO)
            .min_refetch_interval(Duration::ZERO)
            .build()
            .expect("verifier");
        ResourceServer::start(verifier).await
    }
}

/// A GET of `url` (`http://host:port/path`) with an optional bearer token, over a
/// fresh connection: status, headers, body. Bounded by 10 s (see [`http`]).
pub async fn http_get(
    url: &str,
    bearer: Option<&str>,
) -> anyhow::Result<(u16, http::HeaderMap, Bytes)> {
    let uri: http::Uri = url.parse()?;
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow::anyhow!("no authority in {url}"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let auth = bearer.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    http(&format!("http://{authority}"), "GET", path, &headers, None).await
}

/// One operation against a resource server (`GET url` with the bearer token),
/// its rejection classified the way a client would (`reauth::classify`).
pub async fn call_api(url: &str, token: &str) -> Result<(), reauth::Rejection<String>> {
    use reauth::Rejection;
    let (status, headers, body) = http_get(url, Some(token))
        .await
        .map_err(|e| Rejection::Other(e.to_string()))?;
    if status == 200 {
        return Ok(());
    }
    let challenge = headers
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok());
    let body = String::from_utf8_lossy(&body);
    match reauth::classify::from_http(status, challenge, Some(&body)) {
        Some(error) => Err(Rejection::security(error, format!("HTTP {status}"))),
        None => Err(Rejection::Other(format!("HTTP {status}"))),
    }
}

/// Counters of the resource server.
#[derive(Debug, Default)]
pub struct ResourceStats {
    /// Requests with an accepted token.
    pub accepted: AtomicU64,
    /// Requests rejected because the token expired.
    pub expired: AtomicU64,
    /// Requests rejected for any other reason (bad signature, unknown key…).
    pub invalid: AtomicU64,
}

/// An API that accepts the IdP's JWT access tokens, verified with
/// `reauth::verify` against the IdP's JWKS, and answers 401 with an RFC 6750
/// challenge otherwise.
pub struct ResourceServer {
    /// `http://127.0.0.1:<port>/orders`.
    pub url: String,
    /// What it accepted and rejected.
    pub stats: Arc<ResourceStats>,
    task: tokio::task::JoinHandle<()>,
}

impl ResourceServer {
    /// Serve on an ephemeral port.
    pub async fn start(verifier: Verifier) -> ResourceServer {
        let stats = Arc::new(ResourceStats::default());
        let state = (Arc::new(verifier), stats.clone());
        let app = axum::Router::new()
            .route("/orders", axum::routing::get(orders))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the resource server");
        let url = format!("http://{}/orders", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ResourceServer { url, stats, task }
    }
}

impl Drop for ResourceServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn orders(
    State((verifier, stats)): State<(Arc<Verifier>, Arc<ResourceStats>)>,
    headers: HeaderMap,
) -> axum::response::Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        stats.invalid.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
        )
            .into_response();
    };
    match verifier.verify(token).await {
        Ok(claims) => {
            stats.accepted.fetch_add(1, Ordering::Relaxed);
            axum::Json(serde_json::json!({"orders": [], "sub": claims.sub})).into_response()
        }
        Err(e) => {
            if e.is_expired() {
                stats.expired.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.invalid.fetch_add(1, Ordering::Relaxed);
            }
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, e.www_authenticate())],
            )
                .into_response()
        }
    }
}

/// The uid and gid of a system account (from `/etc/passwd`).
fn account_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.first() == Some(&name))
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The directory of PostgreSQL's server binaries (`initdb`, `postgres`).
fn pg_bin() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .filter(|p| p.join("initdb").exists())
        .expect("PostgreSQL server binaries not found (install Debian's `postgresql`)")
}

/// A throwaway PostgreSQL cluster on 127.0.0.1 with password (SCRAM) authentication.
pub struct Postgres {
    process: Peer,
    _dir: tempfile::TempDir,
    /// Its port.
    pub port: u16,
}

/// The superuser's password of the test cluster.
pub const PG_ADMIN_PASSWORD: &str = "pg-admin-pw-6t5r4e";

impl Postgres {
    /// initdb and start a cluster; returns once it accepts connections (≤ 30 s).
    pub async fn start() -> Postgres {
        crate::record_secret(PG_ADMIN_PASSWORD);
        let bin = pg_bin();
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, PG_ADMIN_PASSWORD).unwrap();
        // PostgreSQL refuses to run as root: run it as the `postgres` account then.
        let ids = if is_root() {
            let ids = account_ids("postgres").expect("no `postgres` account (install postgresql)");
            for p in [dir.path(), pwfile.as_path()] {
                std::os::unix::fs::chown(p, Some(ids.0), Some(ids.1)).unwrap();
            }
            Some(ids)
        } else {
            None
        };
        let as_pg = |cmd: &mut Command| {
            if let Some((uid, gid)) = ids {
                use std::os::unix::process::CommandExt as _;
                cmd.uid(uid).gid(gid);
            }
        };
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdout(peer_log("postgres"))
            .stderr(peer_log("postgres"));
        as_pg(&mut initdb);
        let status = initdb.status().expect("running initdb");
        assert!(
            status.success(),
            "initdb failed (see target/test-logs/peers/postgres.log)"
        );
        let port = free_port();
        let mut server = Command::new(bin.join("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-k")
            .arg(dir.path())
            .args(["-c", "fsync=off", "-c", "log_connections=on"])
            .stdout(peer_log("postgres"))
            .stderr(peer_log("postgres"));
        as_pg(&mut server);
        let child = server.spawn().expect("starting postgres");
        let pg = Postgres {
            process: Peer::new(child, "-INT", Duration::from_secs(10)),
            _dir: dir,
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match pg.connect("postgres", PG_ADMIN_PASSWORD).await {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => panic!("postgres did not start: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        pg
    }

    /// Connect as `user` with `password`; the connection task runs in the background.
    pub async fn connect(
        &self,
        user: &str,
        password: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let config = format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname=postgres connect_timeout=5",
            self.port
        );
        let (client, connection) = tokio_postgres::connect(&config, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Run `sql` as the superuser.
    pub async fn admin(&self, sql: &str) {
        let client = self
            .connect("postgres", PG_ADMIN_PASSWORD)
            .await
            .expect("superuser connection");
        client.batch_execute(sql).await.expect("admin SQL");
    }

    /// The superuser's connection URL.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres:{PG_ADMIN_PASSWORD}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    /// Stop the server (SIGINT: fast shutdown).
    pub fn stop(&mut self) {
        self.process.stop();
    }
}

/// A throwaway Redis server on 127.0.0.1 with ACL users and no persistence.
pub struct Redis {
    process: Peer,
    /// Its port.
    pub port: u16,
}

impl Redis {
    /// Start `redis-server`; returns once it answers PING (≤ 20 s).
    pub async fn start() -> Redis {
        Redis::start_on(free_port()).await
    }

    /// Start `redis-server` on `port` (to restart one in place, empty: no
    /// persistence).
    pub async fn start_on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(peer_log("redis"))
            .stderr(peer_log("redis"))
            .spawn()
            .expect("starting redis-server (install Debian's `redis-server`)");
        let redis = Redis {
            process: Peer::new(child, "-TERM", Duration::from_secs(5)),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ping = async {
                let mut c = redis.connect(None).await?;
                redis::cmd("PING").query_async::<String>(&mut c).await
            };
            match ping.await {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => panic!("redis did not start: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        redis
    }

    /// A connection, authenticated as `(user, password)` if given.
    pub async fn connect(
        &self,
        auth: Option<(&str, &str)>,
    ) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let info = redis::ConnectionInfo {
            addr: redis::ConnectionAddr::Tcp("127.0.0.1".into(), self.port),
            redis: redis::RedisConnectionInfo {
                username: auth.map(|a| a.0.to_string()),
                password: auth.map(|a| a.1.to_string()),
                ..Default::default()
            },
        };
        redis::Client::open(info)?
            .get_multiplexed_async_connection()
            .await
    }

    /// Stop the server.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.process.id()
    }
}

/// A throwaway 3-master Redis Cluster on 127.0.0.1 (`redis-cli --cluster
/// create`), no persistence.
pub struct RedisCluster {
    nodes: Vec<Peer>,
    _dir: tempfile::TempDir,
    /// The masters' ports.
    pub ports: Vec<u16>,
}

impl RedisCluster {
    /// Start three cluster-enabled servers and join them; returns once every
    /// node reports `cluster_state:ok` (≤ 30 s).
    pub async fn start() -> RedisCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for &port in &ports {
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(dir.path().join(format!("nodes-{port}.conf")))
                .arg("--dir")
                .arg(dir.path())
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .stdout(peer_log("redis-cluster"))
                .stderr(peer_log("redis-cluster"))
                .spawn()
                .expect("starting redis-server");
            nodes.push(Peer::new(child, "-TERM", Duration::from_secs(5)));
        }
        let cluster = RedisCluster {
            nodes,
            _dir: dir,
            ports,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        for &port in &cluster.ports {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "a cluster node did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(peer_log("redis-cluster"))
            .stderr(peer_log("redis-cluster"))
            .status()
            .expect("redis-cli --cluster create");
        assert!(status.success(), "redis-cli --cluster create failed");
        for &port in &cluster.ports {
            loop {
                let ok = match cluster.node(port).await {
                    Ok(mut c) => redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async::<String>(&mut c)
                        .await
                        .is_ok_and(|i| i.contains("cluster_state:ok")),
                    Err(_) => false,
                };
                if ok {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster did not become ready"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        cluster
    }

    /// A plain connection to the node on `port`.
    pub async fn node(&self, port: u16) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))?
            .get_multiplexed_async_connection()
            .await
    }

    /// The seed URLs, comma-separated (`[fleet] backend = "redis-cluster"`).
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Stop every node.
    pub fn stop(&mut self) {
        for n in &mut self.nodes {
            n.stop();
        }
    }
}

/// A Vault-shaped secrets endpoint (`GET /v1/database/static-creds/<role>` and
/// `GET /v1/secret/data/<path>`) serving whatever the test puts in it, requiring
/// `X-Vault-Token`. Counts reads.
pub struct SecretsEndpoint {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    creds: Arc<Mutex<(String, String, u64)>>,
    /// Reads served.
    pub reads: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

type VaultState = (Arc<Mutex<(String, String, u64)>>, Arc<AtomicU64>, String);

impl SecretsEndpoint {
    /// Serve `(username, password)` with `ttl` seconds until the next rotation,
    /// to clients presenting `vault_token`.
    pub async fn start(username: &str, password: &str, ttl: u64, vault_token: &str) -> Self {
        let creds = Arc::new(Mutex::new((
            username.to_string(),
            password.to_string(),
            ttl,
        )));
        let reads = Arc::new(AtomicU64::new(0));
        let state: VaultState = (creds.clone(), reads.clone(), vault_token.to_string());
        let app = axum::Router::new()
            .route(
                "/v1/database/static-creds/{role}",
                axum::routing::get(static_creds),
            )
            .route("/v1/secret/data/{path}", axum::routing::get(kv2))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the secrets endpoint");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        SecretsEndpoint {
            base,
            creds,
            reads,
            task,
        }
    }

    /// Rotate: serve a new password from now on.
    pub fn set_password(&self, password: &str) {
        self.creds.lock().unwrap().1 = password.to_string();
    }
}

impl Drop for SecretsEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Vault's answer to a missing or wrong token, or `None` if the token is right.
fn vault_denied(headers: &HeaderMap, token: &str) -> Option<axum::response::Response> {
    match headers.get("x-vault-token").and_then(|v| v.to_str().ok()) {
        Some(t) if t == token => None,
        _ => Some(
            (
                StatusCode::FORBIDDEN,
                axum::Json(serde_json::json!({"errors": ["permission denied"]})),
            )
                .into_response(),
        ),
    }
}

async fn static_creds(
    State((creds, reads, token)): State<VaultState>,
    headers: HeaderMap,
) -> axum::response::Response {
    if let Some(r) = vault_denied(&headers, &token) {
        return r;
    }
    reads.fetch_add(1, Ordering::Relaxed);
    let (user, password, ttl) = creds.lock().unwrap().clone();
    axum::Json(serde_json::json!({
        "data": {"username": user, "password": password, "ttl": ttl, "rotation_period": ttl}
    }))
    .into_response()
}

async fn kv2(
    State((creds, reads, token)): State<VaultState>,
    headers: HeaderMap,
) -> axum::response::Response {
    if let Some(r) = vault_denied(&headers, &token) {
        return r;
    }
    reads.fetch_add(1, Ordering::Relaxed);
    let (user, password, _) = creds.lock().unwrap().clone();
    axum::Json(serde_json::json!({
        "data": {"data": {"username": user, "password": password}, "metadata": {"version": 1}}
    }))
    .into_response()
}

/// One HTTP/1.1 request over a fresh connection to `target` (`http://host:port` or
/// `unix:/path`): status, headers, body. Bounded by 10 s.
pub async fn http(
    target: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> anyhow::Result<(u16, http::HeaderMap, Bytes)> {
    use http_body_util::{BodyExt, Full};
    async fn exchange<S>(
        stream: S,
        request: http::Request<Full<Bytes>>,
    ) -> anyhow::Result<(u16, http::HeaderMap, Bytes)>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let conn = tokio::spawn(conn);
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        conn.abort();
        Ok((status, headers, body))
    }
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "reauth");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let work = async {
        if let Some(addr) = target.strip_prefix("http://") {
            exchange(tokio::net::TcpStream::connect(addr).await?, request).await
        } else {
            let path = target.strip_prefix("unix:").unwrap_or(target);
            exchange(tokio::net::UnixStream::connect(path).await?, request).await
        }
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| anyhow::anyhow!("{method} {target}{path} timed out"))?
}

/// An HTTP endpoint on 127.0.0.1 that answers `body` after `delay` and counts hits:
/// a slow identity provider for single-flight and shutdown tests.
pub struct SlowEndpoint {
    /// `http://127.0.0.1:<port>/token`.
    pub url: String,
    /// Requests served.
    pub hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowEndpoint {
    /// Serve `body` after `delay`.
    pub async fn start(body: &'static str, delay: Duration) -> SlowEndpoint {
        let hits = Arc::new(AtomicU64::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().route(
            "/token",
            axum::routing::get(move || {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(delay).await;
                    body
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the slow endpoint");
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        SlowEndpoint { url, hits, task }
    }

    /// `host:port`.
    pub fn authority(&self) -> String {
        self.url
            .trim_start_matches("http://")
            .trim_end_matches("/token")
            .to_string()
    }
}

impl Drop for SlowEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// moto's server mode (PyPI `moto[server]`, pinned in `tests/peers/moto/`,
/// installed by `scripts/install-peers.sh` into `target/peers/moto`): a local
/// stand-in for AWS STS (and the other AWS APIs), on 127.0.0.1.
pub struct Moto {
    _process: Peer,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
}

impl Moto {
    /// The virtualenv with moto, boto3 and botocore.
    pub fn venv() -> PathBuf {
        crate::root().join("target/peers/moto")
    }

    /// Its Python (with botocore importable).
    pub fn python() -> PathBuf {
        Self::venv().join("bin/python")
    }

    /// Start it (bounded: 30 s until it answers).
    pub fn start() -> Moto {
        let server = Self::venv().join("bin/moto_server");
        assert!(
            server.exists(),
            "{} is missing: run scripts/install-peers.sh",
            server.display()
        );
        let port = free_port();
        let child = Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(peer_log("moto"))
            .stderr(peer_log("moto"))
            .spawn()
            .expect("starting moto_server");
        let process = Peer::new(child, "-TERM", Duration::from_secs(3));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on {port} within 30 s (see target/test-logs/peers/moto.log)"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto {
            _process: process,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

/// The made-up company STS and its resource server (`tests/peers/acme-sts/sts.py`,
/// Python's strict `http.server`): not OAuth2, custom challenge scheme, 429 with
/// `Retry-After`, a body needs `Content-Length`.
pub struct AcmeSts {
    _process: Peer,
    /// `127.0.0.1:<port>`.
    pub addr: String,
}

impl AcmeSts {
    /// The API key the STS accepts.
    pub const API_KEY: &'static str = "acme-key-7f3a9c";

    /// Start it (bounded: 20 s for the ready line).
    pub fn start() -> AcmeSts {
        let mut child = Command::new("python3")
            .arg(crate::root().join("tests/peers/acme-sts/sts.py"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(peer_log("acme-sts"))
            .spawn()
            .expect("starting python3 tests/peers/acme-sts/sts.py");
        let ready = ready_line(&mut child, "acme-sts", Duration::from_secs(20));
        let port = ready["port"].as_u64().expect("port");
        AcmeSts {
            _process: Peer::new(child, "-TERM", Duration::from_secs(2)),
            addr: format!("127.0.0.1:{port}"),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Set the STS's behaviour (`{"mode": "ok"|"429"|"down", "retry_after": "2",
    /// "ttl": 30, "revoke": true}`).
    pub async fn admin(&self, settings: serde_json::Value) {
        let (status, _, body) = http(
            &self.url(),
            "POST",
            "/admin",
            &[("content-type", "application/json")],
            Some(settings.to_string().into_bytes()),
        )
        .await
        .expect("POST /admin");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }

    /// Its counters: `sessions`, `chunked`, `rejected_429`, `last_content_length`.
    pub async fn stats(&self) -> serde_json::Value {
        let (status, _, body) = http(&self.url(), "GET", "/stats", &[], None)
            .await
            .expect("GET /stats");
        assert_eq!(status, 200);
        serde_json::from_slice(&body).expect("stats JSON")
    }

    /// `GET /api/whoami` with `authorization`: status, `WWW-Authenticate`,
    /// `Retry-After`.
    pub async fn whoami(&self, authorization: &str) -> (u16, Option<String>) {
        let (status, headers, _) = http(
            &self.url(),
            "GET",
            "/api/whoami",
            &[("authorization", authorization)],
            None,
        )
        .await
        .expect("GET /api/whoami");
        let challenge = headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        (status, challenge)
    }
}
