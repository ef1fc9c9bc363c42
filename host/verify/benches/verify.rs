//! `reauth::verify`: the cost of checking one bearer JWT with a cached key, per
//! algorithm (what a server embedding reauth pays per request).

#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use reauth_verify::Verifier;
use std::time::Duration;

fn claims() -> serde_json::Value {
    let now = jsonwebtoken::get_current_timestamp();
    serde_json::json!({"iss": "https://idp", "aud": "api", "sub": "svc", "exp": now + 3600, "iat": now})
}

fn benches(c: &mut Criterion) {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let base = || {
        Verifier::builder()
            .issuer("https://idp")
            .audience("api")
            .leeway(Duration::from_secs(5))
    };

    let secret = b"0123456789abcdef0123456789abcdef";
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(secret),
    )
    .unwrap();
    let hs_verifier = base().hmac_secret(secret).build().unwrap();

    let ec = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
    let ec_private = ec.to_pkcs8_pem(LineEnding::LF).unwrap();
    let ec_public = ec.public_key().to_public_key_pem(LineEnding::LF).unwrap();
    let es = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims(),
        &EncodingKey::from_ec_pem(ec_private.as_bytes()).unwrap(),
    )
    .unwrap();
    let es_verifier = base().ec_pem(None, ec_public.as_bytes()).build().unwrap();

    let mut group = c.benchmark_group("verify");
    group.bench_function("HS256", |b| {
        b.iter(|| tokio.block_on(hs_verifier.verify(&hs)).unwrap())
    });
    group.bench_function("ES256", |b| {
        b.iter(|| tokio.block_on(es_verifier.verify(&es)).unwrap())
    });
    group.bench_function("HS256 rejected (bad signature)", |b| {
        let forged = format!("{}x", &hs[..hs.len() - 1]);
        b.iter(|| tokio.block_on(hs_verifier.verify(&forged)).unwrap_err())
    });
    group.finish();
}

criterion_group!(verify, benches);
criterion_main!(verify);
