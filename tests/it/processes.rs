//! Many processes, one truth: the sidecar, `reauth get` and standalone adapter runs
//! on one config and one rotating refresh-token grant (npm `oidc-provider` with
//! refresh-token rotation and reuse detection, on 127.0.0.1), each a real `reauth`
//! process. No consumed refresh token may ever be replayed (the IdP would revoke
//! the grant), every access token must be accepted by a JWKS-verifying resource
//! server, and the processes share one IdP call per token lifetime through the
//! shared token cache.

use reauth_tests::peers::{Idp, ResourceServer, http_get};
use reauth_tests::{plugins, workspace_binary};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const API: &str = "urn:reauth:test-api";
const RP_SECRET: &str = "rp-secret-0123456789";

fn setup() {
    reauth_tests::logs();
    reauth_tests::record_secret(RP_SECRET);
}

fn reauth() -> PathBuf {
    workspace_binary("reauth-cli", "reauth")
}

/// A logged-in grant: the IdP, its offline refresh token in a file, a config
/// that uses it (`token_url` instead of discovery when `direct`).
struct Grant {
    dir: tempfile::TempDir,
    idp: Idp,
    config: PathBuf,
}

impl Grant {
    fn new(ttl: u64, direct: bool) -> Grant {
        let dir = tempfile::tempdir().unwrap();
        let idp = Idp::start(&dir.path().join("keys.json"), ttl, None);
        let login = idp.login("alice");
        let seed = login["refresh_token"].as_str().unwrap().to_string();
        reauth_tests::record_secret(&seed);
        std::fs::write(dir.path().join("offline-token"), &seed).unwrap();
        let endpoint = if direct {
            format!("token_url = \"{}/token\"", idp.issuer)
        } else {
            format!("issuer = \"{}\"", idp.issuer)
        };
        let config = dir.path().join("rt.toml");
        std::fs::write(
            &config,
            format!(
                r#"[runtime]
state_dir = "state"
cache_dir = "artifacts"

[providers.sso]
plugin = "{plugin}"
allowed_hosts = ["{authority}"]

[providers.sso.config]
{endpoint}
client_id = "rp"
client_secret = "{RP_SECRET}"
refresh_token = {{ file = "offline-token" }}

# Refresh-ahead tuned for tokens of a few seconds (the defaults assume minutes).
[providers.sso.cache]
min_period_secs = 0
buffer_secs = 0
skew_secs = 1
min_interval_ms = 100
"#,
                plugin = plugins().oidc_refresh.display(),
                authority = idp.authority(),
            ),
        )
        .unwrap();
        Grant { dir, idp, config }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Refresh grants the IdP answered and refused (a refused one is a replay).
    async fn refreshes(&self) -> (u64, u64) {
        self.idp
            .stats()
            .await
            .iter()
            .filter(|s| s.client == "rp" && s.grant == "refresh_token")
            .fold((0, 0), |(ok, failed), s| (ok + s.ok, failed + s.failed))
    }

    /// `reauth get sso --format json`, standalone.
    fn get(&self) -> Command {
        let mut cmd = Command::new(reauth());
        cmd.args(["get", "sso", "--format", "json", "--config"])
            .arg(&self.config);
        cmd
    }

    /// `reauth kubectl-credential`, standalone or through the sidecar at `server`.
    fn kubectl(&self, server: Option<&Path>) -> Command {
        let mut cmd = Command::new(reauth());
        cmd.args(["kubectl-credential", "--provider", "sso", "--config"])
            .arg(&self.config);
        if let Some(socket) = server {
            cmd.arg("--server").arg(socket);
        }
        cmd
    }

    /// `reauth serve` on a Unix socket, ready.
    fn sidecar(&self) -> (reauth_tests::peers::Peer, PathBuf) {
        let socket = self.dir.path().join("s.sock");
        let child = Command::new(reauth())
            .args(["serve", "--config"])
            .arg(&self.config)
            .arg("--socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(log_file("sidecar"))
            .spawn()
            .expect("starting reauth serve");
        let peer = reauth_tests::peers::Peer::new(child, "-TERM", Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the sidecar did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        (peer, socket)
    }
}

fn log_file(name: &str) -> std::fs::File {
    let dir = reauth_tests::log_dir().join("processes");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .unwrap()
}

/// Run `cmd` to completion, within 60 s.
fn run(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawning reauth");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("a reauth process ran for more than 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The bearer token a successful run printed (`reauth get` JSON or an
/// ExecCredential); the run's stderr otherwise.
fn token_of(output: &Output) -> Result<String, String> {
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let v: serde_json::Value = serde_json::from_slice(&output.stdout).map_err(|e| {
        format!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })?;
    let token = v["token"]
        .as_str()
        .or(v["status"]["token"].as_str())
        .ok_or_else(|| format!("no token in {v}"))?
        .to_string();
    reauth_tests::record_secret(&token);
    Ok(token)
}

async fn resource_server(idp: &Idp) -> ResourceServer {
    idp.resource_server(API).await
}

async fn accepted(rs: &ResourceServer, token: &str) -> bool {
    matches!(http_get(&rs.url, Some(token)).await, Ok((200, _, _)))
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

impl Grant {
    /// Every file reauth wrote (state, its lock and key ring, the shared cache,
    /// precompiled artifacts, temporary files of killed writers): no refresh
    /// token (the seed, the one stored now), no access token and no client secret
    /// in clear, and nothing that looks like a token record. The user's own
    /// inputs (the config, the seed file) and the IdP's keys are not reauth's.
    fn assert_nothing_in_clear(&self, access_tokens: &HashSet<String>) {
        let mut secrets: Vec<String> = access_tokens.iter().cloned().collect();
        secrets.push(RP_SECRET.to_string());
        secrets.push(std::fs::read_to_string(self.dir.path().join("offline-token")).unwrap());
        let stored = reauth_tests::read_state(&self.state_dir(), "sso")
            .and_then(|s| s.get("refresh").cloned())
            .and_then(|r| serde_json::from_str::<serde_json::Value>(&r).ok())
            .and_then(|r| r["refresh_token"].as_str().map(str::to_string));
        if let Some(stored) = stored {
            reauth_tests::record_secret(&stored);
            secrets.push(stored);
        }
        let mine = ["offline-token", "rt.toml", "keys.json"];
        let scanned: Vec<PathBuf> = files(self.dir.path())
            .into_iter()
            .filter(|p| !mine.iter().any(|m| p.file_name().is_some_and(|n| n == *m)))
            .collect();
        assert!(
            access_tokens.is_empty()
                != scanned
                    .iter()
                    .any(|p| p.extension().is_some_and(|e| e == "tok")),
            "a fetched token must be in the shared cache (sealed)"
        );
        for file in &scanned {
            let text = String::from_utf8_lossy(&std::fs::read(file).unwrap()).into_owned();
            for secret in &secrets {
                assert!(
                    !text.contains(secret.as_str()),
                    "{} holds a secret in clear",
                    file.display()
                );
            }
            // (The precompiled plugin holds these words as its own literals, and
            // the record of its source's digest names its file: only those, in
            // the test's own artifact cache.)
            let code = file
                .strip_prefix(self.dir.path().join("artifacts"))
                .is_ok_and(|rel| {
                    let name = rel.to_string_lossy();
                    let parts: Vec<_> = rel.components().collect();
                    (parts.len() == 1 && (name.ends_with(".cwasm") || name.ends_with(".meta.json")))
                        || (parts.len() == 2
                            && rel.starts_with("sources")
                            && name.ends_with(".json"))
                });
            assert!(
                code || !(text.contains("refresh_token") || text.contains("access_token")),
                "{} holds a token record in clear",
                file.display()
            );
        }
        println!("{} files scanned, no secret in clear", scanned.len());
    }
}

/// The README's sequence, continued over several token lifetimes: the sidecar, a
/// standalone `reauth get` and standalone kubectl adapter runs take turns on one
/// rotating grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_cli_and_adapters_share_one_rotating_grant() {
    setup();
    let grant = Grant::new(4, false);
    let rs = resource_server(&grant.idp).await;
    let (mut sidecar, socket) = grant.sidecar();
    let started = Instant::now();
    let (mut runs, mut failures, mut tokens) = (0u32, Vec::new(), HashSet::new());
    let mut step = 0u32;
    // Three and a half 4-second lifetimes.
    while started.elapsed() < Duration::from_secs(14) {
        let cmd = match step % 3 {
            0 => grant.kubectl(Some(&socket)),
            1 => grant.get(),
            _ => grant.kubectl(None),
        };
        step += 1;
        runs += 1;
        match token_of(&run(cmd)) {
            Ok(token) => {
                if !accepted(&rs, &token).await {
                    failures.push(format!("run {runs}: the resource server refused the token"));
                }
                tokens.insert(token);
            }
            Err(e) => failures.push(format!("run {runs} (kind {}): {e}", (step - 1) % 3)),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sidecar.stop();
    let (ok, replays) = grant.refreshes().await;
    println!(
        "{runs} processes, {} distinct access tokens, {ok} refresh grants, {replays} refused",
        tokens.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(replays, 0, "a consumed refresh token was replayed");
    // One refresh per lifetime (refresh-ahead at ~80% of 4 s): ~5 in 14 s, never
    // one per process.
    assert!(
        ok <= 7 && (ok as u32) < runs / 3,
        "{ok} refresh grants for {runs} processes over 14 s of 4 s tokens"
    );
    grant.assert_nothing_in_clear(&tokens);
}

/// 20 `reauth get` processes at once, plus the sidecar, on one rotating grant,
/// once per token lifetime: one refresh per round, no replay, no failed process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_processes_and_a_sidecar_spend_each_refresh_token_once() {
    setup();
    let grant = Grant::new(10, false);
    let rs = resource_server(&grant.idp).await;
    let (mut sidecar, socket) = grant.sidecar();
    const ROUNDS: u64 = 3;
    let mut tokens = HashSet::new();
    for round in 0..ROUNDS {
        let round_started = Instant::now();
        let mut children = Vec::new();
        for i in 0..22 {
            let cmd = if i % 11 == 10 {
                grant.kubectl(Some(&socket))
            } else {
                grant.get()
            };
            children.push(std::thread::spawn(move || run(cmd)));
        }
        let mut round_tokens = HashSet::new();
        for (i, child) in children.into_iter().enumerate() {
            match token_of(&child.join().unwrap()) {
                Ok(token) => {
                    round_tokens.insert(token);
                }
                Err(e) => panic!("round {round}, process {i} failed: {e}"),
            }
        }
        for token in &round_tokens {
            assert!(accepted(&rs, token).await, "round {round}: token refused");
        }
        println!(
            "round {round}: 22 processes in {:?}, {} distinct token(s)",
            round_started.elapsed(),
            round_tokens.len()
        );
        tokens.extend(round_tokens);
        // Let the token expire before the next round.
        tokio::time::sleep(
            Duration::from_secs(10).saturating_sub(round_started.elapsed())
                + Duration::from_millis(500),
        )
        .await;
    }
    sidecar.stop();
    let (ok, replays) = grant.refreshes().await;
    println!("{ROUNDS} rounds: {ok} refresh grants, {replays} refused");
    assert_eq!(replays, 0, "a consumed refresh token was replayed");
    assert_eq!(ok, ROUNDS, "one refresh per round (per token lifetime)");
    grant.assert_nothing_in_clear(&tokens);
}

/// 50 standalone kubectl adapter runs in a row, within one token lifetime: one
/// IdP request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_standalone_kubectl_runs_make_one_idp_request() {
    setup();
    let grant = Grant::new(60, false);
    let rs = resource_server(&grant.idp).await;
    let mut tokens = HashSet::new();
    let started = Instant::now();
    for i in 0..50 {
        let token =
            token_of(&run(grant.kubectl(None))).unwrap_or_else(|e| panic!("run {i} failed: {e}"));
        tokens.insert(token);
    }
    let elapsed = started.elapsed();
    let (ok, replays) = grant.refreshes().await;
    println!("50 standalone kubectl runs in {elapsed:?}: {ok} refresh grant(s)");
    assert_eq!((ok, replays), (1, 0));
    assert_eq!(tokens.len(), 1, "every run printed the one shared token");
    assert!(accepted(&rs, tokens.iter().next().unwrap()).await);
    grant.assert_nothing_in_clear(&tokens);
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// Wait (bounded) until `path` names `pid` as the state's holder.
fn wait_for_holder(path: &Path, pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let want = format!("pid={pid} ");
    while !std::fs::read_to_string(path).is_ok_and(|s| s.starts_with(&want)) {
        assert!(
            Instant::now() < deadline,
            "process {pid} never took the state lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Grant {
    /// With the IdP paused (SIGSTOP), start a `reauth get`, wait until it holds
    /// the state lock, let its request sit for `linger`, SIGKILL it and resume the
    /// IdP. Returns the killed process's PID.
    fn kill_a_holder(&self, linger: Duration) -> u32 {
        let idp_pid = self.idp.pid().unwrap();
        signal(idp_pid, "-STOP");
        let mut a = self
            .get()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let a_pid = a.id();
        wait_for_holder(&self.state_dir().join("sso.lock"), a_pid);
        std::thread::sleep(linger);
        a.kill().unwrap();
        a.wait().unwrap();
        signal(idp_pid, "-CONT");
        a_pid
    }
}

/// A process SIGKILLed while it holds the state lock, before the IdP saw its
/// refresh request: the lock is released by the kernel and the next process
/// refreshes with the same (unspent) token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_killed_before_the_idp_call_loses_nothing() {
    setup();
    // With discovery, the provider reads its state, then asks for the discovery
    // document: with the IdP paused, it holds the lock there.
    let grant = Grant::new(30, false);
    grant.kill_a_holder(Duration::ZERO);
    let output = run(grant.get());
    let token = token_of(&output).expect("the next process refreshes");
    let rs = resource_server(&grant.idp).await;
    assert!(accepted(&rs, &token).await);
    assert_eq!(grant.refreshes().await, (1, 0));
    grant.assert_nothing_in_clear(&HashSet::from([token]));
}

/// A process SIGKILLed after its refresh request reached the IdP but before it
/// wrote the rotated token: the rotated token dies with it. The next process can
/// only present the token the IdP considers spent; it fails, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_killed_after_the_idp_rotated_is_reported_to_the_next() {
    setup();
    // `token_url`: no discovery, the refresh request is the first thing sent.
    let grant = Grant::new(30, true);
    // Its request reaches the IdP's socket buffer right after it read the state;
    // half a second is plenty for it to be written.
    let a_pid = grant.kill_a_holder(Duration::from_millis(500));
    // The IdP processes the dead process's request (or drops it): wait until it
    // settled.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (spent, _) = grant.refreshes().await;
    let output = run(grant.get());
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    println!(
        "IdP answered the killed process: {}; next process: {:?}\n{stderr}",
        spent == 1,
        output.status
    );
    if spent == 1 {
        // The grant is gone: what the user sees must say why.
        assert!(!output.status.success(), "the spent token cannot work");
        assert!(
            stderr.contains(&format!(
                "process {a_pid} died while it held this provider's state"
            )),
            "the error does not name the dead holder: {stderr}"
        );
        assert!(stderr.contains("Log in again"), "{stderr}");
        grant.assert_nothing_in_clear(&HashSet::new());
    } else {
        // The IdP dropped the request of a closed connection: nothing was spent.
        let token = token_of(&output).expect("nothing was spent; the next process refreshes");
        grant.assert_nothing_in_clear(&HashSet::from([token]));
    }
}

/// The testkit's `counter` mode reads a number from state, adds one and writes it
/// back: every call that read and wrote must see the previous call's write.
fn counter_host(state_dir: &Path, timeout_ms: u64) -> reauth::Host {
    let mut p = reauth::ProviderConfig::new(&plugins().testkit).config("mode", "counter");
    p.limits.timeout_ms = timeout_ms;
    reauth::Host::builder()
        .state_dir(state_dir)
        .shared_cache(None)
        .provider("counter", p)
        .build()
        .unwrap()
}

/// Two hosts on one state directory stand for two processes (only the file lock
/// is between them), ten subjects each at once: no read-modify-write is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_updates_from_two_hosts_are_never_lost() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        counter_host(dir.path(), 10_000),
        counter_host(dir.path(), 10_000),
    );
    let mut tasks = Vec::new();
    for i in 0..20 {
        let host = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            host.get_credentials("counter", &reauth::Request::new().subject(format!("s{i}")))
                .await
        }));
    }
    let mut seen = HashSet::new();
    for t in tasks {
        let c = t.await.unwrap().unwrap();
        let reauth::Credential::Bearer(token) = &c.credential else {
            panic!("bearer expected")
        };
        let n: u64 = token.expose().split('-').nth(1).unwrap().parse().unwrap();
        assert!(seen.insert(n), "two calls read the same counter value {n}");
    }
    assert_eq!(seen, (1..=20).collect::<HashSet<u64>>());
    let state = reauth_tests::read_state(dir.path(), "counter").unwrap();
    assert_eq!(state["count"], "20");
}

/// A state lock held by another process past the call's deadline: the call fails
/// with `Error::State` naming the file and the holder, and does not write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_lock_held_too_long_is_a_typed_error_naming_the_holder() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let host = counter_host(dir.path(), 600);
    // Another "process" holds the lock (and says so, as reauth does).
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(dir.path().join("counter.lock"))
        .unwrap();
    lock.lock().unwrap();
    std::fs::write(
        dir.path().join("counter.lock"),
        "pid=4242 since=1700000000\n",
    )
    .unwrap();
    let started = Instant::now();
    match host
        .get_credentials("counter", &reauth::Request::new())
        .await
    {
        Err(reauth::Error::State {
            provider,
            detail,
            holder,
        }) => {
            assert_eq!(provider, "counter");
            assert_eq!(holder, Some(4242));
            assert!(
                detail.contains("counter.json") && detail.contains("held by process 4242"),
                "{detail}"
            );
        }
        other => panic!("expected Error::State, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        !dir.path().join("counter.json").exists(),
        "nothing was written"
    );
    // Released: the next call goes through.
    drop(lock);
    host.get_credentials("counter", &reauth::Request::new().subject("after"))
        .await
        .unwrap();
}
