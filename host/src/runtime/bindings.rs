//! Generated bindings for the `reauth:provider` world and conversions between the
//! WIT types and the host's public types (which wrap secrets).

use crate::secret::Secret;
use crate::types;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

wasmtime::component::bindgen!({
    path: "../wit",
    world: "reauth:provider/provider",
    imports: {
        // A call waits for its provider's state lock without blocking a thread.
        "reauth:provider/state": async | trappable,
        default: trappable,
    },
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

/// Latest `expires-at` accepted from a plugin: 9999-12-31T23:59:59Z.
const MAX_EXPIRES_AT_SECS: u64 = crate::clock::MAX_UNIX_SECS;

fn from_datetime(d: wit::Datetime) -> Option<SystemTime> {
    if d.seconds > MAX_EXPIRES_AT_SECS || d.nanoseconds > 999_999_999 {
        return None;
    }
    UNIX_EPOCH.checked_add(Duration::new(d.seconds, d.nanoseconds))
}

/// Why a credential returned by a plugin was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Violation {
    /// Larger than `limits.max_credential_bytes` (its size).
    TooLarge(u64),
    /// Breaks the contract; the message never contains a secret.
    Invalid(String),
}

fn header_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Secrets end up in HTTP headers and connection strings: no control characters
/// (a CR/LF would inject headers).
fn value_ok(value: &str) -> bool {
    !value.bytes().any(|b| b.is_ascii_control() && b != b'\t')
}

/// Check and convert a credential crossing the WIT boundary from a plugin: size
/// (every string together), well-formed header names, no control characters in
/// secrets, a representable expiry. Violation messages name the field, never its
/// value.
pub(crate) fn credentials_from_guest(
    c: wit::Credentials,
    max_bytes: u64,
) -> Result<types::Credentials, Violation> {
    let strings: u64 = match &c.credential {
        wit::Credential::Basic(b) => (b.username.len() + b.password.len()) as u64,
        wit::Credential::Bearer(t) => t.len() as u64,
        wit::Credential::Headers(h) => h.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum(),
    } + c.principal.as_ref().map_or(0, |p| p.len() as u64);
    if strings > max_bytes {
        return Err(Violation::TooLarge(strings));
    }
    let invalid = |why: &str| Err(Violation::Invalid(why.to_string()));
    match &c.credential {
        wit::Credential::Basic(b) => {
            if b.username.contains(':') || !value_ok(&b.username) {
                return invalid("basic username contains `:` or a control character");
            }
            if !value_ok(&b.password) {
                return invalid("basic password contains a control character");
            }
        }
        wit::Credential::Bearer(t) => {
            if t.is_empty() || !value_ok(t) {
                return invalid("bearer token is empty or contains a control character");
            }
        }
        wit::Credential::Headers(h) => {
            if h.is_empty() {
                return invalid("headers credential has no headers");
            }
            for (i, (name, value)) in h.iter().enumerate() {
                if !header_name_ok(name) {
                    return Err(Violation::Invalid(format!(
                        "header #{i} has an invalid name"
                    )));
                }
                if !value_ok(value) {
                    return Err(Violation::Invalid(format!(
                        "header `{name}` value contains a control character"
                    )));
                }
            }
        }
    }
    if c.principal.as_deref().is_some_and(|p| !value_ok(p)) {
        return invalid("principal contains a control character");
    }
    let expires_at = match c.expires_at {
        None => None,
        Some(d) => match from_datetime(d) {
            Some(t) => Some(t),
            None => return invalid("expires-at is out of range (after year 9999)"),
        },
    };
    let mut converted = types::Credentials::from(c);
    converted.expires_at = expires_at;
    Ok(converted)
}

/// Entry points for the fuzz targets in `fuzz/` (not a stable API).
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Build a guest credential from raw parts, run it through
    /// [`credentials_from_guest`] and check what must hold for any input: no panic,
    /// the size limit enforced, and no secret in the error or in `Debug` output.
    /// With `jwt_payload`, a bearer token is a JWT carrying that payload (its
    /// `exp` is hostile too), and an accepted credential is then placed on the
    /// cache's timeline at `now_secs` (see `cache::fuzz_accept`).
    pub fn credential_from_guest(
        kind: u8,
        strings: &[String],
        expires: Option<(u64, u32)>,
        principal: Option<String>,
        max_bytes: u64,
        jwt_payload: Option<&[u8]>,
        now_secs: u64,
    ) {
        use base64::Engine as _;
        let s = |i: usize| strings.get(i).cloned().unwrap_or_default();
        let credential = match kind % 3 {
            0 => wit::Credential::Basic(wit::BasicAuth {
                username: s(0),
                password: s(1),
            }),
            1 => match jwt_payload {
                Some(payload) => wit::Credential::Bearer(format!(
                    "eyJhbGciOiJub25lIn0.{}.{}",
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload),
                    s(0)
                )),
                None => wit::Credential::Bearer(s(0)),
            },
            _ => wit::Credential::Headers(
                strings
                    .chunks(2)
                    .map(|p| (p[0].clone(), p.get(1).cloned().unwrap_or_default()))
                    .collect(),
            ),
        };
        let secrets: Vec<String> = match &credential {
            wit::Credential::Basic(b) => vec![b.password.clone()],
            wit::Credential::Bearer(t) => vec![t.clone()],
            wit::Credential::Headers(h) => h.iter().map(|(_, v)| v.clone()).collect(),
        };
        let input = wit::Credentials {
            credential,
            expires_at: expires.map(|(seconds, nanoseconds)| wit::Datetime {
                seconds,
                nanoseconds,
            }),
            principal,
        };
        // A secret "leaks" when it shows up more often than in the same text
        // rendered with every secret blanked (it may legitimately equal a header
        // name, the username or the principal, or be part of the Debug syntax).
        let count = |text: &str, s: &str| text.matches(s).count();
        let leaks = |real: &str, blanked: &str| {
            secrets
                .iter()
                .filter(|s| s.len() >= 8)
                .any(|s| count(real, s) > count(blanked, s))
        };
        let blank = |c: &wit::Credentials| {
            let mut c = c.clone();
            match &mut c.credential {
                wit::Credential::Basic(b) => b.password.clear(),
                wit::Credential::Bearer(t) => t.clear(),
                wit::Credential::Headers(h) => h.iter_mut().for_each(|(_, v)| v.clear()),
            }
            c
        };
        let blanked_input = blank(&input);
        match credentials_from_guest(input, max_bytes) {
            Ok(c) => {
                let now = UNIX_EPOCH + Duration::from_secs(now_secs % (1 << 40));
                crate::cache::fuzz_accept(&c, now);
                let debug = format!("{c:?}");
                let blanked = format!("{:?}", types::Credentials::from(blanked_input));
                assert!(!leaks(&debug, &blanked), "Debug output leaks a secret");
                let back = wit::Credentials::from(&c);
                assert_eq!(types::Credentials::from(back), c, "round trip");
            }
            Err(Violation::TooLarge(n)) => assert!(n > max_bytes),
            Err(Violation::Invalid(why)) => {
                let public: String = format!("{:?}", blanked_input);
                assert!(!leaks(&why, &public), "violation message leaks a secret")
            }
        }
    }
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
            // Out-of-range expiries are refused by `credentials_from_guest`; a
            // direct conversion treats them as "no stated expiry".
            expires_at: c.expires_at.and_then(from_datetime),
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
