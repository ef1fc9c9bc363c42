//! Python and JavaScript providers (componentize-py / componentize-js, built from
//! source by the test setup with the kits in `sdk/python` and `sdk/js`), opt-in
//! instance reuse, the conformance kit's ability to fail, and `reauth new` for
//! every language.

use reauth::clock::SystemClock;
use reauth::runtime::{ProviderRuntime, ProviderSpec, Runtime, RuntimeOptions};
use reauth::{
    BreakerConfig, Credential, Error, Host, LimitKind, LimitsConfig, ProviderConfig, ProviderError,
    Request, Secret,
};
use reauth_cli::conformance::{self, Manifest, Outcome};
use reauth_tests::peers::SlowEndpoint;
use reauth_tests::{plugins, root, workspace_binary};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Precompiled artifacts shared by the tests (and runs): a 13–19 MB component
/// compiles once, then loads in milliseconds.
fn precompiled() -> PathBuf {
    root().join("target/test-precompiled")
}

fn token(c: &reauth::Credentials) -> String {
    match &c.credential {
        Credential::Bearer(t) => t.expose().to_string(),
        other => panic!("expected bearer, got {other:?}"),
    }
}

fn heavy(plugin: &Path, mode: &str) -> ProviderConfig {
    let mut p = ProviderConfig::new(plugin).config("mode", mode);
    p.cache.backoff_initial_ms = 1;
    p.cache.backoff_max_ms = 1;
    p.cache.min_interval_ms = 0;
    p
}

fn languages() -> [(&'static str, PathBuf); 2] {
    [
        ("python", plugins().hostile_py.clone()),
        ("js", plugins().hostile_js.clone()),
    ]
}

/// The infinite-loop and memory-hog fixtures of each language are stopped by the
/// call's deadline and the memory cap, with the limit named, while a well-behaved
/// provider of the same language keeps serving.
#[tokio::test]
async fn python_and_js_loops_and_memory_hogs_are_stopped() {
    reauth_tests::logs();
    for (lang, plugin) in languages() {
        let mut spin = heavy(&plugin, "spin");
        spin.limits.timeout_ms = 1500;
        let mut alloc = heavy(&plugin, "alloc");
        alloc.limits.timeout_ms = 20_000;
        let host = Host::builder()
            .cache_dir(precompiled())
            .provider("spin", spin)
            .provider("alloc", alloc)
            .provider("ok", heavy(&plugin, "ok"))
            .build()
            .unwrap();
        let started = Instant::now();
        let e = host
            .get_credentials("spin", &Request::new())
            .await
            .unwrap_err();
        let spun = started.elapsed();
        assert!(
            matches!(&e, Error::Timeout { provider, timeout_ms: 1500, .. } if provider == "spin"),
            "{lang}: {e:?}"
        );
        assert!(
            spun < Duration::from_secs(4),
            "{lang}: stopped after {spun:?}"
        );
        let e = host
            .get_credentials("alloc", &Request::new())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::Limit { limit: LimitKind::Memory, provider, .. } if provider == "alloc"),
            "{lang}: {e:?}"
        );
        assert!(e.to_string().contains("past 64 MiB"), "{lang}: {e}");
        let c = host.get_credentials("ok", &Request::new()).await.unwrap();
        assert_eq!(token(&c), format!("{}-ok", &lang[..2]), "{lang}");
        assert_eq!(c.principal.as_deref(), Some(&lang[..2]));
        eprintln!("{lang}: loop stopped after {spun:?}, memory hog capped");
    }
}

/// `fetch()` from JavaScript and `http` from Python leave only through
/// `allowed_hosts`: the allowed endpoint answers, an endpoint that is not listed is
/// never reached and the provider reports `unavailable`.
#[tokio::test]
async fn js_fetch_and_python_http_obey_allowed_hosts() {
    reauth_tests::logs();
    let allowed = SlowEndpoint::start("fetched-token", Duration::ZERO).await;
    let forbidden = SlowEndpoint::start("must-not-be-read", Duration::ZERO).await;
    for (lang, plugin) in languages() {
        let host = Host::builder()
            .cache_dir(precompiled())
            .provider(
                "allowed",
                heavy(&plugin, "fetch")
                    .config("url", &allowed.url)
                    .allow_host(allowed.authority()),
            )
            .provider(
                "not-allowed",
                heavy(&plugin, "fetch")
                    .config("url", &forbidden.url)
                    .allow_host(allowed.authority()),
            )
            .build()
            .unwrap();
        let c = host
            .get_credentials("allowed", &Request::new())
            .await
            .unwrap();
        assert_eq!(token(&c), "fetched-token", "{lang}");
        let e = host
            .get_credentials("not-allowed", &Request::new())
            .await
            .unwrap_err();
        match &e {
            Error::Provider {
                error: ProviderError::Unavailable { message: m, .. },
                ..
            } => assert!(
                m.contains(&forbidden.authority())
                    || m.contains("denied")
                    || m.contains("NetworkError"),
                "{lang}: {m}"
            ),
            other => panic!("{lang}: expected unavailable, got {other:?}"),
        }
    }
    assert_eq!(
        forbidden.hits.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "a host outside allowed_hosts was reached"
    );
    assert_eq!(allowed.hits.load(std::sync::atomic::Ordering::Relaxed), 2);
}

fn load(runtime: &Runtime, plugin: &Path, reuse: bool, max_calls: u32) -> ProviderRuntime {
    let instances = {
        let mut c = reauth::config::InstancesConfig::default();
        c.reuse = reuse;
        c.max_calls = max_calls;
        c
    };
    ProviderRuntime::load(
        runtime,
        ProviderSpec {
            name: "counter".into(),
            plugin: plugin.to_path_buf(),
            sha256: None,
            allowed_hosts: Vec::new(),
            allow_http: false,
            config: vec![("mode".into(), Secret::new("counter"))],
            limits: LimitsConfig::default(),
            breaker: {
                let mut c = BreakerConfig::default();
                c.faults = 100;
                c
            },
            instances,
            state_file: None,
            shared_state: false,
            secret_keys: Vec::new(),
            credential_keys: Vec::new(),
            rate: reauth::RateConfig::unlimited(),
        },
    )
    .unwrap()
}

async fn call(runtime: &Runtime, p: &ProviderRuntime, subject: &str) -> Result<String, Error> {
    let request = Request::new().subject(subject);
    p.get_credentials(runtime, &request)
        .await
        .map(|c| token(&c))
}

/// Instance reuse, in both heavy languages: off by default (every call sees a fresh
/// module: `call-1`); on, an instance serves later calls of the same subject only,
/// is recycled after `max_calls`, and is discarded after a trap.
#[tokio::test]
async fn reused_instances_stay_with_one_subject_and_are_recycled() {
    reauth_tests::logs();
    let runtime = Runtime::new(
        RuntimeOptions {
            cache_dir: Some(precompiled()),
            ..RuntimeOptions::default()
        },
        Arc::new(SystemClock),
    )
    .unwrap();
    for (lang, plugin) in languages() {
        let fresh = load(&runtime, &plugin, false, 100);
        for _ in 0..3 {
            assert_eq!(
                call(&runtime, &fresh, "a").await.unwrap(),
                "call-1",
                "{lang}: fresh"
            );
        }
        assert_eq!(fresh.idle_instances(), 0);

        let reused = load(&runtime, &plugin, true, 3);
        let mut seen = Vec::new();
        for subject in ["a", "a", "b", "a", "b", "a"] {
            seen.push(call(&runtime, &reused, subject).await.unwrap());
        }
        // a: 1, 2, (b: 1), 3 — recycled after 3 calls — (b: 2), a: 1 again.
        assert_eq!(
            seen,
            ["call-1", "call-2", "call-1", "call-3", "call-2", "call-1"],
            "{lang}"
        );
        // A trap discards the instance: the next call starts afresh.
        assert_eq!(call(&runtime, &reused, "c").await.unwrap(), "call-1");
        assert_eq!(call(&runtime, &reused, "c").await.unwrap(), "call-2");
        let boom = call(&runtime, &reused, "boom").await.unwrap_err();
        assert!(matches!(boom, Error::Plugin { .. }), "{lang}: {boom:?}");
        assert_eq!(
            call(&runtime, &reused, "boom-free").await.unwrap(),
            "call-1"
        );
        let stats = reused.stats();
        let instantiations = stats
            .instantiations
            .load(std::sync::atomic::Ordering::Relaxed);
        let kept = stats.reused.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            instantiations + kept,
            10,
            "{lang}: every call had an instance"
        );
        assert_eq!(kept, 4, "{lang}: a2, a3, b2, c2 reused");
        assert!(reused.idle_instances() <= 4, "{lang}");
        reused.discard_idle();
        assert_eq!(reused.idle_instances(), 0);
        eprintln!("{lang}: {instantiations} instantiations, {kept} reused calls");
    }
}

/// The conformance kit must be able to fail: each deliberate flaw of the `flawed`
/// fixture fails exactly the scenarios it breaks, and the control passes all.
#[tokio::test]
async fn the_conformance_kit_catches_deliberately_wrong_providers() {
    reauth_tests::logs();
    let dir = root().join("plugins/fixtures/flawed");
    let cases: &[(&str, &[&str])] = &[
        ("none", &[]),
        ("denied-on-5xx", &["idp-5xx", "rate-limited"]),
        ("no-expiry", &["expiry"]),
        ("switch-principal", &["principal-stable"]),
        (
            "replay",
            &["refresh-ahead", "token-expired", "principal-stable"],
        ),
        ("refresh-on-forbidden", &["forbidden", "challenges"]),
        // A trap never passes (the egress scenario once passed a trapping one).
        ("trap-on-network-error", &["egress"]),
        ("drop-retry-after", &["rate-limited"]),
        ("drop-audience", &["audience"]),
        // The host refuses its config (`flaw` is not declared): every scenario
        // fails, each saying so.
        ("undeclared-key", conformance::SCENARIOS),
    ];
    for (flaw, failing) in cases {
        let path = dir.join(format!("{flaw}.toml"));
        let manifest =
            Manifest::from_toml(&std::fs::read_to_string(&path).unwrap(), &path).unwrap();
        let report = conformance::run(&manifest, &plugins().flawed, &[])
            .await
            .unwrap();
        let failed: Vec<&str> = report
            .results
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Fail(_)))
            .map(|r| r.name)
            .collect();
        assert_eq!(&failed, failing, "flaw {flaw}:\n{}", report.table());
        assert!(!report.table().contains(conformance::SECRET), "{flaw}");
        assert_eq!(report.results.len(), conformance::SCENARIOS.len());
    }
    // `[request]` reaches the provider: a subject is refused by the
    // client-credentials provider, so the kit's first fetch fails.
    let path = root().join("plugins/oauth2-client-credentials/conformance.toml");
    let mut manifest =
        Manifest::from_toml(&std::fs::read_to_string(&path).unwrap(), &path).unwrap();
    manifest.request.subject = Some("alice".into());
    let only = ["first-fetch".to_string()];
    let report = conformance::run(&manifest, &plugins().oauth2, &only)
        .await
        .unwrap();
    assert!(
        matches!(report.outcome("first-fetch"), Some(Outcome::Fail(m)) if m.contains("per-subject")),
        "{}",
        report.table()
    );
    assert_eq!(report.results.len(), 1, "--scenario runs only that one");
    // A component that does not fit the world is refused before any scenario runs.
    let e = conformance::run(&Manifest::default(), &plugins().other_world, &[])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("auth-provider"), "{e}");
}

/// `reauth test` on every shipped provider, as CI runs it (`make conformance`):
/// the real binary, exit 0, a table with no failure.
#[test]
fn every_shipped_provider_passes_reauth_test() {
    reauth_tests::logs();
    plugins();
    let reauth = workspace_binary("reauth", "reauth");
    for provider in [
        "static",
        "password-rotation",
        "oauth2-client-credentials",
        "oidc-refresh-token",
        "oauth2-client-credentials-py",
        "password-rotation-js",
        "acme-sts",
        "acme-sts-py",
        "acme-sts-js",
    ] {
        let out = Command::new(&reauth)
            .arg("test")
            .arg(root().join("plugins").join(provider))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(" 0 failed"),
            "{provider}:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The table names errors and principals, never a secret.
        let stderr = String::from_utf8_lossy(&out.stderr);
        for secret in [conformance::SECRET, conformance::WRONG_SECRET] {
            assert!(
                !stdout.contains(secret) && !stderr.contains(secret),
                "{provider}: a secret in the output"
            );
        }
    }
    // The same report as one JSON document.
    let out = Command::new(&reauth)
        .args(["test", "--format", "json"])
        .arg(root().join("plugins/acme-sts-py"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["passed"], conformance::SCENARIOS.len(), "{report}");
    let names: Vec<&str> = report["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, conformance::SCENARIOS);
    assert!(
        report["scenarios"][conformance::SCENARIOS
            .iter()
            .position(|s| *s == "challenges")
            .unwrap()]["detail"]
            .as_str()
            .unwrap()
            .contains("revoked ⇒ Fail"),
        "{report}"
    );
}

/// `reauth new` in each language produces a project that builds with its
/// `./build.sh` and passes `reauth test .` — the README's two commands.
#[test]
fn reauth_new_projects_build_and_pass_reauth_test() {
    reauth_tests::logs();
    plugins(); // the kits' tools are installed by the components build
    let reauth = workspace_binary("reauth", "reauth");
    let tmp = tempfile::tempdir().unwrap();
    for lang in ["rust", "python", "js"] {
        let dir = tmp.path().join(format!("acme-{lang}"));
        let out = Command::new(&reauth)
            .args(["new", &format!("acme-{lang}"), "--lang", lang, "--dir"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{lang}: {:?}", out);
        let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
        assert!(readme.contains("./build.sh\nreauth test ."), "{lang}");
        let started = Instant::now();
        let mut build = Command::new(dir.join("build.sh"));
        build
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET");
        if lang == "rust" {
            // Share compiled dependencies between runs (a fresh clone builds them once).
            build.env(
                "CARGO_TARGET_DIR",
                root().join("plugins/target/new-projects"),
            );
        } else {
            build.env_remove("CARGO_TARGET_DIR");
        }
        let out = build.current_dir(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "{lang}: ./build.sh failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let built = started.elapsed();
        if lang != "rust" {
            // The digest to pin, beside the component (builds are not
            // reproducible: the guides' "Pinning a build").
            let wasm = std::fs::read(dir.join("provider.wasm")).unwrap();
            let pinned = std::fs::read_to_string(dir.join("provider.wasm.sha256")).unwrap();
            assert_eq!(pinned.trim(), reauth_tests::sha256_hex(&wasm), "{lang}");
            // Why a rebuild is not pinned: the same source builds to other bytes
            // (the toolchains' pre-initialised heap; when they become
            // reproducible this fails, and the guides' "Pinning a build" changes).
            let again = Command::new(dir.join("build.sh"))
                .env_remove("CARGO_TARGET_DIR")
                .current_dir(&dir)
                .output()
                .unwrap();
            assert!(again.status.success(), "{lang}: second build");
            let rebuilt = std::fs::read_to_string(dir.join("provider.wasm.sha256")).unwrap();
            assert_ne!(
                rebuilt.trim(),
                pinned.trim(),
                "{lang}: the build became reproducible: update the guides' \"Pinning a build\""
            );
        }
        let mut test = Command::new(&reauth);
        test.arg("test").arg(".").current_dir(&dir);
        if lang == "rust" {
            test.arg("--plugin").arg(
                root().join("plugins/target/new-projects/wasm32-wasip2/release/acme_rust.wasm"),
            );
        }
        let out = test.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && stdout.contains(&format!(
                    "{} passed, 0 failed",
                    conformance::SCENARIOS.len()
                )),
            "{lang}: reauth test .:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "reauth new --lang {lang}: built in {built:?}, {n}/{n} scenarios pass",
            n = conformance::SCENARIOS.len()
        );
    }
}

/// The Python kit's safety net (`rp.Provider`): an exception the provider did not
/// mean to raise becomes `unavailable` naming the exception (not a trap that
/// counts toward the circuit breaker), and its traceback is logged at WARN with
/// the provider's name, its declared secrets redacted — here an STS answer that
/// makes `acme-sts-py` raise `ValueError` on a `ttl` holding the API key.
#[tokio::test]
async fn a_python_exception_is_unavailable_with_its_traceback_logged_redacted() {
    let logs = reauth_tests::logs();
    const KEY: &str = "acme-key-7f3a9c";
    let app = axum::Router::new().fallback(|| async {
        (
            [("content-type", "application/json")],
            format!(r#"{{"session": "s-1", "ttl": "{KEY}", "user": "alice"}}"#),
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let plugin = root().join("plugins/target/components/acme-sts-py.wasm");
    plugins();
    let host = Host::builder()
        .cache_dir(precompiled())
        .provider(
            "acme-py-net",
            ProviderConfig::new(&plugin)
                .allow_host(addr.to_string())
                .config("sts_url", format!("http://{addr}"))
                .config("api_key", KEY)
                .config("user", "alice"),
        )
        .build()
        .unwrap();
    let e = host
        .get_credentials("acme-py-net", &Request::new())
        .await
        .unwrap_err();
    let text = e.to_string();
    match &e {
        Error::Provider {
            error: ProviderError::Unavailable { message, .. },
            ..
        } => assert!(message.contains("provider raised ValueError"), "{message}"),
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert!(!text.contains(KEY), "{text}");
    // The traceback, one WARN line each, naming the provider, the key redacted.
    let all = logs.contents();
    let ours: Vec<&str> = all.lines().filter(|l| l.contains("acme-py-net")).collect();
    let has = |needle: &str| {
        ours.iter()
            .any(|l| l.contains("WARN") && l.contains(needle))
    };
    assert!(has("get_credentials raised"), "{ours:#?}");
    assert!(has("Traceback (most recent call last)"), "{ours:#?}");
    assert!(has("ValueError: invalid literal for int()"), "{ours:#?}");
    assert!(!all.contains(KEY), "the API key reached a log line");
}
