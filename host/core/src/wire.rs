//! The JSON shapes credentials and requests take outside the process: `reauth get
//! --format json`, the sidecar's HTTP API (`reauth serve`) and the adapters that
//! talk to it. One definition, so what the sidecar returns is what an adapter reads
//! back and what a caller reports in a security error.
//!
//! These types carry secrets in the clear on purpose (they are the hand-over);
//! their `Debug` output redacts them.
//!
//! Times come from HTTP bodies, so every conversion is checked: an
//! `expires_at_unix` after [`MAX_EXPIRES_AT_UNIX`] (9999-12-31T23:59:59Z, the bound
//! the plugin boundary uses too) is refused while parsing, with the field named,
//! never overflowed. Going out, an expiry is cut to whole seconds by rounding
//! *down*: the wire never shows a later expiry than the real one (a time before
//! 1970 is shown as 0; it is long past either way).

use crate::secret::Secret;
use crate::types::{Credential, Credentials, Request, SecurityError, SecurityErrorKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A credential as JSON: `{"kind": "bearer", "token": …}`, `{"kind": "basic",
/// "username": …, "password": …}` or `{"kind": "headers", "headers": {…}}`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
#[allow(
    clippy::exhaustive_enums,
    reason = "a JSON shape of the sidecar's versioned API (openapi.json); mirrors the contract's credential shapes"
)]
pub enum WireCredential {
    /// A bearer token.
    Bearer {
        /// The token.
        token: String,
    },
    /// Username and password.
    Basic {
        /// The username.
        username: String,
        /// The password.
        password: String,
    },
    /// Header name/value pairs.
    Headers {
        /// The headers.
        headers: BTreeMap<String, String>,
    },
}

impl std::fmt::Debug for WireCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireCredential::Bearer { .. } => f.write_str("Bearer([redacted])"),
            WireCredential::Basic { username, .. } => {
                write!(
                    f,
                    "Basic {{ username: {username:?}, password: [redacted] }}"
                )
            }
            WireCredential::Headers { headers } => {
                write!(
                    f,
                    "Headers({:?} = [redacted])",
                    headers.keys().collect::<Vec<_>>()
                )
            }
        }
    }
}

/// Latest `expires_at_unix` accepted on the wire: 9999-12-31T23:59:59Z.
pub const MAX_EXPIRES_AT_UNIX: u64 = crate::clock::MAX_UNIX_SECS;

/// Why a wire value does not convert to the host's types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// An expiry beyond [`MAX_EXPIRES_AT_UNIX`]; `field` names it.
    #[error("`{field}` is {value}, after 9999-12-31T23:59:59Z (at most {MAX_EXPIRES_AT_UNIX})")]
    ExpiryOutOfRange {
        /// The field (`expires_at_unix`).
        field: &'static str,
        /// The value given.
        value: u64,
    },
}

/// Credentials as JSON: the credential's fields, plus `expires_at` (RFC 3339, UTC),
/// `expires_at_unix` (seconds) and `principal` when known.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[allow(
    clippy::exhaustive_structs,
    reason = "a JSON shape of the sidecar's versioned API (openapi.json); the tools build it with a literal"
)]
pub struct WireCredentials {
    /// The credential.
    #[serde(flatten)]
    pub credential: WireCredential,
    /// Expiry as `YYYY-MM-DDTHH:MM:SSZ` (rounded down to the second; informative,
    /// `expires_at_unix` is what is read back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Expiry in seconds since the Unix epoch, rounded down (what clients should
    /// read); at most [`MAX_EXPIRES_AT_UNIX`], larger values are refused while
    /// parsing.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "expiry_seconds"
    )]
    pub expires_at_unix: Option<u64>,
    /// The stable identity the credential stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
}

impl From<&std::sync::Arc<Credentials>> for WireCredentials {
    fn from(c: &std::sync::Arc<Credentials>) -> Self {
        Self::from(&**c)
    }
}

impl From<&Credentials> for WireCredentials {
    fn from(c: &Credentials) -> Self {
        let credential = match &c.credential {
            Credential::Bearer(t) => WireCredential::Bearer {
                token: t.expose().to_string(),
            },
            Credential::Basic { username, password } => WireCredential::Basic {
                username: username.clone(),
                password: password.expose().to_string(),
            },
            Credential::Headers(h) => WireCredential::Headers {
                headers: h
                    .iter()
                    .map(|(k, v)| (k.clone(), v.expose().to_string()))
                    .collect(),
            },
        };
        let seconds = c.expires_at.map(unix_seconds_down);
        WireCredentials {
            credential,
            expires_at: seconds.map(|s| crate::clock::rfc3339(UNIX_EPOCH + Duration::from_secs(s))),
            expires_at_unix: seconds,
            principal: c.principal.clone(),
        }
    }
}

/// Whole seconds since the epoch, rounded down, within `0..=MAX_EXPIRES_AT_UNIX`
/// (never later than `t`, except a time before 1970, shown as 0).
fn unix_seconds_down(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .min(MAX_EXPIRES_AT_UNIX)
}

/// `expires_at_unix` while parsing: a number in range, or an error serde reports at
/// the field's path.
fn expiry_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<u64>::deserialize(d)? {
        Some(value) if value > MAX_EXPIRES_AT_UNIX => Err(serde::de::Error::custom(format!(
            "{value} is after 9999-12-31T23:59:59Z (at most {MAX_EXPIRES_AT_UNIX})"
        ))),
        other => Ok(other),
    }
}

/// The time `seconds` after the epoch, if within [`MAX_EXPIRES_AT_UNIX`].
fn checked_expiry(seconds: u64) -> Result<SystemTime, WireError> {
    let out_of_range = WireError::ExpiryOutOfRange {
        field: "expires_at_unix",
        value: seconds,
    };
    if seconds > MAX_EXPIRES_AT_UNIX {
        return Err(out_of_range);
    }
    UNIX_EPOCH
        .checked_add(Duration::from_secs(seconds))
        .ok_or(out_of_range)
}

impl TryFrom<WireCredentials> for Credentials {
    type Error = WireError;

    /// Checked: an `expires_at_unix` beyond [`MAX_EXPIRES_AT_UNIX`] is an error
    /// naming the field, never an overflow.
    fn try_from(w: WireCredentials) -> Result<Self, WireError> {
        let expires_at = w.expires_at_unix.map(checked_expiry).transpose()?;
        let credential = match w.credential {
            WireCredential::Bearer { token } => Credential::Bearer(Secret::new(token)),
            WireCredential::Basic { username, password } => Credential::Basic {
                username,
                password: Secret::new(password),
            },
            WireCredential::Headers { headers } => Credential::Headers(
                headers
                    .into_iter()
                    .map(|(k, v)| (k, Secret::new(v)))
                    .collect(),
            ),
        };
        Ok(Credentials {
            credential,
            expires_at,
            principal: w.principal,
        })
    }
}

/// What credentials are wanted (the cache key beside the provider name).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(
    clippy::exhaustive_structs,
    reason = "a JSON shape of the sidecar's versioned API (openapi.json); the tools build it with a literal"
)]
pub struct WireRequest {
    /// Per-user identity; absent for the provider's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Scopes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Audience / resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
}

impl From<WireRequest> for Request {
    fn from(w: WireRequest) -> Self {
        Request {
            subject: w.subject,
            scopes: w.scopes,
            audience: w.audience,
            ..Request::default()
        }
    }
}

/// A server's rejection, as reported to `POST /v1/providers/{name}/security-errors`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(
    clippy::exhaustive_structs,
    reason = "a JSON shape of the sidecar's versioned API (openapi.json); the tools build it with a literal"
)]
pub struct WireSecurityError {
    /// `token_expired`, `unauthorized`, `forbidden` or `other`.
    pub kind: SecurityErrorKind,
    /// HTTP status, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Protocol error code (`invalid_token`, `28P01`, `WRONGPASS` …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Human-readable message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The server's `WWW-Authenticate` value as received, any scheme: parsed into
    /// the challenges a 0.2 provider sees (and the `code`, when none is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub www_authenticate: Option<String>,
    /// The server's `Retry-After` value as received (delta-seconds or an HTTP date).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<String>,
}

impl WireSecurityError {
    /// The security error it reports; `now` places an HTTP-date `Retry-After`.
    /// A `Retry-After` that is neither a number nor an HTTP date is ignored.
    pub fn into_security_error(self, now: SystemTime) -> SecurityError {
        let challenges = self
            .www_authenticate
            .as_deref()
            .map(crate::classify::parse_www_authenticate)
            .unwrap_or_default();
        let code = self
            .code
            .or_else(|| crate::classify::challenge_code(&challenges).map(str::to_string));
        SecurityError {
            kind: self.kind,
            code,
            status: self.status,
            message: self.message,
            challenges,
            retry_after: self
                .retry_after
                .as_deref()
                .and_then(|v| crate::classify::parse_retry_after(v, now)),
        }
    }
}

/// The time in `expires_at_unix`, if any and within [`MAX_EXPIRES_AT_UNIX`] (a
/// larger value, only possible in a value built in code, is `None`: checked, never
/// an overflow).
pub fn expiry(c: &WireCredentials) -> Option<SystemTime> {
    c.expires_at_unix.and_then(|s| checked_expiry(s).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reported_security_error_carries_the_servers_challenges_and_retry_after() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let w: WireSecurityError = serde_json::from_value(serde_json::json!({
            "kind": "unauthorized",
            "status": 401,
            "www_authenticate": "AcmeSession realm=\"acme\", error=\"revoked\"",
            "retry_after": "120",
        }))
        .unwrap();
        let e = w.into_security_error(now);
        assert_eq!(
            e.code.as_deref(),
            Some("revoked"),
            "the code comes from the challenge"
        );
        assert_eq!(e.challenges[0].scheme, "AcmeSession");
        assert_eq!(e.retry_after, Some(Duration::from_secs(120)));
        // A code given wins; an unusable Retry-After is ignored, not an error.
        let w: WireSecurityError = serde_json::from_value(serde_json::json!({
            "kind": "token_expired",
            "code": "mine",
            "www_authenticate": "Bearer error=\"invalid_token\"",
            "retry_after": "whenever",
        }))
        .unwrap();
        let e = w.into_security_error(now);
        assert_eq!(e.code.as_deref(), Some("mine"));
        assert_eq!(e.retry_after, None);
        assert!(
            serde_json::from_value::<WireSecurityError>(serde_json::json!({
                "kind": "other", "retry_after": 5
            }))
            .is_err(),
            "retry_after is the header's text"
        );
    }

    #[test]
    fn round_trips_and_redacts() {
        let c = Credentials {
            credential: Credential::Basic {
                username: "app".into(),
                password: Secret::new("pw-123456"),
            },
            expires_at: Some(UNIX_EPOCH + Duration::from_secs(1_764_100_000)),
            principal: Some("app".into()),
        };
        let w = WireCredentials::from(&c);
        let json = serde_json::to_value(&w).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"kind": "basic", "username": "app", "password": "pw-123456",
                "expires_at": "2025-11-25T19:46:40Z", "expires_at_unix": 1_764_100_000u64, "principal": "app"})
        );
        let back: WireCredentials = serde_json::from_value(json).unwrap();
        assert_eq!(Credentials::try_from(back).unwrap(), c);
        assert!(!format!("{w:?}").contains("pw-123456"));
    }

    fn bearer(expires_at_unix: Option<u64>) -> WireCredentials {
        WireCredentials {
            credential: WireCredential::Bearer { token: "t".into() },
            expires_at: None,
            expires_at_unix,
            principal: None,
        }
    }

    /// Issue #14 item 2: `UNIX_EPOCH + Duration::from_secs(u64::MAX)` panicked.
    #[test]
    fn huge_expires_at_unix_is_an_error_not_a_panic() {
        for value in [u64::MAX, MAX_EXPIRES_AT_UNIX + 1, i64::MAX as u64] {
            assert_eq!(
                Credentials::try_from(bearer(Some(value))),
                Err(WireError::ExpiryOutOfRange {
                    field: "expires_at_unix",
                    value
                })
            );
            assert_eq!(expiry(&bearer(Some(value))), None);
        }
        let last = Credentials::try_from(bearer(Some(MAX_EXPIRES_AT_UNIX))).unwrap();
        assert_eq!(
            last.expires_at,
            Some(UNIX_EPOCH + Duration::from_secs(MAX_EXPIRES_AT_UNIX))
        );
        // Parsing refuses it too, naming the field.
        let json = r#"{"kind": "bearer", "token": "t", "expires_at_unix": 18446744073709551615}"#;
        let de = &mut serde_json::Deserializer::from_str(json);
        let err = serde_path_to_error::deserialize::<_, WireCredentials>(de).unwrap_err();
        assert_eq!(err.path().to_string(), "expires_at_unix", "{err}");
        assert!(err.to_string().contains("9999-12-31T23:59:59Z"), "{err}");
    }

    /// Expiries shortened to whole seconds are rounded down, never up.
    #[test]
    fn expiry_is_rounded_down_to_the_second() {
        let at = |t: SystemTime| Credentials {
            credential: Credential::Bearer(Secret::new("t")),
            expires_at: Some(t),
            principal: None,
        };
        let w = WireCredentials::from(&at(UNIX_EPOCH + Duration::new(1_764_100_000, 999_999_999)));
        assert_eq!(w.expires_at_unix, Some(1_764_100_000));
        assert_eq!(w.expires_at.as_deref(), Some("2025-11-25T19:46:40Z"));
        assert!(expiry(&w).unwrap() <= UNIX_EPOCH + Duration::new(1_764_100_000, 999_999_999));
        // Out of the wire's range: clamped down to the largest value, which
        // converts back.
        let far = WireCredentials::from(&at(
            UNIX_EPOCH + Duration::from_secs(MAX_EXPIRES_AT_UNIX + 10)
        ));
        assert_eq!(far.expires_at_unix, Some(MAX_EXPIRES_AT_UNIX));
        assert_eq!(far.expires_at.as_deref(), Some("9999-12-31T23:59:59Z"));
        assert!(Credentials::try_from(far).is_ok());
        let before_1970 = WireCredentials::from(&at(UNIX_EPOCH - Duration::from_secs(5)));
        assert_eq!(
            before_1970.expires_at_unix,
            Some(0),
            "expired, not 'no expiry'"
        );
    }
}
