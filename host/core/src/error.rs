//! The library's error type.

use crate::types::ProviderError;
use std::path::PathBuf;
use std::sync::Arc;

/// The underlying cause of an [`Error::Load`] or [`Error::Plugin`] (a wasmtime
/// error, a trap, an I/O error): its message through `Display`, its own causes
/// through `source()`. Shared, not copied: every caller that waited on one fetch
/// gets the same cause ([`Error`] is `Clone`).
#[derive(Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl Cause {
    /// Wrap `error` (any error, or a message).
    pub fn new(error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Cause(Arc::from(error.into()))
    }

    /// The underlying error (e.g. to tell a missing plugin file, an
    /// `std::io::Error`, from a compile error).
    pub fn get_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }

    /// The underlying error as a `T`, if it is one.
    pub fn downcast_ref<T: std::error::Error + 'static>(&self) -> Option<&T> {
        self.0.downcast_ref::<T>()
    }
}

impl From<Box<dyn std::error::Error + Send + Sync + 'static>> for Cause {
    fn from(error: Box<dyn std::error::Error + Send + Sync + 'static>) -> Self {
        Cause(Arc::from(error))
    }
}

impl From<String> for Cause {
    fn from(message: String) -> Self {
        Cause::new(message)
    }
}

impl From<&str> for Cause {
    fn from(message: &str) -> Self {
        Cause::new(message)
    }
}

impl std::fmt::Debug for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&*self.0, f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Everything that can go wrong in the host. Every variant about a provider names it.
///
/// `Clone` shares the causes (moka's `try_get_with`): a fetch's error reaches every
/// caller that waited on it as the same error.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid; the message names file, provider and key.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),

    /// No provider of that name is configured.
    #[error("unknown provider `{provider}`")]
    UnknownProvider {
        /// The name asked for.
        provider: String,
    },

    /// The provider's component could not be read, compiled or linked.
    #[error("provider `{provider}`: failed to load plugin {path}: {source}")]
    Load {
        /// Provider name.
        provider: String,
        /// The plugin file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Cause,
    },

    /// The provider is configured but failed to load; `reason` is the load error,
    /// which names the provider. Other providers are unaffected.
    #[error("{reason}")]
    NotLoaded {
        /// Provider name.
        provider: String,
        /// Why it did not load.
        reason: String,
    },

    /// The provider answered with a `provider-error`.
    #[error("provider `{provider}`: {error}")]
    Provider {
        /// Provider name.
        provider: String,
        /// What the plugin reported.
        error: ProviderError,
    },

    /// The plugin trapped, exceeded a limit or broke the contract. Its instance was
    /// discarded; the next call starts afresh.
    #[error("provider `{provider}`: plugin failed during `{function}`: {source}")]
    Plugin {
        /// Provider name.
        provider: String,
        /// The exported function being called.
        function: &'static str,
        /// The trap or failure.
        #[source]
        source: Cause,
    },

    /// The call exceeded the provider's `timeout_ms`.
    #[error("provider `{provider}`: `{function}` exceeded its {timeout_ms} ms timeout")]
    Timeout {
        /// Provider name.
        provider: String,
        /// The exported function being called.
        function: &'static str,
        /// The limit.
        timeout_ms: u64,
    },

    /// The call hit a sandbox limit. Its instance was discarded; the next call
    /// starts afresh.
    #[error("provider `{provider}`: `{function}` hit its {limit} limit: {detail}")]
    Limit {
        /// Provider name.
        provider: String,
        /// The exported function being called.
        function: &'static str,
        /// Which limit.
        limit: LimitKind,
        /// The configured value and what the plugin tried.
        detail: String,
    },

    /// The provider faulted `faults` times in a row and is cooling down; calls fail
    /// fast until the cool-down ends, then one trial call is let through.
    #[error(
        "provider `{provider}` is cooling down after {faults} consecutive faults (last: {last_fault}); next attempt in {retry_in_ms} ms"
    )]
    CoolingDown {
        /// Provider name.
        provider: String,
        /// Consecutive faults so far.
        faults: u32,
        /// Milliseconds until the next call is let through.
        retry_in_ms: u64,
        /// The last fault's message.
        last_fault: String,
    },

    /// The provider broke the contract in a way the host refuses to pass on: it
    /// returned an already-expired credential, or switched principal for one key.
    /// Nothing was handed out; the key backs off like after a failed fetch.
    #[error("provider `{provider}`: {detail}")]
    Contract {
        /// Provider name.
        provider: String,
        /// What it did.
        detail: String,
    },

    /// All of the provider's `limits.max_concurrent_calls` were busy for
    /// `limits.queue_timeout_ms` (its bulkhead): the call was not started. Not a
    /// fault of the provider (the breaker does not count it); retry later.
    #[error(
        "provider `{provider}`: all {max_concurrent_calls} call slots stayed busy for {waited_ms} ms (limits.max_concurrent_calls); try again later"
    )]
    Busy {
        /// Provider name.
        provider: String,
        /// The provider's quota of concurrent calls.
        max_concurrent_calls: u32,
        /// How long the call waited for a slot.
        waited_ms: u64,
    },

    /// The provider's fetch budget (`[providers.<name>.rate]`) was spent: this
    /// fetch would have had to wait longer than `rate.wait_ms` for its turn, so it
    /// was not started. Not a fault of the provider and not recorded against the
    /// key; retry after `retry_in_ms`.
    #[error(
        "provider `{provider}`: over its fetch budget ({per_second} fetches/s, burst {burst}: rate.fetches_per_second, rate.burst); its turn would come in {retry_in_ms} ms, later than rate.wait_ms allows"
    )]
    Throttled {
        /// Provider name.
        provider: String,
        /// The budget's sustained rate.
        per_second: f64,
        /// The budget's burst.
        burst: u32,
        /// Milliseconds until a fetch would have had its turn.
        retry_in_ms: u64,
    },

    /// The provider's `state` could not be taken for the call: another call (of
    /// this process or another one) held it until the call's deadline, or it could
    /// not be read. The call was stopped; nothing was written.
    #[error("provider `{provider}`: {detail}")]
    State {
        /// Provider name.
        provider: String,
        /// What happened, naming the state file (never a value).
        detail: String,
        /// The process that held the state, when known.
        holder: Option<u32>,
    },

    /// An I/O failure of the host itself (state or cache directory).
    #[error("{context}: {source}")]
    Io {
        /// What the host was doing.
        context: String,
        /// The I/O error.
        #[source]
        source: Arc<std::io::Error>,
    },
}

impl Error {
    /// The provider this error is about, if any.
    pub fn provider(&self) -> Option<&str> {
        match self {
            Error::UnknownProvider { provider }
            | Error::Load { provider, .. }
            | Error::NotLoaded { provider, .. }
            | Error::Provider { provider, .. }
            | Error::Plugin { provider, .. }
            | Error::Timeout { provider, .. }
            | Error::Limit { provider, .. }
            | Error::CoolingDown { provider, .. }
            | Error::Contract { provider, .. }
            | Error::Busy { provider, .. }
            | Error::Throttled { provider, .. }
            | Error::State { provider, .. } => Some(provider),
            Error::Config(_) | Error::Io { .. } => None,
        }
    }

    /// Whether retrying soon is pointless: the IdP refused, or the provider is
    /// misconfigured. Such failures are not retried hot.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Error::Provider {
                error: ProviderError::Denied(_) | ProviderError::Misconfigured(_),
                ..
            } | Error::Config(_)
                | Error::UnknownProvider { .. }
                | Error::NotLoaded { .. }
                | Error::Load { .. }
        )
    }

    /// The `provider-error` the plugin returned, if that is what this is.
    pub fn provider_error(&self) -> Option<&ProviderError> {
        match self {
            Error::Provider { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// A sandbox limit (see [`crate::config::LimitsConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LimitKind {
    /// `limits.memory_mib`: linear memory growth refused.
    Memory,
    /// `limits.fuel`: the call's fuel ran out.
    Fuel,
    /// The WebAssembly stack overflowed (deep recursion).
    Stack,
    /// Table growth refused.
    Table,
    /// `limits.max_credential_bytes`: the returned credential is too large.
    CredentialSize,
    /// `limits.max_response_bytes`: an HTTP response body was too large.
    ResponseBody,
    /// `limits.max_output_bytes`: too much stdout/stderr.
    Output,
    /// `limits.max_requests_in_flight`: too many HTTP requests at once.
    RequestsInFlight,
    /// `limits.max_host_resources`: too many host-side objects (HTTP fields,
    /// requests, streams…) alive at once, or a host call asked for too much
    /// (e.g. random bytes).
    HostResources,
}

// LimitKind: its name in metric labels (`key` is its config key).
names!(LimitKind {
    Memory => "memory",
    Fuel => "fuel",
    Stack => "stack",
    Table => "table",
    CredentialSize => "credential_size",
    ResponseBody => "response_body",
    Output => "output",
    RequestsInFlight => "requests_in_flight",
    HostResources => "host_resources",
});

impl LimitKind {
    /// The config key of the limit.
    pub fn key(self) -> &'static str {
        match self {
            LimitKind::Memory => "limits.memory_mib",
            LimitKind::Fuel => "limits.fuel",
            LimitKind::Stack => "stack",
            LimitKind::Table => "table",
            LimitKind::CredentialSize => "limits.max_credential_bytes",
            LimitKind::ResponseBody => "limits.max_response_bytes",
            LimitKind::Output => "limits.max_output_bytes",
            LimitKind::RequestsInFlight => "limits.max_requests_in_flight",
            LimitKind::HostResources => "limits.max_host_resources",
        }
    }
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key())
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
