//! The host-side mirror of the WIT `types` interface, with secrets wrapped in
//! [`Secret`] so that `Debug` output of credentials never leaks them.

use crate::secret::Secret;
use std::fmt;
use std::time::SystemTime;

/// What a client presents to a server.
///
/// Deliberately exhaustive: it mirrors the WIT contract's `credential` variant
/// one to one, and a new variant is a contract change (a new WIT version) that
/// every consumer — the host's conversions included — must handle on purpose.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
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
pub struct Credentials {
    /// The credential itself.
    pub credential: Credential,
    /// When it stops being valid, if the provider said so.
    pub expires_at: Option<SystemTime>,
    /// The stable identity it stands for (e.g. `iss|sub`).
    pub principal: Option<String>,
}

/// Why the host asks a provider for credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProviderError {
    /// Transient: IdP down, 5xx, timeout.
    Unavailable(String),
    /// The IdP refused: bad secret, revoked grant.
    Denied(String),
    /// The provider's configuration is wrong.
    Misconfigured(String),
}

impl ProviderError {
    /// The same error with its message rewritten by `f`.
    pub fn map_message(self, f: impl FnOnce(String) -> String) -> Self {
        match self {
            ProviderError::Unavailable(m) => ProviderError::Unavailable(f(m)),
            ProviderError::Denied(m) => ProviderError::Denied(f(m)),
            ProviderError::Misconfigured(m) => ProviderError::Misconfigured(f(m)),
        }
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProviderError::Unavailable(m) => write!(f, "unavailable: {m}"),
            ProviderError::Denied(m) => write!(f, "denied: {m}"),
            ProviderError::Misconfigured(m) => write!(f, "misconfigured: {m}"),
        }
    }
}

/// Coarse classification of a server's authentication failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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

/// A server rejected an operation for an authentication reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityError {
    /// Classification.
    pub kind: SecurityErrorKind,
    /// Server-specific code (`invalid_token`, `28P01`, …).
    pub code: Option<String>,
    /// HTTP status, where there was one.
    pub status: Option<u16>,
    /// The server's message.
    pub message: Option<String>,
}

impl SecurityError {
    /// A security error of `kind` with no further detail.
    pub fn new(kind: SecurityErrorKind) -> Self {
        SecurityError {
            kind,
            code: None,
            status: None,
            message: None,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
