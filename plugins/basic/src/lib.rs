//! `basic`: username and password with rotation (neo4j `AuthManagers.basic`).
//!
//! The password is read at every fetch, so a rotated password is picked up on the
//! next refresh. Config:
//! - `username` and `password`: fixed values (usually `{ env = … }` / `{ file = … }`
//!   references resolved by the host at load), or
//! - `secret_url`: an HTTP endpoint answering JSON (e.g. a secrets manager);
//!   `username_field` / `password_field` select the fields (a plain key or a JSON
//!   pointer such as `/data/password`; defaults `username` / `password`);
//!   `secret_token` optionally authenticates to that endpoint with a bearer token.
//!   A `username` in config overrides the one from the endpoint.
//!
//! `unauthorized` ⇒ refresh-and-retry (the password may have rotated); everything
//! else ⇒ fail.

use reauth_sdk::http::Request as HttpRequest;
use reauth_sdk::{
    Credentials, Decision, Provider, ProviderError, Request, SecurityError, SecurityErrorKind,
    config,
};
use serde_json::Value;

struct Basic;

fn field<'a>(doc: &'a Value, selector: &str) -> Option<&'a Value> {
    if selector.starts_with('/') {
        doc.pointer(selector)
    } else {
        doc.get(selector)
    }
}

fn fetch_secret(url: &str) -> Result<(Option<String>, String), ProviderError> {
    let mut request = HttpRequest::get(url).header("accept", "application/json");
    if let Some(token) = config::get("secret_token")? {
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
            return Err(ProviderError::unavailable(format!(
                "secret endpoint answered HTTP {s}"
            )));
        }
    }
    let doc: Value = response
        .json()
        .map_err(|e| ProviderError::unavailable(format!("secret endpoint: {e}")))?;
    let password_field = config::or("password_field", "password")?;
    let password = field(&doc, &password_field)
        .and_then(Value::as_str)
        .ok_or_else(|| {
            ProviderError::misconfigured(format!(
                "secret endpoint response has no string field `{password_field}`"
            ))
        })?
        .to_string();
    let username_field = config::or("username_field", "username")?;
    let username = field(&doc, &username_field)
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok((username, password))
}

impl Provider for Basic {
    fn get_credentials(_request: Request) -> Result<Credentials, ProviderError> {
        let configured_user = config::get("username")?;
        let (username, password) = match config::get("secret_url")? {
            Some(url) => {
                let (fetched_user, password) = fetch_secret(&url)?;
                let username = configured_user.or(fetched_user).ok_or_else(|| {
                    ProviderError::misconfigured(
                        "no `username` in config and none in the secret endpoint response",
                    )
                })?;
                (username, password)
            }
            None => (
                configured_user
                    .ok_or_else(|| ProviderError::misconfigured("missing config key `username`"))?,
                config::required("password")?,
            ),
        };
        let principal = username.clone();
        Ok(Credentials::basic(username, password).principal(principal))
    }

    fn handle_security_error(_: Request, _: Credentials, error: SecurityError) -> Decision {
        match error.kind {
            SecurityErrorKind::Unauthorized => Decision::RefreshAndRetry,
            _ => Decision::Fail,
        }
    }
}

reauth_sdk::export_provider!(Basic);
