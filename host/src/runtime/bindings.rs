//! Generated bindings for the `reauth:provider` world and conversions between the
//! WIT types and the host's public types (which wrap secrets).

use crate::secret::Secret;
use crate::types;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

wasmtime::component::bindgen!({
    path: "../wit",
    world: "reauth:provider/provider",
    imports: { default: trappable },
    exports: { default: async },
    require_store_data_send: true,
    with: {
        "wasi:io": wasmtime_wasi::p2::bindings::io,
        "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
        "wasi:http": wasmtime_wasi_http::p2::bindings::http,
    },
});

pub(crate) use self::reauth::provider::types as wit;

fn to_datetime(t: SystemTime) -> wit::Datetime {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    wit::Datetime {
        seconds: d.as_secs(),
        nanoseconds: d.subsec_nanos(),
    }
}

fn from_datetime(d: wit::Datetime) -> SystemTime {
    UNIX_EPOCH + Duration::new(d.seconds, d.nanoseconds.min(999_999_999))
}

impl From<&types::Request> for wit::Request {
    fn from(r: &types::Request) -> Self {
        wit::Request {
            subject: r.subject.clone(),
            scopes: r.scopes.clone(),
            audience: r.audience.clone(),
            reason: match r.reason {
                types::Reason::Initial => wit::Reason::Initial,
                types::Reason::RefreshAhead => wit::Reason::RefreshAhead,
                types::Reason::Expired => wit::Reason::Expired,
                types::Reason::AfterSecurityError => wit::Reason::AfterSecurityError,
            },
        }
    }
}

impl From<wit::Credentials> for types::Credentials {
    fn from(c: wit::Credentials) -> Self {
        types::Credentials {
            credential: match c.credential {
                wit::Credential::Basic(b) => types::Credential::Basic {
                    username: b.username,
                    password: Secret::new(b.password),
                },
                wit::Credential::Bearer(t) => types::Credential::Bearer(Secret::new(t)),
                wit::Credential::Headers(h) => types::Credential::Headers(
                    h.into_iter().map(|(k, v)| (k, Secret::new(v))).collect(),
                ),
            },
            expires_at: c.expires_at.map(from_datetime),
            principal: c.principal,
        }
    }
}

impl From<&types::Credentials> for wit::Credentials {
    fn from(c: &types::Credentials) -> Self {
        wit::Credentials {
            credential: match &c.credential {
                types::Credential::Basic { username, password } => {
                    wit::Credential::Basic(wit::BasicAuth {
                        username: username.clone(),
                        password: password.expose().to_string(),
                    })
                }
                types::Credential::Bearer(t) => wit::Credential::Bearer(t.expose().to_string()),
                types::Credential::Headers(h) => wit::Credential::Headers(
                    h.iter()
                        .map(|(k, v)| (k.clone(), v.expose().to_string()))
                        .collect(),
                ),
            },
            expires_at: c.expires_at.map(to_datetime),
            principal: c.principal.clone(),
        }
    }
}

impl From<wit::ProviderError> for types::ProviderError {
    fn from(e: wit::ProviderError) -> Self {
        match e {
            wit::ProviderError::Unavailable(m) => types::ProviderError::Unavailable(m),
            wit::ProviderError::Denied(m) => types::ProviderError::Denied(m),
            wit::ProviderError::Misconfigured(m) => types::ProviderError::Misconfigured(m),
        }
    }
}

impl From<&types::SecurityError> for wit::SecurityError {
    fn from(e: &types::SecurityError) -> Self {
        wit::SecurityError {
            kind: match e.kind {
                types::SecurityErrorKind::TokenExpired => wit::SecurityErrorKind::TokenExpired,
                types::SecurityErrorKind::Unauthorized => wit::SecurityErrorKind::Unauthorized,
                types::SecurityErrorKind::Forbidden => wit::SecurityErrorKind::Forbidden,
                types::SecurityErrorKind::Other => wit::SecurityErrorKind::Other,
            },
            code: e.code.clone(),
            status: e.status,
            message: e.message.clone(),
        }
    }
}

impl From<wit::Decision> for types::Decision {
    fn from(d: wit::Decision) -> Self {
        match d {
            wit::Decision::RefreshAndRetry => types::Decision::RefreshAndRetry,
            wit::Decision::RetryAfter(ms) => types::Decision::RetryAfter(Duration::from_millis(ms)),
            wit::Decision::Fail => types::Decision::Fail,
        }
    }
}
