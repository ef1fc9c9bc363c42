//! [`Host`]: the embedder's entry point.

use crate::cache::{CacheEvent, Fetcher, Invalidation, KeyRef, KeyStats, Lookup, TokenCache};
use crate::clock::{Clock, SystemClock};
use crate::config::{self, ConfigError, HostConfig, ProviderConfig};
use crate::error::{Error, Result};
use crate::metrics::{LookupKind, Metrics, ProviderMetrics, SharedEvent};
use crate::retry::{Action, OperationError, Rejection, RetryPolicy};
use crate::runtime::BreakerStatus;
use crate::runtime::egress::HostPattern;
use crate::runtime::{CompileSource, ProviderRuntime, ProviderSpec, Runtime, RuntimeOptions};
use crate::store::{
    FileSharedCache, KeyRing, RemoteEvent, SharedCache, SharedEntry, SharedFailure,
};
use crate::types::{Credentials, Decision, Reason, Request, SecurityError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// The outcome of loading one provider.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ProviderStatus {
    /// Loaded and instantiable.
    #[non_exhaustive]
    Ready {
        /// Hex SHA-256 of the component.
        sha256: String,
        /// Whether the compiled code came from the precompiled cache.
        from_cache: bool,
        /// The circuit breaker's state.
        breaker: BreakerStatus,
        /// The last reload's failure to load a new version of this provider; the
        /// version described here kept serving.
        reload_error: Option<String>,
        /// The contract version the component was built against (`0.2.0`,
        /// `0.1.0`).
        contract: &'static str,
        /// What the component said about itself (name, version, config schema),
        /// once it was asked (its first call, or [`Host::check`]).
        descriptor: Option<Arc<crate::schema::Descriptor>>,
        /// The candidate version being rolled out, if one is configured.
        rollout: Option<crate::RolloutStatus>,
    },
    /// Failed to load; calls to it return this error's message.
    Failed(String),
}

enum Slot {
    Ready {
        ready: Arc<Ready>,
        reload_error: Option<String>,
    },
    Failed(String),
}

struct Ready {
    name: Arc<str>,
    runtime: Arc<ProviderRuntime>,
    cache: Arc<config::CacheConfig>,
    retry: RetryPolicy,
    /// Re-runs of all operations together (`retry.retry_ratio`).
    retry_budget: Arc<crate::budget::RetryBudget>,
    /// The candidate version rolled out to a share of the keys, if any.
    rollout: Option<Arc<crate::rollout::Rollout>>,
    /// Why the configured candidate did not load (the stable version serves).
    candidate_error: Option<String>,
    fetch: Fetcher,
    metrics: Arc<ProviderMetrics>,
    /// Its view of the shared cache (L2), when there is one.
    shared: Option<Arc<SharedTier>>,
    /// What this version was built from; a reload with the same identity keeps it
    /// (and its cache).
    identity: Identity,
}

/// Everything a provider version is built from.
#[derive(PartialEq)]
struct Identity {
    config: ProviderConfig,
    /// The resolved config values (a candidate's as `candidate:<key>`).
    values: Vec<(String, crate::Secret)>,
    plugin_sha256: String,
    /// The candidate's component digest, when one loaded.
    candidate_sha256: Option<String>,
    state_file: Option<PathBuf>,
}

type Providers = BTreeMap<String, Slot>;

/// What a [`Host::reload`] did, provider by provider.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReloadReport {
    /// New providers that loaded.
    pub added: Vec<String>,
    /// Providers whose new version replaced the old one (their cache was dropped).
    pub updated: Vec<String>,
    /// Providers left as they were (their cache survives).
    pub unchanged: Vec<String>,
    /// Providers no longer configured; their calls now fail with
    /// [`Error::UnknownProvider`].
    pub removed: Vec<String>,
    /// Providers whose new version failed to load, with why. Where an old version
    /// existed it keeps serving.
    pub failed: Vec<(String, String)>,
}

impl ReloadReport {
    /// Whether anything changed or failed.
    pub fn is_noop(&self) -> bool {
        self.added.is_empty()
            && self.updated.is_empty()
            && self.removed.is_empty()
            && self.failed.is_empty()
    }
}

impl std::fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(",")
            }
        };
        write!(
            f,
            "added={} updated={} unchanged={} removed={} failed={}",
            list(&self.added),
            list(&self.updated),
            list(&self.unchanged),
            list(&self.removed),
            if self.failed.is_empty() {
                "-".to_string()
            } else {
                self.failed
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            }
        )
    }
}

/// Hosts auth providers: loads them, caches what they return and asks them what to
/// do when a server rejects a credential.
///
/// Cheap to clone; clones share everything, including reloads.
#[derive(Clone)]
pub struct Host {
    inner: Arc<Inner>,
}

struct Inner {
    runtime: Arc<Runtime>,
    /// Swapped whole by a reload; a call takes a snapshot, so it finishes on the
    /// version it started with.
    providers: arc_swap::ArcSwap<Providers>,
    /// The cells [`ProviderHandle`]s read, by provider name: set to the serving
    /// version at every swap of `providers` (under this lock), `None` while the
    /// provider is not loaded or not configured.
    handles: Mutex<BTreeMap<String, Arc<HandleCell>>>,
    cache: TokenCache,
    /// The configuration currently applied (runtime settings are fixed at build).
    config: Mutex<HostConfig>,
    metrics: Arc<Metrics>,
    /// The cross-process token cache (L2), fixed at build.
    shared: Option<SharedSetup>,
    /// The fleet, when `[fleet]` is configured.
    #[cfg(feature = "fleet")]
    fleet: Option<crate::store::fleet::Fleet>,
    /// How providers' fetchers reach this host (other providers' credentials).
    link: HostLink,
}

/// The host as its providers' fetchers see it, to resolve `{ credential = … }`
/// values: set once the host is built, weak so that no provider keeps the host
/// alive.
type HostLink = Arc<std::sync::OnceLock<std::sync::Weak<Inner>>>;

/// The shared cache (L2) and what listens to its announcements.
struct SharedSetup {
    cache: Arc<dyn SharedCache>,
    link: Arc<RemoteLink>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("providers", &self.snapshot().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Builds a [`Host`] from a config file or programmatically.
pub struct HostBuilder {
    config: HostConfig,
    clock: Arc<dyn Clock>,
    runtime_options: Option<RuntimeOptions>,
    shared: Option<Option<Arc<dyn SharedCache>>>,
    #[cfg(feature = "fleet")]
    fleet: Option<crate::store::fleet::Fleet>,
}

impl std::fmt::Debug for HostBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuilder")
            .field(
                "providers",
                &self.config.providers.keys().collect::<Vec<_>>(),
            )
            .field("runtime", &self.config.runtime)
            .field("runtime_options", &self.runtime_options)
            .field("shared_cache", &self.shared.as_ref().map(|s| s.is_some()))
            .finish_non_exhaustive()
    }
}

impl HostBuilder {
    /// Share fresh credentials with other processes through `cache` (L2) instead
    /// of the one `[runtime.shared_cache]` configures; `None` turns it off.
    pub fn shared_cache(mut self, cache: Option<Arc<dyn SharedCache>>) -> Self {
        self.shared = Some(cache);
        self
    }

    /// Join `fleet` (instead of the one `[fleet]` configures): fresh credentials
    /// and every provider's state are shared through it with the other replicas,
    /// and the host follows the backend's clock.
    #[cfg(feature = "fleet")]
    pub fn fleet(mut self, fleet: crate::store::fleet::Fleet) -> Self {
        self.fleet = Some(fleet);
        self
    }

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

    /// Engine settings beyond the config file's (to measure the cost of the
    /// sandbox's limits). `cache_dir` here is used when the configuration sets no
    /// `runtime.cache_dir`, `keep_resident_bytes` when it sets no
    /// `runtime.keep_resident_kib`; `max_memory_bytes` and `max_instances` are
    /// the configuration's.
    pub fn runtime_options(mut self, options: RuntimeOptions) -> Self {
        self.runtime_options = Some(options);
        self
    }

    /// [`HostBuilder::build`] for async code: compiling plugins takes from
    /// milliseconds (a precompiled artifact) to seconds (a 19 MB Python component
    /// compiled from source), so it runs on tokio's blocking pool instead of
    /// holding up a runtime worker and every task queued behind it.
    ///
    /// # Errors
    ///
    /// As [`HostBuilder::build`].
    pub async fn build_async(self) -> Result<Host> {
        tokio::task::spawn_blocking(move || self.build())
            .await
            .map_err(|e| Error::Io {
                context: "building the host on the blocking pool".into(),
                source: std::sync::Arc::new(std::io::Error::other(e.to_string())),
            })?
    }

    /// Validate the configuration, start the engine and load every provider.
    ///
    /// Configuration errors fail the build. A provider whose plugin fails to load
    /// does not: it is reported by [`Host::status`] and its calls return the load
    /// error, while every other provider serves. Compiling is synchronous: from
    /// async code, prefer [`HostBuilder::build_async`].
    pub fn build(self) -> Result<Host> {
        let config = self.config;
        config.validate()?;
        #[cfg(feature = "fleet")]
        let fleet = match self.fleet {
            Some(fleet) => Some(fleet),
            None => open_fleet(&config)?,
        };
        #[cfg(not(feature = "fleet"))]
        if config.fleet.is_some() {
            return Err(ConfigError::at(
                config.source.as_deref(),
                "fleet",
                "this build of reauth has no fleet support (the `reauth` crate's cargo feature `fleet`)",
            )
            .into());
        }
        #[cfg(feature = "fleet")]
        if let Some(fleet) = &fleet {
            let lease_ms = u64::try_from(fleet.lease().as_millis()).unwrap_or(u64::MAX);
            for (name, p) in &config.providers {
                config::check_state_lease(config.source.as_deref(), name, p, lease_ms)?;
            }
        }
        // A fleet's replicas all follow the backend's clock.
        #[cfg(feature = "fleet")]
        let clock = match &fleet {
            Some(fleet) => fleet.clock(self.clock.clone()),
            None => self.clock.clone(),
        };
        #[cfg(not(feature = "fleet"))]
        let clock = self.clock.clone();
        let defaults = self.runtime_options.unwrap_or_default();
        let runtime = Runtime::new(
            RuntimeOptions {
                // The config's, else the embedder's default (`runtime_options`).
                cache_dir: config
                    .runtime
                    .cache_dir
                    .as_deref()
                    .map(|d| config.resolve(d))
                    .or(defaults.cache_dir.clone()),
                max_memory_bytes: config.runtime.max_memory_mib << 20,
                max_instances: config.runtime.max_instances,
                keep_resident_bytes: config
                    .runtime
                    .keep_resident_kib
                    .map_or(defaults.keep_resident_bytes, |kib| {
                        usize::try_from(kib.saturating_mul(1024)).unwrap_or(usize::MAX)
                    }),
                ..defaults
            },
            clock.clone(),
        )
        .map_err(|e| Error::Io {
            context: "starting the WebAssembly engine".into(),
            source: std::sync::Arc::new(std::io::Error::other(e.into_cause())),
        })?;
        let runtime = Arc::new(runtime);
        let keys = key_ring(&config)?;
        if let Some(keys) = &keys {
            runtime.set_state_keys(keys.clone());
        }
        #[cfg(feature = "fleet")]
        if let Some(fleet) = &fleet {
            runtime.set_state_store(Arc::new(fleet.clone()));
        }
        let metrics = Arc::new(Metrics::default());
        let shared = match self.shared {
            Some(chosen) => chosen,
            #[cfg(feature = "fleet")]
            None if fleet.is_some() => fleet.clone().map(|f| Arc::new(f) as Arc<dyn SharedCache>),
            None => open_shared_cache(&config, keys.as_ref()),
        };
        let cache = TokenCache::with_violation_hook(
            clock,
            config.runtime.max_cache_entries,
            Some({
                let metrics = metrics.clone();
                Arc::new(move |provider: &str| metrics.provider(provider).contract_violation())
            }),
        );
        let shared = shared.map(|shared| SharedSetup {
            link: Arc::new(RemoteLink {
                announces: shared.announces(),
                shared: shared.clone(),
                cache: cache.clone(),
                keys: Mutex::new(RemoteKeys::default()),
                max: config.runtime.max_cache_entries.saturating_mul(2),
                listening: std::sync::OnceLock::new(),
            }),
            cache: shared,
        });
        if let Some(shared) = &shared {
            shared.link.listen();
        }
        let link = HostLink::default();
        let mut providers = BTreeMap::new();
        for (name, p) in &config.providers {
            let loaded = provider_spec(&config, name, p).and_then(|resolved| {
                load_provider(
                    &runtime,
                    &config,
                    &metrics,
                    shared.as_ref(),
                    &link,
                    name,
                    p,
                    resolved,
                    None,
                )
            });
            let slot = match loaded {
                Ok(ready) => {
                    tracing::info!(provider = %name, sha256 = ready.runtime.sha256(), "provider loaded");
                    Slot::Ready {
                        ready: Arc::new(ready),
                        reload_error: None,
                    }
                }
                Err(e) => {
                    tracing::error!(provider = %name, error = %e, "provider failed to load");
                    Slot::Failed(e.to_string())
                }
            };
            providers.insert(name.clone(), slot);
        }
        let inner = Arc::new(Inner {
            runtime,
            providers: arc_swap::ArcSwap::from_pointee(providers),
            handles: Mutex::default(),
            cache,
            config: Mutex::new(config),
            metrics,
            shared,
            #[cfg(feature = "fleet")]
            fleet,
            link: link.clone(),
        });
        let _ = link.set(Arc::downgrade(&inner));
        Ok(Host { inner })
    }
}

/// Load and wire one provider from its resolved spec (see [`provider_spec`]).
/// `previous` is the version a reload replaces (its state store is taken over).
#[allow(clippy::too_many_arguments)]
fn load_provider(
    runtime: &Arc<Runtime>,
    config: &HostConfig,
    metrics: &Metrics,
    shared: Option<&SharedSetup>,
    link: &HostLink,
    name: &str,
    p: &ProviderConfig,
    (spec, identity): (ProviderSpec, Identity),
    previous: Option<&Ready>,
) -> Result<Ready> {
    let retry = RetryPolicy::from_config(&p.retry).map_err(|e| ConfigError {
        file: config.source.clone(),
        line: None,
        message: format!("providers.{name}.retry: {e}"),
    })?;
    let loaded = Arc::new(ProviderRuntime::load_replacing(
        runtime,
        spec,
        previous.map(|r| &*r.runtime),
    )?);
    let provider_metrics = metrics.provider(name);
    loaded.set_metrics(provider_metrics.clone());
    // The candidate: the provider with the candidate's plugin and config
    // overrides, its own sandbox (pool reservation, bulkhead) and its own state,
    // named `<name>@candidate` in its logs and errors; its fetches take turns in
    // the provider's one fetch budget. A candidate that fails to load leaves the
    // stable version serving every key (and says why in the status).
    let (rollout, candidate_error) = match &p.candidate {
        None => (None, None),
        Some(c) => {
            let load = || -> Result<Arc<ProviderRuntime>> {
                let mut cp = p.clone();
                cp.plugin = c.plugin.clone();
                cp.sha256 = c.sha256.clone();
                cp.config.extend(c.config.clone());
                cp.candidate = None;
                cp.rate = config::RateConfig::unlimited();
                let (spec, _) = provider_spec(config, &format!("{name}@candidate"), &cp)?;
                let previous_candidate = previous
                    .and_then(|r| r.rollout.as_ref())
                    .map(|r| &*r.candidate);
                Ok(Arc::new(ProviderRuntime::load_replacing(
                    runtime,
                    spec,
                    previous_candidate,
                )?))
            };
            match load() {
                Ok(candidate) => {
                    candidate.set_metrics(provider_metrics.clone());
                    tracing::info!(provider = %name, candidate = candidate.sha256(), share = c.share, "candidate version loaded");
                    (
                        Some(Arc::new(crate::rollout::Rollout::new(candidate, c))),
                        None,
                    )
                }
                Err(e) => {
                    tracing::error!(provider = %name, error = %e, "the candidate version failed to load; the stable version serves every key");
                    runtime.release(&format!("{name}@candidate"));
                    (None, Some(e.to_string()))
                }
            }
        }
    };
    let settings = Arc::new(p.cache.clone());
    let tier = shared.map(|shared| {
        Arc::new(SharedTier {
            name: Arc::from(name),
            cache: shared.cache.clone(),
            link: shared.link.clone(),
            identity: identity.digest(
                name,
                loaded.sha256(),
                rollout.as_ref().map(|r| r.candidate.sha256()),
                &p.cache,
                runtime.has_state_store(),
            ),
            settings: settings.clone(),
            clock: runtime.clock().clone(),
            metrics: provider_metrics.clone(),
            // Long enough for the fetcher's whole fetch (its turn in the fetch
            // budget, its wait for a call slot, the call, and for `{ credential }`
            // values the other providers' fetches and the one retry); past it
            // the waiter fetches itself.
            wait: fetch_bound(config, name, 0),
        })
    });
    let provider_name: Arc<str> = Arc::from(name);
    let refs: Arc<[Reference]> = config::credential_refs(&p.config)
        .map(|(k, r)| Reference {
            key: k.to_string(),
            target: r.clone(),
            bound: fetch_bound(config, &r.provider, 1),
        })
        .collect();
    let fetch: Fetcher = {
        let provider_name = provider_name.clone();
        let (runtime, loaded, metrics, tier, link, rollout) = (
            runtime.clone(),
            loaded.clone(),
            provider_metrics.clone(),
            tier.clone(),
            link.clone(),
            rollout.clone(),
        );
        Arc::new(move |request: Request| {
            let (runtime, loaded, metrics, tier, link, refs, rollout) = (
                runtime.clone(),
                loaded.clone(),
                metrics.clone(),
                tier.clone(),
                link.clone(),
                refs.clone(),
                rollout.clone(),
            );
            let provider = provider_name.clone();
            let name = provider.clone();
            // The providers whose fetches are waiting on this one (`{ credential }`
            // values): a reference back to any of them is a cycle, refused at once.
            let chain = BORROW_CHAIN
                .try_with(|c| c.clone())
                .unwrap_or_default()
                .iter()
                .cloned()
                .chain(std::iter::once(provider.clone()))
                .collect::<Vec<_>>();
            // Polled first by its caller, on its own task once it has to wait
            // (see `detach`): a fetch is never cut in half by a caller that goes
            // away — say, after the IdP rotated a refresh token and before the
            // provider saved it — and one with nothing to wait for saves the hop.
            let task = crate::detach::Detached::new(BORROW_CHAIN.scope(Arc::new(chain), async move {
                let call = async {
                    let started = std::time::Instant::now();
                    let run = |version: Arc<ProviderRuntime>| {
                        let (link, name, refs, runtime, request) =
                            (&link, &name, &refs, &runtime, &request);
                        async move {
                            if refs.is_empty() {
                                version.get_credentials(runtime, request).await
                            } else {
                                fetch_borrowing(link, name, refs, &version, runtime, request)
                                    .await
                            }
                        }
                    };
                    let result = match &rollout {
                        Some(r) if r.takes(&request) => 'candidate: {
                            // The candidate's turn comes out of the provider's
                            // fetch budget.
                            if let Err(e) = loaded.take_fetch_budget().await {
                                break 'candidate Err(e);
                            }
                            let tried = run(r.candidate.clone()).await;
                            let outcome = crate::rollout::Outcome::of(&tried);
                            match tried {
                                Ok(c) => {
                                    metrics.rollout_fetch(true, outcome.name());
                                    r.record(&name, outcome);
                                    Ok(c)
                                }
                                Err(e) => {
                                    tracing::warn!(provider = %name, error = %crate::rollout::describe(&e), "candidate fetch failed; the stable version serves it");
                                    let stable = run(loaded.clone()).await;
                                    metrics.rollout_fetch(false, crate::rollout::Outcome::of(&stable).name());
                                    // Held against the candidate only when the
                                    // stable version did better (not an IdP
                                    // outage both would have failed).
                                    let judged = if stable.is_ok() {
                                        outcome
                                    } else {
                                        crate::rollout::Outcome::Neutral
                                    };
                                    metrics.rollout_fetch(true, judged.name());
                                    r.record(&name, judged);
                                    stable
                                }
                            }
                        }
                        Some(_) => {
                            let stable = run(loaded.clone()).await;
                            metrics.rollout_fetch(false, crate::rollout::Outcome::of(&stable).name());
                            stable
                        }
                        None => run(loaded.clone()).await,
                    };
                    let now = runtime.clock().now();
                    metrics.fetched(request.reason, started.elapsed(), &result, now);
                    result
                };
                match &tier {
                    Some(tier) => tier.fetch(&request, call).await,
                    None => call.await,
                }
            }));
            Box::pin(async move {
                task.await.unwrap_or_else(|abnormal| {
                    Err(Error::Plugin {
                        provider: provider.to_string(),
                        function: "get-credentials",
                        source: abnormal.to_string().into(),
                    })
                })
            })
        })
    };
    Ok(Ready {
        name: Arc::from(name),
        identity: Identity {
            plugin_sha256: loaded.sha256().to_string(),
            candidate_sha256: rollout.as_ref().map(|r| r.candidate.sha256().to_string()),
            ..identity
        },
        candidate_error,
        runtime: loaded,
        cache: settings,
        retry,
        rollout,
        // Kept by a reload that leaves `[retry]` as it was.
        retry_budget: match previous {
            Some(prev) if prev.identity.config.retry == p.retry => prev.retry_budget.clone(),
            _ => Arc::new(crate::budget::RetryBudget::new(&p.retry)),
        },
        fetch,
        metrics: provider_metrics,
        shared: tier,
    })
}

/// How long one fetch of provider `name` can take at most, as configured: its
/// turn in the fetch budget, its wait for a call slot and the call; with
/// `{ credential = … }` values, the other providers' fetches first and one retry
/// (`depth` bounds the recursion like the config's chain limit).
fn fetch_bound(config: &HostConfig, name: &str, depth: usize) -> Duration {
    let Some(p) = config.providers.get(name) else {
        return Duration::from_secs(1);
    };
    let own = Duration::from_millis(
        p.limits
            .timeout_ms
            .saturating_add(p.limits.queue_timeout_ms)
            .saturating_add(p.rate.wait_ms)
            .saturating_add(1000),
    );
    // A candidate's attempt, then the stable version's.
    let own = if p.candidate.is_some() {
        own.saturating_mul(2)
    } else {
        own
    };
    if depth > config::MAX_CREDENTIAL_CHAIN {
        return own;
    }
    let upstream = config::credential_refs(&p.config)
        .map(|(_, r)| fetch_bound(config, &r.provider, depth + 1))
        .fold(Duration::ZERO, Duration::saturating_add);
    if upstream.is_zero() {
        own
    } else {
        own.saturating_add(upstream).saturating_mul(2)
    }
}

tokio::task_local! {
    /// In a fetch task: the providers whose fetches wait on it, outermost first
    /// (`a` borrowing from `b`: `[a, b]` in `b`'s fetch).
    static BORROW_CHAIN: Arc<Vec<Arc<str>>>;
}

/// One metric sample of a provider: an optional `kind` label and the value.
#[cfg(feature = "metrics")]
type Sample = (Option<&'static str>, u64);

/// The host's metrics as a `prometheus-client` collector (see
/// [`Host::register_metrics`]); holds the host weakly.
#[cfg(feature = "metrics")]
struct HostCollector(std::sync::Weak<Inner>);

#[cfg(feature = "metrics")]
impl std::fmt::Debug for HostCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCollector")
            .field("host_alive", &(self.0.strong_count() > 0))
            .finish()
    }
}

#[cfg(feature = "metrics")]
impl crate::metrics::prometheus_client::collector::Collector for HostCollector {
    fn encode(
        &self,
        mut encoder: crate::metrics::prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        match self.0.upgrade() {
            Some(inner) => Host { inner }.encode_metrics(&mut encoder),
            None => Ok(()),
        }
    }
}

/// A `{ credential = … }` value of a provider's config, with how long the other
/// provider's fetch may take at most.
struct Reference {
    key: String,
    target: config::CredentialRef,
    bound: Duration,
}

/// One value borrowed from another provider's credential for a fetch.
struct Borrowed {
    key: String,
    provider: String,
    request: Request,
    credentials: Credentials,
    value: crate::Secret,
}

/// Fetch from `loaded` (provider `name`) with its `{ credential = … }` values
/// resolved through the host's cache. When the provider answers `denied`, each
/// borrowed credential is reported to its provider as rejected (its
/// `handle-security-error` decides, and its cache's compare-and-invalidate and
/// `min_reauth_interval_ms` apply); if any was dropped, the fetch runs once more
/// with fresh ones.
async fn fetch_borrowing(
    link: &HostLink,
    name: &str,
    refs: &[Reference],
    loaded: &ProviderRuntime,
    runtime: &Runtime,
    request: &Request,
) -> Result<Credentials> {
    let Some(host) = link
        .get()
        .and_then(std::sync::Weak::upgrade)
        .map(|inner| Host { inner })
    else {
        return Err(Error::Provider {
            provider: name.to_string(),
            error: crate::types::ProviderError::unavailable("the host is shutting down"),
        });
    };
    // This provider's turn in its fetch budget before anything is borrowed: a
    // fetch it refuses costs the other providers nothing.
    loaded.take_fetch_budget().await?;
    let mut retried = false;
    loop {
        let borrowed = borrow(&host, name, refs, request, retried).await?;
        let values: Vec<(String, crate::Secret)> = borrowed
            .iter()
            .map(|b| (b.key.clone(), b.value.clone()))
            .collect();
        // The retry is a second plugin call: it takes its own turn.
        let budget = if retried {
            crate::runtime::Budget::Take
        } else {
            crate::runtime::Budget::Taken
        };
        let result = loaded
            .get_credentials_with(runtime, request, &values, budget)
            .await;
        let denied = match &result {
            Err(Error::Provider {
                error: crate::types::ProviderError::Denied(message),
                ..
            }) if !retried => message.clone(),
            _ => return result,
        };
        let mut renewed = false;
        for b in &borrowed {
            let error =
                SecurityError::new(crate::types::SecurityErrorKind::Unauthorized).message(format!(
                    "provider `{name}` was denied with this credential (config key `{}`): {denied}",
                    b.key
                ));
            match host
                .handle_security_error(&b.provider, &b.request, &b.credentials, &error)
                .await
            {
                Ok(Decision::RefreshAndRetry) => renewed = true,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(provider = %name, upstream = %b.provider, error = %e, "could not report a borrowed credential as rejected")
                }
            }
        }
        if !renewed {
            return result;
        }
        tracing::info!(provider = %name, "denied with a borrowed credential: trying once more with a fresh one");
        retried = true;
    }
}

/// Resolve `refs` for a fetch of `name`: each referenced provider's current
/// credential, through the cache (`renewing`: after the provider was denied with
/// the ones it had, so the reason is `after-security-error`). A failure names
/// the key and the provider and keeps its kind (an outage upstream is an outage
/// here; a full bulkhead or a spent fetch budget upstream is not a fault here
/// either). Each fetch is bounded by what the other provider's config allows, so
/// that nothing (not even a reference cycle that a partly failed reload left
/// between an old and a new version) can hold a fetch forever.
async fn borrow(
    host: &Host,
    name: &str,
    refs: &[Reference],
    request: &Request,
    renewing: bool,
) -> Result<Vec<Borrowed>> {
    use crate::types::{Credential, ProviderError};
    let mut out = Vec::with_capacity(refs.len());
    for Reference {
        key,
        target: r,
        bound,
    } in refs
    {
        let upstream = Request {
            subject: if r.pass_subject {
                request.subject.clone()
            } else {
                None
            },
            scopes: r.scopes.clone(),
            audience: r.audience.clone(),
            reason: if renewing {
                Reason::AfterSecurityError
            } else {
                Reason::Initial
            },
        };
        let at = format!(
            "providers.{name}.config.{key}: the credential of provider `{}`",
            r.provider
        );
        // Validation refuses cycles, but the versions that serve can still form
        // one (a reload whose new version failed to load keeps the old one):
        // waiting on a fetch that waits on this one would never end.
        let chain = BORROW_CHAIN.try_with(|c| c.clone()).unwrap_or_default();
        if chain.iter().any(|p| **p == *r.provider) {
            let path: Vec<&str> = chain
                .iter()
                .map(|p| &**p)
                .chain(std::iter::once(r.provider.as_str()))
                .collect();
            return Err(Error::Provider {
                provider: name.to_string(),
                error: ProviderError::Misconfigured(format!(
                    "{at}: the providers that serve form a credential reference cycle ({}): reload a config without it",
                    path.join(" → ")
                )),
            });
        }
        let fetched = tokio::time::timeout(*bound, host.get_credentials(&r.provider, &upstream))
            .await
            .unwrap_or_else(|_| {
                Err(Error::Provider {
                    provider: r.provider.clone(),
                    error: ProviderError::unavailable(format!(
                        "no credential within {} ms",
                        bound.as_millis()
                    )),
                })
            });
        let credentials = match fetched {
            Ok(c) => c,
            Err(e) => {
                let error = match e {
                    Error::Provider { error, .. } => error.map_message(|m| format!("{at}: {m}")),
                    // Passed on as they are (naming the other provider): the
                    // cache treats them as "try again", not as this provider's
                    // failure.
                    e @ (Error::Throttled { .. } | Error::Busy { .. }) => return Err(e),
                    other => ProviderError::unavailable(format!("{at}: {other}")),
                };
                return Err(Error::Provider {
                    provider: name.to_string(),
                    error,
                });
            }
        };
        let value = match (&r.field, &credentials.credential) {
            (config::CredentialField::Token, Credential::Bearer(t)) => Some(t.clone()),
            (
                config::CredentialField::Token | config::CredentialField::Password,
                Credential::Basic { password, .. },
            ) => Some(password.clone()),
            (config::CredentialField::Username, Credential::Basic { username, .. }) => {
                Some(crate::Secret::new(username.clone()))
            }
            (config::CredentialField::Header(h), Credential::Headers(headers)) => headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(h))
                .map(|(_, v)| v.clone()),
            _ => None,
        };
        let Some(value) = value else {
            let kind = match &credentials.credential {
                Credential::Basic { .. } => "basic credentials",
                Credential::Bearer(_) => "a bearer token",
                Credential::Headers(_) => "header credentials",
            };
            return Err(Error::Provider {
                provider: name.to_string(),
                error: ProviderError::Misconfigured(format!(
                    "{at} is {kind}, which has no `{}` (field = \"token\", \"username\", \"password\" or \"header.<name>\")",
                    r.field
                )),
            });
        };
        out.push(Borrowed {
            key: key.clone(),
            provider: r.provider.clone(),
            request: upstream,
            credentials: Arc::unwrap_or_clone(credentials),
            value,
        });
    }
    Ok(out)
}

impl Identity {
    /// A digest of everything that makes this provider's credentials what they
    /// are (name, plugin, configuration values): the shared cache keeps entries of
    /// different versions apart. Only ever fed to the shared cache's keyed hash.
    /// In a fleet (`fleet`) the local state path is left out: replicas whose
    /// config sits in different places still share.
    fn digest(
        &self,
        name: &str,
        plugin_sha256: &str,
        candidate_sha256: Option<&str>,
        cache: &config::CacheConfig,
        fleet: bool,
    ) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(name.as_bytes());
        field(plugin_sha256.as_bytes());
        // With a candidate, entries are shared only with replicas rolling out
        // the same candidate to the same share.
        if let Some(candidate) = candidate_sha256 {
            field(candidate.as_bytes());
            field(
                format!(
                    "{:?}",
                    self.config.candidate.as_ref().map(|c| c.share.to_bits())
                )
                .as_bytes(),
            );
        }
        // Lifetimes and refresh points depend on the cache settings; where the
        // state lives tells logins apart.
        field(format!("{cache:?}").as_bytes());
        if !fleet {
            field(format!("{:?}", self.state_file).as_bytes());
        }
        for (key, value) in &self.values {
            field(key.as_bytes());
            field(value.expose().as_bytes());
        }
        h.finalize().to_vec()
    }
}

/// The `[runtime.shared_cache]` the configuration asks for, if it opens. One that
/// does not is logged and left out: it saves IdP calls, it never decides whether
/// a provider works.
fn open_shared_cache(
    config: &HostConfig,
    keys: Option<&Arc<KeyRing>>,
) -> Option<Arc<dyn SharedCache>> {
    let dir = config.shared_cache_dir()?;
    match FileSharedCache::open(&dir, keys?.clone()) {
        Ok(cache) => {
            let cache = cache.with_max_entries(config.runtime.max_cache_entries);
            tracing::debug!(dir = %dir.display(), key_id = %cache.key_id(), "shared token cache open");
            Some(Arc::new(cache))
        }
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "runtime.shared_cache: cannot open the shared token cache; running without it");
            None
        }
    }
}

/// The key ring `[runtime] key` / `key_file` names (by default the one beside the
/// state directory, created on first use), if anything is kept at rest.
fn key_ring(config: &HostConfig) -> Result<Option<Arc<KeyRing>>> {
    let file = config.source.as_deref();
    if let Some(value) = &config.runtime.key {
        let at = |message: String| ConfigError::at(file, "runtime.key", message);
        let text = config.resolve_value("runtime.key", value)?;
        let text = text.expose();
        let ring = KeyRing::parse(text, "the key ring").map_err(|e| at(e.to_string()))?;
        return Ok(Some(Arc::new(ring)));
    }
    let Some(path) = config.key_file() else {
        return Ok(None);
    };
    let ring = KeyRing::load_or_create(&path)
        .map_err(|e| ConfigError::at(file, "runtime.key_file", e.to_string()))?;
    Ok(Some(Arc::new(ring)))
}

/// One provider's view of the shared cache (L2): read before the provider is
/// called, one process fetching per key at a time, written after.
struct SharedTier {
    name: Arc<str>,
    cache: Arc<dyn SharedCache>,
    link: Arc<RemoteLink>,
    identity: Vec<u8>,
    settings: Arc<config::CacheConfig>,
    clock: Arc<dyn Clock>,
    metrics: Arc<ProviderMetrics>,
    wait: Duration,
}

impl SharedTier {
    /// The entry id of `request`'s key.
    fn id(&self, request: &Request) -> String {
        fn field(material: &mut Vec<u8>, bytes: &[u8]) {
            material.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            material.extend_from_slice(bytes);
        }
        // Tagged, so that no string stands for "none".
        fn optional(material: &mut Vec<u8>, value: Option<&str>) {
            match value {
                None => field(material, b"N"),
                Some(v) => field(material, &[b"S", v.as_bytes()].concat()),
            }
        }
        let mut material = self.identity.clone();
        optional(&mut material, request.subject.as_deref());
        let mut scopes: Vec<&str> = request.scopes.iter().map(String::as_str).collect();
        scopes.sort_unstable();
        scopes.dedup();
        field(&mut material, &(scopes.len() as u64).to_le_bytes());
        for scope in scopes {
            field(&mut material, scope.as_bytes());
        }
        optional(&mut material, request.audience.as_deref());
        self.cache.entry_id(&material)
    }

    /// The entry, if other processes may still take it as it is.
    async fn usable(&self, id: &str) -> Option<Credentials> {
        let entry = self.cache.read(id).await?;
        let now = self.clock.now();
        let (_, use_until, _) = crate::cache::timeline(&entry.credentials, &self.settings, now);
        (now < entry.fresh_until && now < use_until).then_some(entry.credentials)
    }

    /// Serve `request` from the shared cache, or run `call` (as the only process
    /// fetching this key) and share its result.
    async fn fetch(
        &self,
        request: &Request,
        call: impl Future<Output = Result<Credentials>>,
    ) -> Result<Credentials> {
        let id = self.id(request);
        self.link.remember(&id, &self.name, request);
        if let Some(credentials) = self.usable(&id).await {
            self.metrics.shared(SharedEvent::Hit);
            return Ok(credentials);
        }
        let lease = self.cache.fetching(&id, self.wait).await;
        // Another process may have fetched it while this one waited.
        if let Some(credentials) = self.usable(&id).await {
            self.metrics.shared(SharedEvent::Join);
            return Ok(credentials);
        }
        // Another process's fetch failed moments ago: back off with it rather
        // than call the identity provider again.
        let failure = self.cache.read_failure(&id).await;
        if let Some(failure) = &failure {
            let now = self.clock.now();
            if now < failure.retry_at {
                let retry_in = failure.retry_at.duration_since(now).unwrap_or_default();
                return Err(Error::Provider {
                    provider: self.name.to_string(),
                    // The remaining wait travels with the error, so this
                    // process's cache waits as long as the fleet does.
                    error: crate::types::ProviderError::Unavailable {
                        message: format!(
                            "{} (shared: {} failed fetch(es) of this key across processes; next attempt in {} ms)",
                            failure.message,
                            failure.failures,
                            retry_in.as_millis()
                        ),
                        retry_after: Some(retry_in),
                    },
                });
            }
        }
        self.metrics.shared(SharedEvent::Miss);
        let result = call.await;
        match &result {
            Ok(credentials) => {
                let now = self.clock.now();
                let (expires, use_until, refresh_at) =
                    crate::cache::timeline(credentials, &self.settings, now);
                if now < use_until {
                    let mut shared = credentials.clone();
                    shared.expires_at = Some(expires);
                    let entry = SharedEntry {
                        credentials: shared,
                        written_at: now,
                        fresh_until: refresh_at,
                    };
                    match self.cache.write(&id, &entry, lease.as_ref()).await {
                        Ok(()) => self.metrics.shared(SharedEvent::Write),
                        Err(e) => {
                            self.metrics.shared(SharedEvent::Error);
                            tracing::warn!(provider = %self.name, error = %e, "could not write the shared token cache");
                        }
                    }
                }
                if failure.is_some() {
                    let _ = self.cache.write_failure(&id, None, lease.as_ref()).await;
                }
            }
            Err(
                error @ Error::Provider {
                    error: crate::types::ProviderError::Unavailable { message, .. },
                    ..
                },
            ) => {
                use rand::Rng;
                let failures = failure.as_ref().map_or(0, |f| f.failures).saturating_add(1);
                // The identity provider's `Retry-After` (contract 0.2) holds for
                // the whole fleet, within the provider's bound; without one, no
                // replica has a fresh entry for this key, so the outage cap
                // applies (waiting callers recover soon after the IdP does).
                let delay = crate::cache::failure_delay(
                    &self.settings,
                    error,
                    failures,
                    false,
                    rand::rng().random_range(0.0..1.0),
                );
                let shared = SharedFailure {
                    message: message.clone(),
                    failures,
                    retry_at: crate::clock::saturating_add(self.clock.now(), delay),
                };
                if let Err(e) = self
                    .cache
                    .write_failure(&id, Some(&shared), lease.as_ref())
                    .await
                {
                    tracing::debug!(provider = %self.name, error = %e, "could not share a failed fetch");
                }
            }
            Err(_) => {}
        }
        result
    }

    /// A server rejected `credentials`: drop them for every process, if the shared
    /// entry still holds them.
    async fn invalidate(&self, request: &Request, credentials: &Credentials) {
        let id = self.id(request);
        if self
            .cache
            .remove_if(&id, &SharedEntry::fingerprint(credentials))
            .await
        {
            self.metrics.shared(SharedEvent::Invalidation);
        }
    }
}

/// Applies other replicas' announcements to this host's L1 cache: the keys this
/// host served from the shared cache, by entry id (at most `max`; beyond, the
/// oldest go, and their L1 entries with them, so no announcement is missed).
struct RemoteLink {
    /// Whether the shared cache announces anything (else nothing is tracked).
    announces: bool,
    shared: Arc<dyn SharedCache>,
    cache: TokenCache,
    keys: Mutex<RemoteKeys>,
    max: usize,
    listening: std::sync::OnceLock<()>,
}

#[derive(Default)]
struct RemoteKeys {
    by_id: std::collections::HashMap<String, (Arc<str>, Request)>,
    order: std::collections::VecDeque<String>,
}

impl RemoteLink {
    /// Note that entry `id` is `provider`'s key for `request`.
    fn remember(self: &Arc<Self>, id: &str, provider: &Arc<str>, request: &Request) {
        if !self.announces {
            return;
        }
        self.listen();
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if keys.by_id.contains_key(id) {
            return;
        }
        if keys.by_id.len() >= self.max {
            for _ in 0..(self.max / 10).max(1) {
                let Some(old) = keys.order.pop_front() else {
                    break;
                };
                if let Some((p, r)) = keys.by_id.remove(&old) {
                    self.cache.drop_if(&KeyRef::new(&p, &r), |_| true);
                }
            }
        }
        let request = Request {
            reason: Reason::default(),
            ..request.clone()
        };
        keys.by_id
            .insert(id.to_string(), (provider.clone(), request));
        keys.order.push_back(id.to_string());
    }

    /// Start applying announcements (once; needs a tokio runtime).
    fn listen(self: &Arc<Self>) {
        if !self.announces || self.listening.get().is_some() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.listening.set(()).is_err() {
            return;
        }
        let Some(mut events) = self.shared.events() else {
            return;
        };
        let weak = Arc::downgrade(self);
        handle.spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let event = match events.recv().await {
                    Ok(event) => event,
                    Err(RecvError::Lagged(_)) => RemoteEvent::Resync,
                    Err(RecvError::Closed) => return,
                };
                let Some(link) = weak.upgrade() else { return };
                link.apply(event);
            }
        });
    }

    fn apply(&self, event: RemoteEvent) {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            RemoteEvent::Invalidated { id, tag } => {
                if let Some((provider, request)) = keys.by_id.get(&id) {
                    let key = KeyRef::new(provider, request);
                    if self
                        .cache
                        .drop_if(&key, |c| self.shared.credential_tag(c) == tag)
                    {
                        tracing::info!(provider = %provider, "credential rejected on another replica; dropped here too");
                    }
                }
            }
            RemoteEvent::Resync => {
                // Announcements may have been missed: what this host holds is
                // re-read from the shared cache at its next use.
                for (provider, request) in keys.by_id.values() {
                    self.cache
                        .drop_if(&KeyRef::new(provider, request), |_| true);
                }
            }
            #[allow(unreachable_patterns)]
            _ => {}
        }
    }
}

/// The fleet `[fleet]` configures, if any.
#[cfg(feature = "fleet")]
fn open_fleet(config: &HostConfig) -> Result<Option<crate::store::fleet::Fleet>> {
    use crate::store::fleet::{Fleet, FleetBackend, FleetOptions, PostgresBackend, RedisBackend};
    let Some(fc) = &config.fleet else {
        return Ok(None);
    };
    let file = config.source.as_deref();
    let url = config.resolve_value("fleet.url", &fc.url)?;
    let key = config.resolve_value("fleet.key", &fc.key)?;
    let keys = KeyRing::parse(key.expose(), "fleet.key")
        .map_err(|e| ConfigError::at(file, "fleet.key", e.to_string()))?;
    let timeout = Duration::from_millis(fc.timeout_ms);
    let bad_url = |e: crate::store::StoreError| ConfigError::at(file, "fleet.url", e.to_string());
    let backend: Arc<dyn FleetBackend> = match fc.backend {
        config::FleetBackendKind::Redis => {
            Arc::new(RedisBackend::new(url.expose(), &fc.name, timeout).map_err(bad_url)?)
        }
        config::FleetBackendKind::RedisCluster => {
            let nodes: Vec<&str> = url.expose().split(',').map(str::trim).collect();
            Arc::new(RedisBackend::cluster(&nodes, &fc.name, timeout).map_err(bad_url)?)
        }
        config::FleetBackendKind::Postgres => {
            Arc::new(PostgresBackend::new(url.expose(), &fc.name, timeout).map_err(bad_url)?)
        }
        #[allow(unreachable_patterns)]
        other => {
            return Err(ConfigError::at(
                file,
                "fleet.backend",
                format!("`{}` is not supported by this build", other.as_str()),
            )
            .into());
        }
    };
    tracing::info!(fleet = %fc.name, backend = %backend.describe(), key_id = %keys.key_id(), "joining fleet");
    Ok(Some(Fleet::new(
        backend,
        Arc::new(keys),
        FleetOptions {
            name: fc.name.clone(),
            lease: Duration::from_millis(fc.lease_ms),
            wait: Duration::from_millis(fc.wait_ms),
            timeout,
        },
    )))
}

/// The load spec of one provider, and its identity except the plugin's digest.
fn provider_spec(
    config: &HostConfig,
    name: &str,
    p: &ProviderConfig,
) -> Result<(ProviderSpec, Identity)> {
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
    let state_file = config
        .runtime
        .state_dir
        .as_deref()
        .map(|d| config.resolve(d).join(format!("{name}.json")));
    let secret_keys = p
        .config
        .iter()
        .filter(|(key, value)| {
            !matches!(value, config::ConfigValue::Value(_))
                || config::is_secret_key(key)
                || p.secret_keys.contains(key)
        })
        .map(|(key, _)| key.clone())
        .collect();
    let spec = ProviderSpec {
        name: name.to_string(),
        plugin: config.resolve(&p.plugin),
        sha256: p.sha256.clone(),
        allowed_hosts,
        allow_http: p.allow_http,
        config: values.clone(),
        limits: p.limits.clone(),
        breaker: p.circuit_breaker.clone(),
        instances: p.instances.clone(),
        state_file: state_file.clone(),
        shared_state: p.shared_state,
        secret_keys,
        credential_keys: config::credential_refs(&p.config)
            .map(|(k, _)| k.to_string())
            .collect(),
        rate: p.rate.clone(),
    };
    // A candidate's resolved values are part of what the provider is built from:
    // a changed `{ file }` behind one reloads it.
    let mut values = values;
    if let Some(c) = &p.candidate {
        let mut merged = p.config.clone();
        merged.extend(c.config.clone());
        let candidate = config::resolve_values(
            file,
            &config.base_dir,
            &format!("{name}.candidate"),
            &merged,
        )?;
        values.extend(
            candidate
                .into_iter()
                .map(|(k, v)| (format!("candidate:{k}"), v)),
        );
    }
    let identity = Identity {
        config: p.clone(),
        values,
        plugin_sha256: String::new(),
        candidate_sha256: None,
        state_file,
    };
    Ok((spec, identity))
}

/// The plugin file's SHA-256, for comparing versions.
fn plugin_digest(path: &Path) -> Option<String> {
    use sha2::{Digest, Sha256};
    std::fs::read(path)
        .ok()
        .map(|b| hex::encode(Sha256::digest(&b)))
}

impl Host {
    /// A builder with no providers and default settings.
    pub fn builder() -> HostBuilder {
        HostBuilder {
            config: HostConfig::default(),
            clock: Arc::new(SystemClock),
            runtime_options: None,
            shared: None,
            #[cfg(feature = "fleet")]
            fleet: None,
        }
    }

    /// A builder seeded from a parsed configuration.
    pub fn builder_from_config(config: HostConfig) -> HostBuilder {
        HostBuilder {
            config,
            clock: Arc::new(SystemClock),
            runtime_options: None,
            shared: None,
            #[cfg(feature = "fleet")]
            fleet: None,
        }
    }

    /// Read `path` and build a host from it.
    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Host> {
        Self::builder_from_config(HostConfig::from_file(path)?).build()
    }

    fn snapshot(&self) -> Arc<Providers> {
        self.inner.providers.load_full()
    }

    /// Make `next` the serving set of providers, for string lookups and handles.
    fn publish(&self, next: Arc<Providers>) {
        let handles = self.inner.handles.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.providers.store(next.clone());
        for (name, cell) in handles.iter() {
            let ready = serving(&next, name);
            cell.serving.store(ready.is_some(), Ordering::Release);
            cell.ready.store(ready);
        }
    }

    /// A handle on `provider`: the same calls as the host's, without looking the
    /// provider up by name each time (the hot path of an embedder that asks one
    /// provider for every request). It follows reloads; while the provider is not
    /// loaded (or after a reload removed it) its calls fail as the host's would.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownProvider`] when no provider of that name is configured.
    pub fn handle(&self, provider: &str) -> Result<ProviderHandle> {
        let mut handles = self.inner.handles.lock().unwrap_or_else(|e| e.into_inner());
        let snapshot = self.snapshot();
        let Some((name, _)) = snapshot.get_key_value(provider) else {
            return Err(Error::UnknownProvider {
                provider: provider.to_string(),
            });
        };
        let cell = handles
            .entry(name.clone())
            .or_insert_with(|| {
                let ready = serving(&snapshot, name);
                Arc::new(HandleCell {
                    serving: AtomicBool::new(ready.is_some()),
                    ready: arc_swap::ArcSwapOption::new(ready),
                })
            })
            .clone();
        Ok(ProviderHandle {
            host: self.clone(),
            name: Arc::from(name.as_str()),
            metrics: self.inner.metrics.provider(name),
            cell,
        })
    }

    /// Every configured provider and whether it loaded.
    pub fn status(&self) -> BTreeMap<String, ProviderStatus> {
        self.snapshot()
            .iter()
            .map(|(name, slot)| {
                let status = match slot {
                    Slot::Ready {
                        ready,
                        reload_error,
                    } => ProviderStatus::Ready {
                        sha256: ready.runtime.sha256().to_string(),
                        from_cache: ready.runtime.compile_source() == CompileSource::Cache,
                        breaker: ready.runtime.breaker(),
                        reload_error: reload_error.clone(),
                        contract: ready.runtime.contract(),
                        descriptor: ready.runtime.described().map(|d| d.descriptor.clone()),
                        rollout: match (&ready.rollout, &ready.candidate_error) {
                            (Some(r), _) => Some(r.status()),
                            (None, Some(e)) => Some(crate::rollout::RolloutStatus::failed_to_load(
                                ready
                                    .identity
                                    .config
                                    .candidate
                                    .as_ref()
                                    .map_or(0.0, |c| c.share),
                                e,
                            )),
                            (None, None) => None,
                        },
                    },
                    Slot::Failed(e) => ProviderStatus::Failed(e.clone()),
                };
                (name.clone(), status)
            })
            .collect()
    }

    /// The files this host's providers depend on: the config file, every plugin and
    /// every `{ file = … }` value (what [`crate::watch`] watches).
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let config = self.inner.config.lock().unwrap_or_else(|e| e.into_inner());
        let mut files: Vec<PathBuf> = config.source.iter().cloned().collect();
        for p in config.providers.values() {
            files.push(config.resolve(&p.plugin));
            if let Some(c) = &p.candidate {
                files.push(config.resolve(&c.plugin));
                for value in c.config.values() {
                    if let config::ConfigValue::File { file } = value {
                        files.push(config.resolve(file));
                    }
                }
            }
            for value in p.config.values() {
                if let config::ConfigValue::File { file } = value {
                    files.push(config.resolve(file));
                }
            }
        }
        files
    }

    /// Re-read the config file this host was built from (see [`Host::reload`]).
    pub fn reload_from_file(&self) -> Result<ReloadReport> {
        let source = self
            .inner
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .source
            .clone();
        let Some(path) = source else {
            return Err(Error::Config(ConfigError {
                file: None,
                line: None,
                message: "this host was not built from a config file; use Host::reload".into(),
            }));
        };
        self.reload(HostConfig::from_file(&path)?)
    }

    /// Apply a new configuration without stopping.
    ///
    /// - A provider whose configuration, resolved values (`{ env }`/`{ file }`
    ///   references are re-read) and plugin bytes are unchanged is kept as it is,
    ///   cache included.
    /// - A changed or new provider is loaded; on success it replaces the old version
    ///   and the old version's cached credentials are dropped. On failure (bad
    ///   provider config, missing or broken plugin, wrong sha256) **the old version
    ///   keeps serving** and the failure is reported here and in [`Host::status`].
    /// - A removed provider stops: its calls fail with [`Error::UnknownProvider`].
    /// - Calls already running finish on the version they started with.
    ///
    /// Runtime settings (`[runtime]`) are fixed when the host is built; a changed
    /// `[runtime]` section is reported as an error and nothing is applied. (With
    /// [`Host::reload_from_file`], a file that does not parse or validate is an
    /// error too, and nothing is applied.)
    ///
    /// Loading compiles; call this from a blocking context (e.g.
    /// `tokio::task::spawn_blocking`) in async code.
    pub fn reload(&self, config: HostConfig) -> Result<ReloadReport> {
        let mut current = self.inner.config.lock().unwrap_or_else(|e| e.into_inner());
        config.validate_runtime()?;
        if config.runtime != current.runtime {
            return Err(Error::Config(ConfigError {
                file: config.source.clone(),
                line: None,
                message: "runtime: settings changed; they apply only at start, restart to apply them (nothing was reloaded)".into(),
            }));
        }
        if config.fleet != current.fleet {
            tracing::warn!(
                "fleet: settings changed; they apply only at start (the running fleet is kept; restart to apply them)"
            );
        }
        #[cfg(feature = "fleet")]
        let running_lease = self
            .inner
            .fleet
            .as_ref()
            .map(|f| u64::try_from(f.lease().as_millis()).unwrap_or(u64::MAX));
        let old = self.snapshot();
        // Removed providers give their pool reservation back first, so a rename
        // or a quota moved between providers fits.
        for name in old.keys().filter(|n| !config.providers.contains_key(*n)) {
            self.inner.runtime.release(name);
        }
        let mut report = ReloadReport::default();
        let mut next = Providers::new();
        for (name, p) in &config.providers {
            let previous = match old.get(name) {
                Some(Slot::Ready { ready, .. }) => Some(ready.clone()),
                _ => None,
            };
            // Without `fleet` the closure has nothing to check but stays the seam.
            #[cfg_attr(not(feature = "fleet"), allow(clippy::bind_instead_of_map))]
            let attempt = config
                .validate_provider(name)
                .and_then(|()| {
                    // Against the lease of the fleet that runs (a changed
                    // `[fleet]` applies only at restart).
                    #[cfg(feature = "fleet")]
                    if let Some(lease_ms) = running_lease {
                        config::check_state_lease(config.source.as_deref(), name, p, lease_ms)?;
                    }
                    Ok(())
                })
                .map_err(Error::from)
                .and_then(|()| provider_spec(&config, name, p));
            let unchanged = match (&attempt, &previous) {
                (Ok((spec, identity)), Some(prev)) => {
                    prev.identity.config == identity.config
                        && prev.identity.values == identity.values
                        && prev.identity.state_file == identity.state_file
                        && plugin_digest(&spec.plugin).as_deref()
                            == Some(prev.identity.plugin_sha256.as_str())
                        && p.candidate
                            .as_ref()
                            .map(|c| plugin_digest(&config.resolve(&c.plugin)))
                            == prev
                                .identity
                                .candidate_sha256
                                .as_ref()
                                .map(|s| Some(s.clone()))
                }
                _ => false,
            };
            if unchanged && let Some(prev) = previous {
                report.unchanged.push(name.clone());
                next.insert(
                    name.clone(),
                    Slot::Ready {
                        ready: prev,
                        reload_error: None,
                    },
                );
                continue;
            }
            let loaded = attempt.and_then(|resolved| {
                load_provider(
                    &self.inner.runtime,
                    &config,
                    &self.inner.metrics,
                    self.inner.shared.as_ref(),
                    &self.inner.link,
                    name,
                    p,
                    resolved,
                    previous.as_deref(),
                )
            });
            let slot = match (loaded, previous) {
                (Ok(ready), previous) => {
                    tracing::info!(provider = %name, sha256 = ready.runtime.sha256(), "provider (re)loaded");
                    if previous.is_some() {
                        // Its cached credentials go after the swap (below).
                        report.updated.push(name.clone());
                    } else {
                        report.added.push(name.clone());
                    }
                    Slot::Ready {
                        ready: Arc::new(ready),
                        reload_error: None,
                    }
                }
                (Err(e), Some(prev)) => {
                    let why = e.to_string();
                    tracing::error!(provider = %name, error = %why, "reload failed; the previous version keeps serving");
                    report.failed.push((name.clone(), why.clone()));
                    Slot::Ready {
                        ready: prev,
                        reload_error: Some(why),
                    }
                }
                (Err(e), None) => {
                    let why = e.to_string();
                    tracing::error!(provider = %name, error = %why, "provider failed to load");
                    report.failed.push((name.clone(), why.clone()));
                    Slot::Failed(why)
                }
            };
            next.insert(name.clone(), slot);
        }
        for name in old.keys().filter(|n| !config.providers.contains_key(*n)) {
            tracing::info!(provider = %name, "provider removed");
            report.removed.push(name.clone());
        }
        let next = Arc::new(next);
        self.publish(next.clone());
        // The old versions' credentials go once no lookup can reach an old
        // version any more: dropped before the swap, a miss in between would
        // cache a credential of the old version for the new one.
        // (Added ones too: a name that comes back must not find keys that a
        // fetch of its earlier version left behind.)
        for name in report
            .updated
            .iter()
            .chain(&report.removed)
            .chain(&report.added)
        {
            self.inner.cache.remove_provider(name);
        }
        // Candidates no version serves any more give their pool reservation back
        // (after the swap: a failed reload keeps the old version and its
        // candidate).
        for (name, slot) in next.iter() {
            let serving = matches!(slot, Slot::Ready { ready, .. } if ready.rollout.is_some());
            if !serving && old.contains_key(name) {
                self.inner.runtime.release(&format!("{name}@candidate"));
            }
        }
        for name in old.keys().filter(|n| !next.contains_key(*n)) {
            self.inner.runtime.release(&format!("{name}@candidate"));
        }
        *current = config;
        tracing::info!(%report, "configuration reloaded");
        Ok(report)
    }

    /// Now, on the host's clock (the one expiry decisions use: the manual clock in
    /// tests, the backend's in a fleet).
    pub fn now(&self) -> SystemTime {
        self.inner.runtime.clock().now()
    }

    /// Like [`Host::status`], but also instantiates every loaded provider once and
    /// asks it to describe itself, so that a component whose start-up traps, or
    /// whose config breaks its declared schema, is reported too.
    pub async fn check(&self) -> BTreeMap<String, ProviderStatus> {
        let mut failed = BTreeMap::new();
        for (name, slot) in self.snapshot().iter() {
            if let Slot::Ready { ready, .. } = slot {
                match ready.runtime.describe(&self.inner.runtime).await {
                    Err(e) => {
                        failed.insert(name.clone(), e.to_string());
                    }
                    Ok(d) if !d.violations.is_empty() => {
                        failed.insert(name.clone(), self.schema_report(name, &d.violations));
                    }
                    Ok(_) => {}
                }
            }
        }
        let mut status = self.status();
        for (name, why) in failed {
            status.insert(name, ProviderStatus::Failed(why));
        }
        status
    }

    /// How provider `name`'s config breaks its schema, one line per key, each
    /// with the config file and the line of the key (of the provider's table for
    /// a missing key).
    fn schema_report(&self, name: &str, violations: &[crate::schema::Violation]) -> String {
        // The file is read after the config lock is released.
        let file = self
            .inner
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .source
            .clone();
        let text = file
            .as_deref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .unwrap_or_default();
        let line_of = config::key_lines(&text);
        let lines: Vec<String> = violations
            .iter()
            .map(|v| {
                let line = line_of(&["providers", name, "config", &v.key])
                    .or_else(|| line_of(&["providers", name, "config"]))
                    .or_else(|| line_of(&["providers", name]));
                let place = match (&file, line) {
                    (Some(f), Some(l)) => format!("{}:{l}: ", f.display()),
                    (Some(f), None) => format!("{}: ", f.display()),
                    (None, _) => String::new(),
                };
                format!("  {place}providers.{name}.config.{}: {}", v.key, v.problem)
            })
            .collect();
        format!(
            "provider `{name}`: the config does not fit the plugin's declared schema:\n{}",
            lines.join("\n")
        )
    }

    fn provider(&self, name: &str) -> Result<Arc<Ready>> {
        match self.snapshot().get(name) {
            Some(Slot::Ready { ready, .. }) => Ok(ready.clone()),
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
    ///
    /// The credential is shared (`Arc`): a hit copies nothing. (Use
    /// [`Host::handle`] for a provider asked on every request.)
    ///
    /// The future (`Send` and `Unpin`) looks the cache up when first polled: a
    /// fresh hit (before its refresh time) completes in that poll, allocating
    /// nothing when the request's scopes are already sorted and distinct; a miss,
    /// a refresh-ahead and a stale hit go through the boxed fetch path.
    pub fn get_credentials<'a>(
        &'a self,
        provider: &'a str,
        request: &'a Request,
    ) -> impl Future<Output = Result<Arc<Credentials>>> + Send + 'a {
        CredentialsFuture::start(Source::Host(self, provider), request, CredentialsOnly)
    }

    /// Like [`Host::get_credentials`], also saying whether the cache served it.
    pub fn get_credentials_traced<'a>(
        &'a self,
        provider: &'a str,
        request: &'a Request,
    ) -> impl Future<Output = Result<(Arc<Credentials>, Lookup)>> + Send + 'a {
        CredentialsFuture::start(Source::Host(self, provider), request, Traced)
    }

    /// The hit path by name: no lock, no reference count touched but this
    /// thread's.
    fn hit_by_name(&self, provider: &str, request: &Request) -> Option<(Arc<Credentials>, Lookup)> {
        match self.inner.providers.load().get(provider) {
            Some(Slot::Ready { ready, .. }) => self.hit(ready, request),
            _ => None,
        }
    }

    /// The lookup by name that may fetch.
    async fn lookup_by_name(
        &self,
        provider: &str,
        request: &Request,
    ) -> Result<(Arc<Credentials>, Lookup)> {
        let ready = self.provider(provider)?;
        self.lookup(&ready, request).await
    }

    /// A fresh cached credential of `ready` for `request`, counted as a hit.
    fn hit(&self, ready: &Ready, request: &Request) -> Option<(Arc<Credentials>, Lookup)> {
        self.counted_hit(&ready.name, &ready.metrics, request)
    }

    /// A fresh cached credential of provider `name` for `request`, counted as a
    /// hit in `metrics` (the by-name and the handle paths).
    #[inline]
    fn counted_hit(
        &self,
        name: &Arc<str>,
        metrics: &ProviderMetrics,
        request: &Request,
    ) -> Option<(Arc<Credentials>, Lookup)> {
        let credentials = self.inner.cache.fresh_hit(&KeyRef::new(name, request))?;
        metrics.lookup(LookupKind::Hit);
        Some((credentials, Lookup::Hit))
    }

    /// The cache lookup of `ready` (fetching when needed), counted.
    async fn lookup(&self, ready: &Ready, request: &Request) -> Result<(Arc<Credentials>, Lookup)> {
        let key = KeyRef::new(&ready.name, request);
        let result = self
            .inner
            .cache
            .get(&key, request, &ready.cache, &ready.fetch)
            .await;
        ready.metrics.lookup(match &result {
            Ok((_, Lookup::Hit)) => LookupKind::Hit,
            Ok((_, Lookup::Joined)) => LookupKind::Join,
            Ok((_, Lookup::Stale)) => LookupKind::Stale,
            Ok((_, Lookup::Fetched(_))) => LookupKind::Miss,
            // A case added later: counted as a fetch until it has its own counter.
            Ok(_) => LookupKind::Miss,
            Err(_) => LookupKind::Error,
        });
        // A reload swapped this provider's version while this fetch ran: the
        // caller keeps what it asked for, but the cache must not serve the old
        // version's credential under the new one (or keep a removed provider's).
        if let Ok((fetched, Lookup::Fetched(_))) = &result
            && !self.serves(ready)
        {
            self.inner.cache.drop_if(&key, |c| c == &**fetched);
        }
        result
    }

    /// Whether `ready` is the version of its provider that serves now.
    fn serves(&self, ready: &Ready) -> bool {
        matches!(
            self.inner.providers.load().get(&*ready.name),
            Some(Slot::Ready { ready: current, .. }) if std::ptr::eq(&**current, ready)
        )
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
        let started = std::time::Instant::now();
        // The version that serves this key decides.
        let version = match &ready.rollout {
            Some(r) if r.takes(request) => &r.candidate,
            _ => &ready.runtime,
        };
        let result = version
            .handle_security_error(&self.inner.runtime, request, credentials, error)
            .await;
        ready
            .metrics
            .security_error(error.kind, started.elapsed(), &result);
        // A plugin's retry-after (up to 2^64−1 ms) never leaves the host unclamped.
        let decision = ready.retry.clamp(result?);
        if decision == Decision::RefreshAndRetry {
            // The shared entry first: were the in-memory entry dropped first, a
            // concurrent miss here could read the rejected credential back from
            // the shared cache. (A rejected credential never stays shared, even
            // when this process suppresses its own refresh.)
            if let Some(tier) = &ready.shared {
                tier.invalidate(request, credentials).await;
            }
            let key = KeyRef::new(&ready.name, request);
            let outcome = self.inner.cache.invalidate_if(
                &key,
                credentials,
                std::time::Duration::from_millis(ready.cache.min_reauth_interval_ms),
            );
            tracing::debug!(provider, ?outcome, "security error: refresh-and-retry");
            if outcome == Invalidation::Suppressed {
                // The key was force-refreshed moments ago and the server rejects
                // this credential too: another refresh would not help and would
                // load the IdP. The caller gets `fail`.
                return Ok(Decision::Fail);
            }
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
        let ready = self
            .provider(provider)
            .map_err(OperationError::Credentials)?;
        let policy = ready.retry;
        ready.retry_budget.deposit();
        let started = tokio::time::Instant::now();
        let (mut attempts, mut reauths, mut waits) = (0u32, 0u32, 0u32);
        let mut request = request.clone();
        loop {
            let credentials = self
                .get_credentials(provider, &request)
                .await
                .map_err(OperationError::Credentials)?;
            attempts += 1;
            let (error, source) = match op(Credentials::clone(&credentials)).await {
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
            let action = match policy.next(decision, reauths, waits, started.elapsed()) {
                // Every re-run comes out of the provider's retry budget, shared by
                // all its operations: N operations rejected at once re-run only
                // as far as the budget goes.
                Action::Reauthenticate | Action::Wait(_) if !ready.retry_budget.withdraw() => {
                    ready.metrics.retry_refused();
                    tracing::warn!(provider, %error, "retry budget spent (retry.retry_ratio, retry.min_retries_per_sec): not re-running the operation");
                    Action::GiveUp
                }
                action => action,
            };
            match action {
                Action::Reauthenticate => {
                    reauths += 1;
                    request.reason = Reason::AfterSecurityError;
                    ready.metrics.reauthenticated();
                }
                Action::Wait(wait) => {
                    waits += 1;
                    ready.metrics.waited();
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

    /// Count one operation of `provider` toward its retry budget
    /// ([`Host::with_credentials`] does it; the sidecar does it per credentials
    /// request).
    #[doc(hidden)]
    pub fn record_operation(&self, provider: &str) {
        if let Ok(ready) = self.provider(provider) {
            ready.retry_budget.deposit();
        }
    }

    /// Take one re-run of an operation from `provider`'s retry budget; `false`
    /// (counted in the metrics) when the budget is spent.
    #[doc(hidden)]
    pub fn take_retry(&self, provider: &str) -> bool {
        match self.provider(provider) {
            Ok(ready) => {
                let ok = ready.retry_budget.withdraw();
                if !ok {
                    ready.metrics.retry_refused();
                }
                ok
            }
            Err(_) => false,
        }
    }

    /// The host's per-provider counters (every provider it has had). Scrape them
    /// with the host's gauges through [`Host::register_metrics`] or
    /// [`Host::render_metrics`].
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Register the host's metrics — the providers' counters ([`Host::metrics`])
    /// and the host's gauges: cache entries, open circuit breakers, egress
    /// requests per provider, instances, call slots, the fleet's, build info —
    /// into an embedder's own `prometheus-client` registry (re-exported as
    /// [`crate::metrics::prometheus_client`]). Encoded at each scrape; a dropped
    /// host reports nothing. Two hosts in one registry need a label apart
    /// (`registry.sub_registry_with_label(("host", "a".into()))`), or their
    /// families collide.
    #[cfg(feature = "metrics")]
    pub fn register_metrics(
        &self,
        registry: &mut crate::metrics::prometheus_client::registry::Registry,
    ) {
        registry.register_collector(Box::new(HostCollector(Arc::downgrade(&self.inner))));
    }

    /// Every metric of [`Host::register_metrics`] in the OpenMetrics text format
    /// (content type [`crate::metrics::exposition::CONTENT_TYPE`]).
    #[cfg(feature = "metrics")]
    pub fn render_metrics(&self) -> String {
        crate::metrics::exposition::render(HostCollector(Arc::downgrade(&self.inner)))
    }

    #[cfg(feature = "metrics")]
    fn encode_metrics(
        &self,
        encoder: &mut crate::metrics::prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        use crate::metrics::exposition::{MetricType::*, family};
        self.inner.metrics.encode_families(encoder)?;
        let providers = self.snapshot();
        let ready = || {
            providers.iter().filter_map(|(name, slot)| match slot {
                Slot::Ready { ready, .. } => Some((name.as_str(), ready)),
                Slot::Failed(_) => None,
            })
        };
        family(
            encoder,
            "reauth_cache_entries",
            "Keys the token cache holds.",
            Gauge,
            |s| s.gauge(&[], self.inner.cache.len()),
        )?;
        family(
            encoder,
            "reauth_breaker_open",
            "Whether the provider's circuit breaker is open (cooling down).",
            Gauge,
            |s| {
                for (name, ready) in ready() {
                    let open = ready.runtime.breaker().cooling_down_for.is_some();
                    s.gauge(&[("provider", name)], u32::from(open))?;
                }
                Ok(())
            },
        )?;
        family(
            encoder,
            "reauth_rollout_rolled_back",
            "Whether the provider's candidate version was rolled back (absent: no candidate).",
            Gauge,
            |s| {
                for (name, ready) in ready() {
                    if let Some(r) = &ready.rollout {
                        s.gauge(&[("provider", name)], u32::from(r.rolled_back()))?;
                    }
                }
                Ok(())
            },
        )?;
        family(
            encoder,
            "reauth_egress_requests_total",
            "HTTP requests plugins made (sent) and the host refused (denied: host not allowed, plain http, userinfo…).",
            Counter,
            |s| {
                for (name, ready) in ready() {
                    let (sent, denied) = ready.runtime.egress_counts();
                    let (failed, _) = ready.runtime.egress_failures_and_bytes();
                    for (outcome, n) in [("sent", sent), ("denied", denied), ("failed", failed)] {
                        s.counter(&[("provider", name), ("outcome", outcome)], n)?;
                    }
                }
                Ok(())
            },
        )?;
        // Per provider version: these restart from 0 when a reload replaces it
        // (a counter reset, which rate() handles).
        let mut per_provider = |name: &str,
                                kind,
                                help: &str,
                                value: &dyn Fn(&Ready) -> Vec<Sample>|
         -> std::fmt::Result {
            family(encoder, name, help, kind, |s| {
                for (provider, ready) in ready() {
                    for (k, n) in value(ready) {
                        match k {
                            Some(k) => {
                                s.counter_or_gauge(kind, &[("provider", provider), ("kind", k)], n)?
                            }
                            None => s.counter_or_gauge(kind, &[("provider", provider)], n)?,
                        }
                    }
                }
                Ok(())
            })
        };
        per_provider(
            "reauth_egress_response_bytes_total",
            Counter,
            "Response body bytes the provider's HTTP requests received.",
            &|r| vec![(None, r.runtime.egress_failures_and_bytes().1)],
        )?;
        per_provider(
            "reauth_instances_total",
            Counter,
            "Calls by instance: fresh (instantiated for the call) or reused (kept, instances.reuse).",
            &|r| {
                let stats = r.runtime.stats();
                vec![
                    (Some("fresh"), stats.instantiations.load(Ordering::Relaxed)),
                    (Some("reused"), stats.reused.load(Ordering::Relaxed)),
                ]
            },
        )?;
        per_provider(
            "reauth_call_slots_in_use",
            Gauge,
            "Calls running now, of limits.max_concurrent_calls.",
            &|r| vec![(None, u64::from(r.runtime.call_slots_in_use()))],
        )?;
        per_provider(
            "reauth_call_slot_waits_total",
            Counter,
            "Calls that waited for a call slot (past limits.queue_timeout_ms they fail as busy).",
            &|r| vec![(None, r.runtime.stats().slot_waits.load(Ordering::Relaxed))],
        )?;
        let by_provider = self.inner.cache.len_by_provider();
        family(
            encoder,
            "reauth_cache_provider_entries",
            "Keys the token cache holds for the provider.",
            Gauge,
            |s| {
                for (name, _) in ready() {
                    let n = by_provider.get(name).copied().unwrap_or(0);
                    s.gauge(&[("provider", name)], n)?;
                }
                Ok(())
            },
        )?;
        #[cfg(feature = "fleet")]
        if let Some(fleet) = &self.inner.fleet {
            fleet.encode_metrics(encoder)?;
        }
        family(
            encoder,
            "reauth_build_info",
            "The reauth version serving.",
            Info,
            |s| s.info(&[("version", env!("CARGO_PKG_VERSION"))]),
        )
    }

    /// The fleet this host belongs to, if `[fleet]` (or [`HostBuilder::fleet`])
    /// made it join one.
    #[cfg(feature = "fleet")]
    pub fn fleet(&self) -> Option<&crate::store::fleet::Fleet> {
        self.inner.fleet.as_ref()
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

/// The version of `name` serving in `providers`, if it is loaded.
fn serving(providers: &Providers, name: &str) -> Option<Arc<Ready>> {
    match providers.get(name) {
        Some(Slot::Ready { ready, .. }) => Some(ready.clone()),
        _ => None,
    }
}

/// What the handles of one provider share: the version that serves, swapped by
/// every reload.
struct HandleCell {
    /// Whether a version serves (`ready` is `Some`): all a cache hit needs to
    /// know, read without touching the `ArcSwap`'s per-thread debt slots.
    serving: AtomicBool,
    ready: arc_swap::ArcSwapOption<Ready>,
}

/// One provider of a [`Host`], looked up once ([`Host::handle`]). Cheap to clone;
/// follows reloads.
#[derive(Clone)]
pub struct ProviderHandle {
    host: Host,
    name: Arc<str>,
    /// The provider's counters (one block per provider name, kept across reloads).
    metrics: Arc<ProviderMetrics>,
    cell: Arc<HandleCell>,
}

impl std::fmt::Debug for ProviderHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderHandle")
            .field("provider", &self.name)
            .field("loaded", &self.cell.serving.load(Ordering::Acquire))
            .finish()
    }
}

impl ProviderHandle {
    /// The provider's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// [`Host::get_credentials`] for this provider.
    pub fn get_credentials<'a>(
        &'a self,
        request: &'a Request,
    ) -> impl Future<Output = Result<Arc<Credentials>>> + Send + 'a {
        CredentialsFuture::start(Source::Handle(self), request, CredentialsOnly)
    }

    /// [`Host::get_credentials_traced`] for this provider.
    pub fn get_credentials_traced<'a>(
        &'a self,
        request: &'a Request,
    ) -> impl Future<Output = Result<(Arc<Credentials>, Lookup)>> + Send + 'a {
        CredentialsFuture::start(Source::Handle(self), request, Traced)
    }

    /// The hit path: whether a version serves (a load of a line that only
    /// reloads write), then the cache (no lock, no reference count touched but
    /// this thread's). A reload drops the keys of a version it replaces.
    fn hit(&self, request: &Request) -> Option<(Arc<Credentials>, Lookup)> {
        if !self.cell.serving.load(Ordering::Acquire) {
            return None;
        }
        self.host.counted_hit(&self.name, &self.metrics, request)
    }

    /// The lookup that may fetch.
    async fn lookup(&self, request: &Request) -> Result<(Arc<Credentials>, Lookup)> {
        match self.cell.ready.load_full() {
            Some(ready) => self.host.lookup(&ready, request).await,
            // Not loaded (or removed): the host says why.
            None => self.host.lookup_by_name(&self.name, request).await,
        }
    }

    /// [`Host::handle_security_error`] for this provider.
    pub async fn handle_security_error(
        &self,
        request: &Request,
        credentials: &Credentials,
        error: &SecurityError,
    ) -> Result<Decision> {
        self.host
            .handle_security_error(&self.name, request, credentials, error)
            .await
    }

    /// [`Host::with_credentials`] for this provider.
    pub async fn with_credentials<T, E, F, Fut>(
        &self,
        request: &Request,
        op: F,
    ) -> std::result::Result<T, OperationError<E>>
    where
        F: FnMut(Credentials) -> Fut,
        Fut: Future<Output = std::result::Result<T, Rejection<E>>>,
    {
        self.host.with_credentials(&self.name, request, op).await
    }
}

/// Where a [`CredentialsFuture`] looks.
#[derive(Clone, Copy)]
enum Source<'a> {
    Host(&'a Host, &'a str),
    Handle(&'a ProviderHandle),
}

/// The result of a lookup with the fetch path boxed: what may fetch.
type Fetching<'a> = Pin<Box<dyn Future<Output = Result<(Arc<Credentials>, Lookup)>> + Send + 'a>>;

/// What a [`CredentialsFuture`] answers with, made from the lookup's result: a
/// zero-sized type per public function (a function pointer here cost an
/// indirect call per hit, and kept the hit path from being inlined into it).
trait Answer: Copy + Unpin {
    type Output;
    fn answer(self, hit: (Arc<Credentials>, Lookup)) -> Self::Output;
}

/// The credential alone (`get_credentials`).
#[derive(Clone, Copy)]
struct CredentialsOnly;

impl Answer for CredentialsOnly {
    type Output = Arc<Credentials>;
    #[inline]
    fn answer(self, (credentials, _): (Arc<Credentials>, Lookup)) -> Arc<Credentials> {
        credentials
    }
}

/// The credential and where it came from (`get_credentials_traced`).
#[derive(Clone, Copy)]
struct Traced;

impl Answer for Traced {
    type Output = (Arc<Credentials>, Lookup);
    #[inline]
    fn answer(self, hit: (Arc<Credentials>, Lookup)) -> (Arc<Credentials>, Lookup) {
        hit
    }
}

/// The future of `get_credentials`: small (a few pointers), it looks the cache
/// up when first polled, so a hit completes in that poll with nothing allocated
/// or moved but the result; only a miss boxes the lookup that fetches.
enum CredentialsFuture<'a, A> {
    Start {
        source: Source<'a>,
        request: &'a Request,
        answer: A,
    },
    Fetching {
        lookup: Fetching<'a>,
        answer: A,
    },
    Done,
}

impl<'a, A> CredentialsFuture<'a, A> {
    fn start(source: Source<'a>, request: &'a Request, answer: A) -> Self {
        CredentialsFuture::Start {
            source,
            request,
            answer,
        }
    }
}

impl<A: Answer> Future for CredentialsFuture<'_, A> {
    type Output = Result<A::Output>;

    #[inline]
    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<A::Output>> {
        // Unpin: it holds references, a zero-sized answer and a box.
        let this = self.get_mut();
        if let CredentialsFuture::Start {
            source,
            request,
            answer,
        } = *this
        {
            let hit = match source {
                Source::Host(host, provider) => host.hit_by_name(provider, request),
                Source::Handle(handle) => handle.hit(request),
            };
            if let Some(hit) = hit {
                *this = CredentialsFuture::Done;
                return std::task::Poll::Ready(Ok(answer.answer(hit)));
            }
            let lookup: Fetching<'_> = match source {
                Source::Host(host, provider) => Box::pin(host.lookup_by_name(provider, request)),
                Source::Handle(handle) => Box::pin(handle.lookup(request)),
            };
            *this = CredentialsFuture::Fetching { lookup, answer };
        }
        match this {
            CredentialsFuture::Fetching { lookup, answer } => match lookup.as_mut().poll(cx) {
                std::task::Poll::Ready(result) => {
                    let answer = *answer;
                    *this = CredentialsFuture::Done;
                    std::task::Poll::Ready(result.map(|hit| answer.answer(hit)))
                }
                std::task::Poll::Pending => std::task::Poll::Pending,
            },
            _ => panic!("a get_credentials future polled after it completed"),
        }
    }
}
