//! The provider runtime: one wasmtime [`Engine`] per host, one compiled component
//! and `InstancePre` per provider, and a **fresh `Store` per call**.
//!
//! Why a fresh Store per call: a provider handles secrets for many subjects. A new
//! Store (instantiated from the pre-linked component, a few microseconds with the
//! pooling allocator) guarantees that nothing one call leaves in linear memory is
//! visible to the next, and that a trap never poisons later calls — a Store that
//! trapped cannot be re-entered anyway. Long-lived state goes through the explicit,
//! host-persisted `state` interface instead.
//!
//! Opt-in exception (`[providers.<name>.instances] reuse = true`): for providers
//! whose instances are expensive (Python, JavaScript), an instance that finished a
//! call cleanly is kept and serves later calls of the **same subject only**, until
//! `max_calls`; any trap, timeout or limit hit discards it, and deadline, fuel and
//! the limit record are re-armed for every call.
//!
//! Each call runs under an epoch deadline (a running guest yields to the executor
//! every tick, and traps at its deadline) wrapped in a tokio timeout (a call stuck
//! waiting on the network is cancelled), with a memory
//! cap, optional fuel, and caps on the credential it returns, the HTTP bodies it
//! reads and the output it writes; every limit hit is an [`Error::Limit`] naming
//! the provider and the limit. The WASI context inherits nothing: no directories,
//! no environment, no arguments, no sockets; stdout/stderr are captured into
//! `tracing` under the provider's name with known secret values redacted; HTTP
//! leaves only through the allow-list in [`egress`]. A provider whose calls keep
//! faulting is cooled down by its circuit breaker.
//!
//! Loading checks integrity: the optional `sha256` pin (also for precompiled
//! artifacts, which are only used for exactly the bytes they were compiled from,
//! by an engine with the same settings), and that the component fits the
//! `reauth:provider` world — a mismatch lists the missing export and every import
//! the host does not offer.

mod artifact;
mod bindings;
mod breaker;
mod call;
mod capture;
pub mod egress;
mod engine;
mod integrity;
mod limiter;
mod pool;
mod redaction;
pub(crate) mod state;

pub use breaker::BreakerStatus;
pub(crate) use call::StoreState;
pub(crate) use engine::WasiWallClock;
pub use engine::{
    CompileError, CompileSource, EPOCH_TICK, EngineError, Runtime, RuntimeOptions,
    SECRET_SAFE_LOG_DIRECTIVES, artifacts_can_be_mapped,
};
use pool::{Captured, Warm};

#[doc(hidden)]
pub use bindings::fuzzing;

use crate::budget::FetchBucket;
use crate::clock::Clock;
use crate::config::{BreakerConfig, InstancesConfig, LimitsConfig, RateConfig};
use crate::error::{Error, LimitKind};

/// A boxed cause, inside the runtime (the public API wraps it in
/// [`crate::error::Cause`]).
type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
use crate::secret::Secret;
use crate::types;
use bindings::{Provider, ProviderPre, wit};
use breaker::Breaker;
use capture::CapturePipe;
use egress::{EgressHooks, EgressPolicy, HostPattern};
use integrity::ArtifactMeta;
use limiter::{CallHits, CallLimiter};
use redaction::Redactor;
use sha2::{Digest, Sha256};
use state::{CallState, ProviderState, StateFault};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::UNIX_EPOCH;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap,
    UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_config::{WasiConfig, WasiConfigVariables};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// At most this much captured output is logged per stream and call.
const OUTPUT_LOGGED: usize = 4096;

/// Largest in-memory size of one `wasi:http` `fields` object (headers) a plugin
/// may build; with `limits.max_host_resources` this bounds the header memory the
/// host holds for one call.
const FIELD_SIZE_LIMIT: usize = 64 * 1024;

/// Core instances one component may create (Python and JavaScript components
/// use a handful; a component needing more is refused at load).
const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 32;
/// Linear memories one component may have.
const MAX_MEMORIES_PER_COMPONENT: u32 = 4;
/// Tables one component may have.
const MAX_TABLES_PER_COMPONENT: u32 = 32;

/// Largest `get-random-bytes` / `get-insecure-random-bytes` request: a host call
/// cannot be interrupted, so its work is kept short (64 MiB took ~0.5 s).
const MAX_RANDOM_BYTES: u64 = 64 * 1024;

/// Everything needed to load one provider.
#[derive(Debug, Clone)]
#[allow(
    clippy::exhaustive_structs,
    reason = "the runtime's complete input for one provider, built from a `ProviderConfig` by `Host` (and by the conformance kit)"
)]
pub struct ProviderSpec {
    /// Provider name.
    pub name: String,
    /// The component file.
    pub plugin: PathBuf,
    /// Expected hex SHA-256, if pinned.
    pub sha256: Option<String>,
    /// Egress allow-list.
    pub allowed_hosts: Vec<HostPattern>,
    /// Allow plain http to non-loopback hosts.
    pub allow_http: bool,
    /// Resolved config values.
    pub config: Vec<(String, Secret)>,
    /// Limits.
    pub limits: LimitsConfig,
    /// Circuit breaker.
    pub breaker: BreakerConfig,
    /// Instance reuse.
    pub instances: InstancesConfig,
    /// Where its `state` is persisted (`None`: in memory).
    pub state_file: Option<PathBuf>,
    /// Whether its state lives in the runtime's shared store (a fleet's) when
    /// there is one ([`Runtime::set_state_store`]).
    pub shared_state: bool,
    /// Config keys whose values are secret (redacted wherever plugin-controlled
    /// text is logged or reported); see [`crate::config::is_secret_key`].
    pub secret_keys: Vec<String>,
    /// Config keys whose values the host supplies at every fetch (another
    /// provider's credential, `{ credential = … }`): present for the schema check,
    /// passed in by [`ProviderRuntime::get_credentials_with`].
    pub credential_keys: Vec<String>,
    /// The budget of fetches (`[providers.<name>.rate]`).
    pub rate: RateConfig,
}

/// Call counters of one provider.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct CallStats {
    /// `get-credentials` calls made.
    pub get_credentials: AtomicU64,
    /// `handle-security-error` calls made.
    pub handle_security_error: AtomicU64,
    /// Calls that trapped, timed out, hit a limit or failed to instantiate.
    pub faults: AtomicU64,
    /// Calls refused while the circuit breaker was open.
    pub refused: AtomicU64,
    /// Instances created (one per call unless `instances.reuse` is on).
    pub instantiations: AtomicU64,
    /// Calls served by a kept instance (`instances.reuse`).
    pub reused: AtomicU64,
    /// Calls that had to wait for a call slot (`limits.max_concurrent_calls`).
    pub slot_waits: AtomicU64,
}

/// One loaded provider: its compiled component, pre-linked, plus its sandbox
/// settings. Every call gets a fresh Store, unless `instances.reuse` is on.
pub struct ProviderRuntime {
    name: Arc<str>,
    pre: ProviderPre<StoreState>,
    config: Arc<WasiConfigVariables>,
    egress: Arc<EgressPolicy>,
    state: Arc<ProviderState>,
    limits: LimitsConfig,
    sha256: String,
    source: CompileSource,
    stats: CallStats,
    breaker: Breaker,
    /// Config values, redacted from captured output and provider messages.
    redactor: Redactor,
    instances: InstancesConfig,
    /// Idle instances kept for reuse, least recently used first.
    idle: Mutex<Vec<Warm>>,
    /// The bulkhead: one permit per call that may run at once
    /// (`limits.max_concurrent_calls`).
    call_slots: Arc<Semaphore>,
    /// Pool instances reserved for this provider (see [`Runtime::reserve`]).
    reservation: u32,
    /// Resolved config values, checked against the provider's schema.
    settings: Vec<(String, Secret)>,
    /// What the component said about itself (`describe`), asked before its first
    /// call; shared with the egress redactor (declared secret keys).
    described: Arc<OnceLock<Described>>,
    /// Since when fetches fail, and how many did (one log line when they start
    /// failing, one when they recover).
    health: Mutex<Health>,
    /// Keys whose values come from other providers' credentials at every fetch.
    credential_keys: Vec<String>,
    /// The fetch budget (`None`: unlimited), kept by a reload that leaves
    /// `[rate]` as it was.
    bucket: Option<Arc<FetchBucket>>,
    rate: RateConfig,
    /// Where its budget waits and refusals are counted.
    metrics: OnceLock<Arc<crate::metrics::ProviderMetrics>>,
    /// The borrowed values of the calls running now (one entry per call and
    /// value, removed when the call ends), redacted like config values; shared
    /// with the egress redactor.
    borrowed: Arc<Mutex<Vec<(u64, Secret)>>>,
    /// Numbers the calls' entries in `borrowed`.
    borrow_ids: AtomicU64,
    /// The read lease on the artifact the component's code is mapped from, if
    /// it is (see [`artifact`]). The last field: dropped after `pre` and `idle`
    /// (every other reference to the component), so the file stays protected
    /// until the mapping is gone.
    _lease: Option<artifact::Lease>,
}

/// Whether a fetch still has to take its turn in the provider's fetch budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Budget {
    /// Take it now (wait for it, or fail with [`Error::Throttled`]).
    Take,
    /// The caller took it already ([`ProviderRuntime::take_fetch_budget`]).
    Taken,
}

/// Removes a call's borrowed values from the redaction set when the call ends.
struct BorrowedGuard<'a> {
    set: &'a Mutex<Vec<(u64, Secret)>>,
    id: u64,
}

impl Drop for BorrowedGuard<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(id, _)| *id != self.id);
    }
}

#[derive(Debug, Default)]
struct Health {
    failing_since: Option<Instant>,
    failures: u64,
}

/// A provider's descriptor and what the host made of it.
#[derive(Debug)]
pub struct Described {
    /// Name, version, config schema and contract version.
    pub descriptor: Arc<crate::schema::Descriptor>,
    /// How the provider's config breaks its schema (empty when it fits, or when
    /// the provider declared none).
    pub violations: Vec<crate::schema::Violation>,
    /// Values of the keys the provider declared secret.
    secrets: Vec<Secret>,
}

impl std::fmt::Debug for ProviderRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderRuntime")
            .field("name", &self.name)
            .field("sha256", &self.sha256)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl ProviderRuntime {
    /// Read, verify, compile and pre-link the provider's component.
    pub fn load(runtime: &Runtime, spec: ProviderSpec) -> Result<Self, Error> {
        Self::load_replacing(runtime, spec, None)
    }

    /// Like [`ProviderRuntime::load`], taking over `previous`'s state store when it
    /// persists to the same place (a reload: both versions must share one store, and
    /// in-memory state must survive).
    pub(crate) fn load_replacing(
        runtime: &Runtime,
        spec: ProviderSpec,
        previous: Option<&ProviderRuntime>,
    ) -> Result<Self, Error> {
        let load_err = |source: BoxError| Error::Load {
            provider: spec.name.clone(),
            path: spec.plugin.clone(),
            source: source.into(),
        };
        if spec.limits.fuel.is_some() && !runtime.consume_fuel {
            return Err(load_err(
                "limits.fuel is set but this host's engine does not meter fuel".into(),
            ));
        }
        let pinned = |sha256: &str| match &spec.sha256 {
            Some(expected) if !expected.eq_ignore_ascii_case(sha256) => Err(load_err(
                format!("sha256 mismatch: expected {expected}, file has {sha256}").into(),
            )),
            _ => Ok(()),
        };
        // A plugin unchanged since it was last hashed, whose artifact is in the
        // cache: mapped without reading either file.
        let known = runtime
            .cache_dir
            .as_deref()
            .and_then(|dir| artifact::known_source_digest(dir, &spec.plugin));
        let mut mapped = None;
        if let Some(sha256) = &known {
            pinned(sha256)?;
            mapped = runtime.load_mapped(sha256);
        }
        // Declared before everything that refers to the component, so that on an
        // early return it is dropped after them (see `ProviderRuntime::_lease`).
        let lease: Option<artifact::Lease>;
        let (component, source, sha256) = match (mapped, known) {
            (Some((component, mapped_lease)), Some(sha256)) => {
                lease = Some(mapped_lease);
                (component, CompileSource::Cache, sha256)
            }
            (_, known) => {
                // One open file: its stamp before and after the read, and the
                // bytes in between, all of the same inode (whatever the path
                // names meanwhile); "now" taken before, so a write during the
                // read is never taken for a settled file.
                let fs_now = runtime.cache_dir.as_deref().and_then(artifact::fs_now);
                let (bytes, stamps) =
                    artifact::read_stamped(&spec.plugin).map_err(|e| load_err(Box::new(e)))?;
                let sha256 = hex::encode(Sha256::digest(&bytes));
                pinned(&sha256)?;
                if let (Some(dir), Some(now)) = (&runtime.cache_dir, fs_now) {
                    artifact::record_source_digest(dir, &spec.plugin, stamps, now, &sha256);
                }
                let mapped = match known {
                    // Tried just now, for these very bytes.
                    Some(k) if k == sha256 => None,
                    _ => runtime.load_mapped(&sha256),
                };
                match mapped {
                    Some((component, mapped_lease)) => {
                        lease = Some(mapped_lease);
                        (component, CompileSource::Cache, sha256)
                    }
                    None => {
                        lease = None;
                        let (component, source) =
                            runtime.compile_or_load(&bytes, &sha256).map_err(load_err)?;
                        (component, source, sha256)
                    }
                }
            }
        };
        let instance_pre = runtime.linker.instantiate_pre(&component).map_err(|e| {
            load_err(
                match integrity::world_mismatch(&runtime.engine, &component) {
                    Some(why) => why.into(),
                    None => format!("cannot link: {e:#}").into(),
                },
            )
        })?;
        let pre = ProviderPre::new(instance_pre).map_err(|e| {
            load_err(
                integrity::world_mismatch(&runtime.engine, &component)
                    .unwrap_or_else(|| {
                        format!("not a reauth:provider component (0.2.0 or 0.1.0): {e:#}")
                    })
                    .into(),
            )
        })?;
        let state = match (previous, runtime.state_store.get()) {
            (_, Some(store)) if spec.shared_state => {
                Arc::new(ProviderState::in_store(&spec.name, store.clone()))
            }
            (Some(p), None) if p.state.path() == spec.state_file.as_deref() => p.state.clone(),
            _ => Arc::new(
                ProviderState::open(
                    &spec.name,
                    spec.state_file.clone(),
                    runtime.state_keys.get(),
                )
                .map_err(|e| load_err(Box::new(e)))?,
            ),
        };
        let reservation =
            spec.limits
                .max_concurrent_calls
                .saturating_add(if spec.instances.reuse {
                    spec.instances.max_idle
                } else {
                    0
                });
        // While calls of the version this one replaces may still run, keep the
        // larger of both reservations (it shrinks at the next reload).
        let reservation = match previous {
            Some(p) => reservation.max(p.reservation),
            None => reservation,
        };
        runtime
            .reserve(&spec.name, reservation)
            .map_err(|why| load_err(why.into()))?;
        // A reload keeps the bulkhead when the quota is unchanged, so calls still
        // running on the old version count against the same slots.
        let call_slots = match previous {
            Some(p) if p.limits.max_concurrent_calls == spec.limits.max_concurrent_calls => {
                p.call_slots.clone()
            }
            _ => Arc::new(Semaphore::new(spec.limits.max_concurrent_calls as usize)),
        };
        let bucket = match previous {
            Some(p) if p.rate == spec.rate => p.bucket.clone(),
            _ => FetchBucket::new(&spec.rate).map(Arc::new),
        };
        let name: Arc<str> = Arc::from(spec.name.as_str());
        let mut redactor = Redactor::default();
        for (key, value) in &spec.config {
            if spec.secret_keys.contains(key) {
                redactor.add(value.expose());
            }
        }
        let described: Arc<OnceLock<Described>> = Arc::new(OnceLock::new());
        let borrowed: Arc<Mutex<Vec<(u64, Secret)>>> = Arc::default();
        let redact: egress::Redact = {
            let (redactor, state, described, borrowed) = (
                redactor.clone(),
                state.clone(),
                described.clone(),
                borrowed.clone(),
            );
            // Before `describe` said which keys are secret, every config value is.
            let undescribed = {
                let mut all = redactor.clone();
                for (_, value) in &spec.config {
                    all.add(value.expose());
                }
                all
            };
            Arc::new(move |text: &str| {
                let mut all = if described.get().is_some() {
                    redactor.clone()
                } else {
                    undescribed.clone()
                };
                for value in state.values() {
                    all.add(&value);
                }
                for (_, value) in borrowed.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    all.add(value.expose());
                }
                for value in described
                    .get()
                    .map(|d| d.secrets.as_slice())
                    .unwrap_or_default()
                {
                    all.add(value.expose());
                }
                all.redact(text).into_owned()
            })
        };
        let timeout = Duration::from_millis(spec.limits.timeout_ms);
        Ok(ProviderRuntime {
            pre,
            config: Arc::new(
                spec.config
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.expose()))
                    .collect(),
            ),
            egress: Arc::new(EgressPolicy {
                provider: name.clone(),
                allowed: spec.allowed_hosts,
                allow_http: spec.allow_http,
                connect_timeout: Duration::from_millis(spec.limits.connect_timeout_ms).min(timeout),
                first_byte_timeout: Duration::from_millis(spec.limits.first_byte_timeout_ms)
                    .min(timeout),
                max_response_bytes: spec.limits.max_response_bytes,
                sent: AtomicU64::new(0),
                denied: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                response_bytes: Arc::default(),
                in_flight: Arc::new(Semaphore::new(
                    spec.limits.max_provider_requests_in_flight as usize,
                )),
                max_per_call: spec.limits.max_requests_in_flight as usize,
                redact,
                last_failure: std::sync::Mutex::new(None),
            }),
            state,
            breaker: Breaker::new(&spec.breaker),
            limits: spec.limits,
            sha256,
            source,
            stats: CallStats::default(),
            redactor,
            instances: spec.instances,
            idle: Mutex::new(Vec::new()),
            call_slots,
            reservation,
            settings: spec.config,
            described,
            health: Mutex::new(Health::default()),
            credential_keys: spec.credential_keys,
            bucket,
            rate: spec.rate,
            metrics: OnceLock::new(),
            borrowed,
            borrow_ids: AtomicU64::new(0),
            name,
            _lease: lease,
        })
    }

    /// The provider's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Hex SHA-256 of the loaded component.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Whether the compiled code came from the precompiled cache.
    pub fn compile_source(&self) -> CompileSource {
        self.source
    }

    /// Call counters.
    pub fn stats(&self) -> &CallStats {
        &self.stats
    }

    /// The circuit breaker's state.
    pub fn breaker(&self) -> BreakerStatus {
        self.breaker.status()
    }

    /// Egress requests this provider made: `(let through, refused)`.
    pub fn egress_counts(&self) -> (u64, u64) {
        (
            self.egress.sent.load(Ordering::Relaxed),
            self.egress.denied.load(Ordering::Relaxed),
        )
    }

    /// Egress requests let through that failed in transport, and the response
    /// body bytes the plugin was given.
    pub fn egress_failures_and_bytes(&self) -> (u64, u64) {
        (
            self.egress.failed.load(Ordering::Relaxed),
            self.egress.response_bytes.load(Ordering::Relaxed),
        )
    }

    /// Call slots (`limits.max_concurrent_calls`) in use right now.
    pub fn call_slots_in_use(&self) -> u32 {
        let free = u32::try_from(self.call_slots.available_permits()).unwrap_or(u32::MAX);
        self.limits.max_concurrent_calls.saturating_sub(free)
    }

    /// Count this provider's state-lock waits in `metrics`.
    #[doc(hidden)]
    pub fn set_metrics(&self, metrics: Arc<crate::metrics::ProviderMetrics>) {
        self.state.set_metrics(metrics.clone());
        let _ = self.metrics.set(metrics);
    }
}
