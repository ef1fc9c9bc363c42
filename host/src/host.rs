//! [`Host`]: the embedder's entry point.

use crate::cache::{CacheEvent, Fetcher, KeyRef, KeyStats, Lookup, TokenCache};
use crate::clock::{Clock, SystemClock};
use crate::config::{self, ConfigError, HostConfig, ProviderConfig};
use crate::error::{Error, Result};
use crate::retry::{Action, OperationError, Rejection, RetryPolicy};
use crate::runtime::egress::HostPattern;
use crate::runtime::{CompileSource, ProviderRuntime, ProviderSpec, Runtime, RuntimeOptions};
use crate::types::{Credentials, Decision, Reason, Request, SecurityError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

/// The outcome of loading one provider.
#[derive(Debug, Clone)]
pub enum ProviderStatus {
    /// Loaded and instantiable.
    Ready {
        /// Hex SHA-256 of the component.
        sha256: String,
        /// Whether the compiled code came from the precompiled cache.
        from_cache: bool,
    },
    /// Failed to load; calls to it return this error's message.
    Failed(String),
}

enum Slot {
    Ready(Box<Ready>),
    Failed(String),
}

struct Ready {
    name: Arc<str>,
    runtime: Arc<ProviderRuntime>,
    cache: Arc<config::CacheConfig>,
    retry: RetryPolicy,
    fetch: Fetcher,
}

/// Hosts auth providers: loads them, caches what they return and asks them what to
/// do when a server rejects a credential.
///
/// Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Host {
    inner: Arc<Inner>,
}

struct Inner {
    runtime: Arc<Runtime>,
    providers: BTreeMap<String, Slot>,
    cache: TokenCache,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field(
                "providers",
                &self.inner.providers.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Builds a [`Host`] from a config file or programmatically.
pub struct HostBuilder {
    config: HostConfig,
    clock: Arc<dyn Clock>,
}

impl HostBuilder {
    /// Add (or replace) a provider.
    pub fn provider(mut self, name: impl Into<String>, provider: ProviderConfig) -> Self {
        self.config.providers.insert(name.into(), provider);
        self
    }

    /// Persist providers' state under `dir`.
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.runtime.state_dir = Some(dir.into());
        self
    }

    /// Keep precompiled artifacts under `dir`.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.runtime.cache_dir = Some(dir.into());
        self
    }

    /// Use `clock` for expiry decisions and as the plugins' wall clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Validate the configuration, start the engine and load every provider.
    ///
    /// Configuration errors fail the build. A provider whose plugin fails to load
    /// does not: it is reported by [`Host::status`] and its calls return the load
    /// error, while every other provider serves.
    pub fn build(self) -> Result<Host> {
        let config = self.config;
        config.validate()?;
        let runtime = Runtime::new(
            RuntimeOptions {
                cache_dir: config
                    .runtime
                    .cache_dir
                    .as_deref()
                    .map(|d| config.resolve(d)),
                max_memory_bytes: config.runtime.max_memory_mib << 20,
            },
            self.clock.clone(),
        )
        .map_err(|e| Error::Io {
            context: "starting the WebAssembly engine".into(),
            source: std::io::Error::other(e),
        })?;
        let runtime = Arc::new(runtime);
        let mut providers = BTreeMap::new();
        for (name, p) in &config.providers {
            let slot = match load_provider(&runtime, &config, name, p) {
                Ok(loaded) => {
                    tracing::info!(provider = %name, sha256 = loaded.sha256(), "provider loaded");
                    let loaded = Arc::new(loaded);
                    let fetch: Fetcher = {
                        let (runtime, loaded) = (runtime.clone(), loaded.clone());
                        Arc::new(move |request: Request| {
                            let (runtime, loaded) = (runtime.clone(), loaded.clone());
                            Box::pin(
                                async move { loaded.get_credentials(&runtime, &request).await },
                            )
                        })
                    };
                    let retry = RetryPolicy::from_config(&p.retry).map_err(|e| ConfigError {
                        file: config.source.clone(),
                        line: None,
                        message: format!("providers.{name}.retry: {e}"),
                    })?;
                    Slot::Ready(Box::new(Ready {
                        name: Arc::from(name.as_str()),
                        runtime: loaded,
                        cache: Arc::new(p.cache.clone()),
                        retry,
                        fetch,
                    }))
                }
                Err(e) => {
                    tracing::error!(provider = %name, error = %e, "provider failed to load");
                    Slot::Failed(e.to_string())
                }
            };
            providers.insert(name.clone(), slot);
        }
        Ok(Host {
            inner: Arc::new(Inner {
                runtime,
                providers,
                cache: TokenCache::new(self.clock, config.runtime.max_cache_entries),
            }),
        })
    }
}

fn load_provider(
    runtime: &Runtime,
    config: &HostConfig,
    name: &str,
    p: &ProviderConfig,
) -> Result<ProviderRuntime> {
    let file = config.source.as_deref();
    let values = config::resolve_values(file, &config.base_dir, name, &p.config)?;
    let allowed_hosts = p
        .allowed_hosts
        .iter()
        .map(|h| HostPattern::parse(h))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|why| ConfigError {
            file: file.map(Path::to_path_buf),
            line: None,
            message: format!("providers.{name}.allowed_hosts: {why}"),
        })?;
    let spec = ProviderSpec {
        name: name.to_string(),
        plugin: config.resolve(&p.plugin),
        sha256: p.sha256.clone(),
        allowed_hosts,
        config: values,
        limits: p.limits.clone(),
        state_file: config
            .runtime
            .state_dir
            .as_deref()
            .map(|d| config.resolve(d).join(format!("{name}.json"))),
    };
    ProviderRuntime::load(runtime, spec)
}

impl Host {
    /// A builder with no providers and default settings.
    pub fn builder() -> HostBuilder {
        HostBuilder {
            config: HostConfig::default(),
            clock: Arc::new(SystemClock),
        }
    }

    /// A builder seeded from a parsed configuration.
    pub fn builder_from_config(config: HostConfig) -> HostBuilder {
        HostBuilder {
            config,
            clock: Arc::new(SystemClock),
        }
    }

    /// Read `path` and build a host from it.
    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Host> {
        Self::builder_from_config(HostConfig::from_file(path)?).build()
    }

    /// Every configured provider and whether it loaded.
    pub fn status(&self) -> BTreeMap<String, ProviderStatus> {
        self.inner
            .providers
            .iter()
            .map(|(name, slot)| {
                let status = match slot {
                    Slot::Ready(ready) => ProviderStatus::Ready {
                        sha256: ready.runtime.sha256().to_string(),
                        from_cache: ready.runtime.compile_source() == CompileSource::Cache,
                    },
                    Slot::Failed(e) => ProviderStatus::Failed(e.clone()),
                };
                (name.clone(), status)
            })
            .collect()
    }

    /// Like [`Host::status`], but also instantiates every loaded provider once, so
    /// that a component whose start-up traps is reported too.
    pub async fn check(&self) -> BTreeMap<String, ProviderStatus> {
        let mut status = self.status();
        for (name, slot) in &self.inner.providers {
            if let Slot::Ready(ready) = slot
                && let Err(e) = ready.runtime.instantiate_check(&self.inner.runtime).await
            {
                status.insert(name.clone(), ProviderStatus::Failed(e.to_string()));
            }
        }
        status
    }

    fn provider(&self, name: &str) -> Result<&Ready> {
        match self.inner.providers.get(name) {
            Some(Slot::Ready(ready)) => Ok(ready),
            Some(Slot::Failed(reason)) => Err(Error::NotLoaded {
                provider: name.to_string(),
                reason: reason.clone(),
            }),
            None => Err(Error::UnknownProvider {
                provider: name.to_string(),
            }),
        }
    }

    /// Credentials for `request` from `provider`: cached while valid, refreshed
    /// ahead of expiry in the background, fetched (once, however many callers ask at
    /// the same time) when missing or expired. See [`crate::cache`].
    pub async fn get_credentials(&self, provider: &str, request: &Request) -> Result<Credentials> {
        self.get_credentials_traced(provider, request)
            .await
            .map(|(c, _)| c)
    }

    /// Like [`Host::get_credentials`], also saying whether the cache served it.
    pub async fn get_credentials_traced(
        &self,
        provider: &str,
        request: &Request,
    ) -> Result<(Credentials, Lookup)> {
        let ready = self.provider(provider)?;
        let key = KeyRef::new(&ready.name, request);
        self.inner
            .cache
            .get(&key, request, &ready.cache, &ready.fetch)
            .await
    }

    /// When the host stops serving the cached credential for `request` (start of
    /// the mandatory window), if one is cached.
    pub fn cached_until(&self, provider: &str, request: &Request) -> Option<SystemTime> {
        let ready = self.provider(provider).ok()?;
        self.inner
            .cache
            .use_until(&KeyRef::new(&ready.name, request))
    }

    /// When the cached credential for `request` enters its refresh-ahead window.
    pub fn refresh_at(&self, provider: &str, request: &Request) -> Option<SystemTime> {
        let ready = self.provider(provider).ok()?;
        self.inner
            .cache
            .refresh_at(&KeyRef::new(&ready.name, request))
    }

    /// Failure and generation counters of the cache entry for `request`.
    pub fn cache_stats(&self, provider: &str, request: &Request) -> KeyStats {
        match self.provider(provider) {
            Ok(ready) => self.inner.cache.stats(&KeyRef::new(&ready.name, request)),
            Err(_) => KeyStats::default(),
        }
    }

    /// Be told when any key's credential rotates, is invalidated or is evicted —
    /// for embedders that must re-authenticate long-lived connections.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<CacheEvent> {
        self.inner.cache.subscribe()
    }

    /// Ask `provider` what to do now that a server rejected `credentials` with
    /// `error`. On [`Decision::RefreshAndRetry`] the cached entry is dropped — only
    /// if it still holds `credentials`, so a burst of failures with the same old
    /// credential drops it once.
    pub async fn handle_security_error(
        &self,
        provider: &str,
        request: &Request,
        credentials: &Credentials,
        error: &SecurityError,
    ) -> Result<Decision> {
        let ready = self.provider(provider)?;
        let decision = ready
            .runtime
            .handle_security_error(&self.inner.runtime, request, credentials, error)
            .await?;
        if decision == Decision::RefreshAndRetry {
            let key = KeyRef::new(&ready.name, request);
            let dropped = self.inner.cache.invalidate_if(&key, credentials);
            tracing::debug!(provider, dropped, "security error: refresh-and-retry");
        }
        Ok(decision)
    }

    /// Run `op` with credentials from `provider`, re-authenticating when the server
    /// rejects them — as the provider decides and within the provider's
    /// [`RetryPolicy`] (by default one re-authentication per operation).
    ///
    /// `op` reports an authentication failure as [`Rejection::Security`] (see
    /// [`crate::classify`]); the provider's `handle-security-error` then decides:
    /// refresh-and-retry (compare-and-invalidate, one fetch, run again),
    /// retry-after (wait, run again with the same credential) or fail. A plugin
    /// fault while deciding counts as fail. When the budget is spent the caller gets
    /// the last rejection with the attempts recorded.
    pub async fn with_credentials<T, E, F, Fut>(
        &self,
        provider: &str,
        request: &Request,
        mut op: F,
    ) -> std::result::Result<T, OperationError<E>>
    where
        F: FnMut(Credentials) -> Fut,
        Fut: Future<Output = std::result::Result<T, Rejection<E>>>,
    {
        let policy = self
            .provider(provider)
            .map_err(OperationError::Credentials)?
            .retry;
        let started = tokio::time::Instant::now();
        let (mut attempts, mut reauths, mut waits) = (0u32, 0u32, 0u32);
        let mut request = request.clone();
        loop {
            let credentials = self
                .get_credentials(provider, &request)
                .await
                .map_err(OperationError::Credentials)?;
            attempts += 1;
            let (error, source) = match op(credentials.clone()).await {
                Ok(value) => return Ok(value),
                Err(Rejection::Other(e)) => return Err(OperationError::Failed(e)),
                Err(Rejection::Security { error, source }) => (error, source),
            };
            let decision = match self
                .handle_security_error(provider, &request, &credentials, &error)
                .await
            {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(provider, error = %e, "handle-security-error failed; treating as fail");
                    Decision::Fail
                }
            };
            match policy.next(decision, reauths, waits, started.elapsed()) {
                Action::Reauthenticate => {
                    reauths += 1;
                    request.reason = Reason::AfterSecurityError;
                }
                Action::Wait(wait) => {
                    waits += 1;
                    tokio::time::sleep(wait).await;
                }
                Action::GiveUp => {
                    tracing::info!(provider, attempts, reauths, %error, "operation rejected; giving up");
                    return Err(OperationError::Rejected {
                        source,
                        error,
                        attempts,
                        reauths,
                        decision,
                    });
                }
            }
        }
    }

    /// Number of keys the token cache holds.
    pub fn cached_keys(&self) -> usize {
        self.inner.cache.len()
    }

    /// Number of `get-credentials` calls made to `provider`'s plugin so far.
    pub fn plugin_calls(&self, provider: &str) -> u64 {
        self.provider(provider)
            .map(|r| r.runtime.stats().get_credentials.load(Ordering::Relaxed))
            .unwrap_or(0)
    }
}
