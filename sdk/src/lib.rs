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
        export_macro_name: "export_provider",
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

/// Export a type implementing [`Provider`] as the component's `auth-provider`.
pub use bindings::export_provider;
pub use bindings::exports::reauth::provider::auth_provider::Guest as Provider;
pub use bindings::reauth::provider::types::{
    BasicAuth, Credential, Credentials, Datetime, Decision, ProviderError, Reason, Request,
    SecurityError, SecurityErrorKind,
};

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
    /// A transient failure (IdP down, 5xx, timeout): the host backs off and retries.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ProviderError::Unavailable(message.into())
    }

    /// The identity provider refused (bad secret, revoked grant): not retried hot.
    pub fn denied(message: impl Into<String>) -> Self {
        ProviderError::Denied(message.into())
    }

    /// The provider's configuration is wrong or incomplete.
    pub fn misconfigured(message: impl Into<String>) -> Self {
        ProviderError::Misconfigured(message.into())
    }
}

impl From<http::HttpError> for ProviderError {
    /// Transport failures are transient: the identity provider may come back.
    fn from(error: http::HttpError) -> Self {
        match error {
            http::HttpError::InvalidUrl(m) => ProviderError::Misconfigured(m),
            other => ProviderError::Unavailable(other.to_string()),
        }
    }
}
