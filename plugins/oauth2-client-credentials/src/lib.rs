//! `oauth2-client-credentials`: OAuth2 client-credentials grant (RFC 6749 §4.4).
//!
//! Config (the client keys are described in `reauth_sdk::oauth2`):
//! - `issuer` (OpenID Connect discovery) or `token_url`; `client_id`;
//! - `auth_method`: `client_secret_basic`, `client_secret_post` or `private_key_jwt`
//!   (with `client_secret`, or `private_key` + `private_key_alg` [+ `private_key_kid`]);
//! - `scope`: space-separated default scopes (a request's scopes override them);
//! - `audience`: default audience (a request's audience overrides it), sent as the
//!   parameter named by `audience_param` (`audience`, the default, or `resource`
//!   for RFC 8707 resource indicators);
//! - `timeout_ms`: connect/first-byte timeout towards the IdP.
//!
//! Expiry comes from `expires_in`, else the access token's JWT `exp`. IdP errors
//! map to `denied` (`invalid_client`, `unauthorized_client`, `invalid_grant`,
//! `access_denied`), `misconfigured` (`invalid_scope`, `invalid_request`,
//! `invalid_target`, `unsupported_grant_type`) or `unavailable` (5xx, 429,
//! transport failures). On a security error: `token-expired`/`unauthorized` ⇒
//! refresh-and-retry; `forbidden` ⇒ fail (a new token will not grant a missing
//! permission).

use reauth_sdk::oauth2::Client;
use reauth_sdk::{
    ConfigKey, Credentials, Decision, Descriptor, Provider, ProviderError, Request, SecurityError,
    SecurityErrorKind, config,
};

struct ClientCredentials;

impl Provider for ClientCredentials {
    fn describe() -> Descriptor {
        reauth_sdk::oauth2::client_keys()
            .into_iter()
            .chain([
                ConfigKey::text("scope", "space-separated default scopes"),
                ConfigKey::text("audience", "default audience / resource"),
                ConfigKey::text(
                    "audience_param",
                    "`audience` (default) or `resource` (RFC 8707)",
                ),
            ])
            .fold(Descriptor::new(), Descriptor::key)
    }

    fn get_credentials(request: Request) -> Result<Credentials, ProviderError> {
        if request.subject.is_some() {
            return Err(ProviderError::misconfigured(
                "the client-credentials grant has no per-subject tokens; drop `subject`",
            ));
        }
        let client = Client::from_config()?;
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
        let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        if let Some(scope) = scope.as_deref().filter(|s| !s.is_empty()) {
            form.push(("scope", scope));
        }
        if let Some(audience) = audience.as_deref() {
            form.push((audience_param.as_str(), audience));
        }
        let token = client.token(&form)?;
        token.credentials(Some(client.client_id.clone()))
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
