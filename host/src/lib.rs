//! # reauth: a WebAssembly plugin host for custom auth providers
//!
//! Services that talk to databases, brokers and APIs hold credentials that expire
//! or rotate. reauth moves the logic that fetches, caches, refreshes and re-tries
//! them into **sandboxed WebAssembly components** ("providers") that a deployment
//! drops in without recompiling anything. The host loads them with wasmtime, runs
//! every call in a fresh sandbox, caches what they return (single-flight per key)
//! and asks them what to do when a server rejects a credential.
//!
//! ```no_run
//! use reauth::{Host, ProviderConfig, Request, SecurityError, SecurityErrorKind, Decision};
//!
//! # async fn demo() -> Result<(), reauth::Error> {
//! let host = Host::builder()
//!     .provider(
//!         "orders-db",
//!         ProviderConfig::new("plugins/target/wasm32-wasip2/release/oauth2_client_credentials.wasm")
//!             .allow_host("127.0.0.1:9400")
//!             .config("token_url", "http://127.0.0.1:9400/token")
//!             .config("client_id", "orders")
//!             .config_env("client_secret", "ORDERS_CLIENT_SECRET"),
//!     )
//!     .build()?;
//!
//! let request = Request::new().scope("orders:read");
//! let credentials = host.get_credentials("orders-db", &request).await?;   // fetched
//! let again = host.get_credentials("orders-db", &request).await?;         // cached
//! assert_eq!(credentials, again);
//!
//! // The server said the token expired: ask the provider, which says refresh.
//! let error = SecurityError::new(SecurityErrorKind::TokenExpired).status(401);
//! let decision = host.handle_security_error("orders-db", &request, &credentials, &error).await?;
//! assert_eq!(decision, Decision::RefreshAndRetry);
//! let fresh = host.get_credentials("orders-db", &request).await?;        // fetched anew
//! # let _ = fresh; Ok(()) }
//! ```
//!
//! Configuration files are described in [`config`]; the sandbox in [`runtime`];
//! the cache's semantics in [`cache`]. The `reauth` command, the sidecar, the
//! adapters, the conformance kit and the dev issuer live in the `reauth-cli`
//! crate; the engine-free core in `reauth-core`. [`verify`] checks bearer JWTs for
//! servers that embed reauth (static keys or JWKS, expired told apart from invalid).
//!
//! ## Crate features
//!
//! - `cranelift` (default): compile plugins from `.wasm`. Without it only
//!   artifacts precompiled by the same reauth version into `runtime.cache_dir` load.
//! - `metrics` (default): `Host::register_metrics` and `Host::render_metrics`
//!   through `prometheus-client`; without it nothing is encoded, and
//!   [`Host::metrics`] still answers the counters it has getters for (lookups,
//!   throttled fetches, refused retries, fuel, peak memory, shared-cache events).
//! - `verify` (default): [`verify`], bearer-token verification (crate `reauth-verify`).
//! - `watch` (default): [`watch`], reload on config, plugin and secret-file changes.
//! - `fleet`: `[fleet]`, tokens and provider state shared across replicas through
//!   Redis or PostgreSQL ([`store::fleet`]).
//!
//! Unix only. The artifact mapping (leases) and `CLOCK_REALTIME_COARSE` are
//! Linux-only and fall back elsewhere.

#![deny(missing_docs)]
// Every public type makes a deliberate choice: `#[non_exhaustive]`, or an
// `allow` saying why it is complete.
#![warn(clippy::exhaustive_enums, clippy::exhaustive_structs)]

mod detach;
mod host;
mod rollout;
pub mod runtime;
pub mod store;
#[cfg(feature = "watch")]
pub mod watch;

/// Bearer-token verification for servers (crate `reauth-verify`, no wasmtime).
#[cfg(feature = "verify")]
pub use reauth_verify as verify;
/// The engine reauth runs plugins on, at the exact version reauth's API exposes
/// (`Runtime`, `RuntimeOptions`).
pub use wasmtime;

// The engine-free core (crate `reauth-core`), at the paths embedders already use.
pub use reauth_core::{
    budget, cache, classify, clock, config, hosts, metrics, retry, schema, wire,
};
// Internal paths (`crate::types::…`) keep working for the modules here.
use reauth_core::{error, secret, types};

pub use host::{Host, HostBuilder, ProviderHandle, ProviderStatus, ReloadReport};
pub use reauth_core::{
    BreakerConfig, CacheConfig, CacheEvent, CacheKey, Cause, Challenge, ConfigError, Credential,
    Credentials, Decision, Error, HostConfig, KeyRef, KeyStats, LimitKind, LimitsConfig, Lookup,
    OperationError, ProviderConfig, ProviderError, RateConfig, Reason, Rejection, Request, Result,
    RetryConfig, RetryPolicy, SecurityError, SecurityErrorKind,
};
pub use reauth_core::{Secret, constant_time_eq};
pub use rollout::RolloutStatus;

/// The README's library example.
#[doc = include_str!("readme_library.md")]
#[cfg(doctest)]
pub struct ReadmeLibraryExample;

#[cfg(test)]
mod api {
    /// The README shows the example that `ReadmeLibraryExample`'s doc test
    /// compiles, line for line.
    #[test]
    fn the_readme_library_example_is_the_compiled_one() {
        let fence = |text: &str, after: &str, open: &str| -> String {
            let from = text.find(after).expect("section") + after.len();
            let start = text[from..].find(open).expect("code block") + from + open.len();
            let end = text[start..].find("```").expect("end of block") + start;
            text[start..end].to_string()
        };
        let readme = fence(
            include_str!("../../README.md"),
            "### As a library",
            "```rust\n",
        );
        let compiled: String = fence(include_str!("readme_library.md"), "", "```rust,no_run\n")
            .lines()
            .filter(|l| !l.starts_with("# ") && *l != "#")
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            readme, compiled,
            "README.md and host/src/readme_library.md differ"
        );
    }

    /// An embedder's own `prometheus-client` registry carries reauth's metrics
    /// next to its own; a dropped host reports nothing.
    #[test]
    #[cfg(feature = "metrics")]
    fn metrics_register_into_an_embedders_registry() {
        use crate::metrics::prometheus_client::{
            encoding::text::encode, metrics::counter::Counter, registry::Registry,
        };
        let host = crate::Host::builder().build().unwrap();
        let mut registry = Registry::default();
        let requests: Counter = Counter::default();
        registry.register(
            "app_requests",
            "The application's own requests.",
            requests.clone(),
        );
        requests.inc();
        host.register_metrics(&mut registry);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(text.contains("\napp_requests_total 1\n"), "{text}");
        assert!(text.contains("\nreauth_cache_entries 0\n"), "{text}");
        let build = format!(
            "\nreauth_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(
            host.render_metrics()
                .matches("# TYPE reauth_cache_entries gauge\n")
                .count(),
            1
        );
        drop(host);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(text.contains("app_requests_total 1"), "{text}");
        assert!(
            !text.contains("reauth_"),
            "a dropped host reports nothing: {text}"
        );
    }

    fn send_sync<T: Send + Sync>() {}
    fn debug<T: std::fmt::Debug>() {}

    /// Embedders share these across threads and tasks, and print them.
    #[test]
    fn public_types_are_send_sync_and_debug() {
        send_sync::<crate::Host>();
        send_sync::<crate::runtime::Runtime>();
        send_sync::<crate::runtime::ProviderRuntime>();
        send_sync::<crate::store::FileStateStore>();
        send_sync::<crate::store::FileSharedCache>();
        send_sync::<crate::store::KeyRing>();
        send_sync::<crate::Error>();
        send_sync::<crate::ProviderHandle>();
        debug::<crate::ProviderHandle>();
        debug::<crate::Host>();
        debug::<crate::HostBuilder>();
        debug::<crate::runtime::Runtime>();
        debug::<crate::metrics::ProviderMetrics>();
        debug::<crate::store::FileStateStore>();
        debug::<crate::store::FileSharedCache>();
        debug::<crate::store::KeyRing>();
        #[cfg(feature = "watch")]
        debug::<crate::watch::Watcher>();
    }
}
