//! # reauth-core: the engine-free part of reauth
//!
//! Everything about credentials that does not need a WebAssembly engine or an
//! HTTP server: the types that cross the provider contract ([`types`]), secrets
//! that never print themselves ([`Secret`]), the configuration and its
//! validation ([`config`], [`hosts`]), the token cache ([`cache`]: refresh-ahead,
//! single-flight, compare-and-invalidate), the retry policy ([`retry`]), the
//! classification of server errors ([`classify`]), clocks ([`clock`]), metrics
//! ([`metrics`]) and the JSON hand-over shapes (`wire`).
//!
//! ## Crate features
//!
//! - `wire` (default): `reauth_core::wire`, the JSON shapes of credentials and security
//!   errors between processes.
//! - `prometheus` (default): `metrics::exposition`, the counters encoded
//!   through `prometheus-client`.
//!
//! Unix only (the clock reads `CLOCK_REALTIME_COARSE` through libc on Linux).
//!
//! Embedders normally depend on `reauth`, which re-exports all of this at the
//! same paths (`reauth::config::…`, `reauth::Secret`, …) and adds the runtime.
//!
//! ```
//! use reauth_core::{Request, SecurityErrorKind, classify};
//!
//! let request = Request::new().scope("orders:read");
//! assert_eq!(request.scopes, ["orders:read"]);
//! let error = classify::from_http(401, Some(r#"Bearer error="invalid_token""#), None).unwrap();
//! assert_eq!(error.kind, SecurityErrorKind::Unauthorized);
//! assert_eq!(error.code.as_deref(), Some("invalid_token"));
//! ```

#![deny(missing_docs)]
// Every public type makes a deliberate choice: `#[non_exhaustive]`, or an
// `allow` saying why it is complete.
#![warn(clippy::exhaustive_enums, clippy::exhaustive_structs)]

/// The one name table of a fieldless enum: `ALL` (every case, in declaration
/// order), `as_str` (its name) and `index` (its place in `ALL`, for per-case
/// counters). A case left out does not compile (`as_str`'s match), and a case
/// listed out of order fails a compile-time check.
macro_rules! names {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every case, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// Its name.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }

            /// Its position in [`Self::ALL`].
            #[inline]
            pub const fn index(self) -> usize {
                self as usize
            }
        }

        const _: () = {
            let mut i = 0;
            while i < $ty::ALL.len() {
                assert!(
                    $ty::ALL[i] as usize == i,
                    concat!("names!(", stringify!($ty), "): list every case in declaration order")
                );
                i += 1;
            }
        };
    };
}

pub mod budget;
pub mod cache;
pub mod classify;
pub mod clock;
pub mod config;
pub mod error;
pub mod hosts;
pub mod metrics;
pub mod retry;
pub mod schema;
pub mod secret;
#[doc(hidden)]
pub mod sharded;
pub mod types;
#[cfg(feature = "wire")]
pub mod wire;

pub use cache::{CacheEvent, CacheKey, KeyRef, KeyStats, Lookup};
pub use config::{
    BreakerConfig, CacheConfig, ConfigError, HostConfig, LimitsConfig, ProviderConfig, RateConfig,
    RetryConfig,
};
pub use error::{Cause, Error, LimitKind, Result};
pub use retry::{OperationError, Rejection, RetryPolicy};
pub use secret::{Secret, constant_time_eq};
pub use types::{
    Challenge, Credential, Credentials, Decision, ProviderError, Reason, Request, SecurityError,
    SecurityErrorKind,
};
