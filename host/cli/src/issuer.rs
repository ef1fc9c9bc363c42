//! The dev issuer: a small OAuth2 client-credentials token endpoint with JWKS and
//! discovery, on loopback, signing ES256 JWTs.
//!
//! **Not a production identity provider.** It exists so that the demo, the tests and
//! a developer's laptop have a real IdP to talk to with no external service: its
//! keys live in memory, clients come from flags or code, and it has no consent,
//! revocation or rate limiting. Point production providers at a real IdP.
//!
//! Endpoints: `GET /.well-known/openid-configuration`, `GET /jwks`, `POST /token`
//! (`grant_type=client_credentials`, client authentication by `client_secret_basic`
//! or `client_secret_post`, optional `scope`, `audience` or `resource`).

use crate::clock::{Clock, SystemClock};
use crate::secret::Secret;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

/// A client the dev issuer accepts.
#[derive(Debug, Clone)]
pub struct DevClient {
    /// `client_id`.
    pub id: String,
    /// `client_secret`.
    pub secret: Secret,
    /// Scopes it may ask for; empty: any.
    pub scopes: Vec<String>,
}

impl DevClient {
    /// A client that may ask for any scope.
    pub fn new(id: impl Into<String>, secret: impl Into<String>) -> Self {
        DevClient {
            id: id.into(),
            secret: Secret::new(secret.into()),
            scopes: Vec::new(),
        }
    }
}

/// How to run the dev issuer.
#[derive(Clone)]
pub struct DevIssuerConfig {
    /// Where to listen; port 0 picks a free one. Must be loopback unless
    /// `allow_non_loopback` is set.
    pub listen: SocketAddr,
    /// Accepted clients.
    pub clients: Vec<DevClient>,
    /// Lifetime of issued tokens.
    pub token_lifetime: Duration,
    /// `aud` when the client asks for none.
    pub default_audience: Option<String>,
    /// Clock for `iat`/`exp`.
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for DevIssuerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Client ids only: their secrets stay out.
        f.debug_struct("DevIssuerConfig")
            .field("listen", &self.listen)
            .field(
                "clients",
                &self.clients.iter().map(|c| &c.id).collect::<Vec<_>>(),
            )
            .field("token_lifetime", &self.token_lifetime)
            .field("default_audience", &self.default_audience)
            .finish_non_exhaustive()
    }
}

impl Default for DevIssuerConfig {
    fn default() -> Self {
        DevIssuerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            clients: Vec::new(),
            token_lifetime: Duration::from_secs(300),
            default_audience: None,
            clock: Arc::new(SystemClock),
        }
    }
}

struct IssuerState {
    issuer: String,
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    jwk: Value,
    clients: HashMap<String, DevClient>,
    lifetime: Duration,
    default_audience: Option<String>,
    clock: Arc<dyn Clock>,
    issued: AtomicU64,
    requests: AtomicU64,
    unavailable: AtomicBool,
}

/// A running dev issuer; stops when [`DevIssuer::shutdown`] is called or it is dropped.
pub struct DevIssuer {
    addr: SocketAddr,
    state: Arc<IssuerState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer")
            .field("addr", &self.addr)
            .finish()
    }
}

/// Errors starting the dev issuer.
#[derive(Debug, thiserror::Error)]
pub enum DevIssuerError {
    /// Could not bind or serve.
    #[error("dev issuer: cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Refused a non-loopback address: the dev issuer hands out tokens to anyone
    /// with a client secret and must not be reachable from the network.
    #[error("dev issuer: refusing to listen on non-loopback address {0}")]
    NotLoopback(SocketAddr),
    /// Key generation failed.
    #[error("dev issuer: key setup failed: {0}")]
    Key(String),
}

impl DevIssuer {
    /// Generate a fresh ES256 key and start serving.
    pub async fn start(config: DevIssuerConfig) -> Result<DevIssuer, DevIssuerError> {
        if !config.listen.ip().is_loopback() {
            return Err(DevIssuerError::NotLoopback(config.listen));
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| DevIssuerError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| DevIssuerError::Bind {
                addr: config.listen,
                source,
            })?;
        let (encoding, decoding, jwk, kid) = generate_key()?;
        let state = Arc::new(IssuerState {
            issuer: format!("http://{addr}"),
            kid,
            encoding,
            decoding,
            jwk,
            clients: config
                .clients
                .into_iter()
                .map(|c| (c.id.clone(), c))
                .collect(),
            lifetime: config.token_lifetime,
            default_audience: config.default_audience,
            clock: config.clock,
            issued: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            unavailable: AtomicBool::new(false),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/.well-known/oauth-authorization-server", get(discovery))
            .route("/jwks", get(jwks))
            .route("/token", post(token))
            .with_state(state.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "dev issuer stopped");
            }
        });
        tracing::info!(%addr, "dev issuer listening (development only)");
        Ok(DevIssuer {
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The issuer URL (`iss`).
    pub fn url(&self) -> &str {
        &self.state.issuer
    }

    /// The token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}/token", self.state.issuer)
    }

    /// The JWKS endpoint.
    pub fn jwks_url(&self) -> String {
        format!("{}/jwks", self.state.issuer)
    }

    /// Tokens issued so far.
    pub fn issued(&self) -> u64 {
        self.state.issued.load(Ordering::SeqCst)
    }

    /// Token requests received so far (successful or not).
    pub fn token_requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Make the token endpoint answer 503 `temporarily_unavailable` (or stop doing so).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.state.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// The key that verifies this issuer's tokens.
    pub fn decoding_key(&self) -> &DecodingKey {
        &self.state.decoding
    }

    /// Verify a token this issuer signed (signature, `iss`, `exp` with no leeway,
    /// and `aud` when `audience` is given); returns its claims.
    pub fn verify(
        &self,
        token: &str,
        audience: Option<&str>,
    ) -> Result<Value, jsonwebtoken::errors::Error> {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.leeway = 0;
        validation.set_issuer(&[&self.state.issuer]);
        match audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        jsonwebtoken::decode::<Value>(token, &self.state.decoding, &validation).map(|d| d.claims)
    }

    /// Stop serving and wait for the server task to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for DevIssuer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn generate_key() -> Result<(EncodingKey, DecodingKey, Value, String), DevIssuerError> {
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    let key_err = |e: &dyn std::fmt::Display| DevIssuerError::Key(e.to_string());
    let secret = loop {
        if let Ok(k) = p256::SecretKey::from_slice(&rand::random::<[u8; 32]>()) {
            break k;
        }
    };
    let pem = secret
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| key_err(&e))?;
    let encoding = EncodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| key_err(&e))?;
    let point =
        p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&secret.public_key(), false);
    let (Some(x), Some(y)) = (point.x(), point.y()) else {
        return Err(DevIssuerError::Key(
            "public key has no affine coordinates".into(),
        ));
    };
    let (x, y) = (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y));
    let decoding = DecodingKey::from_ec_components(&x, &y).map_err(|e| key_err(&e))?;
    let kid = format!("dev-{:08x}", rand::random::<u32>());
    let jwk = json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "use": "sig", "alg": "ES256"});
    Ok((encoding, decoding, jwk, kid))
}

async fn discovery(State(s): State<Arc<IssuerState>>) -> Json<Value> {
    Json(json!({
        "issuer": s.issuer,
        "token_endpoint": format!("{}/token", s.issuer),
        "jwks_uri": format!("{}/jwks", s.issuer),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "response_types_supported": ["token"],
    }))
}

async fn jwks(State(s): State<Arc<IssuerState>>) -> Json<Value> {
    Json(json!({ "keys": [s.jwk] }))
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let mut response = (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        "no-store".parse().expect("static header"),
    );
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            "Basic realm=\"reauth-dev-issuer\""
                .parse()
                .expect("static header"),
        );
    }
    response
}

/// `application/x-www-form-urlencoded` decoding of one component (RFC 6749
/// §2.3.1: the client id and secret in HTTP Basic are form-encoded). `None` for a
/// component with an unencoded `=` or `&`, or that decodes to invalid UTF-8.
fn form_decode(s: &str) -> Option<String> {
    if s.contains(['=', '&']) {
        return None;
    }
    let decoded = form_urlencoded::parse(s.as_bytes())
        .next()
        .map(|(name, _)| name.into_owned())
        .unwrap_or_default();
    // form_urlencoded replaces invalid UTF-8 with U+FFFD.
    (!decoded.contains('\u{FFFD}') || s.contains('\u{FFFD}')).then_some(decoded)
}

fn client_auth(headers: &HeaderMap, form: &HashMap<String, String>) -> Option<(String, String)> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let encoded = value.to_str().ok()?.strip_prefix("Basic ")?;
        let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
        let (id, secret) = decoded.split_once(':')?;
        return Some((form_decode(id)?, form_decode(secret)?));
    }
    Some((
        form.get("client_id")?.clone(),
        form.get("client_secret")?.clone(),
    ))
}

async fn token(
    State(s): State<Arc<IssuerState>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    s.requests.fetch_add(1, Ordering::SeqCst);
    if s.unavailable.load(Ordering::SeqCst) {
        return oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "the dev issuer was told to be unavailable",
        );
    }
    let Some((client_id, client_secret)) = client_auth(&headers, &form) else {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication missing",
        );
    };
    let client = match s.clients.get(&client_id) {
        Some(c)
            if reauth::constant_time_eq(c.secret.expose().as_bytes(), client_secret.as_bytes()) =>
        {
            c
        }
        _ => {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "unknown client or wrong secret",
            );
        }
    };
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only client_credentials is supported",
        );
    }
    let scopes: Vec<&str> = form
        .get("scope")
        .map(|s| s.split_whitespace().collect())
        .unwrap_or_default();
    if !client.scopes.is_empty()
        && let Some(bad) = scopes
            .iter()
            .find(|s| !client.scopes.iter().any(|c| c == *s))
    {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            &format!("scope `{bad}` is not allowed for this client"),
        );
    }
    let audience = form
        .get("audience")
        .or_else(|| form.get("resource"))
        .cloned()
        .or_else(|| s.default_audience.clone());
    let now = s
        .clock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let n = s.issued.fetch_add(1, Ordering::SeqCst) + 1;
    let mut claims = json!({
        "iss": s.issuer,
        "sub": client.id,
        "client_id": client.id,
        "iat": now,
        "nbf": now,
        "exp": now + s.lifetime.as_secs(),
        "jti": format!("{}-{n}", s.kid),
    });
    if let Some(aud) = &audience {
        claims["aud"] = json!(aud);
    }
    if !scopes.is_empty() {
        claims["scope"] = json!(scopes.join(" "));
    }
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(s.kid.clone());
    let token = match jsonwebtoken::encode(&header, &claims, &s.encoding) {
        Ok(t) => t,
        Err(e) => {
            return oauth_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                &e.to_string(),
            );
        }
    };
    let mut body = json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": s.lifetime.as_secs(),
    });
    if !scopes.is_empty() {
        body["scope"] = json!(scopes.join(" "));
    }
    let mut response = Json(body).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        "no-store".parse().expect("static header"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::form_decode;

    /// RFC 6749 §2.3.1: HTTP Basic client credentials are form-encoded first.
    #[test]
    fn basic_auth_components_are_form_decoded() {
        assert_eq!(form_decode("a+b%2Fc%3D").as_deref(), Some("a b/c="));
        assert_eq!(form_decode("plain").as_deref(), Some("plain"));
        assert_eq!(form_decode("").as_deref(), Some(""));
        assert_eq!(form_decode("%E2%9C%93").as_deref(), Some("✓"));
        assert_eq!(form_decode("%FF"), None, "invalid UTF-8");
        assert_eq!(form_decode("a=b"), None, "unencoded '='");
        assert_eq!(form_decode("a&b"), None, "unencoded '&'");
    }
}
