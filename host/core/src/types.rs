//! The host-side mirror of the WIT `types` interface, with secrets wrapped in
//! [`Secret`] so that `Debug` output of credentials never leaks them.

use crate::secret::Secret;
use std::fmt;
use std::time::{Duration, SystemTime};

/// What a client presents to a server.
///
/// Deliberately exhaustive: it mirrors the WIT contract's `credential` variant
/// one to one, and a new variant is a contract change (a new WIT version) that
/// every consumer — the host's conversions included — must handle on purpose.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[allow(
    clippy::exhaustive_enums,
    reason = "the credential shapes of the versioned WIT contract: a new one comes only with a new contract version, and callers must handle every shape"
)]
pub enum Credential {
    /// Username and password.
    Basic {
        /// The username (not secret).
        username: String,
        /// The password.
        password: Secret,
    },
    /// A bearer token.
    Bearer(Secret),
    /// Header name/value pairs; the values are secret.
    Headers(Vec<(String, Secret)>),
}

impl Credential {
    /// The value of an HTTP `Authorization` header for this credential, if it maps
    /// to one (`Basic …` or `Bearer …`). **Security:** the result holds the secret.
    pub fn authorization_header(&self) -> Option<Secret> {
        use base64::Engine as _;
        match self {
            Credential::Basic { username, password } => {
                let raw = format!("{username}:{}", password.expose());
                Some(Secret::new(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw)
                )))
            }
            Credential::Bearer(token) => Some(Secret::new(format!("Bearer {}", token.expose()))),
            Credential::Headers(_) => None,
        }
    }

    /// Short name of the variant, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Credential::Basic { .. } => "basic",
            Credential::Bearer(_) => "bearer",
            Credential::Headers(_) => "headers",
        }
    }
}

/// A credential with its lifetime and identity, as returned by a provider.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[allow(
    clippy::exhaustive_structs,
    reason = "a record of the versioned WIT contract (changes only with a new contract version); providers and embedders build it with a literal"
)]
pub struct Credentials {
    /// The credential itself.
    pub credential: Credential,
    /// When it stops being valid, if the provider said so.
    pub expires_at: Option<SystemTime>,
    /// The stable identity it stands for (e.g. `iss|sub`).
    pub principal: Option<String>,
}

/// Why the host asks a provider for credentials.
///
/// Non-exhaustive: it mirrors the versioned WIT contract, and a later contract
/// version may add a case (match with a `_` arm).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Reason {
    /// Nothing cached yet.
    #[default]
    Initial,
    /// Still valid, but inside the refresh window.
    RefreshAhead,
    /// The cached credential expired.
    Expired,
    /// A server rejected the cached credential.
    AfterSecurityError,
}

/// What credentials are wanted. Together with the provider name this is the cache key
/// (the `reason` is not part of the key).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
#[allow(
    clippy::exhaustive_structs,
    reason = "a record of the versioned WIT contract (changes only with a new contract version); built with a literal or the builder"
)]
pub struct Request {
    /// Per-user / per-session identity; `None` is the provider's own identity.
    pub subject: Option<String>,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Audience / resource.
    pub audience: Option<String>,
    /// Why the host is asking.
    pub reason: Reason,
}

// Reason: its name in the WIT contract.
names!(Reason {
    Initial => "initial",
    RefreshAhead => "refresh-ahead",
    Expired => "expired",
    AfterSecurityError => "after-security-error",
});

impl Request {
    /// A request for the provider's own identity with no scopes or audience.
    pub fn new() -> Self {
        Self::default()
    }

    /// For `subject`.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// With `scope` added.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scopes.push(scope.into());
        self
    }

    /// For `audience`.
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audience = Some(audience.into());
        self
    }
}

/// Why a provider could not produce credentials (the WIT `provider-error`).
///
/// Non-exhaustive: it mirrors the versioned WIT contract, and a later contract
/// version may add a case (match with a `_` arm).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProviderError {
    /// Transient: IdP down, 5xx, 429, timeout.
    Unavailable {
        /// What went wrong.
        message: String,
        /// How long the identity provider asked to wait (its `Retry-After`), if it
        /// said: the cache waits at least that long (at most 5 minutes, or
        /// `cache.backoff_max_ms` if longer) instead
        /// of its own backoff step. Contract 0.2; always `None` from 0.1.0 plugins.
        retry_after: Option<Duration>,
    },
    /// The IdP refused: bad secret, revoked grant.
    Denied(String),
    /// The provider's configuration is wrong.
    Misconfigured(String),
}

impl ProviderError {
    /// A transient failure with no advice on when to retry.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ProviderError::Unavailable {
            message: message.into(),
            retry_after: None,
        }
    }

    /// The identity provider's `Retry-After`, for an `unavailable` error.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The same error with its message rewritten by `f`.
    pub fn map_message(self, f: impl FnOnce(String) -> String) -> Self {
        match self {
            ProviderError::Unavailable {
                message,
                retry_after,
            } => ProviderError::Unavailable {
                message: f(message),
                retry_after,
            },
            ProviderError::Denied(m) => ProviderError::Denied(f(m)),
            ProviderError::Misconfigured(m) => ProviderError::Misconfigured(f(m)),
        }
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProviderError::Unavailable {
                message,
                retry_after: None,
            } => write!(f, "unavailable: {message}"),
            ProviderError::Unavailable {
                message,
                retry_after: Some(after),
            } => write!(
                f,
                "unavailable: {message} (retry after {} ms)",
                after.as_millis()
            ),
            ProviderError::Denied(m) => write!(f, "denied: {m}"),
            ProviderError::Misconfigured(m) => write!(f, "misconfigured: {m}"),
        }
    }
}

/// Coarse classification of a server's authentication failure.
///
/// Non-exhaustive: it mirrors the versioned WIT contract, and a later contract
/// version may add a case (match with a `_` arm).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "wire",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
#[non_exhaustive]
pub enum SecurityErrorKind {
    /// The credential expired.
    TokenExpired,
    /// The credential was not accepted (wrong, revoked, rotated).
    Unauthorized,
    /// The credential was accepted but lacks permission.
    Forbidden,
    /// Anything else security-related.
    Other,
}

// SecurityErrorKind: its name in metric labels and on the wire.
names!(SecurityErrorKind {
    TokenExpired => "token_expired",
    Unauthorized => "unauthorized",
    Forbidden => "forbidden",
    Other => "other",
});

/// One challenge of a `WWW-Authenticate` header (RFC 9110 §11.6.1), any scheme;
/// parsed by [`crate::classify::parse_www_authenticate`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[allow(
    clippy::exhaustive_structs,
    reason = "one RFC 9110 challenge: scheme, token68, parameters; nothing else exists to add"
)]
pub struct Challenge {
    /// The auth scheme, as sent (compare case-insensitively).
    pub scheme: String,
    /// `token68` credentials, if the challenge carried them instead of parameters.
    pub token68: Option<String>,
    /// Parameters, names lower-cased, values unquoted.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// The value of parameter `name` (case-insensitive).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A server rejected an operation for an authentication reason.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(
    clippy::exhaustive_structs,
    reason = "a record of the versioned WIT contract (changes only with a new contract version); built with a literal or the builder"
)]
pub struct SecurityError {
    /// Classification.
    pub kind: SecurityErrorKind,
    /// Server-specific code (`invalid_token`, `28P01`, …).
    pub code: Option<String>,
    /// HTTP status, where there was one.
    pub status: Option<u16>,
    /// The server's message.
    pub message: Option<String>,
    /// Every `WWW-Authenticate` challenge the server sent, any scheme (contract
    /// 0.2; a 0.1.0 plugin does not see them).
    pub challenges: Vec<Challenge>,
    /// The server's `Retry-After`, if it sent one (contract 0.2).
    pub retry_after: Option<Duration>,
}

impl SecurityError {
    /// A security error of `kind` with no further detail.
    pub fn new(kind: SecurityErrorKind) -> Self {
        SecurityError {
            kind,
            code: None,
            status: None,
            message: None,
            challenges: Vec::new(),
            retry_after: None,
        }
    }

    /// With a server code.
    pub fn code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// With an HTTP status.
    pub fn status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// With a message.
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// With the server's `WWW-Authenticate` challenges.
    pub fn challenges(mut self, challenges: Vec<Challenge>) -> Self {
        self.challenges = challenges;
        self
    }

    /// With the server's `Retry-After`.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The first challenge whose scheme is `scheme` (case-insensitive).
    pub fn challenge(&self, scheme: &str) -> Option<&Challenge> {
        self.challenges
            .iter()
            .find(|c| c.scheme.eq_ignore_ascii_case(scheme))
    }
}

impl fmt::Display for SecurityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.kind)?;
        if let Some(status) = self.status {
            write!(f, " (HTTP {status})")?;
        }
        if let Some(code) = &self.code {
            write!(f, " [{code}]")?;
        }
        if let Some(message) = &self.message {
            write!(f, ": {message}")?;
        }
        Ok(())
    }
}

/// What to do after a security error.
///
/// Non-exhaustive: it mirrors the versioned WIT contract, and a later contract
/// version may add a case (match with a `_` arm).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Invalidate the cached credential, fetch a new one and retry.
    RefreshAndRetry,
    /// Wait, then retry with the same credential.
    RetryAfter(std::time::Duration),
    /// Give up.
    Fail,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_debug_shows_no_secret() {
        let creds = [
            Credential::Bearer(Secret::new("tok-SECRET")),
            Credential::Basic {
                username: "alice".into(),
                password: Secret::new("pw-SECRET"),
            },
            Credential::Headers(vec![("x-api-key".into(), Secret::new("key-SECRET"))]),
        ];
        for credential in creds {
            let c = Credentials {
                credential,
                expires_at: None,
                principal: Some("alice".into()),
            };
            let shown = format!("{c:?} {c:#?}");
            assert!(!shown.contains("SECRET"), "{shown}");
            assert!(shown.contains("[redacted]"), "{shown}");
        }
    }

    #[test]
    fn authorization_header() {
        let basic = Credential::Basic {
            username: "Aladdin".into(),
            password: Secret::new("open sesame"),
        };
        assert_eq!(
            basic.authorization_header().unwrap().expose(),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        let bearer = Credential::Bearer(Secret::new("abc"));
        assert_eq!(
            bearer.authorization_header().unwrap().expose(),
            "Bearer abc"
        );
    }
}
