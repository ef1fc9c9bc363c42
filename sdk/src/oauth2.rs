//! OAuth2 / OpenID Connect client plumbing shared by token providers (feature
//! `oauth2`): the token endpoint from config or discovery, client authentication
//! (`client_secret_basic`, `client_secret_post`, `private_key_jwt`, `none`), the token
//! request, and the mapping of IdP errors to [`ProviderError`]s.
//!
//! Config keys read by [`Client::from_config`]:
//! - `issuer`: discover the token endpoint from `{issuer}/.well-known/openid-configuration`
//!   (cached in the provider's state for `discovery_ttl_s`, default 3600), or
//!   `token_url`: the token endpoint itself (wins over `issuer`);
//! - `client_id` (required);
//! - `auth_method`: `client_secret_basic`, `client_secret_post`, `private_key_jwt` or
//!   `none`. Default: `private_key_jwt` if `private_key` is set, else
//!   `client_secret_basic` if `client_secret` is set, else `none`;
//! - `client_secret` for the `client_secret_*` methods;
//! - `private_key` (PEM, PKCS#8 for EC/Ed25519, PKCS#1 or PKCS#8 for RSA),
//!   `private_key_alg` (`ES256` default, `ES384`, `RS256`, `PS256`, `EdDSA`…),
//!   `private_key_kid` (optional), `assertion_audience` (default: the token endpoint)
//!   for `private_key_jwt` (RFC 7523 client assertion, signed in the sandbox);
//! - `timeout_ms`: connect/first-byte timeout towards the IdP (default 10000).

use crate::http::{HttpError, Request as HttpRequest, Response};
use crate::{Credentials, ProviderError, config, jwt, state, time};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

/// A successful token response (RFC 6749 §5.1).
#[derive(Deserialize)]
pub struct TokenResponse {
    /// The access token.
    pub access_token: String,
    /// `Bearer` (checked by [`TokenResponse::credentials`]).
    #[serde(default)]
    pub token_type: Option<String>,
    /// Lifetime in seconds from now.
    #[serde(default)]
    pub expires_in: Option<u64>,
    /// A (possibly rotated) refresh token.
    #[serde(default)]
    pub refresh_token: Option<String>,
    /// The OpenID Connect ID token.
    #[serde(default)]
    pub id_token: Option<String>,
    /// The granted scopes.
    #[serde(default)]
    pub scope: Option<String>,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("expires_in", &self.expires_in)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

impl TokenResponse {
    /// Bearer credentials for the access token: expiry from `expires_in`, else the
    /// JWT `exp`; principal `iss|sub` from the ID token, else from the access token,
    /// else `fallback_principal`.
    pub fn credentials(
        &self,
        fallback_principal: Option<String>,
    ) -> Result<Credentials, ProviderError> {
        if let Some(t) = self.token_type.as_deref()
            && !t.eq_ignore_ascii_case("bearer")
        {
            return Err(ProviderError::misconfigured(format!(
                "token endpoint issued an unsupported token_type `{t}`"
            )));
        }
        let access = jwt::peek(&self.access_token);
        let principal = self
            .id_token
            .as_deref()
            .and_then(jwt::peek)
            .as_ref()
            .and_then(jwt::Claims::principal)
            .or_else(|| access.as_ref().and_then(jwt::Claims::principal))
            .or(fallback_principal);
        let mut credentials = Credentials::bearer(self.access_token.clone());
        if let Some(p) = principal {
            credentials = credentials.principal(p);
        }
        let jwt_exp = access.as_ref().and_then(|c| c.exp);
        Ok(match (self.expires_in, jwt_exp) {
            (Some(seconds), _) => credentials.expires_in(seconds),
            (None, Some(exp)) => credentials.expires_at_unix(exp),
            (None, None) => credentials,
        })
    }
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// Map a failed token-endpoint response to a provider error: `denied` for a
/// refused client or grant, `misconfigured` for a bad request, `unavailable` for
/// 5xx/429/408 and `temporarily_unavailable`/`server_error`.
pub fn idp_error(status: u16, body: &[u8]) -> ProviderError {
    let Ok(err) = serde_json::from_slice::<ErrorResponse>(body) else {
        return match status {
            500.. | 429 | 408 => {
                ProviderError::unavailable(format!("token endpoint answered HTTP {status}"))
            }
            401 | 403 => {
                ProviderError::denied(format!("token endpoint refused the client (HTTP {status})"))
            }
            _ => ProviderError::misconfigured(format!(
                "token endpoint answered HTTP {status} without an OAuth2 error"
            )),
        };
    };
    // `error` and `error_description` are IdP-chosen text: keep them short and
    // printable so a hostile IdP cannot flood the host's logs.
    let clean = |s: &str| -> String { s.chars().filter(|c| !c.is_control()).take(200).collect() };
    let detail = match &err.error_description {
        Some(d) => format!("{}: {} (HTTP {status})", clean(&err.error), clean(d)),
        None => format!("{} (HTTP {status})", clean(&err.error)),
    };
    match err.error.as_str() {
        "invalid_client" | "unauthorized_client" | "invalid_grant" | "access_denied" => {
            ProviderError::Denied(detail)
        }
        "temporarily_unavailable" | "server_error" => ProviderError::unavailable(detail),
        _ if status >= 500 || status == 429 => ProviderError::unavailable(detail),
        _ => ProviderError::Misconfigured(detail),
    }
}

/// How the client authenticates to the token endpoint.
pub enum ClientAuth {
    /// HTTP Basic with the client secret.
    SecretBasic(String),
    /// `client_id` and `client_secret` in the form body.
    SecretPost(String),
    /// An RFC 7523 JWT client assertion signed with the client's private key.
    PrivateKeyJwt {
        /// The signing key.
        key: EncodingKey,
        /// Its algorithm.
        alg: Algorithm,
        /// Its key id, if the IdP needs one to pick the key.
        kid: Option<String>,
        /// The assertion's `aud` (default: the token endpoint).
        audience: Option<String>,
    },
    /// A public client: `client_id` in the form body, no secret.
    None,
}

/// A configured OAuth2 client.
pub struct Client {
    /// The token endpoint URL.
    pub token_endpoint: String,
    /// The client id.
    pub client_id: String,
    /// The client authentication method.
    pub auth: ClientAuth,
    /// Connect/first-byte timeout in milliseconds.
    pub timeout_ms: u64,
    /// The issuer the endpoint was discovered from, if any.
    pub issuer: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct CachedDiscovery {
    issuer: String,
    token_endpoint: String,
    fetched_at: u64,
}

const DISCOVERY_KEY: &str = "oauth2.discovery";

/// The token endpoint of `issuer` from its OpenID Connect discovery document,
/// cached in the provider's state for `ttl_s` seconds. The document's `issuer`
/// must equal the configured one (OpenID Connect Discovery §4.3).
pub fn discover_token_endpoint(
    issuer: &str,
    ttl_s: u64,
    timeout_ms: u64,
) -> Result<String, ProviderError> {
    let issuer = issuer.trim_end_matches('/');
    let now = time::now_unix();
    if let Some(cached) = state::get(DISCOVERY_KEY)
        .and_then(|v| serde_json::from_str::<CachedDiscovery>(&v).ok())
        .filter(|c| c.issuer == issuer && now.saturating_sub(c.fetched_at) < ttl_s)
    {
        return Ok(cached.token_endpoint);
    }
    #[derive(Deserialize)]
    struct Metadata {
        issuer: String,
        token_endpoint: Option<String>,
    }
    let url = format!("{issuer}/.well-known/openid-configuration");
    let response = HttpRequest::get(&url)
        .header("accept", "application/json")
        .timeout_ms(timeout_ms)
        .send()?;
    if !response.is_success() {
        return Err(match response.status {
            404 => ProviderError::misconfigured(format!(
                "no discovery document at {url} (HTTP 404): check `issuer`, or set `token_url`"
            )),
            s => ProviderError::unavailable(format!("discovery at {url} answered HTTP {s}"))
                .retry_after_ms(response.retry_after_ms()),
        });
    }
    let metadata: Metadata = response.json().map_err(|e| {
        ProviderError::unavailable(format!("discovery document at {url} is unreadable: {e}"))
    })?;
    if metadata.issuer.trim_end_matches('/') != issuer {
        return Err(ProviderError::misconfigured(format!(
            "discovery document at {url} names issuer `{}`, not the configured `{issuer}`",
            metadata.issuer
        )));
    }
    let endpoint = metadata.token_endpoint.ok_or_else(|| {
        ProviderError::misconfigured(format!("discovery document at {url} has no token_endpoint"))
    })?;
    let cached = CachedDiscovery {
        issuer: issuer.to_string(),
        token_endpoint: endpoint.clone(),
        fetched_at: now,
    };
    // A failed write only costs a discovery request next time.
    let _ = state::set(
        DISCOVERY_KEY,
        &serde_json::to_string(&cached).unwrap_or_default(),
    );
    Ok(endpoint)
}

/// The config keys [`Client::from_config`] reads, for a provider's
/// [`Provider::describe`](crate::Provider::describe) (add the provider's own).
pub fn client_keys() -> Vec<crate::ConfigKey> {
    use crate::ConfigKey;
    vec![
        ConfigKey::url(
            "issuer",
            "OpenID Connect issuer (discovery); or `token_url`",
        ),
        ConfigKey::url("token_url", "the token endpoint; or `issuer`"),
        ConfigKey::text("client_id", "the OAuth2 client id").required(),
        ConfigKey::text("client_secret", "client secret (client_secret_basic/post)").secret(),
        ConfigKey::text("private_key", "PEM key for private_key_jwt").secret(),
        ConfigKey::text(
            "auth_method",
            "client_secret_basic, client_secret_post, private_key_jwt or none",
        ),
        ConfigKey::text(
            "private_key_alg",
            "private_key_jwt algorithm (default ES256)",
        ),
        ConfigKey::text("private_key_kid", "private_key_jwt key id"),
        ConfigKey::text(
            "assertion_audience",
            "private_key_jwt `aud` (default: token endpoint)",
        ),
        ConfigKey::integer(
            "timeout_ms",
            "connect/first-byte timeout towards the IdP (ms)",
        ),
        ConfigKey::integer(
            "discovery_ttl_s",
            "how long a discovery document is kept (s)",
        ),
    ]
}

/// Forget the cached discovery document (after the token endpoint failed in a way
/// that suggests it moved).
pub fn forget_discovery() {
    let _ = state::delete(DISCOVERY_KEY);
}

fn parse_u64(key: &str, default: &str) -> Result<u64, ProviderError> {
    config::or(key, default)?
        .parse::<u64>()
        .map_err(|_| ProviderError::misconfigured(format!("config key `{key}` is not a number")))
}

fn signing_key(pem: &str, alg: Algorithm) -> Result<EncodingKey, ProviderError> {
    let bytes = pem.as_bytes();
    let key = match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(bytes),
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => EncodingKey::from_rsa_pem(bytes),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(bytes),
        _ => {
            return Err(ProviderError::misconfigured(format!(
                "config key `private_key_alg`: {alg:?} is not an asymmetric algorithm"
            )));
        }
    };
    key.map_err(|e| {
        ProviderError::misconfigured(format!(
            "config key `private_key` is not a {alg:?} private key in PEM: {e}"
        ))
    })
}

impl Client {
    /// The client described by the provider's config (see the module docs).
    pub fn from_config() -> Result<Client, ProviderError> {
        let client_id = config::required("client_id")?;
        let timeout_ms = parse_u64("timeout_ms", "10000")?;
        let (token_endpoint, issuer) = match (config::get("token_url")?, config::get("issuer")?) {
            (Some(url), issuer) => (url, issuer),
            (None, Some(issuer)) => {
                let ttl = parse_u64("discovery_ttl_s", "3600")?;
                (
                    discover_token_endpoint(&issuer, ttl, timeout_ms)?,
                    Some(issuer),
                )
            }
            (None, None) => {
                return Err(ProviderError::misconfigured(
                    "set `issuer` (discovery) or `token_url`",
                ));
            }
        };
        let private_key = config::get("private_key")?;
        let secret = config::get("client_secret")?;
        let default_method = if private_key.is_some() {
            "private_key_jwt"
        } else if secret.is_some() {
            "client_secret_basic"
        } else {
            "none"
        };
        let method = config::or("auth_method", default_method)?;
        let need_secret = || {
            secret.clone().filter(|s| !s.is_empty()).ok_or_else(|| {
                ProviderError::misconfigured(format!(
                    "auth_method `{method}` needs config key `client_secret`"
                ))
            })
        };
        let auth = match method.as_str() {
            "client_secret_basic" => ClientAuth::SecretBasic(need_secret()?),
            "client_secret_post" => ClientAuth::SecretPost(need_secret()?),
            "private_key_jwt" => {
                let pem = private_key.ok_or_else(|| {
                    ProviderError::misconfigured(
                        "auth_method `private_key_jwt` needs config key `private_key`",
                    )
                })?;
                let alg_name = config::or("private_key_alg", "ES256")?;
                let alg = alg_name.parse::<Algorithm>().map_err(|_| {
                    ProviderError::misconfigured(format!(
                        "config key `private_key_alg`: unknown algorithm `{alg_name}`"
                    ))
                })?;
                ClientAuth::PrivateKeyJwt {
                    key: signing_key(&pem, alg)?,
                    alg,
                    kid: config::get("private_key_kid")?,
                    audience: config::get("assertion_audience")?,
                }
            }
            "none" => ClientAuth::None,
            other => {
                return Err(ProviderError::misconfigured(format!(
                    "config key `auth_method`: unsupported `{other}` (use client_secret_basic, \
                     client_secret_post, private_key_jwt or none)"
                )));
            }
        };
        Ok(Client {
            token_endpoint,
            client_id,
            auth,
            timeout_ms,
            issuer,
        })
    }

    /// An RFC 7523 client assertion for this client, valid for 60 s.
    fn assertion(
        &self,
        key: &EncodingKey,
        alg: Algorithm,
        kid: &Option<String>,
        audience: &Option<String>,
    ) -> Result<String, ProviderError> {
        let mut jti = [0u8; 18];
        getrandom::fill(&mut jti)
            .map_err(|e| ProviderError::unavailable(format!("no randomness for jti: {e}")))?;
        let now = time::now_unix();
        let claims = serde_json::json!({
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": audience.as_deref().unwrap_or(&self.token_endpoint),
            "jti": URL_SAFE_NO_PAD.encode(jti),
            "iat": now,
            "exp": now + 60,
        });
        let mut header = Header::new(alg);
        header.kid = kid.clone();
        jsonwebtoken::encode(&header, &claims, key).map_err(|e| {
            ProviderError::misconfigured(format!("signing the client assertion failed: {e}"))
        })
    }

    /// POST `form` (grant parameters) to the token endpoint with client
    /// authentication; the parsed response, or the IdP's error mapped.
    pub fn token(&self, form: &[(&str, &str)]) -> Result<TokenResponse, ProviderError> {
        let mut form: Vec<(&str, &str)> = form.to_vec();
        let mut http = HttpRequest::post(&self.token_endpoint)
            .header("accept", "application/json")
            .timeout_ms(self.timeout_ms);
        let assertion;
        match &self.auth {
            ClientAuth::SecretBasic(secret) => http = http.basic_auth(&self.client_id, secret),
            ClientAuth::SecretPost(secret) => {
                form.push(("client_id", &self.client_id));
                form.push(("client_secret", secret));
            }
            ClientAuth::PrivateKeyJwt {
                key,
                alg,
                kid,
                audience,
            } => {
                assertion = self.assertion(key, *alg, kid, audience)?;
                form.push(("client_id", &self.client_id));
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ));
                form.push(("client_assertion", &assertion));
            }
            ClientAuth::None => form.push(("client_id", &self.client_id)),
        }
        let response: Response = match http.form(&form).send() {
            Ok(r) => r,
            Err(e) => {
                if self.issuer.is_some() && !matches!(e, HttpError::InvalidUrl(_)) {
                    forget_discovery();
                }
                return Err(e.into());
            }
        };
        if !response.is_success() {
            if response.status == 404 && self.issuer.is_some() {
                forget_discovery();
            }
            return Err(idp_error(response.status, &response.body)
                .retry_after_ms(response.retry_after_ms()));
        }
        response.json().map_err(|e| {
            ProviderError::unavailable(format!("token endpoint sent an unreadable response: {e}"))
        })
    }
}
