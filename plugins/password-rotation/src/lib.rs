//! `password-rotation`: a username and password that rotate (neo4j
//! `AuthManagers.basic`, database credentials managed by a secrets store).
//!
//! The password is read at every fetch, so a rotated password is picked up by the
//! next refresh; a server rejecting the old one (`unauthorized`) makes the host
//! refresh and retry once. Config:
//! - `username` and `password`: fixed values (usually `{ env = … }` / `{ file = … }`
//!   references resolved by the host at load), or
//! - `secret_url`: an HTTP endpoint answering JSON, read with `format`:
//!   - `json` (default): `username_field` / `password_field` select the fields (a
//!     plain key or a JSON pointer such as `/data/password`; defaults `username` /
//!     `password`);
//!   - `vault-kv2`: a Vault KV v2 read (`/v1/<mount>/data/<path>`): fields under
//!     `/data/data/`;
//!   - `vault-static-creds`: a Vault database static role (`/v1/database/static-creds/<role>`):
//!     `/data/username`, `/data/password`, and `/data/ttl` (seconds until Vault
//!     rotates the password) as the credential's expiry, so reauth refreshes right
//!     when the rotation happens instead of waiting for a rejection;
//! - `ttl_field`: a JSON pointer to "seconds until rotation" for other formats;
//! - `vault_token` (sent as `X-Vault-Token`) or `secret_token` (sent as a bearer
//!   token) authenticate to the endpoint.
//!
//! A `username` in config overrides the one from the endpoint.
//! `unauthorized`/`token-expired` ⇒ refresh-and-retry; `forbidden` ⇒ fail (the
//! account lacks a permission; a new password will not grant it).

use reauth_sdk::http::Request as HttpRequest;
use reauth_sdk::{
    ConfigKey, Credentials, Decision, Descriptor, Provider, ProviderError, Request, SecurityError,
    SecurityErrorKind, config,
};
use serde_json::Value;

struct PasswordRotation;

struct Secret {
    username: Option<String>,
    password: String,
    ttl_seconds: Option<u64>,
}

fn field<'a>(doc: &'a Value, selector: &str) -> Option<&'a Value> {
    if selector.starts_with('/') {
        doc.pointer(selector)
    } else {
        doc.get(selector)
    }
}

fn fetch_secret(url: &str) -> Result<Secret, ProviderError> {
    let format = config::or("format", "json")?;
    let (user_default, password_default, ttl_default) = match format.as_str() {
        "json" => ("username", "password", None),
        "vault-kv2" => ("/data/data/username", "/data/data/password", None),
        "vault-static-creds" => ("/data/username", "/data/password", Some("/data/ttl")),
        other => {
            return Err(ProviderError::misconfigured(format!(
                "config key `format`: unknown `{other}` (use json, vault-kv2 or vault-static-creds)"
            )));
        }
    };
    let mut request = HttpRequest::get(url).header("accept", "application/json");
    if let Some(token) = config::get("vault_token")? {
        request = request.header("x-vault-token", token);
    } else if let Some(token) = config::get("secret_token")? {
        request = request.bearer_auth(&token);
    }
    let response = request.send()?;
    match response.status {
        200..=299 => {}
        401 | 403 => {
            return Err(ProviderError::denied(format!(
                "secret endpoint refused access (HTTP {})",
                response.status
            )));
        }
        404 => {
            return Err(ProviderError::misconfigured(
                "secret endpoint answered 404: check `secret_url`",
            ));
        }
        s => {
            return Err(
                ProviderError::unavailable(format!("secret endpoint answered HTTP {s}"))
                    .retry_after_ms(response.retry_after_ms()),
            );
        }
    }
    let doc: Value = response
        .json()
        .map_err(|e| ProviderError::unavailable(format!("secret endpoint: {e}")))?;
    let password_field = config::or("password_field", password_default)?;
    let password = field(&doc, &password_field)
        .and_then(Value::as_str)
        .ok_or_else(|| {
            ProviderError::misconfigured(format!(
                "secret endpoint response has no string field `{password_field}`"
            ))
        })?
        .to_string();
    let username_field = config::or("username_field", user_default)?;
    let username = field(&doc, &username_field)
        .and_then(Value::as_str)
        .map(str::to_string);
    let ttl_field = config::get("ttl_field")?.or(ttl_default.map(str::to_string));
    let ttl_seconds = match ttl_field {
        Some(f) => Some(field(&doc, &f).and_then(Value::as_u64).ok_or_else(|| {
            ProviderError::misconfigured(format!(
                "secret endpoint response has no whole-seconds field `{f}`"
            ))
        })?),
        None => None,
    };
    Ok(Secret {
        username,
        password,
        ttl_seconds,
    })
}

impl Provider for PasswordRotation {
    fn describe() -> Descriptor {
        Descriptor::new()
            .key(ConfigKey::text(
                "username",
                "fixed username (overrides the endpoint's)",
            ))
            .key(ConfigKey::text("password", "fixed password (without `secret_url`)").secret())
            .key(ConfigKey::url(
                "secret_url",
                "JSON endpoint read at every fetch",
            ))
            .key(ConfigKey::text(
                "format",
                "json (default), vault-kv2 or vault-static-creds",
            ))
            .key(ConfigKey::text(
                "username_field",
                "key or JSON pointer of the username",
            ))
            .key(ConfigKey::text(
                "password_field",
                "key or JSON pointer of the password",
            ))
            .key(ConfigKey::text(
                "ttl_field",
                "JSON pointer to seconds until rotation",
            ))
            .key(ConfigKey::text("vault_token", "sent as X-Vault-Token").secret())
            .key(ConfigKey::text("secret_token", "sent as a bearer token").secret())
    }

    fn get_credentials(_request: Request) -> Result<Credentials, ProviderError> {
        let configured_user = config::get("username")?;
        let secret = match config::get("secret_url")? {
            Some(url) => fetch_secret(&url)?,
            None => Secret {
                username: None,
                password: config::required("password")?,
                ttl_seconds: None,
            },
        };
        let username = configured_user.or(secret.username).ok_or_else(|| {
            ProviderError::misconfigured(
                "no `username` in config and none in the secret endpoint response",
            )
        })?;
        let principal = username.clone();
        let credentials = Credentials::basic(username, secret.password).principal(principal);
        Ok(match secret.ttl_seconds {
            // Vault reports 0 while a rotation is due: keep it for a moment rather than
            // marking it expired on arrival.
            Some(ttl) => credentials.expires_in(ttl.max(1)),
            None => credentials,
        })
    }

    fn handle_security_error(_: Request, _: Credentials, error: SecurityError) -> Decision {
        match error.kind {
            SecurityErrorKind::Unauthorized | SecurityErrorKind::TokenExpired => {
                Decision::RefreshAndRetry
            }
            SecurityErrorKind::Forbidden | SecurityErrorKind::Other => Decision::Fail,
        }
    }
}

reauth_sdk::export_provider!(PasswordRotation);
