//! The re-authentication engine through the host with real plugins: single-flight
//! herds, compare-and-invalidate bursts, `with_credentials` decisions, and an
//! end-to-end loop against the dev issuer and a JWT-validating resource server.

use reauth::retry::{OperationError, Rejection};
use reauth::{
    Credential, Credentials, Host, ProviderConfig, Request, SecurityError, SecurityErrorKind,
    classify,
};
use reauth_cli::issuer::{DevClient, DevIssuer, DevIssuerConfig};
use reauth_tests::plugins;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn token(c: &Credentials) -> String {
    match &c.credential {
        Credential::Bearer(t) => t.expose().to_string(),
        other => panic!("{other:?}"),
    }
}

fn counter_host() -> Host {
    Host::builder()
        .provider(
            "counter",
            ProviderConfig::new(&plugins().testkit).config("mode", "counter"),
        )
        .build()
        .unwrap()
}

fn expired() -> SecurityError {
    SecurityError::new(SecurityErrorKind::TokenExpired)
        .status(401)
        .code("invalid_token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herd_of_10000_callers_makes_one_plugin_call() {
    reauth_tests::logs();
    let host = counter_host();
    let tasks: Vec<_> = (0..10_000)
        .map(|_| {
            let host = host.clone();
            tokio::spawn(async move {
                token(
                    &host
                        .get_credentials("counter", &Request::new())
                        .await
                        .unwrap(),
                )
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), "count-1-");
    }
    assert_eq!(host.plugin_calls("counter"), 1);
}

/// A provider handle serves what the host serves (a shared credential: hits
/// copy nothing), follows reloads, fails as the host does while its provider is
/// gone, and serves again when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_handle_follows_reloads_and_shares_the_cached_credential() {
    reauth_tests::logs();
    let config = |token: &str| {
        let mut c = reauth::HostConfig::default();
        c.providers.insert(
            "api".into(),
            ProviderConfig::new(&plugins().static_).config("token", token),
        );
        c
    };
    let host = Host::builder_from_config(config("tok-1"))
        .build_async()
        .await
        .unwrap();
    assert!(matches!(
        host.handle("nope"),
        Err(reauth::Error::UnknownProvider { .. })
    ));
    let handle = host.handle("api").unwrap();
    assert_eq!(handle.name(), "api");
    let r = Request::new().scope("orders:read");
    let first = handle.get_credentials(&r).await.unwrap();
    assert_eq!(token(&first), "tok-1");
    let (again, lookup) = handle.get_credentials_traced(&r).await.unwrap();
    assert_eq!(lookup, reauth::Lookup::Hit);
    assert_eq!(*again, *first);
    let by_name = host.get_credentials("api", &r).await.unwrap();
    assert_eq!(
        *by_name, *first,
        "the host and the handle share one cache entry"
    );
    assert_eq!(host.plugin_calls("api"), 1);

    host.reload(config("tok-2")).unwrap();
    assert_eq!(token(&handle.get_credentials(&r).await.unwrap()), "tok-2");

    host.reload(reauth::HostConfig::default()).unwrap();
    let gone = handle.get_credentials(&r).await.unwrap_err();
    assert!(
        matches!(gone, reauth::Error::UnknownProvider { .. }),
        "{gone:?}"
    );

    host.reload(config("tok-3")).unwrap();
    assert_eq!(token(&handle.get_credentials(&r).await.unwrap()), "tok-3");
    assert!(format!("{handle:?}").contains("api"));
}

/// `get_credentials`' future does nothing until polled, completes a fresh hit in
/// its first poll (by name and through a handle), is `Send` and `Unpin`, and
/// panics when polled after it completed (as an `async fn`'s does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_hit_completes_in_the_first_poll_and_the_future_is_lazy() {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    reauth_tests::logs();
    fn send_unpin<F: Future + Send + Unpin>(f: F) -> F {
        f
    }
    let host = Host::builder()
        .provider(
            "api",
            ProviderConfig::new(&plugins().static_).config("token", "lazy-token"),
        )
        .build_async()
        .await
        .unwrap();
    let handle = host.handle("api").unwrap();
    let r = Request::new().scope("orders:read");
    let mut cx = Context::from_waker(Waker::noop());

    let unpolled = send_unpin(host.get_credentials("api", &r));
    let unpolled_traced = send_unpin(handle.get_credentials_traced(&r));
    drop((unpolled, unpolled_traced));
    assert_eq!(host.plugin_calls("api"), 0, "an unpolled future fetched");

    let first = send_unpin(handle.get_credentials(&r)).await.unwrap();
    assert_eq!(host.plugin_calls("api"), 1);

    let mut by_name = send_unpin(host.get_credentials_traced("api", &r));
    match std::pin::Pin::new(&mut by_name).poll(&mut cx) {
        Poll::Ready(Ok((c, reauth::Lookup::Hit))) => assert_eq!(*c, *first),
        other => panic!("a hit by name did not complete in its first poll: {other:?}"),
    }
    let mut through_handle = send_unpin(handle.get_credentials_traced(&r));
    match std::pin::Pin::new(&mut through_handle).poll(&mut cx) {
        Poll::Ready(Ok((c, reauth::Lookup::Hit))) => assert_eq!(*c, *first),
        other => panic!("a hit through a handle did not complete in its first poll: {other:?}"),
    }
    let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = std::pin::Pin::new(&mut through_handle).poll(&mut cx);
    }));
    assert!(again.is_err(), "a completed future polled again must panic");
    assert_eq!(host.plugin_calls("api"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_1000_rejections_of_the_same_token_causes_one_refresh() {
    reauth_tests::logs();
    // A retry budget that lets every one of the 1000 operations re-run (the
    // default, a fifth of the traffic plus 10/s, would refuse most of them: see
    // the retry-budget test below).
    let mut p = ProviderConfig::new(&plugins().testkit).config("mode", "counter");
    p.retry.retry_ratio = 1.0;
    let host = Host::builder().provider("counter", p).build().unwrap();
    let old = token(
        &host
            .get_credentials("counter", &Request::new())
            .await
            .unwrap(),
    );
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let (host, old) = (host.clone(), old.clone());
            tokio::spawn(async move {
                host.with_credentials("counter", &Request::new(), |c| {
                    let old = old.clone();
                    async move {
                        if token(&c) == old {
                            Err(Rejection::security(expired(), "401"))
                        } else {
                            Ok(token(&c))
                        }
                    }
                })
                .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), "count-2-");
    }
    assert_eq!(host.plugin_calls("counter"), 2);
}

#[tokio::test]
async fn with_credentials_follows_the_providers_decisions_within_budget() {
    reauth_tests::logs();
    // Expired once: one re-authentication, then success.
    let host = counter_host();
    let runs = AtomicUsize::new(0);
    let out = host
        .with_credentials("counter", &Request::new(), |c| {
            let n = runs.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Err(Rejection::security(expired(), "expired"))
                } else {
                    Ok::<_, Rejection<&str>>(token(&c))
                }
            }
        })
        .await
        .unwrap();
    assert_eq!(out, "count-2-");
    assert_eq!(host.plugin_calls("counter"), 2);

    // Expired twice: the original error after the budget of one re-authentication.
    let host = counter_host();
    let e = host
        .with_credentials("counter", &Request::new(), |_c| async {
            Err::<(), _>(Rejection::security(expired(), "server says expired"))
        })
        .await
        .unwrap_err();
    match e {
        OperationError::Rejected {
            source,
            error,
            attempts,
            reauths,
            ..
        } => {
            assert_eq!((source, attempts, reauths), ("server says expired", 2, 1));
            assert_eq!(error.kind, SecurityErrorKind::TokenExpired);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        host.plugin_calls("counter"),
        2,
        "one initial fetch + one re-authentication"
    );

    // Forbidden: the provider says fail, no retry, no fetch.
    let host = counter_host();
    let e = host
        .with_credentials("counter", &Request::new(), |_c| async {
            Err::<(), _>(Rejection::security(
                SecurityError::new(SecurityErrorKind::Forbidden).status(403),
                "403",
            ))
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            OperationError::Rejected {
                attempts: 1,
                reauths: 0,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(host.plugin_calls("counter"), 1);

    // retry-after (the fixture answers 10 ms for `other`): same credential, waits
    // honoured, at most `max_waits` (3) of them.
    let host = counter_host();
    let seen = std::sync::Mutex::new(Vec::new());
    let e = host
        .with_credentials("counter", &Request::new(), |c| {
            seen.lock().unwrap().push(token(&c));
            async {
                Err::<(), _>(Rejection::security(
                    SecurityError::new(SecurityErrorKind::Other),
                    "busy",
                ))
            }
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            OperationError::Rejected {
                attempts: 4,
                reauths: 0,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(*seen.lock().unwrap(), vec!["count-1-"; 4]);
    assert_eq!(host.plugin_calls("counter"), 1);

    // Other failures pass straight through.
    let e = host
        .with_credentials("counter", &Request::new(), |_c| async {
            Err::<(), _>(Rejection::Other("disk full"))
        })
        .await
        .unwrap_err();
    assert!(matches!(e, OperationError::Failed("disk full")));
}

/// A resource server that validates ES256 JWTs against the issuer's JWKS (fetched
/// over HTTP at start) and answers RFC 6750 errors.
async fn resource_server(issuer: &DevIssuer) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use axum::http::{HeaderMap, StatusCode, header};
    let jwks: serde_json::Value =
        serde_json::from_str(&http_get(issuer.addr(), "/jwks", None).await.1).unwrap();
    let jwk = &jwks["keys"][0];
    let key = jsonwebtoken::DecodingKey::from_ec_components(
        jwk["x"].as_str().unwrap(),
        jwk["y"].as_str().unwrap(),
    )
    .unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.leeway = 0;
    validation.set_issuer(&[issuer.url()]);
    validation.set_audience(&["api"]);
    let state = Arc::new((key, validation));
    let app = axum::Router::new().route(
        "/orders",
        axum::routing::get(move |headers: HeaderMap| {
            let state = state.clone();
            async move {
                let token = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                let challenge = |description: &str| {
                    [(
                        header::WWW_AUTHENTICATE,
                        format!(
                            "Bearer error=\"invalid_token\", error_description=\"{description}\""
                        ),
                    )]
                };
                match token
                    .map(|t| jsonwebtoken::decode::<serde_json::Value>(t, &state.0, &state.1))
                {
                    Some(Ok(_)) => (
                        StatusCode::OK,
                        [(header::WWW_AUTHENTICATE, String::new())],
                        "orders".to_string(),
                    ),
                    Some(Err(e))
                        if matches!(
                            e.kind(),
                            jsonwebtoken::errors::ErrorKind::ExpiredSignature
                        ) =>
                    {
                        (
                            StatusCode::UNAUTHORIZED,
                            challenge("The access token expired"),
                            String::new(),
                        )
                    }
                    Some(Err(_)) => (
                        StatusCode::UNAUTHORIZED,
                        challenge("invalid"),
                        String::new(),
                    ),
                    None => (
                        StatusCode::UNAUTHORIZED,
                        [(header::WWW_AUTHENTICATE, "Bearer".into())],
                        String::new(),
                    ),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (
        addr,
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() }),
    )
}

/// A minimal HTTP/1.0 GET over loopback: (status, body, www-authenticate).
async fn http_get(
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
) -> (u16, String, Option<String>) {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let www = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("www-authenticate: ")
                .or_else(|| l.strip_prefix("WWW-Authenticate: "))
        })
        .filter(|v| !v.is_empty())
        .map(str::to_string);
    (status, body.to_string(), www)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_seconds_of_traffic_with_2s_tokens_sees_no_failed_operation() {
    reauth_tests::logs();
    let issuer = DevIssuer::start(DevIssuerConfig {
        clients: vec![DevClient::new("svc", "svc-secret")],
        token_lifetime: Duration::from_secs(2),
        default_audience: Some("api".into()),
        ..DevIssuerConfig::default()
    })
    .await
    .unwrap();
    let (api, server) = resource_server(&issuer).await;
    let host = Host::builder()
        .provider(
            "sso",
            ProviderConfig::new(&plugins().oauth2)
                .allow_host(issuer.addr().to_string())
                .config("token_url", issuer.token_url())
                .config("client_id", "svc")
                .config("client_secret", "svc-secret"),
        )
        .build()
        .unwrap();
    let (mut ok, mut rejected_then_recovered) = (0u32, 0u32);
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    while started.elapsed() < Duration::from_secs(10) {
        let tries = AtomicUsize::new(0);
        let result = host
            .with_credentials("sso", &Request::new(), |c| {
                tries.fetch_add(1, Ordering::SeqCst);
                async move {
                    let (status, body, www) = http_get(api, "/orders", Some(&token(&c))).await;
                    match classify::from_http(status, www.as_deref(), Some(&body)) {
                        None if status == 200 => Ok(body),
                        None => Err(Rejection::Other(format!("HTTP {status}"))),
                        Some(error) => Err(Rejection::security(error, format!("HTTP {status}"))),
                    }
                }
            })
            .await;
        match result {
            Ok(body) => {
                assert_eq!(body, "orders");
                ok += 1;
                if tries.load(Ordering::SeqCst) > 1 {
                    rejected_then_recovered += 1;
                }
            }
            Err(e) => failures.push(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(failures.is_empty(), "failed operations: {failures:?}");
    assert!(ok > 100, "{ok} operations");
    // Tokens rotated several times (refresh-ahead and/or re-authentication), and the
    // IdP saw a handful of requests, not one per operation.
    let issued = issuer.issued();
    eprintln!(
        "{ok} operations, {issued} tokens issued, {rejected_then_recovered} recovered by re-authentication"
    );
    assert!(
        (5..=30).contains(&issued),
        "{issued} tokens for {ok} operations ({rejected_then_recovered} re-authenticated)"
    );
    server.abort();
    issuer.shutdown().await;
}

/// The retry budget is shared by all operations of a provider (tower's
/// `TpsBudget`): with `retry_ratio = 0.5` and no reserve, 10 operations that are
/// each rejected once re-run 5 times between them; the others get the rejection.
#[tokio::test]
async fn the_retry_budget_bounds_re_runs_across_operations() {
    reauth_tests::logs();
    let mut p = ProviderConfig::new(&plugins().testkit).config("mode", "counter");
    p.retry.retry_ratio = 0.5;
    p.retry.min_retries_per_sec = 0;
    let host = Host::builder().provider("counter", p).build().unwrap();
    let (mut served, mut refused) = (0, 0);
    for _ in 0..10 {
        let mut first = true;
        let result = host
            .with_credentials("counter", &Request::new(), |_c| {
                let rejected = std::mem::replace(&mut first, false);
                async move {
                    if rejected {
                        // The testkit answers `other` with retry-after 10 ms.
                        Err(Rejection::security(
                            SecurityError::new(SecurityErrorKind::Other).status(503),
                            "busy",
                        ))
                    } else {
                        Ok(())
                    }
                }
            })
            .await;
        match result {
            Ok(()) => served += 1,
            Err(OperationError::Rejected { attempts: 1, .. }) => refused += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!((served, refused), (5, 5));
    assert_eq!(host.metrics().provider("counter").retries_refused(), 5);
    assert!(
        host.render_metrics()
            .contains("reauth_retry_budget_refused_total{provider=\"counter\"} 5"),
        "{}",
        host.render_metrics()
    );
}

/// The fetch budget (`[rate]`): a burst goes through, then fetches wait for
/// their turn (bounded by `wait_ms`) or are refused with `Error::Throttled` —
/// not a fault, and nothing recorded against the key (it is served as soon as
/// its turn comes).
#[tokio::test]
async fn the_fetch_budget_paces_fetches_and_refuses_beyond_its_wait() {
    reauth_tests::logs();
    let host_with = |per_second: f64, burst: u32, wait_ms: u64| {
        let mut p = ProviderConfig::new(&plugins().testkit).config("mode", "counter");
        p.rate = {
            let mut c = reauth::RateConfig::default();
            c.fetches_per_second = per_second;
            c.burst = burst;
            c.wait_ms = wait_ms;
            c
        };
        Host::builder().provider("counter", p).build().unwrap()
    };
    let subject = |i: u32| Request::new().subject(format!("s{i}"));
    // 10/s, burst 2, no waiting: the third distinct subject is refused.
    let host = host_with(10.0, 2, 0);
    for i in 0..2 {
        host.get_credentials("counter", &subject(i)).await.unwrap();
    }
    let e = host
        .get_credentials("counter", &subject(2))
        .await
        .unwrap_err();
    match &e {
        reauth::Error::Throttled {
            provider,
            retry_in_ms,
            burst: 2,
            ..
        } => {
            assert_eq!(provider, "counter");
            assert!((1..=100).contains(retry_in_ms), "{e}");
        }
        other => panic!("expected Throttled, got {other:?}"),
    }
    assert!(e.to_string().contains("rate.fetches_per_second"), "{e}");
    assert_eq!(
        host.plugin_calls("counter"),
        2,
        "the refused fetch never ran"
    );
    assert_eq!(host.metrics().provider("counter").throttled(), 1);
    // Its turn comes within 100 ms; the key was not put into backoff.
    tokio::time::sleep(Duration::from_millis(150)).await;
    host.get_credentials("counter", &subject(2)).await.unwrap();
    assert_eq!(host.cache_stats("counter", &subject(2)).failures, 0);

    // With a wait: every fetch goes through, the ones past the burst after
    // waiting their turn.
    let host = host_with(20.0, 2, 1000);
    for i in 0..5 {
        host.get_credentials("counter", &subject(i)).await.unwrap();
    }
    let m = host.metrics().provider("counter");
    assert_eq!((m.budget_waits(), m.throttled()), (3, 0));
    assert_eq!(host.plugin_calls("counter"), 5);

    // 0: no budget at all.
    let host = host_with(0.0, 1, 0);
    for i in 0..20 {
        host.get_credentials("counter", &subject(i)).await.unwrap();
    }
    assert_eq!(host.metrics().provider("counter").budget_waits(), 0);
}

/// Config validation refuses credential reference cycles, but the versions that
/// serve can still form one: here a reload whose new `a` fails to load keeps the
/// old `a` (which takes `b`'s credential) while the new `b` takes `a`'s. A fetch
/// that would wait on itself is refused at once, naming the cycle, instead of
/// hanging its callers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_cycle_left_by_a_partly_failed_reload_is_refused_not_hung() {
    reauth_tests::logs();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("reauth.toml");
    let provider = |name: &str, plugin: &std::path::Path, takes: Option<&str>| {
        let mut s = format!(
            "[providers.{name}]\nplugin = \"{}\"\n[providers.{name}.config]\ntoken = \"{name}-token-1234\"\n",
            plugin.display()
        );
        if let Some(other) = takes {
            s += &format!("upstream = {{ credential = \"{other}\", pass_subject = true }}\n");
        }
        s
    };
    let static_ = &plugins().static_;
    std::fs::write(
        &config,
        provider("a", static_, Some("b")) + &provider("b", static_, None),
    )
    .unwrap();
    let host = Host::from_config_file(&config).unwrap();
    let a = host
        .get_credentials("a", &Request::new().subject("s0"))
        .await
        .unwrap();
    assert_eq!(token(&a), "a-token-1234");
    // New `a` fails to load (its plugin is missing): the old one keeps serving.
    std::fs::write(
        &config,
        provider("a", &dir.path().join("missing.wasm"), None) + &provider("b", static_, Some("a")),
    )
    .unwrap();
    let report = host.reload_from_file().unwrap();
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.updated, ["b"], "{report:?}");
    let e = tokio::time::timeout(
        Duration::from_secs(30),
        host.get_credentials("b", &Request::new().subject("s1")),
    )
    .await
    .expect("the fetch must not hang")
    .unwrap_err()
    .to_string();
    assert!(e.contains("cycle (b → a → b)"), "{e}");
}

/// What each provider costs (#20 §4): fuel, peak memory, egress by outcome and
/// bytes, fresh vs reused instances, call slots, cache entries per provider —
/// and every metric the shipped Grafana dashboard queries exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_provider_accounting_and_the_dashboard_agree() {
    reauth_tests::logs();
    let endpoint =
        reauth_tests::peers::SlowEndpoint::start("accounted-token-5678", Duration::ZERO).await;
    let closed = reauth_tests::peers::free_port();
    let fetcher = |url: String, authority: String| {
        ProviderConfig::new(&plugins().testkit)
            .config("mode", "fetch")
            .config("url", url)
            .allow_host(authority)
    };
    let host = Host::builder()
        .provider(
            "fetcher",
            fetcher(endpoint.url.clone(), endpoint.authority()),
        )
        .provider(
            "unreachable",
            fetcher(
                format!("http://127.0.0.1:{closed}/token"),
                format!("127.0.0.1:{closed}"),
            ),
        )
        .build()
        .unwrap();
    for i in 0..3 {
        host.get_credentials("fetcher", &Request::new().subject(format!("u{i}")))
            .await
            .unwrap();
    }
    host.get_credentials("unreachable", &Request::new())
        .await
        .unwrap_err();
    let text = host.render_metrics();
    let value = |line: &str| reauth_tests::metric_value(&text, line);
    let p = |name: &str, provider: &str| format!("{name}{{provider=\"{provider}\"}}");
    assert!(value(&p("reauth_plugin_fuel_consumed_total", "fetcher")) > 0.0);
    assert!(value(&p("reauth_plugin_memory_peak_bytes", "fetcher")) >= 65536.0);
    assert_eq!(
        value("reauth_egress_requests_total{provider=\"fetcher\",outcome=\"sent\"}"),
        3.0
    );
    assert_eq!(
        value("reauth_egress_requests_total{provider=\"unreachable\",outcome=\"failed\"}"),
        1.0
    );
    assert_eq!(
        value(&p("reauth_egress_response_bytes_total", "fetcher")),
        3.0 * "accounted-token-5678".len() as f64
    );
    assert_eq!(
        value("reauth_instances_total{provider=\"fetcher\",kind=\"fresh\"}"),
        3.0
    );
    assert_eq!(value(&p("reauth_call_slots_in_use", "fetcher")), 0.0);
    assert_eq!(value(&p("reauth_cache_provider_entries", "fetcher")), 3.0);
    assert!(!text.contains("u1") && !text.contains("accounted-token"));

    // The dashboard queries only metrics that exist.
    let dashboard =
        std::fs::read_to_string(reauth_tests::root().join("docs/grafana/reauth-dashboard.json"))
            .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut names = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("reauth_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                names.push(name);
            }
        }
    }
    assert!(names.len() > 15, "{names:?}");
    for name in names {
        // The OpenMetrics family a sample name belongs to: counters drop
        // `_total`, histograms their `_bucket`/`_sum`/`_count`, info `_info`.
        let base = ["_bucket", "_sum", "_count", "_total", "_info"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name);
        assert!(
            text.contains(&format!("# TYPE {base} ")),
            "the dashboard queries {name}, which reauth does not export"
        );
    }
}

/// A caller that gives up (a timeout around `get_credentials`, a client that
/// disconnects) never cuts its fetch in half: a fetch that has to wait (here on
/// the IdP) goes on in a task of its own — the IdP's answer is read and the call
/// is accounted. (That a fetch with nothing to wait for stays on its caller's
/// task is `detach`'s unit tests'.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_outlives_the_caller_that_gave_up_on_it() {
    reauth_tests::logs();
    let endpoint =
        reauth_tests::peers::SlowEndpoint::start("late-token-4321", Duration::from_millis(400))
            .await;
    let host = Host::builder()
        .provider(
            "slow",
            ProviderConfig::new(&plugins().testkit)
                .config("mode", "fetch")
                .config("url", &endpoint.url)
                .allow_host(endpoint.authority()),
        )
        .build()
        .unwrap();
    // The caller gives up as soon as the IdP has the request (it answers
    // 400 ms later).
    let request = Request::new().subject("impatient");
    let mut call = Box::pin(host.get_credentials("slow", &request));
    let answered = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            tokio::select! {
                result = &mut call => break Some(result),
                () = tokio::time::sleep(Duration::from_millis(5)) => {
                    if endpoint.hits.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                        break None;
                    }
                }
            }
        }
    })
    .await
    .expect("the request never reached the IdP");
    assert!(
        answered.is_none(),
        "the IdP answered before the caller gave up"
    );
    drop(call);
    // The IdP's answer read whole (egress bytes), then the call accounted
    // (fuel: booked after the call returned).
    let finished = |text: &str| {
        text.lines()
            .any(|l| l == "reauth_egress_response_bytes_total{provider=\"slow\"} 15")
            && text.lines().any(|l| {
                l.strip_prefix("reauth_plugin_fuel_consumed_total{provider=\"slow\"} ")
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|fuel| fuel > 0.0)
            })
    };
    let mut text = host.render_metrics();
    for _ in 0..100 {
        if finished(&text) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = host.render_metrics();
    }
    assert!(
        finished(&text),
        "the fetch was cut off with its caller:\n{text}"
    );
}

fn rollout_config(testkit: &std::path::Path, candidate: Option<(&str, u32, f64)>) -> String {
    let mut s = format!(
        "[providers.api]\nplugin = \"{}\"\n[providers.api.config]\nmode = \"flaky\"\nfail_percent = \"0\"\nprefix = \"stable\"\n",
        testkit.display()
    );
    if let Some((prefix, fail_percent, share)) = candidate {
        s += &format!(
            "[providers.api.candidate]\nplugin = \"{}\"\nshare = {share}\nmin_fetches = 10\nmax_error_rate = 0.2\n[providers.api.candidate.config]\nfail_percent = \"{fail_percent}\"\nprefix = \"{prefix}\"\n",
            testkit.display()
        );
    }
    s
}

/// A candidate that fails 30 % of its fetches is rolled back within its window,
/// and every caller was served meanwhile (a failed candidate fetch is retried on
/// the stable version); `status()` and the metrics say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_candidate_is_rolled_back_while_the_stable_version_serves_everyone() {
    reauth_tests::logs();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("reauth.toml");
    std::fs::write(
        &config,
        rollout_config(&plugins().testkit, Some(("candidate", 30, 1.0))),
    )
    .unwrap();
    let host = Host::from_config_file(&config).unwrap();
    let (mut from_candidate, mut from_stable) = (0, 0);
    for i in 0..60 {
        let c = host
            .get_credentials("api", &Request::new().subject(format!("user-{i}")))
            .await
            .expect("every caller is served");
        if token(&c).starts_with("candidate-") {
            from_candidate += 1;
        } else {
            assert!(token(&c).starts_with("stable-"), "{}", token(&c));
            from_stable += 1;
        }
    }
    let m = host.metrics().provider("api");
    let (ok, errors) = (
        m.rollout_fetches(true, "ok"),
        m.rollout_fetches(true, "error"),
    );
    assert!(errors >= 3, "{errors} candidate errors");
    assert_eq!(ok, from_candidate);
    assert!(
        ok + errors < 30,
        "rolled back late: after {} candidate fetches",
        ok + errors
    );
    assert!(from_stable > 30);
    match &host.status()["api"] {
        reauth::ProviderStatus::Ready {
            rollout: Some(r), ..
        } => {
            let why = r.rolled_back.as_deref().expect("rolled back");
            assert!(why.contains("candidate.max_error_rate"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    // After the rollback no key goes to the candidate.
    for i in 60..80 {
        host.get_credentials("api", &Request::new().subject(format!("user-{i}")))
            .await
            .unwrap();
    }
    assert_eq!(
        m.rollout_fetches(true, "ok") + m.rollout_fetches(true, "error"),
        ok + errors
    );
    assert!(
        host.render_metrics()
            .contains("reauth_rollout_rolled_back{provider=\"api\"} 1")
    );
}

/// A good candidate takes its share of the keys (each key sticks to one version)
/// with no failed call, and is promoted by a config reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_candidate_takes_its_share_by_key_and_is_promoted_by_reload() {
    reauth_tests::logs();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("reauth.toml");
    std::fs::write(
        &config,
        rollout_config(&plugins().testkit, Some(("candidate", 0, 0.5))),
    )
    .unwrap();
    let version = |c: &Credentials| token(c).split('-').next().unwrap().to_string();
    let mut first = Vec::new();
    let host = Host::from_config_file(&config).unwrap();
    for i in 0..40 {
        let c = host
            .get_credentials("api", &Request::new().subject(format!("user-{i}")))
            .await
            .unwrap();
        first.push(version(&c));
    }
    let candidates = first.iter().filter(|v| *v == "candidate").count();
    assert!((8..=32).contains(&candidates), "{candidates} of 40 keys");
    // Another process with the same config sends every key to the same version.
    let other = Host::from_config_file(&config).unwrap();
    for (i, v) in first.iter().enumerate() {
        let c = other
            .get_credentials("api", &Request::new().subject(format!("user-{i}")))
            .await
            .unwrap();
        assert_eq!(&version(&c), v, "user-{i} moved");
    }
    // Promotion: the candidate's plugin and config become the provider's own.
    std::fs::write(
        &config,
        rollout_config(&plugins().testkit, None)
            .replace("prefix = \"stable\"", "prefix = \"candidate\""),
    )
    .unwrap();
    let report = host.reload_from_file().unwrap();
    assert_eq!(report.updated, ["api"], "{report:?}");
    for i in 0..40 {
        let c = host
            .get_credentials("api", &Request::new().subject(format!("user-{i}")))
            .await
            .unwrap();
        assert_eq!(version(&c), "candidate");
    }
    assert!(matches!(
        &host.status()["api"],
        reauth::ProviderStatus::Ready { rollout: None, .. }
    ));
}

/// Failures both versions share (an IdP outage) are not held against the
/// candidate, and a candidate that fails to load leaves the stable version
/// serving every key, the status saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_failures_do_not_roll_back_and_a_broken_candidate_does_not_take_the_provider_down() {
    reauth_tests::logs();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("reauth.toml");
    // Both versions refuse every subject.
    std::fs::write(
        &config,
        rollout_config(&plugins().testkit, Some(("candidate", 100, 1.0)))
            .replace("fail_percent = \"0\"", "fail_percent = \"100\""),
    )
    .unwrap();
    let host = Host::from_config_file(&config).unwrap();
    for i in 0..30 {
        host.get_credentials("api", &Request::new().subject(format!("user-{i}")))
            .await
            .unwrap_err();
    }
    match &host.status()["api"] {
        reauth::ProviderStatus::Ready {
            rollout: Some(r), ..
        } => assert_eq!(r.rolled_back, None, "{r:?}"),
        other => panic!("{other:?}"),
    }
    // A candidate whose plugin is missing.
    std::fs::write(
        &config,
        rollout_config(&plugins().testkit, Some(("candidate", 0, 0.5))).replace(
            &format!(
                "[providers.api.candidate]\nplugin = \"{}\"",
                plugins().testkit.display()
            ),
            &format!(
                "[providers.api.candidate]\nplugin = \"{}\"",
                dir.path().join("missing.wasm").display()
            ),
        ),
    )
    .unwrap();
    let host = Host::from_config_file(&config).unwrap();
    for i in 0..10 {
        let c = host
            .get_credentials("api", &Request::new().subject(format!("user-{i}")))
            .await
            .unwrap();
        assert!(token(&c).starts_with("stable-"));
    }
    match &host.status()["api"] {
        reauth::ProviderStatus::Ready {
            rollout: Some(r), ..
        } => assert!(
            r.rolled_back
                .as_deref()
                .is_some_and(|w| w.contains("failed to load") && w.contains("missing.wasm")),
            "{r:?}"
        ),
        other => panic!("{other:?}"),
    }
}
