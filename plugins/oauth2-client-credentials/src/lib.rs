//! `oauth2-client-credentials`: OAuth2 client-credentials grant (RFC 6749 §4.4).
//!
//! Config:
//! - `token_url` (required), `client_id` (required), `client_secret` (required);
//! - `auth_method`: `client_secret_basic` (default) or `client_secret_post`;
//! - `scope`: space-separated default scopes (a request's scopes override them);
//! - `audience`: default audience (a request's audience overrides it), sent as the
//!   parameter named by `audience_param` (`audience`, the default, or `resource`
//!   for RFC 8707 resource indicators);
//! - `timeout_ms`: connect/first-byte timeout towards the token endpoint.
//!
//! Expiry comes from `expires_in`, else the access token's JWT `exp`. IdP errors
//! map to `denied` (`invalid_client`, `unauthorized_client`, `invalid_grant`,
//! `access_denied`), `misconfigured` (`invalid_scope`, `invalid_request`,
//! `invalid_target`, `unsupported_grant_type`) or `unavailable` (5xx, 429,
//! transport failures). On a security error: `token-expired`/`unauthorized` ⇒
//! refresh-and-retry; `forbidden` ⇒ fail (a new token will not grant a missing
//! permission).

use reauth_sdk::http::Request as HttpRequest;
use reauth_sdk::{
    Credentials, Decision, Provider, ProviderError, Request, SecurityError, SecurityErrorKind,
    config, jwt,
};
use serde::Deserialize;

struct ClientCredentials;

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

fn idp_error(status: u16, body: &[u8]) -> ProviderError {
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
    let detail = match &err.error_description {
        Some(d) => format!("{}: {d} (HTTP {status})", err.error),
        None => format!("{} (HTTP {status})", err.error),
    };
    match err.error.as_str() {
        "invalid_client" | "unauthorized_client" | "invalid_grant" | "access_denied" => {
            ProviderError::Denied(detail)
        }
        "temporarily_unavailable" | "server_error" => ProviderError::Unavailable(detail),
        _ if status >= 500 || status == 429 => ProviderError::Unavailable(detail),
        _ => ProviderError::Misconfigured(detail),
    }
}

impl Provider for ClientCredentials {
    fn get_credentials(request: Request) -> Result<Credentials, ProviderError> {
        if request.subject.is_some() {
            return Err(ProviderError::misconfigured(
                "the client-credentials grant has no per-subject tokens; drop `subject`",
            ));
        }
        let token_url = config::required("token_url")?;
        let client_id = config::required("client_id")?;
        let client_secret = config::required("client_secret")?;
        let scope = if request.scopes.is_empty() {
            config::get("scope")?
        } else {
            Some(request.scopes.join(" "))
        };
        let audience = match request.audience {
            Some(a) => Some(a),
            None => config::get("audience")?,
        };
        let audience_param = config::or("audience_param", "audience")?;
        let timeout_ms = config::or("timeout_ms", "10000")?
            .parse::<u64>()
            .map_err(|_| ProviderError::misconfigured("config key `timeout_ms` is not a number"))?;

        let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        if let Some(scope) = scope.as_deref().filter(|s| !s.is_empty()) {
            form.push(("scope", scope));
        }
        if let Some(audience) = audience.as_deref() {
            form.push((audience_param.as_str(), audience));
        }
        let mut http = HttpRequest::post(&token_url)
            .header("accept", "application/json")
            .timeout_ms(timeout_ms);
        match config::or("auth_method", "client_secret_basic")?.as_str() {
            "client_secret_basic" => http = http.basic_auth(&client_id, &client_secret),
            "client_secret_post" => {
                form.push(("client_id", &client_id));
                form.push(("client_secret", &client_secret));
            }
            other => {
                return Err(ProviderError::misconfigured(format!(
                    "config key `auth_method`: unsupported `{other}` \
                     (use client_secret_basic or client_secret_post)"
                )));
            }
        }
        let response = http.form(&form).send()?;
        if !response.is_success() {
            return Err(idp_error(response.status, &response.body));
        }
        let token: TokenResponse = response.json().map_err(|e| {
            ProviderError::unavailable(format!("token endpoint sent an unreadable response: {e}"))
        })?;
        if let Some(t) = token.token_type.as_deref()
            && !t.eq_ignore_ascii_case("bearer")
        {
            return Err(ProviderError::misconfigured(format!(
                "token endpoint issued an unsupported token_type `{t}`"
            )));
        }
        let claims = jwt::peek(&token.access_token);
        let principal = claims
            .as_ref()
            .and_then(jwt::Claims::principal)
            .unwrap_or(client_id);
        let credentials = Credentials::bearer(token.access_token).principal(principal);
        // `expires_in` counts from now (to the nanosecond); the JWT `exp` is a fallback.
        let jwt_exp = claims.as_ref().and_then(|c| c.exp);
        Ok(match (token.expires_in, jwt_exp) {
            (Some(seconds), _) => credentials.expires_in(seconds),
            (None, Some(exp)) => credentials.expires_at_unix(exp),
            (None, None) => credentials,
        })
    }

    fn handle_security_error(_: Request, _: Credentials, error: SecurityError) -> Decision {
        match error.kind {
            SecurityErrorKind::TokenExpired | SecurityErrorKind::Unauthorized => {
                Decision::RefreshAndRetry
            }
            SecurityErrorKind::Forbidden | SecurityErrorKind::Other => Decision::Fail,
        }
    }
}

reauth_sdk::export_provider!(ClientCredentials);
