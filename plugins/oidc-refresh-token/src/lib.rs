//! `oidc-refresh-token`: an offline refresh token exchanged for short-lived access
//! tokens (OAuth2 refresh grant, RFC 6749 §6; the "offline token" pattern of CLIs
//! and services that log in once).
//!
//! Config (client keys as in `reauth_sdk::oauth2`):
//! - `issuer` (discovery) or `token_url`; `client_id`; client authentication
//!   (`client_secret`, or `private_key`, or none for a public client);
//! - `refresh_token`: the offline refresh token from the operator's login (usually
//!   `{ file = … }`). This is the *seed*: once the IdP rotates it, the rotated token
//!   lives in the provider's state and the seed is never sent again. Putting a new
//!   seed in config (after a new login) supersedes the stored token;
//! - `scope`: optional down-scoping of the refresh request.
//!
//! Rotation: when the IdP returns a new refresh token, it is written to the state
//! store (atomically, durably) **before** the access token is handed to the host. If
//! that write fails the call fails: handing out the access token while losing the
//! only valid refresh token would force a new login later. A consumed refresh token
//! is never sent again (replaying one makes IdPs with reuse detection revoke the
//! whole grant).
//!
//! One token per provider: requests with a subject, scopes or audience are refused,
//! so the host's single-flight serialises every refresh of this provider.
//!
//! Errors: `invalid_grant` ⇒ `denied`, telling the operator to log in again; 5xx and
//! transport failures ⇒ `unavailable`. `principal` is `iss|sub` of the ID token (or of
//! the access token), stable across refreshes.

use reauth_sdk::oauth2::Client;
use reauth_sdk::{
    ConfigKey, Credentials, Decision, Descriptor, Provider, ProviderError, Request, SecurityError,
    SecurityErrorKind, config, state,
};
use serde_json::json;
use sha2::{Digest, Sha256};

struct RefreshToken;

const STATE_KEY: &str = "refresh";

/// The refresh token to use now and the seed fingerprint it descends from.
fn current_token(seed: &str) -> (String, String) {
    let fingerprint = hex::encode(Sha256::digest(seed.as_bytes()));
    let stored = state::get(STATE_KEY)
        .and_then(|v| serde_json::from_str::<serde_json::Value>(&v).ok())
        .filter(|v| v["seed"].as_str() == Some(fingerprint.as_str()))
        .and_then(|v| v["refresh_token"].as_str().map(str::to_string));
    (stored.unwrap_or_else(|| seed.to_string()), fingerprint)
}

impl Provider for RefreshToken {
    fn describe() -> Descriptor {
        reauth_sdk::oauth2::client_keys()
            .into_iter()
            .chain([
                ConfigKey::text("refresh_token", "the offline refresh token (the seed)")
                    .required()
                    .secret(),
                ConfigKey::text("scope", "down-scoping of the refresh request"),
            ])
            .fold(Descriptor::new(), Descriptor::key)
    }

    fn get_credentials(request: Request) -> Result<Credentials, ProviderError> {
        if request.subject.is_some() || !request.scopes.is_empty() || request.audience.is_some() {
            return Err(ProviderError::misconfigured(
                "an offline refresh token serves one identity: drop `subject`, `scopes` and \
                 `audience` from the request (set `scope` in config to down-scope)",
            ));
        }
        let client = Client::from_config()?;
        let seed = config::required("refresh_token")?;
        let (token, fingerprint) = current_token(&seed);
        let scope = config::get("scope")?;
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", token.as_str()),
        ];
        if let Some(scope) = scope.as_deref().filter(|s| !s.is_empty()) {
            form.push(("scope", scope));
        }
        let response = match client.token(&form) {
            Ok(r) => r,
            Err(ProviderError::Denied(detail)) if detail.starts_with("invalid_grant") => {
                return Err(ProviderError::denied(format!(
                    "the IdP rejected the refresh token ({detail}): it expired, was revoked or \
                     was already used. Log in again and put the new offline token in config \
                     key `refresh_token`"
                )));
            }
            Err(e) => return Err(e),
        };
        if let Some(rotated) = response.refresh_token.as_deref().filter(|r| *r != token) {
            let record = json!({"seed": fingerprint, "refresh_token": rotated});
            state::set(STATE_KEY, &record.to_string()).map_err(|e| {
                ProviderError::unavailable(format!(
                    "the IdP rotated the refresh token but it could not be stored ({e}); \
                     the access token was not used"
                ))
            })?;
        }
        response.credentials(None)
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

reauth_sdk::export_provider!(RefreshToken);
