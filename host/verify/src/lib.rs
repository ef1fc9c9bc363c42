//! Bearer-token verification for servers that embed reauth: the other side of the
//! credentials reauth hands out. Its own crate, with no wasmtime (the `reauth`
//! crate re-exports it as `reauth::verify` with its default `verify` feature).
//!
//! A [`Verifier`] checks a JWT's signature against static keys (HMAC, RSA, ECDSA,
//! EdDSA) or a JWKS URL, then its `exp`, `nbf`, `iss` and `aud` with a configurable
//! leeway. Failures are classified so a server can answer the right way:
//! [`VerifyError::Expired`] means "authenticate again" (the signature was good), every
//! other failure means "this token is not acceptable". [`VerifyError::www_authenticate`]
//! gives the RFC 6750 challenge for either.
//!
//! JWKS keys are cached. A token whose `kid` is not in the cache triggers one refetch,
//! at most once per `min_refetch_interval`: a key rotation is picked up at once, and a
//! flood of tokens with made-up `kid`s cannot turn the verifier into a load generator
//! against the IdP. Concurrent refetches are coalesced into one request. Once a
//! verifier has verified a token inside a tokio runtime, a background task
//! refreshes the JWKS at 80 % of `jwks_max_age`, so no request pays the periodic
//! fetch (the task ends when the verifier is dropped).
//!
//! ```no_run
//! use reauth_verify::Verifier;
//! use std::time::Duration;
//!
//! # async fn demo(token: &str) -> Result<(), Box<dyn std::error::Error>> {
//! let verifier = Verifier::builder()
//!     .jwks_url("https://idp.example.com/jwks")
//!     .issuer("https://idp.example.com")
//!     .audience("urn:orders-api")
//!     .leeway(Duration::from_secs(30))
//!     .build()?;
//! match verifier.verify(token).await {
//!     Ok(claims) => println!("hello {}", claims.sub.as_deref().unwrap_or("?")),
//!     Err(e) if e.is_expired() => { /* 401, error="invalid_token", "expired": re-authenticate */ }
//!     Err(e) => { /* 401 with e.www_authenticate() */ let _ = e; }
//! }
//! # Ok(()) }
//! ```

// Every public type makes a deliberate choice: `#[non_exhaustive]`, or an
// `allow` saying why it is complete.
#![warn(clippy::exhaustive_enums, clippy::exhaustive_structs)]

use bytes::Bytes;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The token is genuine but past its `exp` (plus leeway): the client should
    /// authenticate again.
    #[error("token expired at {expired_at} (unix seconds)")]
    Expired {
        /// The token's `exp`.
        expired_at: u64,
    },
    /// The token's `nbf` is in the future (beyond the leeway).
    #[error("token not valid yet")]
    NotYetValid,
    /// The signature does not match any acceptable key.
    #[error("invalid signature")]
    InvalidSignature,
    /// The token names a key (`kid`) the key source does not have, even after a refetch.
    #[error("unknown signing key `{kid}`")]
    UnknownKey {
        /// The `kid` from the token header.
        kid: String,
    },
    /// The token is for another audience.
    #[error("token is not for this audience")]
    WrongAudience,
    /// The token was issued by another issuer.
    #[error("token is from an unexpected issuer")]
    WrongIssuer,
    /// The token's algorithm is not allowed for the key that would verify it.
    #[error("algorithm `{0}` is not allowed")]
    DisallowedAlgorithm(String),
    /// The token is not a well-formed JWT, or a required claim is missing or malformed.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The JWKS could not be fetched or read, and no cached key matched.
    #[error("signing keys unavailable: {0}")]
    KeysUnavailable(String),
}

impl VerifyError {
    /// `true` for a genuine token that expired: the client should re-authenticate,
    /// as opposed to a token that was never acceptable.
    pub fn is_expired(&self) -> bool {
        matches!(self, VerifyError::Expired { .. })
    }

    /// The RFC 6750 `WWW-Authenticate` challenge for this failure. Carries no token
    /// material, only the classification.
    pub fn www_authenticate(&self) -> String {
        let description = match self {
            VerifyError::Expired { .. } => "the access token expired",
            VerifyError::NotYetValid => "the access token is not valid yet",
            VerifyError::WrongAudience => "the access token is for another audience",
            VerifyError::WrongIssuer => "the access token is from another issuer",
            VerifyError::KeysUnavailable(_) => "the signing keys are unavailable",
            _ => "the access token is invalid",
        };
        format!("Bearer error=\"invalid_token\", error_description=\"{description}\"")
    }
}

/// A problem with the verifier's own configuration (a bad key, no key source).
#[derive(Debug, thiserror::Error)]
#[error("verifier configuration: {0}")]
pub struct VerifierConfigError(String);

/// The claims of an accepted token.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct Claims {
    /// Subject.
    #[serde(default)]
    pub sub: Option<String>,
    /// Issuer.
    #[serde(default)]
    pub iss: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Not-before, seconds since the Unix epoch.
    #[serde(default)]
    pub nbf: Option<u64>,
    /// Issued-at, seconds since the Unix epoch.
    #[serde(default)]
    pub iat: Option<u64>,
    /// Every claim, the registered ones included.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The algorithms an RSA key may verify.
const RSA_ALGORITHMS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// One verification key and the algorithms it may verify.
#[derive(Clone)]
struct Key {
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

enum Source {
    Static(Vec<(Option<String>, Key)>),
    Jwks(Arc<Jwks>),
}

struct Jwks {
    url: http::Uri,
    min_refetch: Duration,
    max_age: Duration,
    timeout: Duration,
    state: tokio::sync::Mutex<JwksState>,
    /// The keys and when they were fetched: read without the fetch lock, swapped
    /// after each successful fetch.
    keys: std::sync::RwLock<Arc<KeySet>>,
    /// Whether the background refresher runs (started by the first verification
    /// inside a tokio runtime; it ends when the verifier is dropped, or with its
    /// runtime, and then starts again at the next verification).
    refresher: Arc<std::sync::atomic::AtomicBool>,
    /// Tells the refresher the verifier is gone (it may be asleep for most of
    /// `jwks_max_age`).
    stop: Arc<tokio::sync::Notify>,
}

impl Drop for Jwks {
    fn drop(&mut self) {
        // A permit is stored if the refresher is not waiting right now.
        self.stop.notify_one();
    }
}

/// Clears the refresher flag when the refresher task ends, however it ends (its
/// runtime shutting down drops it mid-sleep).
struct RefresherRunning(Arc<std::sync::atomic::AtomicBool>);

impl Drop for RefresherRunning {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Why the JWKS is refetched; each reason has its own rate limit, so the initial
/// (or periodic) fetch never blocks the refetch a key rotation needs.
#[derive(Clone, Copy, Debug)]
enum Refetch {
    /// No keys yet, or the cached ones are older than `max_age`.
    Stale,
    /// A token named a `kid` the cache does not have.
    UnknownKid,
}

#[derive(Default)]
struct KeySet {
    keys: HashMap<String, Key>,
    fetched: Option<Instant>,
}

#[derive(Default)]
struct JwksState {
    last_stale: Option<Instant>,
    last_unknown_kid: Option<Instant>,
    fetches: u64,
}

/// Verifies bearer JWTs; cheap to share (`Arc` it) across request handlers.
pub struct Verifier {
    source: Source,
    issuers: Vec<String>,
    audiences: Vec<String>,
    leeway: Duration,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match &self.source {
            Source::Static(keys) => format!("{} static key(s)", keys.len()),
            Source::Jwks(j) => format!("jwks {}", j.url),
        };
        f.debug_struct("Verifier")
            .field("source", &source)
            .field("issuers", &self.issuers)
            .field("audiences", &self.audiences)
            .field("leeway", &self.leeway)
            .finish()
    }
}

/// Builds a [`Verifier`]; see [`Verifier::builder`].
#[derive(Default)]
pub struct VerifierBuilder {
    keys: Vec<(Option<String>, Key)>,
    jwks_url: Option<String>,
    issuers: Vec<String>,
    audiences: Vec<String>,
    any_audience: bool,
    leeway: Option<Duration>,
    min_refetch: Option<Duration>,
    max_age: Option<Duration>,
    timeout: Option<Duration>,
    error: Option<String>,
}

impl fmt::Debug for VerifierBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys (an HMAC secret among them) are never printed, only counted.
        f.debug_struct("VerifierBuilder")
            .field("keys", &self.keys.len())
            .field("jwks_url", &self.jwks_url)
            .field("issuers", &self.issuers)
            .field("audiences", &self.audiences)
            .finish_non_exhaustive()
    }
}

fn pem_key(
    what: &str,
    pem: &[u8],
    parse: fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>,
) -> Result<DecodingKey, String> {
    parse(pem).map_err(|e| format!("{what} public key is not a valid PEM: {e}"))
}

impl VerifierBuilder {
    fn push(
        mut self,
        kid: Option<&str>,
        key: Result<DecodingKey, String>,
        algs: &[Algorithm],
    ) -> Self {
        match key {
            Ok(key) => self.keys.push((
                kid.map(str::to_string),
                Key {
                    key,
                    algorithms: algs.to_vec(),
                },
            )),
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
        self
    }

    /// An HMAC secret (HS256/384/512).
    pub fn hmac_secret(self, secret: &[u8]) -> Self {
        let algs = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
        self.push(None, Ok(DecodingKey::from_secret(secret)), &algs)
    }

    /// An RSA public key in PEM (RS256/384/512, PS256/384/512), optionally bound to a `kid`.
    pub fn rsa_pem(self, kid: Option<&str>, pem: &[u8]) -> Self {
        let key = pem_key("RSA", pem, DecodingKey::from_rsa_pem);
        self.push(kid, key, &RSA_ALGORITHMS)
    }

    /// An ECDSA public key in PEM (ES256 or ES384), optionally bound to a `kid`.
    pub fn ec_pem(self, kid: Option<&str>, pem: &[u8]) -> Self {
        let key = pem_key("EC", pem, DecodingKey::from_ec_pem);
        self.push(kid, key, &[Algorithm::ES256, Algorithm::ES384])
    }

    /// An Ed25519 public key in PEM (EdDSA), optionally bound to a `kid`.
    pub fn ed_pem(self, kid: Option<&str>, pem: &[u8]) -> Self {
        let key = pem_key("Ed25519", pem, DecodingKey::from_ed_pem);
        self.push(kid, key, &[Algorithm::EdDSA])
    }

    /// Fetch keys from this JWKS URL (https, or http to a loopback host).
    pub fn jwks_url(mut self, url: impl Into<String>) -> Self {
        self.jwks_url = Some(url.into());
        self
    }

    /// Accept tokens from this issuer (`iss`); call again to accept several.
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuers.push(issuer.into());
        self
    }

    /// Accept tokens for this audience (`aud`); call again to accept several. An
    /// audience is required unless [`VerifierBuilder::any_audience`] says otherwise.
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audiences.push(audience.into());
        self
    }

    /// Do not check `aud` (for tokens that carry none). Explicit, because a verifier
    /// without an audience accepts tokens minted for any other service of the IdP.
    pub fn any_audience(mut self) -> Self {
        self.any_audience = true;
        self
    }

    /// Clock skew tolerated on `exp` and `nbf` (default 30 s).
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = Some(leeway);
        self
    }

    /// At most one JWKS refetch per this interval when a token names an unknown
    /// `kid`, and at most one attempt per interval while the keys are missing or
    /// stale (default 30 s).
    pub fn min_refetch_interval(mut self, interval: Duration) -> Self {
        self.min_refetch = Some(interval);
        self
    }

    /// Refetch the JWKS when the cached copy is older than this (default 1 h).
    pub fn jwks_max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// Timeout of one JWKS fetch (default 5 s).
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The verifier, or what is wrong with its configuration.
    pub fn build(self) -> Result<Verifier, VerifierConfigError> {
        if let Some(e) = self.error {
            return Err(VerifierConfigError(e));
        }
        if self.audiences.is_empty() && !self.any_audience {
            return Err(VerifierConfigError(
                "no audience: set one (or call any_audience() to accept every audience)".into(),
            ));
        }
        let source = match (self.jwks_url, self.keys.is_empty()) {
            (Some(_), false) => {
                return Err(VerifierConfigError(
                    "give either static keys or a JWKS URL, not both".into(),
                ));
            }
            (None, true) => return Err(VerifierConfigError("no key and no JWKS URL".into())),
            (None, false) => Source::Static(self.keys),
            (Some(url), true) => {
                let uri: http::Uri = url
                    .parse()
                    .map_err(|e| VerifierConfigError(format!("JWKS URL `{url}`: {e}")))?;
                let host = uri.host().unwrap_or_default();
                match uri.scheme_str() {
                    Some("https") => {}
                    Some("http") if reauth_core::hosts::is_loopback(host) => {}
                    _ => {
                        return Err(VerifierConfigError(format!(
                            "JWKS URL `{url}` must be https (http only to a loopback host)"
                        )));
                    }
                }
                Source::Jwks(Arc::new(Jwks {
                    url: uri,
                    min_refetch: self.min_refetch.unwrap_or(Duration::from_secs(30)),
                    max_age: self.max_age.unwrap_or(Duration::from_secs(3600)),
                    timeout: self.timeout.unwrap_or(Duration::from_secs(5)),
                    state: Default::default(),
                    keys: Default::default(),
                    refresher: Default::default(),
                    stop: Default::default(),
                }))
            }
        };
        Ok(Verifier {
            source,
            issuers: self.issuers,
            audiences: self.audiences,
            leeway: self.leeway.unwrap_or(Duration::from_secs(30)),
        })
    }
}

/// The algorithms a JWK may verify: its `alg` if it states one, else its key type's.
fn jwk_algorithms(jwk: &jsonwebtoken::jwk::Jwk) -> Vec<Algorithm> {
    if let Some(alg) = jwk
        .common
        .key_algorithm
        .and_then(|a| a.to_string().parse::<Algorithm>().ok())
    {
        return vec![alg];
    }
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => RSA_ALGORITHMS.to_vec(),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => vec![],
        },
        AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
        // Symmetric keys are never taken from a JWKS URL: anyone who can read the
        // (public) JWKS could mint tokens.
        _ => vec![],
    }
}

impl Jwks {
    fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Refetch unless another task just did or the rate limit says no. Returns the
    /// keys to use afterwards, and the fetch error, if a fetch was tried and failed.
    async fn refetch(&self, reason: Refetch) -> (Arc<KeySet>, Option<String>) {
        let before = self.current();
        let mut state = self.state.lock().await;
        let now_keys = self.current();
        if !Arc::ptr_eq(&now_keys, &before) {
            return (now_keys, None); // another task refetched while we waited
        }
        let last = match reason {
            Refetch::Stale => &mut state.last_stale,
            Refetch::UnknownKid => &mut state.last_unknown_kid,
        };
        if last.is_some_and(|t| t.elapsed() < self.min_refetch) {
            tracing::debug!(url = %self.url, ?reason, "JWKS refetch rate-limited");
            return (now_keys, None);
        }
        *last = Some(Instant::now());
        state.fetches += 1;
        match tokio::time::timeout(self.timeout, fetch_jwks(&self.url)).await {
            Ok(Ok(set)) => {
                let mut keys = HashMap::new();
                for jwk in &set.keys {
                    let algorithms = jwk_algorithms(jwk);
                    let kid = jwk.common.key_id.clone().unwrap_or_default();
                    match DecodingKey::from_jwk(jwk) {
                        Ok(key) if !algorithms.is_empty() => {
                            keys.insert(kid, Key { key, algorithms });
                        }
                        _ => {
                            tracing::debug!(url = %self.url, kid, "JWKS key skipped (unsupported)")
                        }
                    }
                }
                tracing::info!(url = %self.url, keys = keys.len(), ?reason, "JWKS fetched");
                let keys = Arc::new(KeySet {
                    keys,
                    fetched: Some(Instant::now()),
                });
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys.clone();
                (keys, None)
            }
            Ok(Err(e)) => {
                tracing::warn!(url = %self.url, "JWKS fetch failed: {e}");
                (now_keys, Some(e))
            }
            Err(_) => {
                tracing::warn!(url = %self.url, "JWKS fetch timed out");
                (
                    now_keys,
                    Some(format!("timed out after {:?}", self.timeout)),
                )
            }
        }
    }

    fn stale(&self, set: &KeySet) -> bool {
        set.keys.is_empty() || set.fetched.is_none_or(|t| t.elapsed() >= self.max_age)
    }

    /// Start the background refresher once (when called inside a tokio runtime):
    /// it refetches the JWKS at 80 % of `jwks_max_age`, so that no verification
    /// pays the fetch, under the same rate limit as any periodic refetch (at most
    /// once per `min_refetch_interval`, and never more than once a second). A
    /// failed refresh keeps the keys; the next try comes after the rate limit.
    /// The task holds the verifier weakly and ends when it is dropped.
    fn ensure_refresher(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.refresher.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        let floor = self.min_refetch.max(Duration::from_secs(1));
        let (running, stop) = (RefresherRunning(self.refresher.clone()), self.stop.clone());
        runtime.spawn(async move {
            let _running = running;
            let mut after_attempt = None::<Instant>;
            loop {
                let wait = {
                    let Some(jwks) = weak.upgrade() else { return };
                    // (Settings at their extremes put `due` past what an
                    // Instant holds: then there is nothing to refresh ahead of.)
                    let due = match jwks.current().fetched {
                        Some(t) => t.checked_add(jwks.max_age.mul_f64(0.8)),
                        None => Some(Instant::now()),
                    };
                    let due = match (due, after_attempt) {
                        (Some(due), Some(t)) => t.checked_add(floor).map(|t| due.max(t)),
                        (due, None) => due,
                        (None, _) => None,
                    };
                    let Some(due) = due else { return };
                    due.saturating_duration_since(Instant::now())
                };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.notified() => return,
                }
                let Some(jwks) = weak.upgrade() else { return };
                tracing::debug!(url = %jwks.url, "JWKS refreshed ahead of jwks_max_age");
                let _ = jwks.refetch(Refetch::Stale).await;
                after_attempt = Some(Instant::now());
            }
        });
    }
}

/// Bound on one JWKS fetch (connect, TLS, request and body together).
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

async fn fetch_jwks(url: &http::Uri) -> Result<JwkSet, String> {
    tokio::time::timeout(JWKS_FETCH_TIMEOUT, fetch_jwks_once(url))
        .await
        .map_err(|_| format!("no answer within {} s", JWKS_FETCH_TIMEOUT.as_secs()))?
}

/// One GET of the JWKS over HTTP/1.1: TLS with the Mozilla roots for https, plain
/// TCP for http (which the builder allows to loopback hosts only).
async fn fetch_jwks_once(url: &http::Uri) -> Result<JwkSet, String> {
    use http_body_util::{BodyExt, Empty, Limited};
    use hyper_util::rt::TokioIo;
    const MAX: usize = 256 * 1024;
    let host = url.host().ok_or("the JWKS URL has no host")?;
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let https = url.scheme_str() == Some("https");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let request = http::Request::get(url.path_and_query().map_or("/", |p| p.as_str()).to_string())
        .header(http::header::ACCEPT, "application/json")
        .header(
            http::header::HOST,
            url.authority().map(|a| a.as_str()).unwrap_or_default(),
        )
        .header(http::header::USER_AGENT, "reauth-verify")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect((bare.as_str(), port))
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let response = if https {
        use tokio_rustls::rustls;
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(bare.clone())
            .map_err(|_| "not a valid TLS server name")?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(TokioIo::new(tls), request).await?
    } else {
        send(TokioIo::new(tcp), request).await?
    };
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX)
        .collect()
        .await
        .map_err(|e| format!("reading the JWKS: {e}"))?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("not a JWKS: {e}"))
}

async fn send<T>(
    io: T,
    request: http::Request<http_body_util::Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    // The connection task ends with the response body (or the timeout above
    // drops everything).
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())
}

impl Verifier {
    /// Start building a verifier.
    pub fn builder() -> VerifierBuilder {
        VerifierBuilder::default()
    }

    /// How many times the JWKS was fetched (0 for static keys). For tests and metrics.
    pub async fn jwks_fetches(&self) -> u64 {
        match &self.source {
            Source::Static(_) => 0,
            Source::Jwks(j) => j.state.lock().await.fetches,
        }
    }

    /// Verify `token` (the bare JWT, without `Bearer `) and return its claims.
    pub async fn verify(&self, token: &str) -> Result<Claims, VerifyError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| VerifyError::Malformed(e.to_string()))?;
        match &self.source {
            Source::Static(keys) => {
                let candidates: Vec<&Key> = keys
                    .iter()
                    .filter(|(kid, _)| kid.is_none() || *kid == header.kid)
                    .map(|(_, k)| k)
                    .collect();
                if candidates.is_empty() {
                    return Err(VerifyError::UnknownKey {
                        kid: header.kid.unwrap_or_default(),
                    });
                }
                self.try_keys(token, header.alg, &candidates)
            }
            Source::Jwks(jwks) => {
                jwks.ensure_refresher();
                let mut keys = jwks.current();
                let mut fetch_error = None;
                if jwks.stale(&keys) {
                    (keys, fetch_error) = jwks.refetch(Refetch::Stale).await;
                }
                let pick = |set: &KeySet| -> Option<Key> {
                    match &header.kid {
                        Some(kid) => set.keys.get(kid).cloned(),
                        None if set.keys.len() == 1 => set.keys.values().next().cloned(),
                        None => None,
                    }
                };
                let key = match pick(&keys) {
                    Some(key) => key,
                    None => {
                        let kid = header.kid.clone().unwrap_or_default();
                        let (keys, error) = jwks.refetch(Refetch::UnknownKid).await;
                        match (pick(&keys), error.or(fetch_error)) {
                            (Some(key), _) => key,
                            (None, Some(e)) if keys.keys.is_empty() => {
                                return Err(VerifyError::KeysUnavailable(e));
                            }
                            (None, _) => return Err(VerifyError::UnknownKey { kid }),
                        }
                    }
                };
                self.try_keys(token, header.alg, &[&key])
            }
        }
    }

    fn try_keys(&self, token: &str, alg: Algorithm, keys: &[&Key]) -> Result<Claims, VerifyError> {
        let usable: Vec<&&Key> = keys
            .iter()
            .filter(|k| k.algorithms.contains(&alg))
            .collect();
        if usable.is_empty() {
            return Err(VerifyError::DisallowedAlgorithm(format!("{alg:?}")));
        }
        let mut validation = Validation::new(alg);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        if self.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audiences);
        }
        if !self.issuers.is_empty() {
            validation.set_issuer(&self.issuers);
        }
        let mut last = VerifyError::InvalidSignature;
        for key in usable {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    last = classify(e.kind(), token);
                    if !matches!(last, VerifyError::InvalidSignature) {
                        return Err(last); // signature was good: the claims decided
                    }
                }
            }
        }
        Err(last)
    }
}

fn classify(kind: &ErrorKind, token: &str) -> VerifyError {
    match kind {
        ErrorKind::InvalidSignature => VerifyError::InvalidSignature,
        ErrorKind::ExpiredSignature => VerifyError::Expired {
            expired_at: unverified_exp(token).unwrap_or_default(),
        },
        ErrorKind::ImmatureSignature => VerifyError::NotYetValid,
        ErrorKind::InvalidAudience => VerifyError::WrongAudience,
        ErrorKind::InvalidIssuer => VerifyError::WrongIssuer,
        ErrorKind::InvalidAlgorithm => VerifyError::DisallowedAlgorithm("for this key".into()),
        ErrorKind::MissingRequiredClaim(c) => {
            VerifyError::Malformed(format!("missing claim `{c}`"))
        }
        other => VerifyError::Malformed(format!("{other:?}")),
    }
}

/// `exp` of a token whose signature was already verified (only used to report it).
fn unverified_exp(token: &str) -> Option<u64> {
    reauth_core::cache::jwt_claims(token)?["exp"].as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn hs(secret: &[u8], claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn verifier(secret: &[u8]) -> Verifier {
        Verifier::builder()
            .hmac_secret(secret)
            .issuer("https://idp")
            .audience("api")
            .leeway(Duration::from_secs(5))
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn classifies_static_key_failures() {
        let v = verifier(b"0123456789abcdef0123456789abcdef");
        let good = json!({"iss": "https://idp", "aud": "api", "sub": "alice", "exp": now() + 60});
        let claims = v
            .verify(&hs(b"0123456789abcdef0123456789abcdef", good.clone()))
            .await
            .unwrap();
        assert_eq!(claims.sub.as_deref(), Some("alice"));

        let expired = json!({"iss": "https://idp", "aud": "api", "exp": now() - 60});
        let e = v
            .verify(&hs(b"0123456789abcdef0123456789abcdef", expired))
            .await
            .unwrap_err();
        assert!(e.is_expired(), "{e:?}");
        // within the leeway: accepted
        let recent = json!({"iss": "https://idp", "aud": "api", "exp": now() - 2});
        assert!(
            v.verify(&hs(b"0123456789abcdef0123456789abcdef", recent))
                .await
                .is_ok()
        );

        let forged = hs(b"another-secret-another-secret-00", good.clone());
        assert_eq!(
            v.verify(&forged).await.unwrap_err(),
            VerifyError::InvalidSignature
        );
        // an expired token with a bad signature is invalid, not expired
        let forged_expired = hs(
            b"another-secret-another-secret-00",
            json!({"iss": "https://idp", "aud": "api", "exp": now() - 60}),
        );
        assert_eq!(
            v.verify(&forged_expired).await.unwrap_err(),
            VerifyError::InvalidSignature
        );

        let other_aud = json!({"iss": "https://idp", "aud": "other", "exp": now() + 60});
        assert_eq!(
            v.verify(&hs(b"0123456789abcdef0123456789abcdef", other_aud))
                .await
                .unwrap_err(),
            VerifyError::WrongAudience
        );
        let other_iss = json!({"iss": "https://evil", "aud": "api", "exp": now() + 60});
        assert_eq!(
            v.verify(&hs(b"0123456789abcdef0123456789abcdef", other_iss))
                .await
                .unwrap_err(),
            VerifyError::WrongIssuer
        );
        let future =
            json!({"iss": "https://idp", "aud": "api", "exp": now() + 600, "nbf": now() + 300});
        assert_eq!(
            v.verify(&hs(b"0123456789abcdef0123456789abcdef", future))
                .await
                .unwrap_err(),
            VerifyError::NotYetValid
        );
        let no_exp = json!({"iss": "https://idp", "aud": "api"});
        assert!(matches!(
            v.verify(&hs(b"0123456789abcdef0123456789abcdef", no_exp))
                .await
                .unwrap_err(),
            VerifyError::Malformed(_)
        ));
        assert!(matches!(
            v.verify("not.a.jwt").await.unwrap_err(),
            VerifyError::Malformed(_)
        ));
    }

    #[tokio::test]
    async fn algorithm_confusion_is_refused() {
        // An HS256 token must not be checked against an RSA/EC key's bytes.
        use p256::pkcs8::{EncodePublicKey, LineEnding};
        let pem = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng)
            .public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        let v = Verifier::builder()
            .ec_pem(None, pem.as_bytes())
            .audience("api")
            .build()
            .unwrap();
        let token = hs(pem.as_bytes(), json!({"aud": "api", "exp": now() + 60}));
        assert!(matches!(
            v.verify(&token).await.unwrap_err(),
            VerifyError::DisallowedAlgorithm(_)
        ));
    }

    #[test]
    fn verify_future_is_send() {
        fn send<T: Send>(_: T) {}
        let v = verifier(b"k");
        send(v.verify("x"));
    }

    #[test]
    fn configuration_errors_are_named() {
        let e = Verifier::builder().hmac_secret(b"k").build().unwrap_err();
        assert!(e.to_string().contains("no audience"), "{e}");
        let e = Verifier::builder().audience("a").build().unwrap_err();
        assert!(e.to_string().contains("no key"), "{e}");
        let e = Verifier::builder()
            .rsa_pem(None, b"garbage")
            .audience("a")
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("RSA public key"), "{e}");
        let e = Verifier::builder()
            .jwks_url("http://idp.example.com/jwks")
            .audience("a")
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("must be https"), "{e}");
    }

    #[test]
    fn challenge_carries_no_token_material() {
        let e = VerifyError::Expired { expired_at: 1 };
        assert_eq!(
            e.www_authenticate(),
            "Bearer error=\"invalid_token\", error_description=\"the access token expired\""
        );
    }
}
