//! `static`: a fixed credential from configuration (neo4j `AuthManagers.static`).
//!
//! Config: `token` (bearer), or `username` + `password` (basic), or one or more
//! `header.<Name>` keys (headers); optional `principal`. Never handles security
//! errors: a fixed credential cannot be refreshed, so every rejection is final.

use reauth_sdk::{Credentials, Decision, Provider, ProviderError, Request, SecurityError, config};

struct Static;

impl Provider for Static {
    fn get_credentials(_request: Request) -> Result<Credentials, ProviderError> {
        let credentials = if let Some(token) = config::get("token")? {
            Credentials::bearer(token)
        } else if let Some(username) = config::get("username")? {
            Credentials::basic(username, config::required("password")?)
        } else {
            let headers: Vec<(String, String)> = config::all()?
                .into_iter()
                .filter_map(|(k, v)| k.strip_prefix("header.").map(|n| (n.to_string(), v)))
                .collect();
            if headers.is_empty() {
                return Err(ProviderError::misconfigured(
                    "static provider needs `token`, `username`/`password` or `header.<name>` keys",
                ));
            }
            Credentials::headers(headers)
        };
        Ok(match config::get("principal")? {
            Some(p) => credentials.principal(p),
            None => credentials,
        })
    }

    fn handle_security_error(_: Request, _: Credentials, _: SecurityError) -> Decision {
        Decision::Fail
    }
}

reauth_sdk::export_provider!(Static);
