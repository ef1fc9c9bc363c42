//! # reauth-sdk: write reauth auth providers in Rust
//!
//! A provider is a WebAssembly component targeting the `reauth:provider` world
//! (see `wit/provider.wit`). It obtains credentials when the host asks
//! (`get-credentials`) and decides what to do when a server rejects them
//! (`handle-security-error`). The host caches, refreshes and retries; a provider only
//! talks to its identity provider.
//!
//! A complete provider is one `impl` and one macro line:
//!
//! ```no_run
//! use reauth_sdk::{config, Credentials, Decision, Provider, ProviderError, Request,
//!                  SecurityError, SecurityErrorKind};
//!
//! struct ApiKey;
//!
//! impl Provider for ApiKey {
//!     fn get_credentials(_request: Request) -> Result<Credentials, ProviderError> {
//!         // `config::required` names the missing key in a `misconfigured` error.
//!         let key = config::required("api_key")?;
//!         Ok(Credentials::headers([("x-api-key", key)]).principal("service-a"))
//!     }
//!
//!     fn handle_security_error(_: Request, _: Credentials, error: SecurityError) -> Decision {
//!         match error.kind {
//!             SecurityErrorKind::Unauthorized => Decision::RefreshAndRetry,
//!             _ => Decision::Fail,
//!         }
//!     }
//! }
//!
//! reauth_sdk::export_provider!(ApiKey);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` (crate type `cdylib`)
//! and point a `[providers.<name>]` entry of `reauth.toml` at the `.wasm` file.
//!
//! The modules: [`config`] reads the provider's configuration, [`http`] talks to
//! the identity provider (through the host's egress allow-list), [`jwt`] peeks at
//! token claims, [`state`] keeps small values (e.g. a rotated refresh token) across
//! calls, and [`time`] reads the host's clock.

/// Raw bindings generated from the `reauth:provider` WIT package.
///
/// Most authors never need these; the crate root re-exports the types a provider uses.
#[allow(missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "reauth:provider/provider",
        pub_export_macro: true,
        export_macro_name: "export_guest",
        default_bindings_module: "reauth_sdk::bindings",
        generate_all,
    });
}

pub mod config;
pub mod http;
pub mod jwt;
#[cfg(feature = "oauth2")]
pub mod oauth2;
pub mod state;
pub mod time;

pub use bindings::reauth::provider::metadata::{ConfigKey, Descriptor, ValueType};
pub use bindings::reauth::provider::types::{
    BasicAuth, Challenge, Credential, Credentials, Datetime, Decision, Outage, ProviderError,
    Reason, Request, SecurityError, SecurityErrorKind,
};

/// What a provider implements: `get_credentials` and `handle_security_error`, and
/// optionally `describe` (its config schema). Export it with [`export_provider!`].
pub trait Provider {
    /// The provider's name, version and config schema. The default declares no
    /// schema (the host then checks nothing and redacts by key name); name and
    /// version left empty are filled from the crate's `Cargo.toml`.
    ///
    /// ```no_run
    /// # use reauth_sdk::{ConfigKey, Descriptor};
    /// fn describe() -> Descriptor {
    ///     Descriptor::new()
    ///         .key(ConfigKey::url("token_url", "the STS endpoint").required())
    ///         .key(ConfigKey::text("api_key", "sent as X-Api-Key").required().secret())
    /// }
    /// ```
    fn describe() -> Descriptor {
        Descriptor::new()
    }

    /// Obtain credentials for `request`.
    fn get_credentials(request: Request) -> Result<Credentials, ProviderError>;

    /// Decide what to do after a server rejected `credentials` with `error`.
    fn handle_security_error(
        request: Request,
        credentials: Credentials,
        error: SecurityError,
    ) -> Decision;
}

/// Export a type implementing [`Provider`] as the component's `auth-provider`
/// (contract `reauth:provider@0.2.0`).
#[macro_export]
macro_rules! export_provider {
    ($provider:ty) => {
        const _: () = {
            struct __ReauthExport;
            impl $crate::bindings::exports::reauth::provider::auth_provider::Guest for __ReauthExport {
                fn describe() -> $crate::Descriptor {
                    let mut d = <$provider as $crate::Provider>::describe();
                    if d.name.is_empty() {
                        d.name = env!("CARGO_PKG_NAME").into();
                    }
                    if d.version.is_empty() {
                        d.version = env!("CARGO_PKG_VERSION").into();
                    }
                    d
                }
                fn get_credentials(
                    request: $crate::Request,
                ) -> Result<$crate::Credentials, $crate::ProviderError> {
                    <$provider as $crate::Provider>::get_credentials(request)
                }
                fn handle_security_error(
                    request: $crate::Request,
                    credentials: $crate::Credentials,
                    error: $crate::SecurityError,
                ) -> $crate::Decision {
                    <$provider as $crate::Provider>::handle_security_error(request, credentials, error)
                }
            }
            $crate::bindings::export_guest!(__ReauthExport);
        };
    };
}

impl Descriptor {
    /// No name or version yet (filled from `Cargo.toml` by [`export_provider!`])
    /// and no schema.
    pub fn new() -> Self {
        Descriptor {
            name: String::new(),
            version: String::new(),
            config: None,
        }
    }

    /// Declare one config key (declaring any makes the schema strict: the host
    /// refuses keys that are not declared).
    pub fn key(mut self, key: ConfigKey) -> Self {
        self.config.get_or_insert_with(Vec::new).push(key);
        self
    }

    /// A schema with no keys: the provider reads no config at all.
    pub fn no_config(mut self) -> Self {
        self.config = Some(Vec::new());
        self
    }
}

impl Default for Descriptor {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigKey {
    fn of(name: &str, value_type: ValueType, help: &str) -> Self {
        ConfigKey {
            name: name.into(),
            value_type,
            required: false,
            secret: false,
            help: help.into(),
        }
    }

    /// An optional text key.
    pub fn text(name: &str, help: &str) -> Self {
        Self::of(name, ValueType::Text, help)
    }

    /// An optional `http(s)://` URL key.
    pub fn url(name: &str, help: &str) -> Self {
        Self::of(name, ValueType::Url, help)
    }

    /// An optional whole-number key.
    pub fn integer(name: &str, help: &str) -> Self {
        Self::of(name, ValueType::Integer, help)
    }

    /// An optional `true`/`false` key.
    pub fn boolean(name: &str, help: &str) -> Self {
        Self::of(name, ValueType::Boolean, help)
    }

    /// Required: the host refuses a config without it.
    pub fn required(mut self) -> Self {
        self.required = true;
        self
    }

    /// Secret: the host redacts its value from everything the provider says.
    pub fn secret(mut self) -> Self {
        self.secret = true;
        self
    }
}

impl SecurityError {
    /// The first challenge of `scheme` (case-insensitive) the server sent.
    pub fn challenge(&self, scheme: &str) -> Option<&Challenge> {
        self.challenges
            .iter()
            .find(|c| c.scheme.eq_ignore_ascii_case(scheme))
    }
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

impl Credentials {
    /// A bearer token with no known expiry (the host still reads a JWT's `exp`).
    pub fn bearer(token: impl Into<String>) -> Self {
        Self::of(Credential::Bearer(token.into()))
    }

    /// A username and password.
    pub fn basic(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self::of(Credential::Basic(BasicAuth {
            username: username.into(),
            password: password.into(),
        }))
    }

    /// Header name/value pairs (API keys, custom schemes).
    pub fn headers<K: Into<String>, V: Into<String>>(
        headers: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self::of(Credential::Headers(
            headers
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        ))
    }

    fn of(credential: Credential) -> Self {
        Credentials {
            credential,
            expires_at: None,
            principal: None,
        }
    }

    /// Expires `seconds` from now on the host's wall clock.
    pub fn expires_in(self, seconds: u64) -> Self {
        let now = time::now();
        self.expires_at(Datetime {
            seconds: now.seconds.saturating_add(seconds),
            nanoseconds: now.nanoseconds,
        })
    }

    /// Expires at `seconds` since the Unix epoch.
    pub fn expires_at_unix(self, seconds: u64) -> Self {
        self.expires_at(Datetime {
            seconds,
            nanoseconds: 0,
        })
    }

    /// Expires at `at`.
    pub fn expires_at(mut self, at: Datetime) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// The stable identity these credentials stand for (e.g. `iss|sub`).
    pub fn principal(mut self, principal: impl Into<String>) -> Self {
        self.principal = Some(principal.into());
        self
    }
}

impl ProviderError {
    /// A transient failure (IdP down, 5xx, 429, timeout): the host backs off and
    /// retries.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ProviderError::Unavailable(Outage {
            message: message.into(),
            retry_after_ms: None,
        })
    }

    /// The identity provider refused (bad secret, revoked grant): not retried hot.
    pub fn denied(message: impl Into<String>) -> Self {
        ProviderError::Denied(message.into())
    }

    /// The provider's configuration is wrong or incomplete.
    pub fn misconfigured(message: impl Into<String>) -> Self {
        ProviderError::Misconfigured(message.into())
    }

    /// For an `unavailable` error: the identity provider asked to wait this long
    /// (e.g. [`http::Response::retry_after_ms`]); the host waits that long before
    /// the next fetch instead of its own backoff step. Other errors are unchanged.
    pub fn retry_after_ms(mut self, ms: Option<u64>) -> Self {
        if let ProviderError::Unavailable(outage) = &mut self {
            outage.retry_after_ms = ms;
        }
        self
    }
}

impl From<http::HttpError> for ProviderError {
    /// Transport failures are transient: the identity provider may come back.
    fn from(error: http::HttpError) -> Self {
        match error {
            http::HttpError::InvalidUrl(m) => ProviderError::Misconfigured(m),
            other => ProviderError::unavailable(other.to_string()),
        }
    }
}
