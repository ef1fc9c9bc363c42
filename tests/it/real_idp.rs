//! The OAuth2/OIDC providers against a real OpenID Connect provider (npm
//! `oidc-provider` 9.x, `tests/peers/idp/`) and a resource server that verifies its
//! JWTs with `reauth::verify` against the IdP's JWKS. Everything on 127.0.0.1.

use reauth::verify::Verifier;
use reauth::{
    CacheConfig, Credential, Credentials, Decision, Error, Host, ProviderConfig, ProviderError,
    Rejection, Request, SecurityError, SecurityErrorKind,
};
use reauth_tests::peers::{Idp, ResourceServer};
use reauth_tests::plugins;
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

const API: &str = "urn:reauth:test-api";
const CC_SECRET: &str = "cc-basic-secret-0123456789";

fn setup() {
    reauth_tests::logs();
    for s in [
        CC_SECRET,
        "cc-post-secret-0123456789",
        "rp-secret-0123456789",
    ] {
        reauth_tests::record_secret(s);
    }
}

/// Refresh-ahead tuned for 5 s tokens (the defaults assume minutes).
fn short_lived_cache() -> CacheConfig {
    {
        let mut c = CacheConfig::default();
        c.min_period_secs = 0;
        c.buffer_secs = 0;
        c.skew_secs = 1;
        c.min_interval_ms = 100;
        c.backoff_initial_ms = 200;
        c.backoff_max_ms = 2000;
        c
    }
}

fn cc_basic(idp: &Idp) -> ProviderConfig {
    let mut p = ProviderConfig::new(&plugins().oauth2)
        .allow_host(idp.authority())
        .config("issuer", &idp.issuer)
        .config("client_id", "cc-basic")
        .config("client_secret", CC_SECRET)
        .config("scope", "api:read");
    p.cache = short_lived_cache();
    p
}

async fn verifier(idp: &Idp, max_age: Duration) -> Verifier {
    Verifier::builder()
        .jwks_url(format!("{}/jwks", idp.issuer))
        .issuer(&idp.issuer)
        .audience(API)
        .leeway(Duration::ZERO)
        .jwks_max_age(max_age)
        .min_refetch_interval(Duration::ZERO)
        .build()
        .expect("verifier")
}

fn token(c: &Credentials) -> &str {
    match &c.credential {
        Credential::Bearer(t) => t.expose(),
        other => panic!("expected a bearer token, got {other:?}"),
    }
}

/// One operation against the resource server, classified the way a client would.
async fn call_api(
    url: &str,
    c: impl std::borrow::Borrow<Credentials>,
) -> Result<(), Rejection<String>> {
    reauth_tests::peers::call_api(url, token(c.borrow())).await
}

struct LoopResult {
    ops: u64,
    failures: Vec<String>,
}

/// Run operations back to back through `with_credentials` for `duration`.
async fn op_loop(host: &Host, provider: &str, url: &str, duration: Duration) -> LoopResult {
    let started = tokio::time::Instant::now();
    let (mut ops, mut failures) = (0u64, Vec::new());
    let mut seen = HashSet::new();
    while started.elapsed() < duration {
        let result = host
            .with_credentials(provider, &Request::new(), |c| {
                if seen.insert(token(&c).to_string()) {
                    reauth_tests::record_secret(token(&c));
                }
                call_api(url, c)
            })
            .await;
        ops += 1;
        if let Err(e) = result {
            failures.push(format!("{e:?}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    LoopResult { ops, failures }
}

fn keys(dir: &Path, name: &str) -> std::path::PathBuf {
    dir.join(format!("{name}.json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_loop_calls_the_idp_once_per_token_lifetime() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let idp = Idp::start(&keys(dir.path(), "k1"), 5, None);
    let api = ResourceServer::start(verifier(&idp, Duration::from_secs(3600)).await).await;
    let host = Host::builder()
        .provider("api", cc_basic(&idp))
        .build()
        .unwrap();

    let run = Duration::from_secs(16);
    let result = op_loop(&host, "api", &api.url, run).await;
    let (idp_ok, idp_failed) = idp.token_requests("cc-basic").await;
    let accepted = api.stats.accepted.load(Ordering::Relaxed);
    println!(
        "client_credentials: {} operations in {run:?}, {idp_ok} token requests \
         ({:.4} IdP calls per operation), {} rejected",
        result.ops,
        idp_ok as f64 / result.ops as f64,
        api.stats.expired.load(Ordering::Relaxed) + api.stats.invalid.load(Ordering::Relaxed),
    );
    assert!(
        result.failures.is_empty(),
        "failed operations: {:?}",
        result.failures
    );
    assert!(result.ops >= 200, "only {} operations ran", result.ops);
    assert_eq!(
        accepted, result.ops,
        "every operation was accepted first time"
    );
    assert_eq!(
        api.stats.expired.load(Ordering::Relaxed),
        0,
        "an expired token was sent"
    );
    // 16 s of 5 s tokens refreshed ahead at ~80%: 4–6 tokens. Never one per operation.
    assert!(
        (4..=7).contains(&idp_ok),
        "{idp_ok} token requests in {run:?}"
    );
    assert_eq!(idp_failed, 0);
    assert_eq!(
        host.plugin_calls("api"),
        idp_ok,
        "one plugin call per token"
    );
    // Discovery was fetched once and then served from the provider's state.
    let stats = idp.stats().await;
    assert!(stats.iter().all(|s| s.client == "cc-basic"), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_restart_with_a_new_signing_key_is_one_reauthentication() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let mut idp = Idp::start(&keys(dir.path(), "k1"), 30, None);
    // The resource server re-reads the JWKS every second, as a real one would
    // periodically, so it drops the old key soon after the IdP rotated it.
    let api = ResourceServer::start(verifier(&idp, Duration::from_secs(1)).await).await;
    let host = Host::builder()
        .provider("api", cc_basic(&idp))
        .build()
        .unwrap();

    let before = op_loop(&host, "api", &api.url, Duration::from_secs(2)).await;
    assert!(before.failures.is_empty(), "{:?}", before.failures);
    assert_eq!(host.plugin_calls("api"), 1, "30 s token: fetched once");

    idp.restart(&keys(dir.path(), "k2"));
    let after = op_loop(&host, "api", &api.url, Duration::from_secs(4)).await;
    assert!(
        after.failures.is_empty(),
        "failed operations: {:?}",
        after.failures
    );
    // The old token was rejected once (unknown key after the JWKS refresh); the
    // provider was asked, said refresh, and one new token served the rest.
    assert_eq!(
        api.stats.invalid.load(Ordering::Relaxed),
        1,
        "one rejection of the old token"
    );
    assert_eq!(host.plugin_calls("api"), 2, "exactly one re-authentication");
    let (ok, _) = idp.token_requests("cc-basic").await; // the restarted IdP's counters
    assert_eq!(ok, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_outage_serves_the_cached_token_backs_off_and_recovers() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let mut idp = Idp::start(&keys(dir.path(), "k1"), 5, None);
    let host = Host::builder()
        .provider("api", cc_basic(&idp))
        .build()
        .unwrap();
    let request = Request::new();
    let first = host.get_credentials("api", &request).await.unwrap();
    reauth_tests::record_secret(token(&first));
    let expires = first.expires_at.expect("expiry");

    idp.stop();
    // Poll hard for 7 s: the cached token keeps being served until it expires,
    // then the outage shows as `unavailable`.
    let started = tokio::time::Instant::now();
    let (mut served, mut unavailable, mut polls) = (0u64, 0u64, 0u64);
    while started.elapsed() < Duration::from_secs(7) {
        polls += 1;
        match host.get_credentials("api", &request).await {
            Ok(c) => {
                assert_eq!(
                    token(&c),
                    token(&first),
                    "only the cached token can be served"
                );
                assert!(
                    std::time::SystemTime::now() < expires,
                    "served past its expiry"
                );
                served += 1;
            }
            Err(Error::Provider {
                error: ProviderError::Unavailable { .. },
                ..
            }) => unavailable += 1,
            Err(e) => panic!("unexpected error during the outage: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let attempts = host.plugin_calls("api") - 1;
    println!(
        "outage: {polls} polls over 7 s, {served} served from cache, {unavailable} unavailable, \
         {attempts} plugin attempts"
    );
    assert!(
        served > 0 && unavailable > 0,
        "served {served}, unavailable {unavailable}"
    );
    // Backoff 200 ms doubling to 2 s: a handful of attempts, not one per poll.
    assert!(
        (2..=12).contains(&attempts),
        "{attempts} attempts during a 7 s outage"
    );

    idp.restart(&keys(dir.path(), "k1"));
    let back = tokio::time::Instant::now();
    let fresh = loop {
        match host.get_credentials("api", &request).await {
            Ok(c) => break c,
            Err(_) if back.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no recovery 10 s after the IdP came back: {e}"),
        }
    };
    reauth_tests::record_secret(token(&fresh));
    assert_ne!(token(&fresh), token(&first));
    println!(
        "outage: recovered {:?} after the IdP came back",
        back.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_auth_methods_and_idp_errors() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    // private_key_jwt: the client's P-256 key; the IdP knows its public JWK.
    let secret = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
    let pem = {
        use p256::pkcs8::{EncodePrivateKey, LineEnding};
        secret.to_pkcs8_pem(LineEnding::LF).unwrap().to_string()
    };
    reauth_tests::record_secret(pem.lines().nth(1).unwrap());
    let mut jwk: serde_json::Value =
        serde_json::from_str(&secret.public_key().to_jwk_string()).unwrap();
    jwk["alg"] = "ES256".into();
    jwk["kid"] = "client-key-1".into();
    let jwk_path = dir.path().join("client.jwk.json");
    std::fs::write(&jwk_path, jwk.to_string()).unwrap();
    let idp = Idp::start(&keys(dir.path(), "k1"), 60, Some(&jwk_path));
    let api = ResourceServer::start(verifier(&idp, Duration::from_secs(3600)).await).await;

    let with = |p: ProviderConfig| p.allow_host(idp.authority());
    let jwt_client = with(ProviderConfig::new(&plugins().oauth2))
        .config("issuer", &idp.issuer)
        .config("client_id", "cc-jwt")
        .config("private_key", &pem)
        .config("private_key_alg", "ES256")
        .config("private_key_kid", "client-key-1");
    let post_client = with(ProviderConfig::new(&plugins().oauth2))
        .config("token_url", format!("{}/token", idp.issuer))
        .config("auth_method", "client_secret_post")
        .config("client_id", "cc-post")
        .config("client_secret", "cc-post-secret-0123456789");
    let wrong_secret = with(ProviderConfig::new(&plugins().oauth2))
        .config("issuer", &idp.issuer)
        .config("client_id", "cc-basic")
        .config("client_secret", "not-the-secret");
    let bad_scope = with(ProviderConfig::new(&plugins().oauth2))
        .config("issuer", &idp.issuer)
        .config("client_id", "cc-post")
        .config("auth_method", "client_secret_post")
        .config("client_secret", "cc-post-secret-0123456789")
        .config("scope", "api:write");
    let wrong_issuer = with(ProviderConfig::new(&plugins().oauth2))
        .config("issuer", format!("{}/nowhere", idp.issuer))
        .config("client_id", "cc-basic")
        .config("client_secret", CC_SECRET);
    let resource = |r: &str| {
        with(ProviderConfig::new(&plugins().oauth2))
            .config("issuer", &idp.issuer)
            .config("client_id", "cc-basic")
            .config("client_secret", CC_SECRET)
            .config("audience_param", "resource")
            .config("audience", r)
    };
    let host = Host::builder()
        .provider("resource", resource(API))
        .provider("unknown-resource", resource("urn:unknown"))
        .provider("jwt", jwt_client)
        .provider("post", post_client)
        .provider("wrong-secret", wrong_secret)
        .provider("bad-scope", bad_scope)
        .provider("wrong-issuer", wrong_issuer)
        .build()
        .unwrap();

    // RFC 8707 resource indicator: the token is for exactly that resource.
    let c = host
        .get_credentials("resource", &Request::new())
        .await
        .unwrap();
    reauth_tests::record_secret(token(&c));
    call_api(&api.url, c)
        .await
        .expect("token for the named resource");

    for name in ["jwt", "post"] {
        let c = host.get_credentials(name, &Request::new()).await.unwrap();
        reauth_tests::record_secret(token(&c));
        call_api(&api.url, c.clone())
            .await
            .unwrap_or_else(|e| panic!("{name}: the resource server refused the token: {e:?}"));
        let client = if name == "jwt" { "cc-jwt" } else { "cc-post" };
        assert_eq!(
            c.principal.as_deref(),
            Some(format!("{}|{client}", idp.issuer).as_str())
        );
    }
    assert_eq!(
        idp.token_requests("cc-jwt").await,
        (1, 0),
        "private_key_jwt accepted"
    );

    let err = |r: Result<Arc<Credentials>, Error>| match r {
        Err(Error::Provider { error, .. }) => error,
        other => panic!("expected a provider error, got {other:?}"),
    };
    let e = err(host.get_credentials("wrong-secret", &Request::new()).await);
    assert!(
        matches!(&e, ProviderError::Denied(m) if m.contains("invalid_client")),
        "{e:?}"
    );
    let e = err(host.get_credentials("bad-scope", &Request::new()).await);
    assert!(
        matches!(&e, ProviderError::Misconfigured(m) if m.contains("invalid_scope")),
        "{e:?}"
    );
    let e = err(host
        .get_credentials("unknown-resource", &Request::new())
        .await);
    assert!(
        matches!(&e, ProviderError::Misconfigured(m) if m.contains("invalid_target")),
        "{e:?}"
    );
    let e = err(host.get_credentials("wrong-issuer", &Request::new()).await);
    assert!(
        matches!(&e, ProviderError::Misconfigured(m) if m.contains("discovery")),
        "{e:?}"
    );
}

fn refresh_provider(idp: &Idp, seed_file: &Path) -> ProviderConfig {
    let mut p = ProviderConfig::new(&plugins().oidc_refresh)
        .allow_host(idp.authority())
        .config("issuer", &idp.issuer)
        .config("client_id", "rp")
        .config("client_secret", "rp-secret-0123456789");
    p.config.insert(
        "refresh_token".into(),
        reauth::config::ConfigValue::File {
            file: seed_file.to_path_buf(),
        },
    );
    p
}

fn stored_refresh_token(state_dir: &Path) -> Option<String> {
    let state = reauth_tests::read_state(state_dir, "sso")?;
    let record: serde_json::Value = serde_json::from_str(state.get("refresh")?).ok()?;
    record["refresh_token"].as_str().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_token_rotation_survives_host_restarts() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let idp = Idp::start(&keys(dir.path(), "k1"), 60, None);
    let (seed, seed_file) = idp.offline_token(dir.path());
    let state_dir = dir.path().join("state");

    let mut used = vec![seed.clone()];
    let mut principals = HashSet::new();
    for round in 0..4 {
        // A new host each round: a restart between rotations. Without the shared
        // cache, so that each restart has to refresh (with it, the next test).
        let host = Host::builder()
            .state_dir(&state_dir)
            .shared_cache(None)
            .provider("sso", refresh_provider(&idp, &seed_file))
            .build()
            .unwrap();
        let request = Request::new();
        let c = host.get_credentials("sso", &request).await.unwrap();
        reauth_tests::record_secret(token(&c));
        principals.insert(c.principal.clone());
        let rotated = stored_refresh_token(&state_dir).expect("rotated token persisted");
        reauth_tests::record_secret(&rotated);
        assert!(
            !used.contains(&rotated),
            "round {round}: refresh token did not rotate"
        );
        used.push(rotated);
        if round == 1 {
            // Within one host: the server rejects the token, the provider says
            // refresh, and the next fetch rotates again.
            let e = SecurityError::new(SecurityErrorKind::TokenExpired).status(401);
            let d = host
                .handle_security_error("sso", &request, &c, &e)
                .await
                .unwrap();
            assert_eq!(d, Decision::RefreshAndRetry);
            let again = host.get_credentials("sso", &request).await.unwrap();
            reauth_tests::record_secret(token(&again));
            assert_ne!(token(&again), token(&c));
            let rotated = stored_refresh_token(&state_dir).unwrap();
            reauth_tests::record_secret(&rotated);
            assert!(!used.contains(&rotated));
            used.push(rotated);
        }
    }
    let (ok, failed) = idp.token_requests("rp").await;
    // 1 code exchange by the login, then one refresh per rotation.
    assert_eq!(ok, 1 + (used.len() as u64 - 1), "token requests: {ok}");
    assert_eq!(
        failed, 0,
        "a consumed refresh token was replayed (the IdP revoked the grant)"
    );
    assert_eq!(
        principals.into_iter().collect::<Vec<_>>(),
        vec![Some(format!("{}|alice", idp.issuer))],
        "principal is iss|sub, stable across refreshes"
    );
    println!(
        "refresh rotation: {} rotations, all persisted, none replayed",
        used.len() - 1
    );

    // With the shared cache (on by default with a state_dir), a restart within
    // the token's lifetime costs no IdP call at all; a server's rejection of the
    // shared token drops it for every process, and the next host refreshes.
    let shared_round = || {
        Host::builder()
            .state_dir(&state_dir)
            .provider("sso", refresh_provider(&idp, &seed_file))
            .build()
            .unwrap()
    };
    let first = shared_round();
    let c1 = first.get_credentials("sso", &Request::new()).await.unwrap();
    reauth_tests::record_secret(token(&c1));
    let before = idp.token_requests("rp").await;
    let second = shared_round();
    let c2 = second
        .get_credentials("sso", &Request::new())
        .await
        .unwrap();
    assert_eq!(
        token(&c1),
        token(&c2),
        "the restarted host took the shared token"
    );
    assert_eq!(idp.token_requests("rp").await, before, "no IdP call");
    let e = SecurityError::new(SecurityErrorKind::TokenExpired).status(401);
    let d = second
        .handle_security_error("sso", &Request::new(), &c2, &e)
        .await
        .unwrap();
    assert_eq!(d, Decision::RefreshAndRetry);
    let third = shared_round();
    let c3 = third.get_credentials("sso", &Request::new()).await.unwrap();
    reauth_tests::record_secret(token(&c3));
    assert_ne!(
        token(&c3),
        token(&c2),
        "the rejected token was dropped for all"
    );
    let after = idp.token_requests("rp").await;
    assert_eq!(
        (after.0 - before.0, after.1),
        (1, 0),
        "one refresh, no replay"
    );
    if let Some(rotated) = stored_refresh_token(&state_dir) {
        reauth_tests::record_secret(&rotated);
    }

    // A revoked/unknown refresh token: denied, telling the operator what to do.
    let bogus = dir.path().join("bogus-token");
    std::fs::write(&bogus, "not-a-real-refresh-token").unwrap();
    let host = Host::builder()
        .provider("sso", refresh_provider(&idp, &bogus))
        .build()
        .unwrap();
    match host.get_credentials("sso", &Request::new()).await {
        Err(Error::Provider {
            error: ProviderError::Denied(m),
            ..
        }) => assert!(m.contains("Log in again"), "{m}"),
        other => panic!("expected denied, got {other:?}"),
    }
}

/// #20: with the default backoff (100 ms doubling to 10 s), callers left without a
/// token during an IdP outage used to wait up to the last backoff step after the
/// IdP came back. Now a key with nothing to serve retries every 0.9–1 s: the
/// outage costs about one attempt a second, and every waiting caller is served
/// about a second after the IdP returns (the bench section `recovery` measures it
/// through the sidecar).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_callers_recover_soon_after_an_idp_outage_with_one_attempt_a_second() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let mut idp = Idp::start(&keys(dir.path(), "k1"), 3, None);
    let mut provider = cc_basic(&idp);
    // Only the refresh window is tuned for 3 s tokens; backoff as shipped.
    provider.cache = {
        let mut c = CacheConfig::default();
        c.min_period_secs = 0;
        c.buffer_secs = 0;
        c.skew_secs = 1;
        c
    };
    let host = std::sync::Arc::new(Host::builder().provider("api", provider).build().unwrap());
    let first = host.get_credentials("api", &Request::new()).await.unwrap();
    reauth_tests::record_secret(token(&first));

    idp.stop();
    let outage = Duration::from_secs(10);
    let pollers: Vec<_> = (0..8)
        .map(|_| {
            let host = host.clone();
            tokio::spawn(async move {
                let until = tokio::time::Instant::now() + outage;
                while tokio::time::Instant::now() < until {
                    let _ = host.get_credentials("api", &Request::new()).await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    for p in pollers {
        p.await.unwrap();
    }
    let attempts = host.plugin_calls("api") - 1;
    // The token (3 s) expired during the 10 s outage: then about one attempt a
    // second (100/200/400/800 ms steps first), not one per poll (8 × 50/s).
    assert!(
        (5..=20).contains(&attempts),
        "{attempts} IdP attempts during a 10 s outage"
    );

    idp.restart(&keys(dir.path(), "k1"));
    let back = tokio::time::Instant::now();
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let host = host.clone();
            tokio::spawn(async move {
                loop {
                    match host.get_credentials("api", &Request::new()).await {
                        Ok(c) => return (back.elapsed(), c),
                        Err(_) if back.elapsed() < Duration::from_secs(15) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => panic!("no recovery 15 s after the IdP came back: {e}"),
                    }
                }
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for c in callers {
        let (waited, credentials) = c.await.unwrap();
        reauth_tests::record_secret(token(&credentials));
        slowest = slowest.max(waited);
    }
    println!(
        "recovery: {attempts} attempts during a 10 s outage; all 8 callers served {slowest:?} after the IdP came back"
    );
    // The retry period is 0.9–1 s; the rest is the fetch itself on a loaded
    // 2-core machine. The old backoff could leave callers waiting ~8 s here.
    assert!(
        slowest < Duration::from_millis(2500),
        "callers waited {slowest:?} after the IdP came back"
    );
}

// ---- A provider that takes another provider's credential: AWS STS ----------

const ROLE: &str = "arn:aws:iam::123456789012:role/app";

/// `aws`: the shipped `aws-sts` provider against `sts_url`, its web identity
/// token taken from the provider `oidc` (`{ credential = "oidc" }`).
fn aws_sts(sts_url: &str) -> ProviderConfig {
    let authority = sts_url.trim_start_matches("http://").to_string();
    let mut p = ProviderConfig::new(&plugins().aws_sts)
        .allow_host(authority)
        .config("sts_url", sts_url)
        .config("role_arn", ROLE);
    p.config.insert(
        "web_identity_token".into(),
        reauth::config::ConfigValue::Credential(reauth::config::CredentialRef::new("oidc")),
    );
    p
}

fn header<'a>(c: &'a Credentials, name: &str) -> &'a str {
    match &c.credential {
        Credential::Headers(h) => h
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.expose())
            .unwrap_or_else(|| panic!("no {name} header")),
        other => panic!("expected header credentials, got {other:?}"),
    }
}

fn record_aws(c: &Credentials) {
    for name in ["aws-secret-access-key", "aws-session-token"] {
        reauth_tests::record_secret(header(c, name));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_sts_takes_its_web_identity_token_from_the_oidc_provider() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let idp = Idp::start(&keys(dir.path(), "k1"), 60, None);
    let moto = reauth_tests::peers::Moto::start();
    let host = Host::builder()
        .provider("oidc", cc_basic(&idp))
        .provider("aws", aws_sts(&moto.url))
        .build()
        .unwrap();

    let c = host.get_credentials("aws", &Request::new()).await.unwrap();
    record_aws(&c);
    assert!(header(&c, "aws-access-key-id").starts_with("ASIA"), "{c:?}");
    assert!(!header(&c, "aws-secret-access-key").is_empty());
    assert!(!header(&c, "aws-session-token").is_empty());
    assert_eq!(
        c.principal.as_deref(),
        Some("arn:aws:sts::123456789012:assumed-role/app/reauth")
    );
    // STS's Expiration (moto: an hour) became the expiry.
    let left = c
        .expires_at
        .expect("an expiry")
        .duration_since(host.now())
        .unwrap();
    assert!(
        left > Duration::from_secs(600) && left <= Duration::from_secs(43_200),
        "{left:?}"
    );
    // The OIDC token was fetched through the cache, once; the AWS credentials are
    // cached as well.
    assert_eq!(idp.token_requests("cc-basic").await, (1, 0));
    let again = host.get_credentials("aws", &Request::new()).await.unwrap();
    assert_eq!(
        header(&again, "aws-access-key-id"),
        header(&c, "aws-access-key-id")
    );
    assert_eq!(host.plugin_calls("aws"), 1);
    assert_eq!(host.plugin_calls("oidc"), 1);
    // The OIDC token is redacted from everything the aws provider says.
    let oidc = host.get_credentials("oidc", &Request::new()).await.unwrap();
    let token = token(&oidc).to_string();
    reauth_tests::record_secret(&token);
    assert!(
        !reauth_tests::logs().contents().contains(&token),
        "the borrowed token reached a log line"
    );
}

/// A scripted STS (`AssumeRoleWithWebIdentity` over real HTTP) that refuses the
/// web identity tokens it was told to (`InvalidIdentityToken`, as AWS does for a
/// token it cannot verify) and counts the calls.
struct ScriptedSts {
    url: String,
    calls: Arc<AtomicU64>,
    refused: Arc<std::sync::Mutex<Vec<String>>>,
    refuse_all: Arc<std::sync::atomic::AtomicBool>,
}

async fn scripted_sts() -> ScriptedSts {
    use axum::http::StatusCode;
    let calls = Arc::new(AtomicU64::new(0));
    let refused: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let refuse_all = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let app = axum::Router::new().route(
        "/",
        axum::routing::post({
            let (calls, refused, refuse_all) = (calls.clone(), refused.clone(), refuse_all.clone());
            move |body: String| {
                let (calls, refused, refuse_all, seen) =
                    (calls.clone(), refused.clone(), refuse_all.clone(), seen.clone());
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let token = body
                        .split('&')
                        .find_map(|kv| kv.strip_prefix("WebIdentityToken="))
                        .unwrap_or_default()
                        .to_string();
                    let first = {
                        let mut seen = seen.lock().unwrap();
                        let first = seen.is_empty();
                        seen.push(token.clone());
                        first
                    };
                    // The first token ever seen is refused (as if the IdP's key
                    // had been rotated away), and every token once told to.
                    if first || refuse_all.load(Ordering::SeqCst) {
                        refused.lock().unwrap().push(token);
                        return (
                            StatusCode::BAD_REQUEST,
                            "<ErrorResponse><Error><Type>Sender</Type><Code>InvalidIdentityToken</Code><Message>Couldn&apos;t retrieve verification key from your identity provider</Message></Error></ErrorResponse>".to_string(),
                        );
                    }
                    (
                        StatusCode::OK,
                        "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>ASIASCRIPTED</AccessKeyId><SecretAccessKey>scripted-aws-secret-31337</SecretAccessKey><SessionToken>scripted-session-token-4242</SessionToken><Expiration>2099-01-01T00:00:00Z</Expiration></Credentials><AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/app/reauth</Arn></AssumedRoleUser></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>".to_string(),
                    )
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    ScriptedSts {
        url,
        calls,
        refused,
        refuse_all,
    }
}

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_web_identity_token_is_renewed_once_at_the_idp() {
    setup();
    reauth_tests::record_secret("scripted-aws-secret-31337");
    reauth_tests::record_secret("scripted-session-token-4242");
    let dir = tempfile::tempdir().unwrap();
    let idp = Idp::start(&keys(dir.path(), "k1"), 60, None);
    let sts = scripted_sts().await;
    let mut oidc = cc_basic(&idp);
    // Reports of a rejected token are honoured at once here (the default is a
    // few seconds between forced refreshes of one key).
    oidc.cache.min_reauth_interval_ms = 0;
    let mut aws = aws_sts(&sts.url);
    aws.cache = short_lived_cache();
    let host = Host::builder()
        .provider("oidc", oidc)
        .provider("aws", aws)
        .build()
        .unwrap();

    // STS refuses the first OIDC token: the host reports it to `oidc` as
    // rejected, `oidc` fetches a new one, and the fetch of `aws` runs once more.
    let c = host.get_credentials("aws", &Request::new()).await.unwrap();
    assert_eq!(header(&c, "aws-access-key-id"), "ASIASCRIPTED");
    assert_eq!(sts.calls.load(Ordering::SeqCst), 2);
    assert_eq!(idp.token_requests("cc-basic").await, (2, 0));
    let refused = sts.refused.lock().unwrap().clone();
    assert_eq!(refused.len(), 1);
    let current = token(&host.get_credentials("oidc", &Request::new()).await.unwrap()).to_string();
    reauth_tests::record_secret(&current);
    reauth_tests::record_secret(&refused[0]);
    assert_ne!(current, refused[0], "the refused token was replaced");

    // A STS that refuses every token: one renewal per fetch, then `denied` with
    // STS's message; no loop against the IdP.
    sts.refuse_all.store(true, Ordering::SeqCst);
    let err = host
        .get_credentials("aws", &Request::new().audience("another-key"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            Error::Provider {
                error: ProviderError::Denied(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(text.contains("InvalidIdentityToken"), "{text}");
    assert!(
        text.contains("Couldn't retrieve verification key"),
        "{text}"
    );
    assert!(!text.contains(&current), "{text}");
    assert_eq!(sts.calls.load(Ordering::SeqCst), 4);
    assert_eq!(idp.token_requests("cc-basic").await, (3, 0));
}

/// botocore, as the AWS CLI and SDKs use it: a profile's `credential_process`
/// runs `reauth aws-credential-process`, whose `aws` provider assumes a role at
/// the local STS (moto) with the OIDC token of the `oidc` provider (the IdP).
/// botocore then signs `GetCallerIdentity` with those credentials, and moto
/// answers with the role they belong to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn botocore_signs_with_credentials_from_aws_credential_process() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let idp = Idp::start(&keys(dir.path(), "k1"), 60, None);
    let moto = reauth_tests::peers::Moto::start();
    let config = dir.path().join("reauth.toml");
    std::fs::write(
        &config,
        format!(
            r#"[providers.oidc]
plugin = "{oauth2}"
allowed_hosts = ["{idp_host}"]
[providers.oidc.config]
issuer = "{issuer}"
client_id = "cc-basic"
client_secret = "{CC_SECRET}"
scope = "api:read"

[providers.aws]
plugin = "{aws}"
allowed_hosts = ["{moto_host}"]
[providers.aws.config]
sts_url = "{moto}"
role_arn = "{ROLE}"
web_identity_token = {{ credential = "oidc" }}
session_name = "botocore-test"
"#,
            oauth2 = plugins().oauth2.display(),
            idp_host = idp.authority(),
            issuer = idp.issuer,
            aws = plugins().aws_sts.display(),
            moto_host = moto.url.trim_start_matches("http://"),
            moto = moto.url,
        ),
    )
    .unwrap();
    let reauth = reauth_tests::workspace_binary("reauth", "reauth");
    let aws_config = dir.path().join("aws-config");
    std::fs::write(
        &aws_config,
        format!(
            "[profile app]\nregion = us-east-1\ncredential_process = {} aws-credential-process --provider aws --config {}\n",
            reauth.display(),
            config.display()
        ),
    )
    .unwrap();
    let script = r#"
import json, sys, botocore.session
session = botocore.session.Session(profile="app")
client = session.create_client("sts", endpoint_url=sys.argv[1])
identity = client.get_caller_identity()
frozen = session.get_credentials().get_frozen_credentials()
print(json.dumps({"arn": identity["Arn"], "key": frozen.access_key, "method": session.get_credentials().method}))
"#;
    let mut cmd = std::process::Command::new(reauth_tests::peers::Moto::python());
    cmd.args(["-c", script, &moto.url])
        .env("AWS_CONFIG_FILE", &aws_config)
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("none"))
        .env("AWS_EC2_METADATA_DISABLED", "true");
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_")
            && !matches!(
                k.as_str(),
                "AWS_CONFIG_FILE" | "AWS_SHARED_CREDENTIALS_FILE" | "AWS_EC2_METADATA_DISABLED"
            )
        {
            cmd.env_remove(k);
        }
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("running botocore");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "botocore failed: {stderr}");
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        got["arn"], "arn:aws:sts::123456789012:assumed-role/app/botocore-test",
        "{got}"
    );
    assert!(got["key"].as_str().unwrap().starts_with("ASIA"), "{got}");
    assert_eq!(got["method"], "custom-process");
    assert_eq!(idp.token_requests("cc-basic").await, (1, 0));
    assert!(!stderr.contains(CC_SECRET));
}
