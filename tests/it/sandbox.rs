//! The sandbox against hostile and broken plugins (`plugins/fixtures/hostile`,
//! `plugins/fixtures/other-world`): every limit contains its fixture with a typed
//! error naming the provider and the limit, and the host keeps serving the other
//! providers meanwhile.

use axum::Router;
use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use reauth::retry::{OperationError, Rejection};
use reauth::{
    Credential, Decision, Error, Host, LimitKind, ProviderConfig, ProviderStatus, Request,
    SecurityError, SecurityErrorKind,
};
use reauth_tests::plugins;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn hostile(mode: &str) -> ProviderConfig {
    let mut p = ProviderConfig::new(&plugins().hostile).config("mode", mode);
    // Every call reaches the plugin: no backoff or pacing between attempts.
    p.cache.backoff_initial_ms = 1;
    p.cache.backoff_max_ms = 1;
    p.cache.min_interval_ms = 0;
    p
}

fn limit_of(e: &Error) -> Option<LimitKind> {
    match e {
        Error::Limit { limit, .. } => Some(*limit),
        _ => None,
    }
}

fn bearer(c: &reauth::Credentials) -> String {
    match &c.credential {
        Credential::Bearer(t) => t.expose().to_string(),
        other => panic!("expected bearer, got {other:?}"),
    }
}

/// A loopback server: big bodies, a redirect, a slow and a fast endpoint. Counts
/// the requests to `/target`.
async fn server(redirect_to: Option<SocketAddr>) -> (SocketAddr, Arc<AtomicU64>) {
    let hits = Arc::new(AtomicU64::new(0));
    let counted = hits.clone();
    let big = || {
        let chunk = bytes::Bytes::from(vec![b'a'; 64 << 10]);
        futures_util::stream::iter(
            (0..1600).map(move |_| Ok::<_, std::convert::Infallible>(chunk.clone())),
        )
    };
    let app = Router::new()
        // 100 MiB without a content-length: capped while streaming.
        .route(
            "/big-chunked",
            get(move || async move { Body::from_stream(big()) }),
        )
        // 100 MiB announced by content-length: refused before reading.
        .route(
            "/big-length",
            get(move || async move {
                Response::builder()
                    .header(header::CONTENT_LENGTH, (1600u64 * (64 << 10)).to_string())
                    .body(Body::from_stream(big()))
                    .unwrap()
            }),
        )
        .route(
            "/redirect",
            get(move || async move {
                match redirect_to {
                    Some(to) => (
                        StatusCode::FOUND,
                        [(
                            header::LOCATION,
                            format!("http://localhost:{}/target", to.port()),
                        )],
                    )
                        .into_response(),
                    None => StatusCode::NOT_FOUND.into_response(),
                }
            }),
        )
        .route(
            "/target",
            get(move || async move {
                counted.fetch_add(1, Ordering::SeqCst);
                "target-reached"
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(600)).await;
                "slow-version"
            }),
        )
        .route("/fast", get(|| async { "fast-version" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, hits)
}

/// An infinite loop is stopped at its timeout, and another provider serves while
/// it spins — on the same thread: a running guest yields to the executor at
/// every epoch tick.
#[tokio::test]
async fn infinite_loop_is_stopped_within_its_timeout_while_others_serve() {
    reauth_tests::logs();
    let mut spin = hostile("spin");
    spin.limits.timeout_ms = 500;
    let host = Host::builder()
        .provider("spin", spin)
        .provider("ok", hostile("ok"))
        .build()
        .unwrap();
    let started = Instant::now();
    let spinning = {
        let host = host.clone();
        tokio::spawn(async move {
            let r = host.get_credentials("spin", &Request::new()).await;
            (r, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut served_while_spinning = 0;
    for i in 0..5 {
        let c = host
            .get_credentials("ok", &Request::new().subject(format!("s{i}")))
            .await
            .unwrap();
        assert_eq!(bearer(&c), "hostile-ok");
        if !spinning.is_finished() {
            served_while_spinning += 1;
        }
    }
    let (result, elapsed) = spinning.await.unwrap();
    let e = result.unwrap_err();
    assert!(
        matches!(&e, Error::Timeout { provider, timeout_ms: 500, .. } if provider == "spin"),
        "{e:?}"
    );
    assert!(e.to_string().contains("exceeded its 500 ms timeout"), "{e}");
    assert!(
        elapsed < Duration::from_millis(1500),
        "stopped after {elapsed:?}"
    );
    assert!(
        served_while_spinning > 0,
        "the other provider was served while the loop ran"
    );
    eprintln!("infinite loop stopped after {elapsed:?} (timeout 500 ms)");
}

/// Memory, stack and fuel exhaustion each end in the limit's own error; the next
/// call starts from a fresh instance and works.
#[tokio::test]
async fn memory_stack_and_fuel_are_capped() {
    reauth_tests::logs();
    let mut fuel = hostile("burn");
    fuel.limits.fuel = Some(5_000_000);
    let mut roomy = hostile("burn");
    roomy.limits.fuel = Some(u64::MAX);
    roomy.limits.timeout_ms = 60_000;
    let host = Host::builder()
        .provider("alloc", hostile("alloc"))
        .provider("recurse", hostile("recurse"))
        .provider("recurse-native", hostile("recurse-native"))
        .provider("fuel", fuel)
        .provider("ok", hostile("ok"))
        .build()
        .unwrap();
    let e = host
        .get_credentials("alloc", &Request::new())
        .await
        .unwrap_err();
    assert_eq!(limit_of(&e), Some(LimitKind::Memory), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("provider `alloc`: `get-credentials` hit its limits.memory_mib limit: linear memory may not grow past 64 MiB"),
        "{e}"
    );
    // Rust keeps big frames on a shadow stack in linear memory: overflowing it
    // runs off the bottom of memory and traps.
    let e = host
        .get_credentials("recurse", &Request::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Plugin { provider, .. } if provider == "recurse")
            && e.to_string().contains("out of bounds memory access"),
        "{e:?}"
    );
    // Scalar recursion overflows the WebAssembly stack itself.
    let e = host
        .get_credentials("recurse-native", &Request::new())
        .await
        .unwrap_err();
    assert_eq!(limit_of(&e), Some(LimitKind::Stack), "{e:?}");
    let e = host
        .get_credentials("fuel", &Request::new())
        .await
        .unwrap_err();
    assert_eq!(limit_of(&e), Some(LimitKind::Fuel), "{e:?}");
    assert!(e.to_string().contains("all of its 5000000 fuel"), "{e}");
    // Still fine: the failures stayed in their own Stores.
    let c = host.get_credentials("ok", &Request::new()).await.unwrap();
    assert_eq!(bearer(&c), "hostile-ok");
    assert_eq!(host.plugin_calls("alloc"), 1);
}

/// Oversized results: a 10 MB credential, a 100 MB response (streamed or announced)
/// and a flood of stderr each fail with the limit named; a credential that would
/// inject a header is refused as a contract violation.
#[tokio::test]
async fn oversized_results_are_capped_with_a_clear_error() {
    reauth_tests::logs();
    let (addr, _) = server(None).await;
    let fetch = |path: &str| {
        hostile("read-body")
            .allow_host(addr.to_string())
            .config("url", format!("http://{addr}{path}"))
    };
    let host = Host::builder()
        .provider("big-credential", hostile("big-credential"))
        .provider("big-chunked", fetch("/big-chunked"))
        .provider("big-length", fetch("/big-length"))
        .provider("small", fetch("/fast"))
        .provider("flood", hostile("stderr-flood"))
        .provider("inject", hostile("header-injection"))
        .build()
        .unwrap();
    let e = host
        .get_credentials("big-credential", &Request::new())
        .await
        .unwrap_err();
    assert_eq!(limit_of(&e), Some(LimitKind::CredentialSize), "{e:?}");
    assert!(
        e.to_string()
            .contains("returned a 10485760-byte credential; at most 65536 bytes"),
        "{e}"
    );
    for name in ["big-chunked", "big-length"] {
        let e = host
            .get_credentials(name, &Request::new())
            .await
            .unwrap_err();
        assert_eq!(limit_of(&e), Some(LimitKind::ResponseBody), "{name}: {e:?}");
        assert!(e.to_string().contains("larger than 1048576 bytes"), "{e}");
    }
    let c = host
        .get_credentials("small", &Request::new())
        .await
        .unwrap();
    assert_eq!(bearer(&c), "read-12");
    let e = host
        .get_credentials("flood", &Request::new())
        .await
        .unwrap_err();
    assert_eq!(limit_of(&e), Some(LimitKind::Output), "{e:?}");
    assert!(e.to_string().contains("more than 262144 bytes"), "{e}");
    let e = host
        .get_credentials("inject", &Request::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Plugin { .. })
            && e.to_string().contains(
                "invalid credential: bearer token is empty or contains a control character"
            ),
        "{e:?}"
    );
}

/// Egress: a redirect from an allowed host to one that is not allowed is refused
/// (the target never sees a request), and plain http to a non-loopback host is
/// refused before any network access.
#[tokio::test]
async fn redirects_and_plain_http_cannot_escape_the_allow_list() {
    let logs = reauth_tests::logs();
    let (target, target_hits) = server(None).await;
    let (addr, _) = server(Some(target)).await;
    let host = Host::builder()
        .provider(
            "redirected",
            hostile("follow-redirect")
                .allow_host(addr.to_string())
                .config("url", format!("http://{addr}/redirect")),
        )
        .provider(
            "plain-http",
            hostile("read-body")
                .allow_host("idp.example.com:80")
                .config("url", "http://idp.example.com/token"),
        )
        .build()
        .unwrap();
    let e = host
        .get_credentials("redirected", &Request::new())
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("HttpRequestDenied") || e.to_string().contains("denied"),
        "{e}"
    );
    assert_eq!(
        target_hits.load(Ordering::SeqCst),
        0,
        "the redirect target was reached"
    );
    let e = host
        .get_credentials("plain-http", &Request::new())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("HttpRequestDenied"), "{e}");
    let logged = logs.contents();
    assert!(
        logged.contains("egress denied: host not in allowed_hosts"),
        "{logged}"
    );
    assert!(
        logged.contains("egress denied: plain http to a non-loopback host"),
        "{logged}"
    );
}

/// A panic (or a runaway loop) in `handle-security-error` is an error, and
/// `with_credentials` treats it as `fail`: no retry, no crash.
#[tokio::test]
async fn a_fault_in_handle_security_error_counts_as_fail() {
    reauth_tests::logs();
    let mut spin = hostile("ok").config("handle", "spin");
    spin.limits.timeout_ms = 300;
    let host = Host::builder()
        .provider("panics", hostile("ok").config("handle", "panic"))
        .provider("spins", spin)
        .build()
        .unwrap();
    let c = host
        .get_credentials("panics", &Request::new())
        .await
        .unwrap();
    let expired = SecurityError::new(SecurityErrorKind::TokenExpired).status(401);
    let e = host
        .handle_security_error("panics", &Request::new(), &c, &expired)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Plugin { provider, function: "handle-security-error", .. } if provider == "panics"),
        "{e:?}"
    );
    for name in ["panics", "spins"] {
        let mut runs = 0;
        let outcome: Result<(), OperationError<&str>> = host
            .with_credentials(name, &Request::new(), |_| {
                runs += 1;
                async {
                    Err(Rejection::Security {
                        error: SecurityError::new(SecurityErrorKind::TokenExpired),
                        source: "rejected",
                    })
                }
            })
            .await;
        match outcome {
            Err(OperationError::Rejected {
                decision, attempts, ..
            }) => {
                assert_eq!(decision, Decision::Fail, "{name}");
                assert_eq!(attempts, 1, "{name}");
            }
            other => panic!("{name}: {other:?}"),
        }
        assert_eq!(runs, 1, "{name}: the operation was not retried");
    }
}

/// Integrity: wrong sha256, a truncated file, a core module and a component for
/// another world are refused at load with a message saying what is wrong; the
/// other providers load and serve.
#[tokio::test]
async fn broken_or_foreign_plugins_are_refused_at_load() {
    reauth_tests::logs();
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&plugins().hostile).unwrap();
    let truncated = dir.path().join("truncated.wasm");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"#!/bin/sh\necho not wasm\n").unwrap();
    // The smallest valid core module: magic and version 1, no sections.
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let mut pinned = hostile("ok");
    pinned.sha256 = Some("0".repeat(64));
    let host = Host::builder()
        .provider("pinned-wrong", pinned)
        .provider("truncated", ProviderConfig::new(&truncated))
        .provider("garbage", ProviderConfig::new(&garbage))
        .provider("core", ProviderConfig::new(&core))
        .provider("other-world", ProviderConfig::new(&plugins().other_world))
        .provider("ok", hostile("ok"))
        .build()
        .unwrap();
    let status = host.status();
    let failed = |name: &str| match &status[name] {
        ProviderStatus::Failed(e) => e.clone(),
        other => panic!("{name} should have failed: {other:?}"),
    };
    let e = failed("pinned-wrong");
    assert!(
        e.contains("provider `pinned-wrong`") && e.contains("sha256 mismatch: expected 0000"),
        "{e}"
    );
    let e = failed("truncated");
    assert!(
        e.contains("provider `truncated`") && e.contains("not a valid WebAssembly component"),
        "{e}"
    );
    let e = failed("garbage");
    assert!(
        e.contains("not a WebAssembly file") && e.contains("truncated or the wrong file"),
        "{e}"
    );
    let e = failed("core");
    assert!(
        e.contains("core WebAssembly module, not a component"),
        "{e}"
    );
    let e = failed("other-world");
    assert!(
        e.contains(
            "missing export `reauth:provider/auth-provider@0.2.0` or `…@0.1.0` (it exports `run`)"
        ) && e.contains("imports the host does not offer: `acme:other/vault@1.0.0`"),
        "{e}"
    );
    assert!(matches!(status["ok"], ProviderStatus::Ready { .. }));
    let c = host.get_credentials("ok", &Request::new()).await.unwrap();
    assert_eq!(bearer(&c), "hostile-ok");
    let e = host
        .get_credentials("core", &Request::new())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotLoaded { .. }), "{e:?}");
}

/// The precompiled cache only serves an artifact for exactly the plugin's bytes:
/// an artifact swapped in from another plugin, or corrupted, is recompiled.
#[tokio::test]
async fn the_precompiled_cache_never_serves_an_artifact_for_other_bytes() {
    reauth_tests::logs();
    let cache = tempfile::tempdir().unwrap();
    let build = || {
        Host::builder()
            .cache_dir(cache.path())
            .provider("hostile", hostile("ok"))
            .provider(
                "static",
                ProviderConfig::new(&plugins().static_).config("token", "static-token"),
            )
            .build()
            .unwrap()
    };
    let from_cache = |host: &Host, name: &str| match &host.status()[name] {
        ProviderStatus::Ready { from_cache, .. } => *from_cache,
        other => panic!("{other:?}"),
    };
    let first = build();
    assert!(!from_cache(&first, "hostile"));
    let second = build();
    assert!(from_cache(&second, "hostile") && from_cache(&second, "static"));
    // Swap the static plugin's artifact (and meta) in for the hostile one's.
    let files: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let hostile_sha = match &second.status()["hostile"] {
        ProviderStatus::Ready { sha256, .. } => sha256.clone(),
        _ => unreachable!(),
    };
    let artifact = |prefix: &str, ext: &str| {
        files
            .iter()
            .find(|p| {
                let n = p.file_name().unwrap().to_string_lossy();
                n.starts_with(prefix) && n.ends_with(ext)
            })
            .unwrap()
            .clone()
    };
    let hostile_art = artifact(&hostile_sha, ".cwasm");
    let static_art = files
        .iter()
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            !n.starts_with(&hostile_sha) && n.ends_with(".cwasm")
        })
        .unwrap()
        .clone();
    writable(&hostile_art);
    std::fs::copy(&static_art, &hostile_art).unwrap();
    std::fs::copy(
        static_art.with_extension("meta.json"),
        hostile_art.with_extension("meta.json"),
    )
    .unwrap();
    let third = build();
    assert!(
        !from_cache(&third, "hostile"),
        "a swapped artifact must be recompiled"
    );
    assert_eq!(
        bearer(
            &third
                .get_credentials("hostile", &Request::new())
                .await
                .unwrap()
        ),
        "hostile-ok"
    );
    // Corrupt the (rewritten) artifact itself: recompiled again.
    let mut bytes = std::fs::read(&hostile_art).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    writable(&hostile_art);
    std::fs::write(&hostile_art, bytes).unwrap();
    let fourth = build();
    assert!(
        !from_cache(&fourth, "hostile"),
        "a corrupted artifact must be recompiled"
    );
    assert!(from_cache(&fourth, "static"));
}

/// The lines of this process's memory map that name `path`.
fn mappings_of(path: &std::path::Path) -> usize {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let path = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains(path.as_ref()))
        .count()
}

/// The one precompiled artifact in `dir`.
fn only_artifact(dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".cwasm"))
        .unwrap()
}

/// Open `path` for writing without waiting for a lease (`O_NONBLOCK`).
fn write_now(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(0o4000)
        .open(path)
}

/// Make an artifact (written 0400) writable again, as a user would before
/// damaging it (root needs not, but the tests may run as anyone).
fn writable(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Precompiled code is mapped from the cache (not copied) under a read lease:
/// truncating an artifact while a host runs its code, even in the middle of a
/// call, neither crashes the host nor changes what it runs. The writer waits
/// until the host has swapped the mapping for its own copy. A host built
/// afterwards notices the damage and recompiles, also when the artifact was
/// verified earlier and then rewritten in place at the same size.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[tokio::test]
async fn an_artifact_truncated_while_its_code_runs_does_not_crash_the_host() {
    use std::os::unix::fs::PermissionsExt;
    reauth_tests::logs();
    let cache = tempfile::tempdir().unwrap();
    if !reauth::runtime::artifacts_can_be_mapped(cache.path()) {
        eprintln!(
            "skipped: artifacts are not mapped here (file leases disabled or short, or {} on a file system without dependable leases)",
            cache.path().display()
        );
        return;
    }
    let build = || {
        Host::builder()
            .cache_dir(cache.path())
            .provider("sleep", hostile("sleep").config("sleep_ms", "1500"))
            .build()
            .unwrap()
    };
    let from_cache = |host: &Host| match &host.status()["sleep"] {
        ProviderStatus::Ready { from_cache, .. } => *from_cache,
        other => panic!("{other:?}"),
    };
    let compiled = build();
    assert!(!from_cache(&compiled));
    drop(compiled);
    let art = only_artifact(cache.path());
    let mode = std::fs::metadata(&art).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o400, "artifacts are written read-only");
    writable(&art);
    assert!(
        write_now(&art).is_ok(),
        "no host holds it: nothing to wait for"
    );

    // 1. A writer that would wait: the lease turns it away at once, the host
    //    swaps in its copy, the file is no longer mapped, and the host keeps
    //    running the code it loaded.
    let host = build();
    assert!(from_cache(&host));
    assert!(mappings_of(&art) > 0, "the code is mapped from {art:?}");
    let e = write_now(&art).expect_err("a host maps it: the lease holds writers");
    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while mappings_of(&art) > 0 {
        assert!(Instant::now() < deadline, "the mapping was never swapped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    std::fs::write(&art, b"").unwrap();
    let c = host
        .get_credentials("sleep", &Request::new().subject("after-cut"))
        .await
        .unwrap();
    assert_eq!(bearer(&c), "slept");
    drop(host);

    // 2. Truncated in the middle of a call (the plugin sleeps in a host call
    //    while the file is cut, then runs on): the call completes.
    let host = build();
    assert!(
        !from_cache(&host),
        "a truncated artifact must be recompiled"
    );
    drop(host);
    let art = only_artifact(cache.path());
    let host = Arc::new(build());
    assert!(from_cache(&host));
    assert!(mappings_of(&art) > 0);
    let call = {
        let host = host.clone();
        tokio::spawn(async move {
            host.get_credentials("sleep", &Request::new().subject("during-cut"))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    writable(&art);
    let cut = {
        let art = art.clone();
        tokio::task::spawn_blocking(move || {
            // A plain open for writing, truncating: waits for the lease.
            std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&art)
                .map(drop)
        })
    };
    tokio::time::timeout(Duration::from_secs(30), cut)
        .await
        .expect("the truncating writer was let through")
        .unwrap()
        .unwrap();
    assert_eq!(std::fs::metadata(&art).unwrap().len(), 0);
    assert_eq!(mappings_of(&art), 0);
    let c = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(bearer(&c), "slept");
    drop(host);

    // 3. Verified once, then trusted by its stamp: once it has settled, a load
    //    records the stamp; a rewrite in place at the same size changes it, so
    //    the next load hashes, finds the damage and recompiles.
    let host = build();
    assert!(!from_cache(&host));
    drop(host);
    let art = only_artifact(cache.path());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let host = build();
    assert!(from_cache(&host));
    drop(host);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(art.with_extension("meta.json")).unwrap()).unwrap();
    assert!(
        meta["verified"].is_object(),
        "a settled artifact's stamp is recorded: {meta}"
    );
    let mut bytes = std::fs::read(&art).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    writable(&art);
    std::fs::write(&art, &bytes).unwrap();
    let host = build();
    assert!(
        !from_cache(&host),
        "an artifact changed in place must be recompiled"
    );

    // 4. Dropping a host releases its lease (the guard may hold the entry for
    //    one more check).
    let art = only_artifact(cache.path());
    let mapped = build();
    assert!(from_cache(&mapped));
    drop(mapped);
    drop(host);
    let deadline = Instant::now() + Duration::from_secs(5);
    while mappings_of(&art) > 0 {
        assert!(
            Instant::now() < deadline,
            "still mapped after its host went"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writable(&art);
    while let Err(e) = write_now(&art) {
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
        assert!(Instant::now() < deadline, "the lease outlived its host");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An artifact compiled by an engine with other settings (here: fuel metering
/// off) is rejected by wasmtime's header check and recompiled, even when its file
/// and meta are put where this engine looks.
#[tokio::test]
async fn an_artifact_from_another_engine_config_is_recompiled() {
    reauth_tests::logs();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let build = |dir: &std::path::Path, fuel: bool| {
        Host::builder()
            .cache_dir(dir)
            .runtime_options(reauth::runtime::RuntimeOptions {
                consume_fuel: fuel,
                ..Default::default()
            })
            .provider("hostile", hostile("ok"))
            .build()
            .unwrap()
    };
    build(a.path(), false);
    build(b.path(), true);
    let only = |dir: &std::path::Path, ext: &str| {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().ends_with(ext))
            .unwrap()
    };
    let (a_art, b_art) = (only(a.path(), ".cwasm"), only(b.path(), ".cwasm"));
    assert_ne!(
        a_art.file_name(),
        b_art.file_name(),
        "engine settings are part of the key"
    );
    // Put the fuel-less artifact where the fuel engine looks, with a meta that
    // vouches for it.
    writable(&b_art);
    std::fs::copy(&a_art, &b_art).unwrap();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b_art.with_extension("meta.json")).unwrap()).unwrap();
    let forged = serde_json::json!({
        "source_sha256": meta["source_sha256"],
        "artifact_sha256": reauth_tests::sha256_hex(&std::fs::read(&a_art).unwrap()),
        "engine": meta["engine"],
    });
    std::fs::write(b_art.with_extension("meta.json"), forged.to_string()).unwrap();
    let host = build(b.path(), true);
    match &host.status()["hostile"] {
        ProviderStatus::Ready { from_cache, .. } => assert!(!from_cache),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        bearer(
            &host
                .get_credentials("hostile", &Request::new())
                .await
                .unwrap()
        ),
        "hostile-ok"
    );
}

/// A provider that keeps faulting is cooled down: calls fail fast without running
/// the plugin, the status reports it, and after the cool-down one trial call runs.
#[tokio::test]
async fn a_provider_that_keeps_faulting_is_cooled_down() {
    reauth_tests::logs();
    let mut faulty = hostile("recurse-native");
    faulty.circuit_breaker.faults = 2;
    faulty.circuit_breaker.cooldown_ms = 400;
    let host = Host::builder()
        .provider("faulty", faulty)
        .provider("ok", hostile("ok"))
        .build()
        .unwrap();
    // (The pauses let the cache's own 1 ms backoff pass, so that every call
    // reaches the provider.)
    for _ in 0..2 {
        let e = host
            .get_credentials("faulty", &Request::new())
            .await
            .unwrap_err();
        assert_eq!(limit_of(&e), Some(LimitKind::Stack), "{e:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = host
        .get_credentials("faulty", &Request::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::CoolingDown { provider, faults: 2, .. } if provider == "faulty"),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("cooling down after 2 consecutive faults"),
        "{e}"
    );
    assert_eq!(
        host.plugin_calls("faulty"),
        2,
        "no plugin call while cooling down"
    );
    match &host.status()["faulty"] {
        ProviderStatus::Ready { breaker, .. } => {
            assert_eq!(breaker.consecutive_faults, 2);
            assert!(breaker.cooling_down_for.is_some());
        }
        other => panic!("{other:?}"),
    }
    // Other providers are unaffected.
    host.get_credentials("ok", &Request::new()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The trial call runs (and faults again: the cool-down doubles).
    let e = host
        .get_credentials("faulty", &Request::new())
        .await
        .unwrap_err();
    assert_eq!(limit_of(&e), Some(LimitKind::Stack), "{e:?}");
    assert_eq!(host.plugin_calls("faulty"), 3);
}

fn write_config(path: &std::path::Path, providers: &str) {
    // Write-then-rename, like deployment tools do.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, providers).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Hot reload through the library: a broken new build keeps the old version
/// serving, a fixed one takes over, an unchanged provider keeps its cache, a
/// removed one stops, and a call in flight finishes on its own version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_working_versions_and_applies_good_ones() {
    reauth_tests::logs();
    let (addr, _) = server(None).await;
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("p.wasm");
    std::fs::copy(&plugins().hostile, &plugin).unwrap();
    let testkit = plugins().testkit.display().to_string();
    let config = dir.path().join("reauth.toml");
    let providers = |token: &str, slow_path: &str, with_gone: bool| {
        let mut s = format!(
            "[providers.changing]\nplugin = \"p.wasm\"\nconfig = {{ mode = \"ok\", token = \"{token}\" }}\n\
             [providers.stable]\nplugin = \"p.wasm\"\nconfig = {{ mode = \"ok\", token = \"stable\" }}\n\
             [providers.fetching]\nplugin = {testkit:?}\nallowed_hosts = [\"{addr}\"]\n\
             config = {{ mode = \"fetch\", url = \"http://{addr}{slow_path}\" }}\n"
        );
        if with_gone {
            s.push_str("[providers.gone]\nplugin = \"p.wasm\"\nconfig = { mode = \"ok\" }\n");
        }
        s
    };
    write_config(&config, &providers("v1", "/slow", true));
    let host = Host::from_config_file(&config).unwrap();
    let get = |name: &'static str| {
        let host = host.clone();
        async move { host.get_credentials(name, &Request::new()).await }
    };
    assert_eq!(bearer(&get("changing").await.unwrap()), "v1");
    assert_eq!(bearer(&get("stable").await.unwrap()), "stable");
    get("gone").await.unwrap();

    // Nothing changed: nothing reloaded.
    let report = host.reload_from_file().unwrap();
    assert!(report.is_noop(), "{report:?}");
    assert_eq!(report.unchanged.len(), 4);

    // A broken build of the shared plugin (truncated): every provider using it
    // keeps its old version, and says so.
    let good = std::fs::read(&plugin).unwrap();
    std::fs::write(&plugin, &good[..good.len() / 3]).unwrap();
    let report = host.reload_from_file().unwrap();
    let failed: Vec<&str> = report.failed.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(failed, ["changing", "gone", "stable"], "{report:?}");
    assert!(
        report.failed[0]
            .1
            .contains("not a valid WebAssembly component"),
        "{report:?}"
    );
    assert_eq!(bearer(&get("changing").await.unwrap()), "v1");
    match &host.status()["changing"] {
        ProviderStatus::Ready {
            reload_error: Some(e),
            ..
        } => {
            assert!(e.contains("not a valid WebAssembly component"), "{e}")
        }
        other => panic!("{other:?}"),
    }

    // Fixed plugin, new config for `changing`, `gone` removed, while a slow call
    // of `fetching` is in flight.
    std::fs::write(&plugin, &good).unwrap();
    let in_flight = tokio::spawn(get("fetching"));
    tokio::time::sleep(Duration::from_millis(150)).await;
    write_config(&config, &providers("v2", "/fast", false));
    let reloading = host.clone();
    let report = tokio::task::spawn_blocking(move || reloading.reload_from_file())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.updated, ["changing", "fetching"], "{report:?}");
    assert_eq!(report.removed, ["gone"]);
    assert_eq!(report.unchanged, ["stable"]);
    assert!(report.failed.is_empty(), "{report:?}");
    // The call that started on the old version finished on it.
    assert_eq!(bearer(&in_flight.await.unwrap().unwrap()), "slow-version");
    assert_eq!(bearer(&get("fetching").await.unwrap()), "fast-version");
    assert_eq!(bearer(&get("changing").await.unwrap()), "v2");
    // The unchanged provider kept its cache: still one plugin call.
    assert_eq!(bearer(&get("stable").await.unwrap()), "stable");
    assert_eq!(host.plugin_calls("stable"), 1);
    let e = get("gone").await.unwrap_err();
    assert!(
        matches!(&e, Error::UnknownProvider { provider } if provider == "gone"),
        "{e:?}"
    );

    // A config that does not parse changes nothing.
    write_config(&config, "[providers.changing\n");
    let e = host.reload_from_file().unwrap_err();
    assert!(e.to_string().contains("reauth.toml"), "{e}");
    assert_eq!(bearer(&get("changing").await.unwrap()), "v2");
}

// ---------------------------------------------------------------------------
// Hardening review (issue #14): host-side resources, wrong answers, secrets in
// plugin-controlled text. Each test fails on the behaviour the review found.

/// Resident set size of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Item 3: 8,192 `wasi:http` fields of ~12 KB each kept alive by one call grew the
/// host by ~1 GiB; the host's objects for one call are now bounded
/// (`limits.max_host_resources`, 64 KiB per fields object) and the call fails with
/// a limit naming the key. Item 6: a loop of 64 MiB `get-random-bytes` calls
/// overran its deadline; each call is bounded now.
#[tokio::test]
async fn host_side_objects_and_random_bytes_are_bounded_per_call() {
    reauth_tests::logs();
    let host = Host::builder()
        .provider("fields", hostile("fields-flood"))
        .provider("random", hostile("random-flood"))
        .provider("ok", hostile("ok"))
        .build()
        .unwrap();
    let before = rss_kib();
    let e = host
        .get_credentials("fields", &Request::new())
        .await
        .unwrap_err();
    assert_eq!(limit_of(&e), Some(LimitKind::HostResources), "{e}");
    assert!(e.to_string().contains("limits.max_host_resources"), "{e}");
    let after = rss_kib();
    eprintln!("fields flood: RSS {} → {} MiB", before / 1024, after / 1024);
    let started = Instant::now();
    let e = host
        .get_credentials("random", &Request::new())
        .await
        .unwrap_err();
    assert_eq!(limit_of(&e), Some(LimitKind::HostResources), "{e}");
    eprintln!("random flood stopped after {:?}", started.elapsed());
    // The neighbour is unaffected.
    let c = host.get_credentials("ok", &Request::new()).await.unwrap();
    assert_eq!(bearer(&c), "hostile-ok");
}

/// Item 4: one call kept ~30,000 requests in flight to an address that never
/// answers and ran the host out of file descriptors. Requests in flight are
/// capped per call (one more fails the call with a limit) and per provider.
#[tokio::test]
async fn requests_in_flight_are_capped_per_call() {
    reauth_tests::logs();
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let (counted, seen_closed) = (accepted.clone(), closed.clone());
    let holder = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let seen_closed = seen_closed.clone();
            // Never answer; notice when the host closes its end.
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt as _;
                let mut buf = [0u8; 1024];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                seen_closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    let mut flood = hostile("request-flood")
        .config("authority", addr.to_string())
        .config("count", "30000")
        .allow_host(addr.to_string());
    flood.limits.timeout_ms = 3000;
    let host = Host::builder()
        .provider("flood", flood)
        .provider("ok", hostile("ok"))
        .build()
        .unwrap();
    let e = host
        .get_credentials("flood", &Request::new())
        .await
        .unwrap_err();
    assert_eq!(limit_of(&e), Some(LimitKind::RequestsInFlight), "{e}");
    assert!(
        e.to_string().contains("limits.max_requests_in_flight"),
        "{e}"
    );
    let peak_connections = accepted.load(Ordering::SeqCst);
    assert!(
        peak_connections <= 8,
        "{peak_connections} connections reached the server (cap 8)"
    );
    // The call's sockets went with its Store: the server sees every one closed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while closed.load(Ordering::SeqCst) < peak_connections && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        closed.load(Ordering::SeqCst),
        peak_connections,
        "connections left open after the call"
    );
    let c = host.get_credentials("ok", &Request::new()).await.unwrap();
    assert_eq!(bearer(&c), "hostile-ok");
    holder.abort();
}

/// Item 5: 300 concurrent calls to a provider that only sleeps took all of the
/// engine's instances; 40 % of another provider's calls failed, and those
/// failures opened the *good* provider's breaker. Each provider has a bulkhead
/// now (its reservation of the pool): the sleeper's extra calls wait, then fail
/// with `Error::Busy` (not a fault), and the neighbour never fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_provider_cannot_take_the_instances_another_one_needs() {
    reauth_tests::logs();
    let mut slow = hostile("sleep").config("sleep_ms", "1500");
    slow.limits.queue_timeout_ms = 300;
    let host = Host::builder()
        .provider("slow", slow)
        .provider("ok", hostile("ok"))
        .build()
        .unwrap();
    let mut slow_calls = tokio::task::JoinSet::new();
    for i in 0..300 {
        let host = host.clone();
        slow_calls.spawn(async move {
            host.get_credentials("slow", &Request::new().subject(format!("s{i}")))
                .await
        });
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut ok_calls = tokio::task::JoinSet::new();
    for i in 0..200 {
        let host = host.clone();
        ok_calls.spawn(async move {
            host.get_credentials("ok", &Request::new().subject(format!("o{i}")))
                .await
        });
    }
    let mut ok_failures = Vec::new();
    while let Some(r) = ok_calls.join_next().await {
        if let Err(e) = r.unwrap() {
            ok_failures.push(e.to_string());
        }
    }
    let (mut served, mut busy, mut other) = (0, 0, Vec::new());
    while let Some(r) = slow_calls.join_next().await {
        match r.unwrap() {
            Ok(_) => served += 1,
            Err(Error::Busy { .. }) => busy += 1,
            Err(e) => other.push(e.to_string()),
        }
    }
    assert!(
        ok_failures.is_empty(),
        "the neighbour failed: {ok_failures:?}"
    );
    assert!(other.is_empty(), "unexpected errors: {other:?}");
    assert!(served >= 8 && busy > 0, "served {served}, busy {busy}");
    for name in ["ok", "slow"] {
        match &host.status()[name] {
            ProviderStatus::Ready { breaker, .. } => {
                assert_eq!(breaker.consecutive_faults, 0, "{name}: {breaker:?}")
            }
            other => panic!("{other:?}"),
        }
    }
    // A reservation that does not fit the pool fails to load, naming the keys.
    let mut greedy = hostile("ok");
    greedy.limits.max_concurrent_calls = 2000;
    let host = Host::builder()
        .provider("greedy", greedy)
        .provider("ok", hostile("ok"))
        .build()
        .unwrap();
    match &host.status()["greedy"] {
        ProviderStatus::Failed(why) => {
            assert!(why.contains("runtime.max_instances"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert!(host.get_credentials("ok", &Request::new()).await.is_ok());
}

/// Items 1, 9 and 12: a JWT `exp` of 2^64−1 panicked the host; credentials that
/// had already expired (by `expires-at` or by their JWT `exp`) were handed out; a
/// provider switching principal for one key was served silently.
#[tokio::test]
async fn wrong_answers_from_a_plugin_are_refused_not_passed_through() {
    reauth_tests::logs();
    let host = Host::builder()
        .provider("max-exp", hostile("jwt-max-exp"))
        .provider("expired", hostile("expired"))
        .provider("jwt-expired", hostile("jwt-expired"))
        .provider("flip", hostile("principal-flip"))
        .build()
        .unwrap();
    let c = host
        .get_credentials("max-exp", &Request::new())
        .await
        .unwrap();
    assert!(c.expires_at.is_some());
    for name in ["expired", "jwt-expired"] {
        let e = host
            .get_credentials(name, &Request::new())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Contract { .. }), "{name}: {e}");
    }
    let request = Request::new();
    let first = host.get_credentials("flip", &request).await.unwrap();
    assert_eq!(first.principal.as_deref(), Some("user-0"));
    let error = SecurityError::new(SecurityErrorKind::Unauthorized).status(401);
    let decision = host
        .handle_security_error("flip", &request, &first, &error)
        .await
        .unwrap();
    assert_eq!(decision, Decision::RefreshAndRetry);
    let e = host.get_credentials("flip", &request).await.unwrap_err();
    assert!(matches!(e, Error::Contract { .. }), "{e}");
    assert!(e.to_string().contains("another principal"), "{e}");
    assert_eq!(host.metrics().provider("flip").contract_violations(), 1);
}

/// Item 10: a `retry-after` of 2^64−1 ms was passed on unclamped. Item 11: a
/// plugin that caught the output limit and reported `unavailable` came back as
/// its own error, not as the limit, and was not counted as a fault.
#[tokio::test]
async fn retry_after_is_clamped_and_an_output_limit_is_always_a_limit() {
    reauth_tests::logs();
    let host = Host::builder()
        .provider("wait", hostile("ok").config("handle", "retry-after-max"))
        .provider("chatty", hostile("stderr-until-error"))
        .build()
        .unwrap();
    let request = Request::new();
    let c = host.get_credentials("wait", &request).await.unwrap();
    let error = SecurityError::new(SecurityErrorKind::Unauthorized).status(401);
    let decision = host
        .handle_security_error("wait", &request, &c, &error)
        .await
        .unwrap();
    let max = reauth::RetryPolicy::default().max_retry_after();
    assert_eq!(decision, Decision::RetryAfter(max));
    let e = host
        .get_credentials("chatty", &Request::new())
        .await
        .unwrap_err();
    assert_eq!(limit_of(&e), Some(LimitKind::Output), "{e}");
    match &host.status()["chatty"] {
        ProviderStatus::Ready { breaker, .. } => assert_eq!(breaker.consecutive_faults, 1),
        other => panic!("{other:?}"),
    }
}

/// Item 7: a config secret placed in a URL reached the `egress` log lines, and a
/// secret used as a header name reached the error (and the sidecar's 502 body).
/// Item 8: every config value of 6+ characters was redacted, non-secrets too.
/// Item 13: `http://127.0.0.1:P@localhost:Q/` passed the check for `localhost:Q`.
#[tokio::test]
async fn plugin_controlled_text_is_redacted_and_urls_are_parsed_once() {
    let logs = reauth_tests::logs();
    const SECRET: &str = "hush-7f3a9c-secret";
    const HEADER_SECRET: &str = "hush 2b8e header";
    reauth_tests::record_secret(SECRET);
    reauth_tests::record_secret(HEADER_SECRET);
    let (addr, hits) = server(None).await;
    let host = Host::builder()
        .provider("url", hostile("secret-in-url").config("secret", SECRET))
        .provider(
            "header",
            hostile("secret-header-name")
                .config("secret", HEADER_SECRET)
                .config("url", format!("http://{addr}/target"))
                .allow_host(addr.to_string()),
        )
        .provider(
            "userinfo",
            hostile("read-body")
                .config(
                    "url",
                    format!("http://127.0.0.1:1@localhost:{}/target", addr.port()),
                )
                .allow_host(format!("localhost:{}", addr.port())),
        )
        .provider("plain", hostile("no-such-mode-value"))
        .build()
        .unwrap();
    let e = host
        .get_credentials("url", &Request::new())
        .await
        .unwrap_err();
    assert!(!e.to_string().contains(SECRET), "{e}");
    let e = host
        .get_credentials("header", &Request::new())
        .await
        .unwrap_err();
    assert!(!e.to_string().contains(HEADER_SECRET), "{e}");
    let e = host
        .get_credentials("userinfo", &Request::new())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("Denied"), "{e}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the userinfo URL got through"
    );
    // A plain config value (not a secret by source, name or declaration) stays
    // readable in messages.
    let e = host
        .get_credentials("plain", &Request::new())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no-such-mode-value"), "{e}");
    let logged = logs.contents();
    assert!(logged.contains("egress denied"), "no egress log line");
    assert!(!logged.contains(SECRET), "the URL secret reached the log");
    assert!(
        !logged.contains(HEADER_SECRET),
        "the header secret reached the log"
    );
}

/// A hostile `describe` (contract 0.2) is contained like any other call: a trap,
/// a loop, an oversized or forged descriptor fail that provider only, and
/// `describe` can neither reach the network nor touch state.
#[tokio::test]
async fn a_hostile_describe_fails_its_provider_only_and_does_no_io() {
    let logs = reauth_tests::logs();
    let endpoint =
        reauth_tests::peers::SlowEndpoint::start("not-for-describe", Duration::ZERO).await;
    let state_dir = tempfile::tempdir().unwrap();
    let hostile = |describe: &str| {
        let mut p = ProviderConfig::new(&plugins().hostile)
            .config("mode", "ok")
            .config("describe", describe)
            .allow_host(endpoint.authority())
            .config("url", endpoint.url.clone());
        p.allow_http = true;
        p.limits.timeout_ms = 1000;
        p
    };
    let host = Host::builder()
        .state_dir(state_dir.path())
        .provider("d-trap", hostile("trap"))
        .provider("d-spin", hostile("spin"))
        .provider("d-huge", hostile("huge"))
        .provider("d-forged", hostile("forged"))
        .provider("d-io", hostile("io"))
        .provider(
            "d-leak",
            hostile("leak").config("tenant_hint", "describe-leak-8e1f2a"),
        )
        .provider("ok", hostile("none"))
        .build()
        .unwrap();
    let err = |name: &'static str| {
        let host = &host;
        async move {
            host.get_credentials(name, &Request::new())
                .await
                .expect_err(name)
                .to_string()
        }
    };
    let trap = err("d-trap").await;
    assert!(
        trap.contains("plugin failed during `get-credentials`"),
        "{trap}"
    );
    // A failed `describe` never said which keys are secret: every config value
    // is redacted from what it printed (the name rule alone would miss
    // `tenant_hint`).
    let leak = err("d-leak").await;
    assert!(
        leak.contains("plugin failed during `get-credentials`"),
        "{leak}"
    );
    let text = logs.contents();
    assert!(
        text.contains("hostile describe: tenant_hint = "),
        "the output was logged"
    );
    assert!(
        !text.contains("describe-leak-8e1f2a"),
        "a config value printed by a failed describe was logged"
    );
    let spin = err("d-spin").await;
    assert!(spin.contains("exceeded its 1000 ms timeout"), "{spin}");
    let huge = err("d-huge").await;
    assert!(
        huge.contains("describe returned an unusable descriptor: its config schema declares 100000 keys (at most 256)"),
        "{huge}"
    );
    let forged = err("d-forged").await;
    assert!(forged.contains("control or bidi characters"), "{forged}");
    assert!(
        !logs
            .contents()
            .contains("\n2026-11-28T00:00:00Z ERROR forged line")
    );
    // `describe` made a request and wrote state: both refused, nothing reached.
    let c = host.get_credentials("d-io", &Request::new()).await.unwrap();
    assert_eq!(bearer(&c), "hostile-ok");
    match &host.status()["d-io"] {
        ProviderStatus::Ready {
            descriptor: Some(d),
            ..
        } => assert_eq!(d.version, "sent=false stored=false"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        endpoint.hits.load(Ordering::SeqCst),
        0,
        "describe reached the network"
    );
    let stored = std::fs::read_dir(state_dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with("d-io"));
    assert!(!stored, "describe wrote state");
    // The well-behaved provider of the same plugin is served throughout.
    assert_eq!(
        bearer(&host.get_credentials("ok", &Request::new()).await.unwrap()),
        "hostile-ok"
    );
    let status = host.check().await;
    for name in ["d-trap", "d-huge", "d-forged"] {
        assert!(
            matches!(status[name], ProviderStatus::Failed(_)),
            "{name}: {:?}",
            status[name]
        );
    }
}

/// Nothing a call leaves in linear memory reaches a later instance in the pool,
/// of the same provider or another one (the slot is reset; wasmtime's
/// `PAGEMAP_SCAN` reset, which can skip a swapped-out dirty page, is not used).
/// The writer leaves 3 MiB of a pattern computed at run time; the reader grows
/// its memory and scans all of it. The control shows the scan finds the pattern
/// when it is there.
#[tokio::test]
async fn memory_a_call_leaves_never_reaches_the_next_instance() {
    reauth_tests::logs();
    let host = Host::builder()
        .provider("writer", hostile("leave-marker"))
        .provider("reader", hostile("find-marker"))
        .provider("control", hostile("leave-and-find-marker"))
        .build()
        .unwrap();
    let get = |name: &'static str, subject: String| {
        let host = host.clone();
        async move {
            let c = host
                .get_credentials(name, &Request::new().subject(subject))
                .await
                .unwrap();
            bearer(&c)
        }
    };
    let control = get("control", "c".into()).await;
    assert!(control.starts_with("found-at-"), "{control}");
    for round in 0..4 {
        let left = get("writer", format!("w{round}")).await;
        assert!(left.starts_with("left-at-"), "{left}");
        let seen = get("reader", format!("r{round}")).await;
        assert!(seen.starts_with("clean-"), "round {round}: {seen}");
        // The writer's own next instance (same component, likely the same slot).
        let again = get("control", format!("c{round}")).await;
        assert!(again.starts_with("found-at-"), "{again}");
        let seen = get("reader", format!("r{round}b")).await;
        assert!(seen.starts_with("clean-"), "round {round}: {seen}");
    }
}
