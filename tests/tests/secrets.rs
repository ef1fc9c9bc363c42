//! Secret hygiene: its own test binary, because it installs a process-wide
//! `tracing` subscriber and must see every log line the host writes.

use reauth::issuer::{DevClient, DevIssuer, DevIssuerConfig};
use reauth::{Credential, Host, ProviderConfig, Request, SecurityError, SecurityErrorKind};
use reauth_tests::{CapturedLogs, plugins};
use std::time::Duration;

const SECRET: &str = "client-secret-9f8e7d";

/// Secrets (client secret, issued tokens, passwords) never appear in logs, error
/// messages or `Debug` output, across a run that exercises success and failures.
#[tokio::test]
async fn secrets_stay_out_of_logs_errors_and_debug() {
    let logs = CapturedLogs::default();
    logs.install_global();
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
