//! Secret hygiene: its own test binary, because it installs a process-wide
//! `tracing` subscriber and must see every log line the host writes.

use reauth::{Credential, Host, ProviderConfig, Request, SecurityError, SecurityErrorKind};
use reauth_cli::issuer::{DevClient, DevIssuer, DevIssuerConfig};
use reauth_tests::{plugins, record_secret};
use std::time::Duration;

const SECRET: &str = "client-secret-9f8e7d";

/// Secrets (client secret, issued tokens, passwords) never appear in logs, error
/// messages or `Debug` output, across a run that exercises success and failures.
#[tokio::test]
async fn secrets_stay_out_of_logs_errors_and_debug() {
    let logs = reauth_tests::logs();
    let issuer = DevIssuer::start(DevIssuerConfig {
        clients: vec![DevClient::new("svc", SECRET)],
        token_lifetime: Duration::from_secs(60),
        ..DevIssuerConfig::default()
    })
    .await
    .unwrap();
    let oauth2 = |secret: &str| {
        ProviderConfig::new(&plugins().oauth2)
            .allow_host(issuer.addr().to_string())
            .config("token_url", issuer.token_url())
            .config("client_id", "svc")
            .config("client_secret", secret)
    };
    let bearer = |c: &Credential| match c {
        Credential::Bearer(t) => t.expose().to_string(),
        other => panic!("{other:?}"),
    };
    let host = Host::builder()
        .provider("good", oauth2(SECRET))
        .provider("bad", oauth2("wrong-secret-5a4b3c"))
        .provider(
            "static",
            ProviderConfig::new(&plugins().static_)
                .config("username", "u")
                .config("password", "static-pw-1q2w3e"),
        )
        .build()
        .unwrap();
    let c = host.get_credentials("good", &Request::new()).await.unwrap();
    let token = bearer(&c.credential);
    record_secret(&token);
    let e = host
        .get_credentials("bad", &Request::new())
        .await
        .unwrap_err();
    let s = host
        .get_credentials("static", &Request::new())
        .await
        .unwrap();
    host.handle_security_error(
        "good",
        &Request::new(),
        &c,
        &SecurityError::new(SecurityErrorKind::TokenExpired),
    )
    .await
    .unwrap();
    let shown = format!("{c:?} {s:?} {e} {e:?} {host:?} {:?}", oauth2(SECRET));
    let logged = logs.contents();
    assert!(
        logged.contains("provider loaded"),
        "logs were captured: {logged}"
    );
    for secret in [
        SECRET,
        "wrong-secret-5a4b3c",
        "static-pw-1q2w3e",
        token.as_str(),
    ] {
        assert!(!shown.contains(secret), "secret in output: {shown}");
        assert!(!logged.contains(secret), "secret in logs");
    }
    issuer.shutdown().await;
}

/// A plugin that prints its config secret, a refresh token it stores in `state`
/// and the token it returns: the host redacts all three from the captured output
/// it logs. A plugin that puts its secret in an error message: redacted there too.
#[tokio::test]
async fn secrets_a_plugin_echoes_are_redacted() {
    let logs = reauth_tests::logs();
    const ECHOED: &str = "echoed-secret-7h6g5f";
    let host = Host::builder()
        .provider(
            "echo",
            ProviderConfig::new(&plugins().hostile)
                .config("mode", "echo-secret")
                .config("secret", ECHOED),
        )
        .provider(
            "leaky-error",
            ProviderConfig::new(&plugins().hostile)
                .config("mode", "leak-in-error")
                .config("secret", ECHOED),
        )
        .build()
        .unwrap();
    let c = host.get_credentials("echo", &Request::new()).await.unwrap();
    let token = match &c.credential {
        Credential::Bearer(t) => t.expose().to_string(),
        other => panic!("{other:?}"),
    };
    let refresh_token = format!("rt-{}-rotated", ECHOED.len());
    record_secret(&token);
    record_secret(&refresh_token);
    let e = host
        .get_credentials("leaky-error", &Request::new())
        .await
        .unwrap_err();
    let shown = format!("{e} {e:?}");
    assert!(
        shown.contains("IdP refused client secret [redacted]"),
        "{shown}"
    );
    let logged = logs.contents();
    assert!(
        logged.contains("debug: the secret is [redacted]")
            && logged.contains("debug: stored refresh token [redacted]")
            && logged.contains("debug: returning [redacted]"),
        "the plugin's output was logged, redacted: {logged}"
    );
    for secret in [ECHOED, token.as_str(), refresh_token.as_str()] {
        assert!(!shown.contains(secret), "secret in error: {shown}");
        assert!(!logged.contains(secret), "secret in logs");
    }
}
