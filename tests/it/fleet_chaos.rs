//! Fleet chaos with two embedded hosts on one Redis and the real oidc-provider
//! (refresh-token rotation with reuse detection): replica A dies — its backend
//! connection goes silent, as for a process killed or partitioned — at a chosen
//! point of a refresh, and replica B takes over once A's leases lapse. Each
//! point has its own, asserted outcome:
//!
//! - before the IdP call (A holds the state lease, has not read the token): B
//!   refreshes with the unspent token; no replay;
//! - after the IdP answered, before the rotated token was stored: that token is
//!   gone with A (nothing can recover it); B's refresh is refused by the IdP and
//!   its error says the previous holder died holding the state;
//! - after the commit, before the release and its announcement: B takes A's
//!   result from the shared entry once the lease lapses; no second IdP call.
//!
//! Also: a `[fleet]` whose URL or key cannot be resolved fails the build with
//! an error naming the key.

use reauth::store::fleet::{
    Acquired, BusStream, Fleet, FleetBackend, FleetOptions, Record, RedisBackend,
};
use reauth::store::{KeyRing, StoreError, StoreFuture};
use reauth::{Credential, Host, ProviderConfig, Request};
use reauth_tests::peers::{Idp, Redis};
use reauth_tests::plugins;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const KEY: &str = "v1 chaos 7777777777777777777777777777777777777777777777777777777777777777";

/// Where replica A dies.
#[derive(Clone, Copy, Debug, PartialEq)]
enum DiesAt {
    /// Right after it took the provider's state lease.
    StateLeaseTaken,
    /// When it is about to store the rotated state.
    StateWrite,
    /// When it is about to release the key's lease (after writing the entry).
    EntryRelease,
}

/// A backend that goes silent (every operation hangs) from a chosen point on.
struct Dying {
    inner: RedisBackend,
    at: DiesAt,
    dead: Arc<AtomicBool>,
}

impl Dying {
    fn gate<'a, T: Send + 'a>(
        &'a self,
        dies_now: bool,
        op: StoreFuture<'a, Result<T, StoreError>>,
    ) -> StoreFuture<'a, Result<T, StoreError>> {
        if dies_now {
            self.dead.store(true, Ordering::SeqCst);
        }
        if self.dead.load(Ordering::SeqCst) {
            return Box::pin(std::future::pending());
        }
        op
    }
}

impl FleetBackend for Dying {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn acquire<'a>(
        &'a self,
        name: &'a str,
        token: &'a str,
        holder: &'a str,
        ttl_ms: u64,
    ) -> StoreFuture<'a, Result<Option<Acquired>, StoreError>> {
        let op = self.gate(false, self.inner.acquire(name, token, holder, ttl_ms));
        let (at, dead) = (self.at, self.dead.clone());
        Box::pin(async move {
            let got = op.await?;
            if got.is_some() && at == DiesAt::StateLeaseTaken && name.starts_with("s.") {
                dead.store(true, Ordering::SeqCst);
            }
            Ok(got)
        })
    }
    fn renew<'a>(
        &'a self,
        name: &'a str,
        token: &'a str,
        ttl_ms: u64,
    ) -> StoreFuture<'a, Result<bool, StoreError>> {
        self.gate(false, self.inner.renew(name, token, ttl_ms))
    }
    fn release<'a>(
        &'a self,
        name: &'a str,
        token: &'a str,
        leave: Option<&'a str>,
    ) -> StoreFuture<'a, Result<(), StoreError>> {
        let dies = self.at == DiesAt::EntryRelease && !name.starts_with("s.");
        self.gate(dies, self.inner.release(name, token, leave))
    }
    fn get<'a>(
        &'a self,
        name: &'a str,
    ) -> StoreFuture<'a, Result<(Option<Record>, u64), StoreError>> {
        self.gate(false, self.inner.get(name))
    }
    fn put<'a>(
        &'a self,
        name: &'a str,
        record: &'a Record,
        ttl_ms: u64,
        lease: Option<(&'a str, &'a str)>,
    ) -> StoreFuture<'a, Result<bool, StoreError>> {
        let dies = self.at == DiesAt::StateWrite && name.starts_with("s.");
        self.gate(dies, self.inner.put(name, record, ttl_ms, lease))
    }
    fn delete_if<'a>(
        &'a self,
        name: &'a str,
        tag: Option<&'a str>,
    ) -> StoreFuture<'a, Result<bool, StoreError>> {
        self.gate(false, self.inner.delete_if(name, tag))
    }
    fn publish<'a>(&'a self, message: &'a str) -> StoreFuture<'a, Result<(), StoreError>> {
        self.gate(false, self.inner.publish(message))
    }
    fn subscribe<'a>(&'a self, inbox: &'a str) -> StoreFuture<'a, Result<BusStream, StoreError>> {
        self.gate(false, self.inner.subscribe(inbox))
    }
    fn heartbeat<'a>(
        &'a self,
        inbox: &'a str,
        message: &'a str,
    ) -> StoreFuture<'a, Result<(), StoreError>> {
        self.gate(false, self.inner.heartbeat(inbox, message))
    }
}

fn options() -> FleetOptions {
    FleetOptions {
        name: "chaos".into(),
        lease: Duration::from_millis(1500),
        wait: Duration::from_secs(10),
        timeout: Duration::from_millis(500),
    }
}

fn keys() -> Arc<KeyRing> {
    Arc::new(KeyRing::parse(KEY, "chaos ring").unwrap())
}

fn provider(idp: &Idp, seed_file: &Path) -> ProviderConfig {
    let mut p = ProviderConfig::new(&plugins().oidc_refresh)
        .allow_host(idp.authority())
        .config("token_url", format!("{}/token", idp.issuer))
        .config("client_id", "rp")
        .config("client_secret", "rp-secret-0123456789");
    p.config.insert(
        "refresh_token".into(),
        reauth::config::ConfigValue::File {
            file: seed_file.to_path_buf(),
        },
    );
    // At most 80 % of the 1.5 s lease (checked at build).
    p.limits.timeout_ms = 1000;
    p
}

fn token(c: &reauth::Credentials) -> String {
    match &c.credential {
        Credential::Bearer(t) => t.expose().to_string(),
        other => panic!("not a bearer token: {other:?}"),
    }
}

/// (refresh grants answered, refused) by the IdP.
async fn refreshes(idp: &Idp) -> (u64, u64) {
    idp.stats()
        .await
        .iter()
        .filter(|s| s.client == "rp" && s.grant == "refresh_token")
        .fold((0, 0), |(ok, failed), s| (ok + s.ok, failed + s.failed))
}

async fn scenario(at: DiesAt) {
    reauth_tests::logs();
    reauth_tests::record_secret("rp-secret-0123456789");
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start().await;
    let idp = Idp::start(&dir.path().join("keys.json"), 30, None);
    let (_, seed_file) = idp.offline_token(dir.path());
    let dead = Arc::new(AtomicBool::new(false));
    let dying = Dying {
        inner: RedisBackend::new(&redis.url(), "chaos", Duration::from_millis(500)).unwrap(),
        at,
        dead: dead.clone(),
    };
    let host_a = Host::builder()
        .provider("sso", provider(&idp, &seed_file))
        .fleet(Fleet::new(Arc::new(dying), keys(), options()))
        .build()
        .unwrap();
    let host_b = Host::builder()
        .provider("sso", provider(&idp, &seed_file))
        .fleet(Fleet::new(
            Arc::new(RedisBackend::new(&redis.url(), "chaos", Duration::from_millis(500)).unwrap()),
            keys(),
            options(),
        ))
        .build()
        .unwrap();
    let request = Request::new();
    let (a, b) = if at == DiesAt::EntryRelease {
        // B asks while A is fetching: it waits for A (woken by nothing, A dies
        // before announcing) and takes A's entry once A's lease lapsed.
        tokio::join!(host_a.get_credentials("sso", &request), async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            host_b.get_credentials("sso", &request).await
        })
    } else {
        let a = host_a.get_credentials("sso", &Request::new()).await;
        (a, host_b.get_credentials("sso", &Request::new()).await)
    };
    assert!(
        dead.load(Ordering::SeqCst),
        "{at:?}: replica A never reached its point of death"
    );
    let (ok, refused) = refreshes(&idp).await;
    println!(
        "{at:?}: A {:?}, B {:?}, IdP refreshes {ok} answered, {refused} refused",
        a.as_ref().map(|_| "ok"),
        b.as_ref().map(|_| "ok")
    );
    match at {
        DiesAt::StateLeaseTaken => {
            assert!(a.is_err(), "A could not have finished");
            let b = b.expect("B refreshes with the unspent token");
            assert_eq!((ok, refused), (1, 0), "one refresh, no replay");
            assert!(!token(&b).is_empty());
        }
        DiesAt::StateWrite => {
            let e = b.expect_err("the rotated token died with A: B's replay is refused");
            let text = e.to_string();
            assert!(text.contains("denied"), "{text}");
            assert!(
                text.contains("while it held this provider's state"),
                "B's error names the lost holder: {text}"
            );
            assert_eq!(
                refused, 1,
                "exactly one replay, the one that revealed the loss"
            );
        }
        DiesAt::EntryRelease => {
            let a = a.expect("A finished: its entry and state were written");
            let b = b.expect("B takes A's entry");
            assert_eq!(token(&a), token(&b), "B took the shared entry");
            assert_eq!((ok, refused), (1, 0), "no second IdP call");
        }
    }
    drop(host_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_dies_before_the_idp_call() {
    scenario(DiesAt::StateLeaseTaken).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_dies_after_the_idp_answered_before_the_commit() {
    scenario(DiesAt::StateWrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_dies_after_the_commit_before_the_announcement() {
    scenario(DiesAt::EntryRelease).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresolvable_fleet_settings_fail_the_build_naming_the_key() {
    reauth_tests::logs();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("reauth.toml");
    let write = |fleet: &str| {
        std::fs::write(
            &config,
            format!(
                "[fleet]\nname = \"payments\"\n{fleet}\n\n[providers.p]\nplugin = \"{}\"\n\n[providers.p.config]\ntoken = \"t\"\n",
                plugins().static_.display()
            ),
        )
        .unwrap();
    };
    write("backend = \"redis\"\nurl = { env = \"REAUTH_TEST_NO_SUCH_VAR\" }\nkey = \"v1 k 00\"");
    let e = Host::from_config_file(&config).unwrap_err().to_string();
    assert!(
        e.contains("fleet.url") && e.contains("REAUTH_TEST_NO_SUCH_VAR"),
        "{e}"
    );
    write(&format!(
        "backend = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nkey = {{ file = \"{}\" }}",
        dir.path().join("missing-key").display()
    ));
    let e = Host::from_config_file(&config).unwrap_err().to_string();
    assert!(e.contains("fleet.key") && e.contains("missing-key"), "{e}");
    write("backend = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nkey = \"not a key ring\"");
    let e = Host::from_config_file(&config).unwrap_err().to_string();
    assert!(e.contains("fleet.key"), "{e}");
    write(&format!(
        "backend = \"postgres\"\nurl = \"no such url ===\"\nkey = \"{KEY}\""
    ));
    let e = Host::from_config_file(&config).unwrap_err().to_string();
    assert!(e.contains("fleet.url") && !e.contains(KEY), "{e}");
    // An unreachable backend is not a build error: the host starts, serves what
    // it can, and says the backend is down.
    write(&format!(
        "backend = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nkey = \"{KEY}\""
    ));
    let host = Host::from_config_file(&config).unwrap();
    let c = host.get_credentials("p", &Request::new()).await.unwrap();
    assert_eq!(token(&c), "t");
    assert!(
        host.render_metrics()
            .contains("reauth_fleet_backend_up{fleet=\"payments\"} 0")
    );
}

/// `reauth check` says whether the fleet's backend answers (and fails when it
/// does not), naming the backend without its password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reauth_check_reports_the_fleet() {
    reauth_tests::logs();
    let redis = Redis::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("reauth.toml");
    let check = |url: &str| {
        std::fs::write(
            &config,
            format!(
                "[fleet]\nname = \"payments\"\nbackend = \"redis\"\nurl = {{ env = \"REAUTH_FLEET_URL\" }}\nkey = {{ env = \"REAUTH_FLEET_KEY\" }}\n\n\
                 [providers.p]\nplugin = \"{}\"\n\n[providers.p.config]\ntoken = \"t\"\n",
                plugins().static_.display()
            ),
        )
        .unwrap();
        std::process::Command::new(reauth_tests::workspace_binary("reauth-cli", "reauth"))
            .args(["check", "--config"])
            .arg(&config)
            .env("REAUTH_FLEET_URL", url)
            .env("REAUTH_FLEET_KEY", KEY)
            .output()
            .unwrap()
    };
    let ok = check(&redis.url());
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        text.contains(&format!(
            "ok   fleet `payments`: redis 127.0.0.1:{} reachable; key chaos",
            redis.port
        )),
        "{text}"
    );
    let down = check("redis://:fleet-pw-secret@127.0.0.1:1");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&down.stdout),
        String::from_utf8_lossy(&down.stderr)
    );
    assert_eq!(down.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL fleet `payments`"), "{text}");
    assert!(
        !text.contains("fleet-pw-secret") && !text.contains(KEY),
        "{text}"
    );
}
