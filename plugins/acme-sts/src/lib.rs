//! `acme-sts`: a provider for a company STS that is *not* OAuth2 — the example
//! of contract 0.2 (its test peer is `tests/peers/acme-sts/sts.py`).
//!
//! The STS: `POST <sts_url>/sts/session` with `X-Api-Key` and a JSON body
//! `{"user", "audience"}` answers `{"session", "ttl", "user"}`; it may answer 429
//! with `Retry-After`. The resource servers take `Authorization: AcmeSession
//! <session>` and answer 401 with `WWW-Authenticate: AcmeSession error="expired"`
//! or `error="revoked"`, and 403 for a session of another audience.
//!
//! What the provider does with that:
//! - `describe`: its config schema (so a typo such as `api_kye` is refused by
//!   `reauth check` and at load, naming the key; `api_key` and `otp_seed` are
//!   redacted from everything it says);
//! - a 429/5xx is `unavailable` carrying the STS's `Retry-After`, so the host waits
//!   exactly that long (not its own backoff);
//! - `expired` ⇒ refresh-and-retry; `revoked` ⇒ fail (an administrator ended the
//!   session: a new one would undo that); 403 (wrong audience) ⇒ fail; a
//!   rejection that carries `Retry-After` ⇒ retry-after.

use reauth_sdk::http::Request as HttpRequest;
use reauth_sdk::{
    ConfigKey, Credentials, Decision, Descriptor, Provider, ProviderError, Request, SecurityError,
    SecurityErrorKind, config,
};
use serde::Deserialize;
use serde_json::json;

struct AcmeSts;

#[derive(Deserialize)]
struct Session {
    session: String,
    ttl: u64,
    user: String,
}

impl Provider for AcmeSts {
    fn describe() -> Descriptor {
        Descriptor::new()
            .key(
                ConfigKey::url("sts_url", "the STS base URL (POST <sts_url>/sts/session)")
                    .required(),
            )
            .key(
                ConfigKey::text("api_key", "sent as X-Api-Key")
                    .required()
                    .secret(),
            )
            .key(ConfigKey::text("user", "the user sessions are for").required())
            .key(ConfigKey::text(
                "audience",
                "default audience (a request's wins)",
            ))
            .key(ConfigKey::text("otp_seed", "sent as X-Acme-Otp").secret())
            .key(ConfigKey::integer(
                "timeout_ms",
                "timeout towards the STS (ms, default 10000)",
            ))
    }

    fn get_credentials(request: Request) -> Result<Credentials, ProviderError> {
        let base = config::required("sts_url")?;
        let url = format!("{}/sts/session", base.trim_end_matches('/'));
        let mut body = json!({ "user": config::required("user")? });
        if let Some(audience) = request.audience.or(config::get("audience")?) {
            body["audience"] = audience.into();
        }
        let timeout_ms = config::or("timeout_ms", "10000")?
            .parse::<u64>()
            .map_err(|_| ProviderError::misconfigured("`timeout_ms` is not a number"))?;
        let mut call = HttpRequest::post(&url)
            .header("x-api-key", config::required("api_key")?)
            .json(&body)
            .timeout_ms(timeout_ms);
        if let Some(otp) = config::get("otp_seed")? {
            call = call.header("x-acme-otp", otp);
        }
        let response = call.send()?;
        match response.status {
            200 => {
                let s: Session = response.json()?;
                Ok(
                    Credentials::headers([("authorization", format!("AcmeSession {}", s.session))])
                        .expires_in(s.ttl)
                        .principal(s.user),
                )
            }
            429 | 500.. => Err(ProviderError::unavailable(format!(
                "the STS answered HTTP {}",
                response.status
            ))
            .retry_after_ms(response.retry_after_ms())),
            // The STS's answer is passed on as it is: the host redacts the
            // secrets this provider declared, should the STS echo them.
            401 | 403 => Err(ProviderError::denied(format!(
                "the STS refused the API key (HTTP {}): {}",
                response.status,
                response.text().chars().take(500).collect::<String>()
            ))),
            s => Err(ProviderError::misconfigured(format!(
                "the STS answered HTTP {s}: {}",
                response.text().chars().take(200).collect::<String>()
            ))),
        }
    }

    fn handle_security_error(_: Request, _: Credentials, error: SecurityError) -> Decision {
        if let Some(ms) = error.retry_after_ms {
            return Decision::RetryAfter(ms);
        }
        let code = error
            .challenge("AcmeSession")
            .and_then(|c| c.param("error"))
            .map(str::to_string);
        match (error.kind, code.as_deref()) {
            (_, Some("expired")) => Decision::RefreshAndRetry,
            (_, Some("revoked")) => Decision::Fail,
            (SecurityErrorKind::Forbidden, _) => Decision::Fail,
            (SecurityErrorKind::TokenExpired | SecurityErrorKind::Unauthorized, _) => {
                Decision::RefreshAndRetry
            }
            _ => Decision::Fail,
        }
    }
}

reauth_sdk::export_provider!(AcmeSts);
