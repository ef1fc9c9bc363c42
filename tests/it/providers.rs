//! The shipped providers and the fixtures, through the real host, against real
//! peers on loopback.

use reauth::{
    Credential, Decision, Error, Host, HostConfig, ProviderConfig, ProviderError, Reason, Request,
    SecurityError, SecurityErrorKind,
};
use reauth_cli::issuer::{DevClient, DevIssuer, DevIssuerConfig};
use reauth_tests::plugins;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

const SECRET: &str = "client-secret-9f8e7d";

async fn issuer(lifetime: Duration) -> DevIssuer {
    let mut limited = DevClient::new("limited", "limited-secret");
    limited.scopes = vec!["read".into()];
    DevIssuer::start(DevIssuerConfig {
        clients: vec![DevClient::new("svc", SECRET), limited],
        token_lifetime: lifetime,
        default_audience: Some("api".into()),
        ..DevIssuerConfig::default()
    })
    .await
    .expect("starting the dev issuer")
}

fn oauth2(issuer: &DevIssuer, client_id: &str, secret: &str) -> ProviderConfig {
    ProviderConfig::new(&plugins().oauth2)
        .allow_host(issuer.addr().to_string())
        .config("token_url", issuer.token_url())
        .config("client_id", client_id)
        .config("client_secret", secret)
}

fn bearer(c: &Credential) -> String {
    match c {
        Credential::Bearer(t) => {
            reauth_tests::record_secret(t.expose());
            t.expose().to_string()
        }
        other => panic!("expected a bearer credential, got {other:?}"),
    }
}

fn provider_error<T: std::fmt::Debug>(result: Result<T, Error>) -> ProviderError {
    match result {
        Err(Error::Provider { error, .. }) => error,
        other => panic!("expected a provider error, got {other:?}"),
    }
}

#[tokio::test]
async fn static_provider_serves_each_credential_shape_and_never_retries() {
    reauth_tests::logs();
    let p = &plugins().static_;
    let host = Host::builder()
        .provider(
            "token",
            ProviderConfig::new(p)
                .config("token", "tok-1")
                .config("principal", "svc-a"),
        )
        .provider(
            "userpass",
            ProviderConfig::new(p)
                .config("username", "neo4j")
                .config("password", "pw"),
        )
        .provider(
            "apikey",
            ProviderConfig::new(p).config("header.x-api-key", "k-1"),
        )
        .provider("empty", ProviderConfig::new(p))
        .build()
        .unwrap();
    let r = Request::new();
    let c = host.get_credentials("token", &r).await.unwrap();
    assert_eq!(bearer(&c.credential), "tok-1");
    assert_eq!(c.principal.as_deref(), Some("svc-a"));
    assert_eq!(c.expires_at, None);
    match host
        .get_credentials("userpass", &r)
        .await
        .unwrap()
        .credential
        .clone()
    {
        Credential::Basic { username, password } => {
            assert_eq!((username.as_str(), password.expose()), ("neo4j", "pw"))
        }
        other => panic!("{other:?}"),
    }
    match host
        .get_credentials("apikey", &r)
        .await
        .unwrap()
        .credential
        .clone()
    {
        Credential::Headers(h) => {
            assert_eq!(h.len(), 1);
            assert_eq!((h[0].0.as_str(), h[0].1.expose()), ("x-api-key", "k-1"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        provider_error(host.get_credentials("empty", &r).await),
        ProviderError::Misconfigured(_)
    ));
    for kind in [
        SecurityErrorKind::TokenExpired,
        SecurityErrorKind::Unauthorized,
    ] {
        let d = host
            .handle_security_error("token", &r, &c, &SecurityError::new(kind))
            .await
            .unwrap();
        assert_eq!(d, Decision::Fail);
    }
    // A cached hit does not call the plugin again.
    host.get_credentials("token", &r).await.unwrap();
    assert_eq!(host.plugin_calls("token"), 1);
}

/// A stand-in secrets endpoint (e.g. a vault's KV read) whose password rotates.
async fn secret_server(
    password: Arc<std::sync::Mutex<String>>,
    hits: Arc<AtomicUsize>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/v1/secret/db",
        get(move |headers: axum::http::HeaderMap| {
            let password = password.clone();
            let hits = hits.clone();
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                if headers.get("authorization").and_then(|v| v.to_str().ok())
                    != Some("Bearer vault-token")
                {
                    return (axum::http::StatusCode::FORBIDDEN, "{}".to_string());
                }
                let pw = password.lock().unwrap().clone();
                (
                    axum::http::StatusCode::OK,
                    serde_json::json!({"data": {"user": "app", "password": pw}}).to_string(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, task)
}

#[tokio::test]
async fn basic_provider_picks_up_a_rotated_password_after_unauthorized() {
    reauth_tests::logs();
    let password = Arc::new(std::sync::Mutex::new("pw-v1".to_string()));
    let hits = Arc::new(AtomicUsize::new(0));
    let (addr, server) = secret_server(password.clone(), hits.clone()).await;
    let p = &plugins().password_rotation;
    let host = Host::builder()
        .provider(
            "db",
            ProviderConfig::new(p)
                .allow_host(addr.to_string())
                .config("secret_url", format!("http://{addr}/v1/secret/db"))
                .config("secret_token", "vault-token")
                .config("username_field", "/data/user")
                .config("password_field", "/data/password"),
        )
        .provider(
            "bad-token",
            ProviderConfig::new(p)
                .allow_host(addr.to_string())
                .config("secret_url", format!("http://{addr}/v1/secret/db"))
                .config("secret_token", "wrong"),
        )
        .provider(
            "fixed",
            ProviderConfig::new(p)
                .config("username", "u")
                .config("password", "p"),
        )
        .build()
        .unwrap();
    let r = Request::new();
    let first = host.get_credentials("db", &r).await.unwrap();
    let Credential::Basic {
        username,
        password: pw,
    } = &first.credential
    else {
        panic!()
    };
    assert_eq!((username.as_str(), pw.expose()), ("app", "pw-v1"));

    // The password rotates; the database answers "unauthorized" to the old one.
    *password.lock().unwrap() = "pw-v2".into();
    assert_eq!(
        host.get_credentials("db", &r).await.unwrap(),
        first,
        "still cached"
    );
    let decision = host
        .handle_security_error(
            "db",
            &r,
            &first,
            &SecurityError::new(SecurityErrorKind::Unauthorized).code("28P01"),
        )
        .await
        .unwrap();
    assert_eq!(decision, Decision::RefreshAndRetry);
    let second = host.get_credentials("db", &r).await.unwrap();
    let Credential::Basic { password: pw, .. } = &second.credential else {
        panic!()
    };
    assert_eq!(pw.expose(), "pw-v2");
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    // Forbidden is final for passwords.
    let d = host
        .handle_security_error(
            "db",
            &r,
            &second,
            &SecurityError::new(SecurityErrorKind::Forbidden),
        )
        .await
        .unwrap();
    assert_eq!(d, Decision::Fail);
    assert!(matches!(
        provider_error(host.get_credentials("bad-token", &r).await),
        ProviderError::Denied(_)
    ));
    assert!(host.get_credentials("fixed", &r).await.is_ok());
    server.abort();
}

#[tokio::test]
async fn oauth2_against_the_dev_issuer() {
    reauth_tests::logs();
    let issuer = issuer(Duration::from_secs(120)).await;
    let host = Host::builder()
        .provider("good", oauth2(&issuer, "svc", SECRET))
        .provider(
            "post",
            oauth2(&issuer, "svc", SECRET).config("auth_method", "client_secret_post"),
        )
        .provider("wrong-secret", oauth2(&issuer, "svc", "not-the-secret"))
        .provider("limited", oauth2(&issuer, "limited", "limited-secret"))
        .build()
        .unwrap();
    let r = Request::new().scope("orders:read").audience("orders-api");
    let before = SystemTime::now();
    let c = host.get_credentials("good", &r).await.unwrap();
    let token = bearer(&c.credential);
    // A real ES256 JWT from the issuer, for the requested audience and scope.
    let claims = issuer
        .verify(&token, Some("orders-api"))
        .expect("token verifies");
    assert_eq!(claims["scope"], "orders:read");
    assert_eq!(claims["sub"], "svc");
    assert_eq!(
        c.principal.as_deref(),
        Some(format!("{}|svc", issuer.url()).as_str())
    );
    // expires_in = 120 s was turned into an absolute expiry.
    let expires = c.expires_at.expect("expiry parsed");
    let lifetime = expires.duration_since(before).unwrap();
    assert!(
        lifetime > Duration::from_secs(117) && lifetime <= Duration::from_secs(121),
        "{lifetime:?}"
    );
    // Cached: no second token.
    assert_eq!(host.get_credentials("good", &r).await.unwrap(), c);
    assert_eq!(issuer.issued(), 1);
    // Different scopes are a different key.
    let other = host
        .get_credentials("good", &Request::new().scope("orders:write"))
        .await
        .unwrap();
    assert_ne!(bearer(&other.credential), token);
    // client_secret_post authenticates too.
    host.get_credentials("post", &Request::new()).await.unwrap();

    // Refused client secret: denied.
    let e = provider_error(host.get_credentials("wrong-secret", &Request::new()).await);
    assert!(
        matches!(&e, ProviderError::Denied(m) if m.contains("invalid_client")),
        "{e:?}"
    );
    // Scope the client may not have: misconfigured.
    let e = provider_error(
        host.get_credentials("limited", &Request::new().scope("admin"))
            .await,
    );
    assert!(
        matches!(&e, ProviderError::Misconfigured(m) if m.contains("invalid_scope")),
        "{e:?}"
    );

    // Decisions: expired/unauthorized refresh, forbidden fails.
    for (kind, expected) in [
        (SecurityErrorKind::Forbidden, Decision::Fail),
        (SecurityErrorKind::Unauthorized, Decision::RefreshAndRetry),
    ] {
        let d = host
            .handle_security_error("good", &r, &c, &SecurityError::new(kind).status(401))
            .await
            .unwrap();
        assert_eq!(d, expected);
    }
    // The refresh-and-retry dropped the entry: the next get fetches a new token,
    // and a second report about the old token changes nothing.
    let fresh = host
        .get_credentials(
            "good",
            &Request {
                reason: Reason::AfterSecurityError,
                ..r.clone()
            },
        )
        .await
        .unwrap();
    assert_ne!(bearer(&fresh.credential), token);
    let d = host
        .handle_security_error(
            "good",
            &r,
            &c,
            &SecurityError::new(SecurityErrorKind::TokenExpired),
        )
        .await
        .unwrap();
    assert_eq!(d, Decision::RefreshAndRetry);
    assert_eq!(host.get_credentials("good", &r).await.unwrap(), fresh);

    // The IdP answers 503: unavailable.
    issuer.set_unavailable(true);
    let e = provider_error(
        host.get_credentials("good", &Request::new().scope("x"))
            .await,
    );
    assert!(
        matches!(&e, ProviderError::Unavailable { message: m, .. } if m.contains("temporarily_unavailable")),
        "{e:?}"
    );
    issuer.set_unavailable(false);

    // The IdP is down: unavailable.
    issuer.shutdown().await;
    let e = provider_error(
        host.get_credentials("good", &Request::new().scope("y"))
            .await,
    );
    assert!(matches!(e, ProviderError::Unavailable { .. }), "{e:?}");
}

#[tokio::test]
async fn egress_outside_allowed_hosts_is_refused() {
    reauth_tests::logs();
    let issuer = issuer(Duration::from_secs(60)).await;
    let other_port = issuer.addr().port().wrapping_add(1).max(1);
    let host = Host::builder()
        .provider(
            "no-egress",
            ProviderConfig::new(&plugins().oauth2)
                .config("token_url", issuer.token_url())
                .config("client_id", "svc")
                .config("client_secret", SECRET),
        )
        .provider(
            "wrong-port",
            ProviderConfig::new(&plugins().oauth2)
                .allow_host(format!("127.0.0.1:{other_port}"))
                .config("token_url", issuer.token_url())
                .config("client_id", "svc")
                .config("client_secret", SECRET),
        )
        .provider(
            "fetch",
            ProviderConfig::new(&plugins().testkit)
                .allow_host(issuer.addr().to_string())
                .config("mode", "fetch")
                .config("url", "http://localhost:1/elsewhere"),
        )
        .build()
        .unwrap();
    for name in ["no-egress", "wrong-port", "fetch"] {
        let e = provider_error(host.get_credentials(name, &Request::new()).await);
        assert!(
            matches!(&e, ProviderError::Unavailable { message: m, .. } if m.contains("HttpRequestDenied")),
            "{name}: {e:?}"
        );
    }
    assert_eq!(issuer.token_requests(), 0, "nothing reached the issuer");
    issuer.shutdown().await;
}

#[tokio::test]
async fn a_trap_returns_err_and_the_next_call_gets_a_fresh_instance() {
    reauth_tests::logs();
    let mut trap = ProviderConfig::new(&plugins().testkit).config("mode", "trap-once");
    // A 1 ms backoff after the fault, so the next call soon reaches the plugin.
    trap.cache.backoff_initial_ms = 1;
    trap.cache.min_interval_ms = 0;
    let host = Host::builder()
        .provider("trap", trap)
        .provider(
            "ok",
            ProviderConfig::new(&plugins().static_).config("token", "t"),
        )
        .build()
        .unwrap();
    let e = host
        .get_credentials("trap", &Request::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Plugin { provider, function: "get-credentials", .. } if provider == "trap"),
        "{e}"
    );
    assert!(e.to_string().contains("provider `trap`"), "{e}");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let c = host.get_credentials("trap", &Request::new()).await.unwrap();
    assert_eq!(bearer(&c.credential), "after-trap");
    assert!(host.get_credentials("ok", &Request::new()).await.is_ok());
}

#[tokio::test]
async fn state_persists_across_calls_and_hosts_and_keys_are_per_subject() {
    reauth_tests::logs();
    let dir = tempfile::tempdir().unwrap();
    let build = || {
        Host::builder()
            .state_dir(dir.path())
            .provider(
                "counter",
                ProviderConfig::new(&plugins().testkit).config("mode", "counter"),
            )
            .build()
            .unwrap()
    };
    let host = build();
    let alice = host
        .get_credentials("counter", &Request::new().subject("alice"))
        .await
        .unwrap();
    let bob = host
        .get_credentials("counter", &Request::new().subject("bob"))
        .await
        .unwrap();
    assert_eq!(bearer(&alice.credential), "count-1-alice");
    assert_eq!(bearer(&bob.credential), "count-2-bob");
    // Cached per subject.
    assert_eq!(
        host.get_credentials("counter", &Request::new().subject("alice"))
            .await
            .unwrap(),
        alice
    );
    drop(host);
    let host = build();
    let carol = host
        .get_credentials("counter", &Request::new().subject("carol"))
        .await
        .unwrap();
    assert_eq!(bearer(&carol.credential), "count-3-carol");
    assert!(dir.path().join("counter.json").exists());
}

#[tokio::test]
async fn the_sandbox_grants_no_files_env_args_or_sockets() {
    reauth_tests::logs();
    // SAFETY-free: the variable only needs to exist in the host process.
    let host = Host::builder()
        .provider(
            "sandbox",
            ProviderConfig::new(&plugins().testkit).config("mode", "sandbox"),
        )
        .build()
        .unwrap();
    let c = host
        .get_credentials("sandbox", &Request::new())
        .await
        .unwrap();
    let Credential::Headers(h) = c.credential.clone() else {
        panic!()
    };
    let get = |k: &str| {
        h.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.expose().to_string())
            .unwrap()
    };
    assert!(get("passwd").starts_with("refused"), "{}", get("passwd"));
    assert_eq!(get("env"), "0");
    assert_eq!(get("args"), "0");
    assert!(get("tcp").starts_with("refused"), "{}", get("tcp"));
}

#[tokio::test]
async fn config_references_reach_the_plugin_through_wasi_config() {
    reauth_tests::logs();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret.txt"), "from-a-file\n").unwrap();
    let plugin = plugins().testkit.display().to_string();
    let toml = format!(
        "[providers.echo]\nplugin = {plugin:?}\n[providers.echo.config]\nmode = \"echo-config\"\nnum = 42\nfrom_file = {{ file = \"secret.txt\" }}\nfrom_env = {{ env = \"CARGO_PKG_NAME\" }}\n"
    );
    let path = dir.path().join("reauth.toml");
    std::fs::write(&path, toml).unwrap();
    let host = Host::from_config_file(&path).unwrap();
    let c = host.get_credentials("echo", &Request::new()).await.unwrap();
    let Credential::Headers(h) = c.credential.clone() else {
        panic!()
    };
    let mut got: Vec<(String, String)> = h
        .into_iter()
        .map(|(k, v)| (k, v.expose().to_string()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("from_env".into(), "reauth-tests".into()),
            ("from_file".into(), "from-a-file".into()),
            ("mode".into(), "echo-config".into()),
            ("num".into(), "42".into()),
        ]
    );
}

#[tokio::test]
async fn a_broken_provider_does_not_take_down_the_others() {
    reauth_tests::logs();
    let dir = tempfile::tempdir().unwrap();
    let static_ = plugins().static_.display().to_string();
    std::fs::write(dir.path().join("not-a-component.wasm"), b"\0asm\x01\0\0\0").unwrap();
    let toml = format!(
        r#"
[providers.good]
plugin = {static_:?}
config = {{ token = "t" }}

[providers.missing]
plugin = "does-not-exist.wasm"

[providers.pinned]
plugin = {static_:?}
sha256 = "{zeros}"

[providers.core-module]
plugin = "not-a-component.wasm"
"#,
        zeros = "0".repeat(64)
    );
    let path = dir.path().join("reauth.toml");
    std::fs::write(&path, toml).unwrap();
    let host = Host::from_config_file(&path).unwrap();
    let status = host.check().await;
    assert!(matches!(
        status["good"],
        reauth::ProviderStatus::Ready { .. }
    ));
    let failed = |name: &str| match &status[name] {
        reauth::ProviderStatus::Failed(m) => m.clone(),
        other => panic!("{name}: {other:?}"),
    };
    let missing = failed("missing");
    assert!(
        missing.starts_with("provider `missing`: failed to load plugin"),
        "{missing}"
    );
    assert!(missing.contains("does-not-exist.wasm"), "{missing}");
    assert!(
        failed("pinned").contains("sha256 mismatch"),
        "{}",
        failed("pinned")
    );
    assert!(
        failed("core-module").starts_with("provider `core-module`"),
        "{}",
        failed("core-module")
    );
    assert!(host.get_credentials("good", &Request::new()).await.is_ok());
    let e = host
        .get_credentials("missing", &Request::new())
        .await
        .unwrap_err();
    assert_eq!(e.provider(), Some("missing"));
    let e = host
        .get_credentials("nope", &Request::new())
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "unknown provider `nope`");
}

#[test]
fn config_file_errors_name_file_provider_and_key() {
    reauth_tests::logs();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reauth.toml");
    let err = |text: &str| {
        std::fs::write(&path, text).unwrap();
        HostConfig::from_file(&path)
            .unwrap_err()
            .to_string()
            .replace(&path.display().to_string(), "reauth.toml")
    };
    // Snapshots of the messages an operator sees.
    assert_eq!(
        err("[providers.db]\nplugin = \"x.wasm\"\nallowed_host = [\"a\"]\n"),
        "reauth.toml:3: providers.db.allowed_host: unknown field `allowed_host`, expected one of `plugin`, `sha256`, `allowed_hosts`, `allow_http`, `config`, `secret_keys`, `cache`, `retry`, `rate`, `limits`, `circuit_breaker`, `instances`, `shared_state`, `candidate`"
    );
    assert_eq!(
        err("[providers.db]\nplugin = \"x.wasm\"\n[providers.db.limits]\nmemory_mib = 4096\n"),
        "reauth.toml: providers.db.limits.memory_mib: must be between 1 and runtime.max_memory_mib (512)"
    );
    let bad = err("[providers.db\nplugin = \"x.wasm\"\n");
    assert!(bad.starts_with("reauth.toml:1: "), "{bad}");
    assert_eq!(
        HostConfig::from_file(dir.path().join("absent.toml"))
            .unwrap_err()
            .to_string(),
        format!(
            "{}: cannot read config file: No such file or directory (os error 2)",
            dir.path().join("absent.toml").display()
        )
    );
}

// ---------------------------------------------------------------------------
// Contract 0.2: what real servers say (challenges, Retry-After), what a provider
// says about itself (describe: its config schema), and 0.1.0 components next to
// 0.2.0 ones.

mod contract {
    use super::*;
    use reauth::ProviderStatus;
    use reauth::clock::ManualClock;
    use reauth_tests::peers::AcmeSts;
    use serde_json::json;

    fn acme(sts: &AcmeSts) -> ProviderConfig {
        ProviderConfig::new(&plugins().acme_sts)
            .allow_host(&sts.addr)
            .config("sts_url", sts.url())
            .config("api_key", AcmeSts::API_KEY)
            .config("user", "alice")
    }

    fn authorization(c: &reauth::Credentials) -> String {
        match &c.credential {
            Credential::Headers(h) => {
                assert_eq!(h.len(), 1, "{c:?}");
                assert_eq!(h[0].0, "authorization");
                reauth_tests::record_secret(h[0].1.expose());
                h[0].1.expose().to_string()
            }
            other => panic!("expected a headers credential, got {other:?}"),
        }
    }

    /// The server's real answer, classified the way an embedder does it.
    async fn rejection(sts: &AcmeSts, authorization: &str) -> SecurityError {
        let (status, challenge) = sts.whoami(authorization).await;
        reauth::classify::from_http(status, challenge.as_deref(), None)
            .unwrap_or_else(|| panic!("HTTP {status} is not a security error"))
    }

    #[tokio::test]
    async fn a_non_oauth2_sts_end_to_end_challenges_retry_after_and_audience() {
        reauth_tests::logs();
        let sts = AcmeSts::start();
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let host = Host::builder()
            .clock(clock.clone())
            .provider("acme", acme(&sts))
            .build()
            .unwrap();

        // describe: name, version, schema, contract.
        match &host.check().await["acme"] {
            ProviderStatus::Ready {
                contract,
                descriptor: Some(d),
                ..
            } => {
                assert_eq!(*contract, "0.2.0");
                assert_eq!((d.name.as_str(), d.version.as_str()), ("acme-sts", "0.1.0"));
                let keys = d.config.as_ref().expect("a declared schema");
                assert_eq!(keys.len(), 6, "{keys:?}");
                assert_eq!(d.secret_keys().collect::<Vec<_>>(), ["api_key", "otp_seed"]);
            }
            other => panic!("{other:?}"),
        }

        // A JSON body with Content-Length: Python's strict http.server takes it.
        let c = host.get_credentials("acme", &Request::new()).await.unwrap();
        let auth = authorization(&c);
        assert_eq!(c.principal.as_deref(), Some("alice"));
        let stats = sts.stats().await;
        assert_eq!(stats["sessions"], 1, "{stats}");
        assert_eq!(
            stats["chunked"], 0,
            "a chunked body reached the STS: {stats}"
        );
        assert!(stats["last_content_length"].is_string(), "{stats}");
        assert_eq!(sts.whoami(&auth).await.0, 200);

        // Revoked (custom scheme, `error="revoked"`): the provider reads the
        // challenge and gives up.
        sts.admin(json!({"revoke": true})).await;
        let revoked = rejection(&sts, &auth).await;
        assert_eq!(revoked.code.as_deref(), Some("revoked"));
        assert_eq!(revoked.challenges.len(), 1);
        assert_eq!(revoked.challenges[0].scheme, "AcmeSession");
        assert_eq!(revoked.challenges[0].param("realm"), Some("acme"));
        let decision = host
            .handle_security_error("acme", &Request::new(), &c, &revoked)
            .await
            .unwrap();
        assert_eq!(decision, Decision::Fail);

        // Expired (`error="expired"`): classified token-expired, the provider
        // refreshes, and the next fetch is a new session.
        sts.admin(json!({"ttl": 1})).await;
        let request = Request::new().audience("api");
        let short = host.get_credentials("acme", &request).await.unwrap();
        let short_auth = authorization(&short);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let expired = rejection(&sts, &short_auth).await;
        assert_eq!(expired.kind, SecurityErrorKind::TokenExpired, "{expired:?}");
        let decision = host
            .handle_security_error("acme", &request, &short, &expired)
            .await
            .unwrap();
        assert_eq!(decision, Decision::RefreshAndRetry);
        sts.admin(json!({"ttl": 30})).await;
        let again = host.get_credentials("acme", &request).await.unwrap();
        assert_ne!(authorization(&again), short_auth);
        assert_eq!(sts.whoami(&authorization(&again)).await.0, 200);
        assert_eq!(sts.stats().await["sessions"], 3);

        // Wrong audience: 403, forbidden, fail.
        let other = Request::new().audience("billing");
        let wrong = host.get_credentials("acme", &other).await.unwrap();
        let forbidden = rejection(&sts, &authorization(&wrong)).await;
        assert_eq!(forbidden.kind, SecurityErrorKind::Forbidden);
        let decision = host
            .handle_security_error("acme", &other, &wrong, &forbidden)
            .await
            .unwrap();
        assert_eq!(decision, Decision::Fail);

        // A rejection with Retry-After: the provider sees it and waits that long.
        let busy = SecurityError::new(SecurityErrorKind::Unauthorized)
            .status(401)
            .retry_after(Duration::from_secs(3));
        let decision = host
            .handle_security_error("acme", &Request::new(), &c, &busy)
            .await
            .unwrap();
        assert_eq!(decision, Decision::RetryAfter(Duration::from_secs(3)));

        // 429 + Retry-After: 2 → unavailable carrying it, and the host waits
        // exactly that long on its clock (its own first backoff step is 100 ms).
        sts.admin(json!({"mode": "429", "retry_after": "2"})).await;
        let throttled = Request::new().scope("reports");
        let e = provider_error(host.get_credentials("acme", &throttled).await);
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)), "{e:?}");
        assert!(e.to_string().contains("HTTP 429"), "{e}");
        assert_eq!(sts.stats().await["rejected_429"], 1);
        clock.advance(Duration::from_millis(1500));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let e = provider_error(host.get_credentials("acme", &throttled).await);
        assert!(matches!(e, ProviderError::Unavailable { .. }), "{e:?}");
        assert_eq!(
            sts.stats().await["rejected_429"],
            1,
            "the host called the STS again before its Retry-After"
        );
        sts.admin(json!({"mode": "ok"})).await;
        clock.advance(Duration::from_millis(600));
        let ok = host.get_credentials("acme", &throttled).await.unwrap();
        assert_eq!(sts.whoami(&authorization(&ok)).await.0, 200);
        assert_eq!(sts.stats().await["rejected_429"], 1);
    }

    #[tokio::test]
    async fn a_config_that_breaks_the_declared_schema_is_refused_naming_file_line_and_key() {
        reauth_tests::logs();
        let sts = AcmeSts::start();
        let dir = tempfile::tempdir().unwrap();
        let plugin = plugins().acme_sts.display().to_string();
        let toml = format!(
            r#"[providers.acme]
plugin = {plugin:?}
allowed_hosts = [{addr:?}]

[providers.acme.config]
sts_url = "{url}"
user = "alice"
api_kye = "typo-secret-4711"
timeout_ms = "soon"

[providers.fine]
plugin = {plugin:?}
allowed_hosts = [{addr:?}]
config = {{ sts_url = "{url}", user = "bob", api_key = "{key}" }}
"#,
            addr = sts.addr,
            url = sts.url(),
            key = AcmeSts::API_KEY,
        );
        let path = dir.path().join("reauth.toml");
        std::fs::write(&path, toml).unwrap();
        let host = Host::from_config_file(&path).unwrap();
        let status = host.check().await;
        let report = match &status["acme"] {
            ProviderStatus::Failed(m) => m.clone(),
            other => panic!("{other:?}"),
        };
        let file = path.display().to_string();
        for expected in [
            "provider `acme`: the config does not fit the plugin's declared schema".to_string(),
            format!(
                "{file}:8: providers.acme.config.api_kye: not a key this provider reads (did you mean `api_key`?)"
            ),
            format!(
                "{file}:5: providers.acme.config.api_key: required, but not set: sent as X-Api-Key"
            ),
            format!(
                "{file}:9: providers.acme.config.timeout_ms: is not a whole number (declared integer)"
            ),
        ] {
            assert!(
                report.contains(&expected),
                "missing {expected:?} in:\n{report}"
            );
        }
        assert!(!report.contains("typo-secret-4711"), "{report}");
        assert!(!report.contains("soon"), "values are never shown: {report}");
        assert!(matches!(status["fine"], ProviderStatus::Ready { .. }));

        // At call time: misconfigured, naming the key, and the STS never called.
        let e = provider_error(host.get_credentials("acme", &Request::new()).await);
        match &e {
            ProviderError::Misconfigured(m) => {
                assert!(m.contains("providers.acme.config.api_kye"), "{m}");
                assert!(!m.contains("typo-secret-4711"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(sts.stats().await["sessions"], 0);
        // The other provider of the same plugin is unaffected.
        host.get_credentials("fine", &Request::new()).await.unwrap();
        assert_eq!(sts.stats().await["sessions"], 1);
    }

    #[tokio::test]
    async fn declared_secret_keys_are_redacted_from_what_the_provider_says() {
        reauth_tests::logs();
        let sts = AcmeSts::start();
        // `otp_seed` is secret only because the plugin says so (its name is not
        // one the host would guess); the STS echoes every header it got.
        for s in ["wrong-key-5550123", "otp-seed-98765"] {
            reauth_tests::record_secret(s);
        }
        let host = Host::builder()
            .provider(
                "acme",
                acme(&sts)
                    .config("api_key", "wrong-key-5550123")
                    .config("otp_seed", "otp-seed-98765"),
            )
            .build()
            .unwrap();
        let e = provider_error(host.get_credentials("acme", &Request::new()).await);
        let shown = e.to_string();
        assert!(
            shown.contains("the STS refused the API key (HTTP 401)"),
            "{shown}"
        );
        assert!(
            shown.contains("[redacted]"),
            "the echo was not there: {shown}"
        );
        assert!(!shown.contains("otp-seed-98765"), "{shown}");
        assert!(!shown.contains("wrong-key-5550123"), "{shown}");
    }

    #[tokio::test]
    async fn reauth_get_after_error_exercises_the_security_error_path() {
        reauth_tests::logs();
        let sts = AcmeSts::start();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reauth.toml");
        std::fs::write(
            &path,
            format!(
                "[providers.acme]\nplugin = {:?}\nallowed_hosts = [{:?}]\nconfig = {{ sts_url = \"{}\", user = \"alice\", api_key = \"{}\" }}\n",
                plugins().acme_sts.display().to_string(),
                sts.addr,
                sts.url(),
                AcmeSts::API_KEY
            ),
        )
        .unwrap();
        let reauth = reauth_tests::workspace_binary("reauth-cli", "reauth");
        let run = |extra: &[&str]| {
            let output = std::process::Command::new(&reauth)
                .args(["get", "acme", "--config"])
                .arg(&path)
                .args(extra)
                .output()
                .expect("running reauth get");
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            assert!(output.status.success(), "{stdout}\n{stderr}");
            let json: serde_json::Value = serde_json::from_str(&stdout).expect("JSON on stdout");
            reauth_tests::record_secret(json["headers"]["authorization"].as_str().unwrap_or(""));
            (json, stderr)
        };
        let (_, stderr) = run(&[
            "--after-error",
            "unauthorized",
            "--status",
            "401",
            "--www-authenticate",
            r#"AcmeSession realm="acme", error="expired""#,
        ]);
        assert!(stderr.contains("decision: refresh-and-retry"), "{stderr}");
        assert_eq!(
            sts.stats().await["sessions"],
            2,
            "fetched, then fetched again"
        );
        let (_, stderr) = run(&[
            "--after-error",
            "unauthorized",
            "--www-authenticate",
            r#"AcmeSession error="revoked""#,
        ]);
        assert!(stderr.contains("decision: fail"), "{stderr}");
        let (_, stderr) = run(&["--after-error", "other", "--retry-after", "4"]);
        assert!(stderr.contains("decision: retry-after 4000 ms"), "{stderr}");
        assert_eq!(sts.stats().await["sessions"], 4);
        // `--status` and friends need `--after-error`.
        let output = std::process::Command::new(&reauth)
            .args(["get", "acme", "--status", "401", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "a usage error");
        // A provider that is not configured: reauth could not do it (3), named.
        let output = std::process::Command::new(&reauth)
            .args(["get", "nope", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(3), "a runtime error");
        assert!(String::from_utf8_lossy(&output.stderr).contains("unknown provider `nope`"));
    }

    #[tokio::test]
    async fn one_log_line_when_fetches_start_failing_naming_the_request_and_one_when_they_recover()
    {
        let logs = reauth_tests::logs();
        let sts = AcmeSts::start();
        let host = Host::builder()
            .provider("acme-health", acme(&sts))
            .build()
            .unwrap();
        sts.admin(json!({"mode": "down"})).await;
        for _ in 0..3 {
            let e = provider_error(host.get_credentials("acme-health", &Request::new()).await);
            assert!(matches!(e, ProviderError::Unavailable { .. }), "{e:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        sts.admin(json!({"mode": "ok"})).await;
        let mut recovered = false;
        for _ in 0..30 {
            if host
                .get_credentials("acme-health", &Request::new())
                .await
                .is_ok()
            {
                recovered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(recovered);
        let logged = logs.contents();
        let lines: Vec<&str> = logged
            .lines()
            .filter(|l| l.contains("acme-health"))
            .collect();
        let failing: Vec<&&str> = lines
            .iter()
            .filter(|l| l.contains("fetches are failing"))
            .collect();
        assert_eq!(
            failing.len(),
            1,
            "one line per outage:\n{}",
            lines.join("\n")
        );
        assert!(
            failing[0].contains(&format!("POST http://{}/sts/session: HTTP 503", sts.addr)),
            "the failing request is named: {}",
            failing[0]
        );
        let back: Vec<&&str> = lines
            .iter()
            .filter(|l| l.contains("fetches recovered"))
            .collect();
        assert_eq!(back.len(), 1, "{}", lines.join("\n"));
        assert!(back[0].contains("failed_fetches="), "{}", back[0]);
    }

    #[tokio::test]
    async fn a_0_1_0_component_loads_and_works_next_to_0_2_0_ones() {
        reauth_tests::logs();
        let sts = AcmeSts::start();
        let host = Host::builder()
            .provider("v01", ProviderConfig::new(&plugins().contract_v01))
            .provider(
                "v01-down",
                ProviderConfig::new(&plugins().contract_v01).config("fail", "unavailable"),
            )
            .provider("acme", acme(&sts))
            .build()
            .unwrap();
        let status = host.check().await;
        match &status["v01"] {
            ProviderStatus::Ready {
                contract,
                descriptor: Some(d),
                ..
            } => {
                assert_eq!(*contract, "0.1.0");
                assert!(d.name.is_empty() && d.config.is_none(), "{d:?}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            &status["acme"],
            ProviderStatus::Ready {
                contract: "0.2.0",
                ..
            }
        ));

        let c = host.get_credentials("v01", &Request::new()).await.unwrap();
        assert_eq!(bearer(&c.credential), "token-1");
        assert_eq!(c.principal.as_deref(), Some("v01"));
        // The 0.1.0 provider sees a security error without the 0.2 fields.
        let expired = SecurityError::new(SecurityErrorKind::Unauthorized)
            .status(401)
            .challenges(reauth::classify::parse_www_authenticate(
                r#"Bearer error="invalid_token""#,
            ))
            .retry_after(Duration::from_secs(1));
        let decision = host
            .handle_security_error("v01", &Request::new(), &c, &expired)
            .await
            .unwrap();
        assert_eq!(decision, Decision::RefreshAndRetry);
        // Its state (the 0.1.0 `state` interface) counted the second fetch.
        let next = host.get_credentials("v01", &Request::new()).await.unwrap();
        assert_eq!(bearer(&next.credential), "token-2");
        let decision = host
            .handle_security_error(
                "v01",
                &Request::new(),
                &next,
                &SecurityError::new(SecurityErrorKind::Forbidden),
            )
            .await
            .unwrap();
        assert_eq!(decision, Decision::RetryAfter(Duration::from_millis(7)));
        let e = provider_error(host.get_credentials("v01-down", &Request::new()).await);
        assert_eq!(
            e,
            ProviderError::Unavailable {
                message: "0.1.0 provider told to fail".into(),
                retry_after: None
            }
        );
        // And the 0.2.0 provider next to it is served.
        host.get_credentials("acme", &Request::new()).await.unwrap();
    }
}
