//! `reauth::verify` against the real IdP's tokens and JWKS: expired, forged,
//! wrong-audience and unknown-`kid` tokens are told apart; an unknown `kid` makes the
//! verifier refetch the JWKS, and a flood of them does not.

use base64::Engine as _;
use reauth::verify::{Verifier, VerifyError};
use reauth_tests::peers::{Idp, http};
use std::time::Duration;

const API: &str = "urn:reauth:test-api";

async fn client_credentials_token(idp: &Idp) -> String {
    let basic =
        base64::engine::general_purpose::STANDARD.encode("cc-basic:cc-basic-secret-0123456789");
    let auth = format!("Basic {basic}");
    let (status, _, body) = http(
        &idp.issuer,
        "POST",
        "/token",
        &[
            ("authorization", &auth),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        Some(b"grant_type=client_credentials".to_vec()),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let token = json["access_token"].as_str().unwrap().to_string();
    reauth_tests::record_secret(&token);
    token
}

fn verifier(idp: &Idp, audience: &str, min_refetch: Duration) -> Verifier {
    Verifier::builder()
        .jwks_url(format!("{}/jwks", idp.issuer))
        .issuer(&idp.issuer)
        .audience(audience)
        .leeway(Duration::ZERO)
        .min_refetch_interval(min_refetch)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_tokens_are_classified() {
    reauth_tests::logs();
    reauth_tests::record_secret("cc-basic-secret-0123456789");
    let dir = tempfile::tempdir().unwrap();
    let mut idp = Idp::start(&dir.path().join("k1.json"), 2, None);
    let v = verifier(&idp, API, Duration::from_secs(60));

    let token = client_credentials_token(&idp).await;
    let claims = v.verify(&token).await.expect("a fresh token verifies");
    assert_eq!(claims.sub.as_deref(), Some("cc-basic"));
    assert_eq!(claims.iss.as_deref(), Some(idp.issuer.as_str()));
    assert_eq!(v.jwks_fetches().await, 1);

    // Forged: the payload changed, the signature kept.
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    let mut payload: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&parts[1])
            .unwrap(),
    )
    .unwrap();
    payload["sub"] = "mallory".into();
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload.to_string());
    assert_eq!(
        v.verify(&parts.join(".")).await.unwrap_err(),
        VerifyError::InvalidSignature
    );

    // Another audience.
    let other = verifier(&idp, "urn:another-api", Duration::from_secs(60));
    assert_eq!(
        other.verify(&token).await.unwrap_err(),
        VerifyError::WrongAudience
    );

    // Expired: genuine but past its 2 s lifetime.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let e = v.verify(&token).await.unwrap_err();
    assert!(e.is_expired(), "{e:?}");
    assert!(e.www_authenticate().contains("expired"));

    // The IdP rotates its signing key: a token with the new `kid` makes the verifier
    // refetch the JWKS once, then verifies.
    idp.restart(&dir.path().join("k2.json"));
    let rotated = client_credentials_token(&idp).await;
    v.verify(&rotated)
        .await
        .expect("the new key is fetched on demand");
    assert_eq!(v.jwks_fetches().await, 2);
    // The old key is gone: a token signed with it is now an unknown key (not expired),
    // and the refetch it triggers is rate-limited (60 s here): no new fetch.
    match v.verify(&token).await.unwrap_err() {
        VerifyError::UnknownKey { kid } => assert!(!kid.is_empty()),
        other => panic!("expected an unknown key, got {other:?}"),
    }
    assert_eq!(v.jwks_fetches().await, 2, "rate-limited refetch");

    // A flood of tokens naming made-up keys costs one refetch.
    let fresh = verifier(&idp, API, Duration::from_secs(60));
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let forged: Vec<String> = (0..200)
        .map(|i| {
            let h = header.encode(format!(r#"{{"alg":"RS256","kid":"bogus-{i}"}}"#));
            format!("{h}.{}.{}", parts[1], parts[2])
        })
        .collect();
    let results = futures_util::future::join_all(forged.iter().map(|t| fresh.verify(t))).await;
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(VerifyError::UnknownKey { .. })))
    );
    assert_eq!(
        fresh.jwks_fetches().await,
        2,
        "200 unknown kids: the first load and one refetch"
    );
}

/// The JWKS is refreshed in the background at 80 % of `jwks_max_age` (once the
/// verifier has verified a token): no request pays the periodic fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jwks_is_refreshed_ahead_of_its_max_age_in_the_background() {
    reauth_tests::logs();
    reauth_tests::record_secret("cc-basic-secret-0123456789");
    let dir = tempfile::tempdir().unwrap();
    let idp = Idp::start(&dir.path().join("k1.json"), 60, None);
    let v = Verifier::builder()
        .jwks_url(format!("{}/jwks", idp.issuer))
        .issuer(&idp.issuer)
        .audience(API)
        .jwks_max_age(Duration::from_secs(2))
        .min_refetch_interval(Duration::ZERO)
        .build()
        .unwrap();
    let token = client_credentials_token(&idp).await;
    v.verify(&token).await.unwrap();
    assert_eq!(v.jwks_fetches().await, 1);
    // At 1.6 s the refresher fetched; nobody asked.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while v.jwks_fetches().await < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no background refresh"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past the original keys' max age, a verification finds fresh keys: it does
    // not fetch inline.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = v.jwks_fetches().await;
    v.verify(&token).await.unwrap();
    assert_eq!(v.jwks_fetches().await, before, "a request paid the fetch");
}
