//! The JSON shapes credentials and requests take outside the process: `reauth get
//! --format json`, the sidecar's HTTP API (`reauth serve`) and the adapters that
//! talk to it. One definition, so what the sidecar returns is what an adapter reads
//! back and what a caller reports in a security error.
//!
//! These types carry secrets in the clear on purpose (they are the hand-over);
//! their `Debug` output redacts them.

use crate::secret::Secret;
use crate::types::{Credential, Credentials, Request, SecurityError, SecurityErrorKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A credential as JSON: `{"kind": "bearer", "token": …}`, `{"kind": "basic",
/// "username": …, "password": …}` or `{"kind": "headers", "headers": {…}}`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
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

/// Credentials as JSON: the credential's fields, plus `expires_at` (RFC 3339, UTC),
/// `expires_at_unix` (seconds) and `principal` when known.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireCredentials {
    /// The credential.
    #[serde(flatten)]
    pub credential: WireCredential,
    /// Expiry as `YYYY-MM-DDTHH:MM:SSZ`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Expiry in seconds since the Unix epoch (what clients should read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_unix: Option<u64>,
    /// The stable identity the credential stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
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
        WireCredentials {
            credential,
            expires_at: c.expires_at.map(crate::cli::rfc3339),
            expires_at_unix: c
                .expires_at
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            principal: c.principal.clone(),
        }
    }
}

impl From<WireCredentials> for Credentials {
    fn from(w: WireCredentials) -> Self {
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
        Credentials {
            credential,
            expires_at: w
                .expires_at_unix
                .map(|s| UNIX_EPOCH + Duration::from_secs(s)),
            principal: w.principal,
        }
    }
}

/// What credentials are wanted (the cache key beside the provider name).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
pub struct WireSecurityError {
    /// `token_expired`, `unauthorized`, `forbidden` or `other`.
    pub kind: WireErrorKind,
    /// HTTP status, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Protocol error code (`invalid_token`, `28P01`, `WRONGPASS` …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Human-readable message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// [`SecurityErrorKind`] on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireErrorKind {
    /// The credential expired.
    TokenExpired,
    /// The credential was not accepted.
    Unauthorized,
    /// Accepted but lacking permission.
    Forbidden,
    /// Anything else security-related.
    Other,
}

impl From<WireSecurityError> for SecurityError {
    fn from(w: WireSecurityError) -> Self {
        SecurityError {
            kind: match w.kind {
                WireErrorKind::TokenExpired => SecurityErrorKind::TokenExpired,
                WireErrorKind::Unauthorized => SecurityErrorKind::Unauthorized,
                WireErrorKind::Forbidden => SecurityErrorKind::Forbidden,
                WireErrorKind::Other => SecurityErrorKind::Other,
            },
            code: w.code,
            status: w.status,
            message: w.message,
        }
    }
}

/// The time in `expires_at_unix`, if any.
pub fn expiry(c: &WireCredentials) -> Option<SystemTime> {
    c.expires_at_unix
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(Credentials::from(back), c);
        assert!(!format!("{w:?}").contains("pw-123456"));
    }
}
