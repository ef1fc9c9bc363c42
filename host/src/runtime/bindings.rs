//! Generated bindings for the `reauth:provider` world and conversions between the
//! WIT types and the host's public types (which wrap secrets).

use crate::secret::Secret;
use crate::types;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `reauth:provider@0.2.0`, the current contract (`wit/provider.wit`).
pub(crate) mod v02 {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "reauth:provider/provider@0.2.0",
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
}

/// `reauth:provider@0.1.0` (`wit/0.1.0/provider.wit`, frozen): components built
/// against it load unchanged; their values are converted to 0.2's here.
pub(crate) mod v01 {
    wasmtime::component::bindgen!({
        path: ["../wit", "../wit/0.1.0/provider.wit"],
        world: "reauth:provider/provider@0.1.0",
        imports: {
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
}

use self::v01::reauth::provider0_1_0::types as old;
pub(crate) use self::v02::reauth::provider::metadata as wit_meta;
pub(crate) use self::v02::reauth::provider::types as wit;

/// A pre-linked provider component of either contract version.
pub(crate) enum ProviderPre<T: 'static> {
    /// Built against 0.2.0.
    V02(v02::ProviderPre<T>),
    /// Built against 0.1.0.
    V01(v01::ProviderPre<T>),
}

impl<T: Send + 'static> ProviderPre<T> {
    /// The pre-instance as whichever contract version the component exports.
    pub(crate) fn new(pre: wasmtime::component::InstancePre<T>) -> wasmtime::Result<Self> {
        match v02::ProviderPre::new(pre.clone()) {
            Ok(pre) => Ok(ProviderPre::V02(pre)),
            Err(e02) => v01::ProviderPre::new(pre)
                .map(ProviderPre::V01)
                .map_err(|_| e02),
        }
    }

    /// The contract version (`0.2.0`, `0.1.0`).
    pub(crate) fn contract(&self) -> &'static str {
        match self {
            ProviderPre::V02(_) => "0.2.0",
            ProviderPre::V01(_) => "0.1.0",
        }
    }

    pub(crate) async fn instantiate_async(
        &self,
        store: impl wasmtime::AsContextMut<Data = T>,
    ) -> wasmtime::Result<Provider> {
        Ok(match self {
            ProviderPre::V02(pre) => Provider::V02(pre.instantiate_async(store).await?),
            ProviderPre::V01(pre) => Provider::V01(pre.instantiate_async(store).await?),
        })
    }
}

/// An instance of a provider component of either contract version; calls take and
/// return 0.2 values.
pub(crate) enum Provider {
    V02(v02::Provider),
    V01(v01::Provider),
}

impl Provider {
    pub(crate) async fn describe<S: wasmtime::AsContextMut>(
        &self,
        store: S,
    ) -> wasmtime::Result<Option<wit_meta::Descriptor>>
    where
        S::Data: Send,
    {
        match self {
            Provider::V02(p) => Ok(Some(
                p.reauth_provider_auth_provider()
                    .call_describe(store)
                    .await?,
            )),
            Provider::V01(_) => Ok(None),
        }
    }

    pub(crate) async fn get_credentials<S: wasmtime::AsContextMut>(
        &self,
        store: S,
        request: &wit::Request,
    ) -> wasmtime::Result<Result<wit::Credentials, wit::ProviderError>>
    where
        S::Data: Send,
    {
        match self {
            Provider::V02(p) => {
                p.reauth_provider_auth_provider()
                    .call_get_credentials(store, request)
                    .await
            }
            Provider::V01(p) => Ok(p
                .reauth_provider0_1_0_auth_provider()
                .call_get_credentials(store, &request_v01(request))
                .await?
                .map(credentials_from_v01)
                .map_err(|e| match e {
                    old::ProviderError::Unavailable(message) => {
                        wit::ProviderError::Unavailable(wit::Outage {
                            message,
                            retry_after_ms: None,
                        })
                    }
                    old::ProviderError::Denied(m) => wit::ProviderError::Denied(m),
                    old::ProviderError::Misconfigured(m) => wit::ProviderError::Misconfigured(m),
                })),
        }
    }

    pub(crate) async fn handle_security_error<S: wasmtime::AsContextMut>(
        &self,
        store: S,
        request: &wit::Request,
        credentials: &wit::Credentials,
        error: &wit::SecurityError,
    ) -> wasmtime::Result<wit::Decision>
    where
        S::Data: Send,
    {
        match self {
            Provider::V02(p) => {
                p.reauth_provider_auth_provider()
                    .call_handle_security_error(store, request, credentials, error)
                    .await
            }
            Provider::V01(p) => {
                let error = old::SecurityError {
                    kind: match error.kind {
                        wit::SecurityErrorKind::TokenExpired => {
                            old::SecurityErrorKind::TokenExpired
                        }
                        wit::SecurityErrorKind::Unauthorized => {
                            old::SecurityErrorKind::Unauthorized
                        }
                        wit::SecurityErrorKind::Forbidden => old::SecurityErrorKind::Forbidden,
                        wit::SecurityErrorKind::Other => old::SecurityErrorKind::Other,
                    },
                    code: error.code.clone(),
                    status: error.status,
                    message: error.message.clone(),
                };
                let decision = p
                    .reauth_provider0_1_0_auth_provider()
                    .call_handle_security_error(
                        store,
                        &request_v01(request),
                        &credentials_to_v01(credentials),
                        &error,
                    )
                    .await?;
                Ok(match decision {
                    old::Decision::RefreshAndRetry => wit::Decision::RefreshAndRetry,
                    old::Decision::RetryAfter(ms) => wit::Decision::RetryAfter(ms),
                    old::Decision::Fail => wit::Decision::Fail,
                })
            }
        }
    }
}

fn request_v01(r: &wit::Request) -> old::Request {
    old::Request {
        subject: r.subject.clone(),
        scopes: r.scopes.clone(),
        audience: r.audience.clone(),
        reason: match r.reason {
            wit::Reason::Initial => old::Reason::Initial,
            wit::Reason::RefreshAhead => old::Reason::RefreshAhead,
            wit::Reason::Expired => old::Reason::Expired,
            wit::Reason::AfterSecurityError => old::Reason::AfterSecurityError,
        },
    }
}

fn credentials_from_v01(c: old::Credentials) -> wit::Credentials {
    wit::Credentials {
        credential: match c.credential {
            old::Credential::Basic(b) => wit::Credential::Basic(wit::BasicAuth {
                username: b.username,
                password: b.password,
            }),
            old::Credential::Bearer(t) => wit::Credential::Bearer(t),
            old::Credential::Headers(h) => wit::Credential::Headers(h),
        },
        expires_at: c.expires_at,
        principal: c.principal,
    }
}

fn credentials_to_v01(c: &wit::Credentials) -> old::Credentials {
    old::Credentials {
        credential: match &c.credential {
            wit::Credential::Basic(b) => old::Credential::Basic(old::BasicAuth {
                username: b.username.clone(),
                password: b.password.clone(),
            }),
            wit::Credential::Bearer(t) => old::Credential::Bearer(t.clone()),
            wit::Credential::Headers(h) => old::Credential::Headers(h.clone()),
        },
        expires_at: c.expires_at,
        principal: c.principal.clone(),
    }
}

/// A descriptor from the guest, checked: a 0.1.0 component is undeclared.
pub(crate) fn descriptor_from_guest(d: Option<wit_meta::Descriptor>) -> crate::schema::Descriptor {
    use crate::schema::{ConfigKey, Descriptor, ValueType};
    let Some(d) = d else {
        return Descriptor::undeclared("0.1.0");
    };
    Descriptor::new(
        d.name,
        d.version,
        d.config.map(|keys| {
            keys.into_iter()
                .map(|k| {
                    let mut key = ConfigKey::new(
                        k.name,
                        match k.value_type {
                            wit_meta::ValueType::Text => ValueType::Text,
                            wit_meta::ValueType::Integer => ValueType::Integer,
                            wit_meta::ValueType::Boolean => ValueType::Boolean,
                            wit_meta::ValueType::Url => ValueType::Url,
                        },
                    )
                    .help(k.help);
                    if k.required {
                        key = key.required();
                    }
                    if k.secret {
                        key = key.secret();
                    }
                    key
                })
                .collect()
        }),
    )
}

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
    /// `credentials_from_guest` and check what must hold for any input: no panic,
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
                // A reason newer than this contract version: to this plugin it
                // is a plain request.
                _ => wit::Reason::Initial,
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
            wit::ProviderError::Unavailable(outage) => types::ProviderError::Unavailable {
                message: outage.message,
                // Clamped by the cache (`backoff_max_ms`); any u64 is safe here.
                retry_after: outage.retry_after_ms.map(Duration::from_millis),
            },
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
                // A kind newer than this contract version.
                _ => wit::SecurityErrorKind::Other,
            },
            code: e.code.clone(),
            status: e.status,
            message: e.message.clone(),
            challenges: e
                .challenges
                .iter()
                .map(|c| wit::Challenge {
                    scheme: c.scheme.clone(),
                    params: c.params.clone(),
                    token68: c.token68.clone(),
                })
                .collect(),
            retry_after_ms: e
                .retry_after
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
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
