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
mod capture;
pub mod egress;
mod integrity;
mod limits;
pub(crate) mod state;

pub use limits::BreakerStatus;

#[doc(hidden)]
pub use bindings::fuzzing;

use crate::budget::FetchBucket;
use crate::clock::Clock;
use crate::config::{BreakerConfig, InstancesConfig, LimitsConfig, RateConfig};
use crate::error::{BoxError, Error, LimitKind};
use crate::secret::Secret;
use crate::types;
use bindings::{Provider, ProviderPre, wit};
use capture::CapturePipe;
use egress::{EgressHooks, EgressPolicy, HostPattern};
use integrity::ArtifactMeta;
use limits::{Breaker, CallHits, CallLimiter, Redactor};
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

/// `tracing` filter directives that every subscriber of a process hosting
/// providers should add (the `reauth` binary does): wasmtime's generated WASI
/// bindings log every host call's arguments at TRACE — the URLs, headers and
/// bodies a plugin sends — and those carry secrets. Add them after the user's own
/// filter (`EnvFilter::add_directive`), so that `RUST_LOG=trace` stays safe.
pub const SECRET_SAFE_LOG_DIRECTIVES: &[&str] = &[
    "wasmtime_wasi_http::p2::bindings=off",
    "wasmtime_wasi::p2::bindings=off",
    "wasmtime_wasi_http::p3=off",
    "wasmtime_wasi::p3=off",
];

/// How often the epoch advances: the granularity of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

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

/// The per-call Store data.
pub(crate) struct StoreState {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: EgressHooks,
    config: Arc<WasiConfigVariables>,
    state: CallState,
    limiter: CallLimiter,
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for StoreState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// What `state` answers while the guest runs `describe` (which must not touch it:
/// `reauth check` has no side effects, and takes no state lock).
const DESCRIBE_NO_STATE: &str = "no state during `describe`";

/// The `state` interface of both contract versions: one implementation.
macro_rules! state_host {
    ($($state:path),*) => {$(
        impl $state for StoreState {
            async fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
                if self.hooks.describing {
                    return Ok(None);
                }
                self.state.get(&key).await
            }

            async fn set(
                &mut self,
                key: String,
                value: String,
            ) -> wasmtime::Result<Result<(), String>> {
                if self.hooks.describing {
                    return Ok(Err(DESCRIBE_NO_STATE.into()));
                }
                self.state.set(key, value).await
            }

            async fn delete(&mut self, key: String) -> wasmtime::Result<Result<(), String>> {
                if self.hooks.describing {
                    return Ok(Err(DESCRIBE_NO_STATE.into()));
                }
                self.state.delete(&key).await
            }
        }
    )*};
}
state_host!(
    bindings::v02::reauth::provider::state::Host,
    bindings::v01::reauth::provider0_1_0::state::Host
);

/// The WebAssembly engine could not be set up ([`Runtime::new`]).
#[derive(Debug, thiserror::Error)]
#[error("starting the WebAssembly engine: {0}")]
pub struct EngineError(#[source] BoxError);

impl EngineError {
    /// What failed, without this error's own context.
    pub(crate) fn into_cause(self) -> BoxError {
        self.0
    }
}

/// A component could not be compiled or loaded from the precompiled cache
/// ([`Runtime::compile`]); the message says which check or step failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CompileError(#[source] BoxError);

/// Settings of the shared engine.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Directory for precompiled artifacts; `None` compiles at every load.
    pub cache_dir: Option<PathBuf>,
    /// Largest linear memory any plugin may use (sizes the pooling allocator's slots).
    pub max_memory_bytes: u64,
    /// Meter fuel, so that providers may set `limits.fuel`. Default true. (Exposed
    /// to measure its cost; providers with a fuel limit fail to load without it.)
    pub consume_fuel: bool,
    /// Interrupt CPU-bound calls at their deadline. Default true. **Turning it off
    /// leaves an infinite loop in a plugin running forever**; it exists only to
    /// measure its cost.
    pub epoch_interruption: bool,
    /// Enforce `limits.memory_mib` per call. Default true. Without it only the
    /// pooling allocator's `max_memory_bytes` bounds a plugin; it exists only to
    /// measure its cost.
    pub limit_memory: bool,
    /// Component instances in the pool (`runtime.max_instances`), shared out as
    /// providers' reservations.
    pub max_instances: u32,
    /// How much of a linear memory (and, up to 64 KiB, of a table) is reset with
    /// `memset` when a call's instance goes away, instead of being returned to
    /// the kernel with `madvise`; every memory slot that was used keeps that
    /// much resident. Default 0 (`madvise` everything: least memory held, and
    /// no faster here with `memset` — see BENCHMARKS.md, miss path).
    pub keep_resident_bytes: usize,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            cache_dir: None,
            max_memory_bytes: crate::config::defaults::max_memory_mib() << 20,
            consume_fuel: true,
            epoch_interruption: true,
            limit_memory: true,
            max_instances: crate::config::defaults::max_instances(),
            keep_resident_bytes: 0,
        }
    }
}

/// The shared engine, linker and precompiled-artifact cache. Cheap to share; one per
/// host.
pub struct Runtime {
    engine: Engine,
    linker: Linker<StoreState>,
    cache_dir: Option<PathBuf>,
    engine_hash: String,
    clock: Arc<dyn Clock>,
    consume_fuel: bool,
    epoch_interruption: bool,
    limit_memory: bool,
    max_instances: u32,
    /// Instances reserved per provider name (see [`Runtime::reserve`]).
    reservations: Mutex<BTreeMap<String, u32>>,
    /// The key ring sealing providers' state files (see [`Runtime::set_state_keys`]).
    state_keys: std::sync::OnceLock<Arc<crate::store::KeyRing>>,
    /// Where every provider's state lives instead (a fleet), if set.
    state_store: std::sync::OnceLock<Arc<dyn crate::store::StateStore>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("cache_dir", &self.cache_dir)
            .field("max_instances", &self.max_instances)
            .finish_non_exhaustive()
    }
}

/// Where a provider's compiled code came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompileSource {
    /// Compiled now from the `.wasm` (and stored in the cache, if one is set).
    Compiled,
    /// Loaded from the precompiled-artifact cache.
    Cache,
}

impl Runtime {
    /// The clock plugins and the cache see.
    pub(crate) fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Build the engine (epoch interruption, pooling allocator), start its epoch
    /// ticker and link every interface a provider may import.
    pub fn new(options: RuntimeOptions, clock: Arc<dyn Clock>) -> Result<Self, EngineError> {
        Self::start(options, clock).map_err(EngineError)
    }

    fn start(options: RuntimeOptions, clock: Arc<dyn Clock>) -> Result<Self, BoxError> {
        let mut pool = PoolingAllocationConfig::new();
        let instances = options.max_instances.max(16);
        // Every component is bounded in the core instances, memories and tables it
        // may use (a bigger one is refused at load), and the pool holds that much
        // for each of its component instances: reserving component instances
        // (`Runtime::reserve`) then reserves everything else too, so no provider
        // can exhaust the core-instance, memory or table pools of the others.
        pool.max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
            .max_memories_per_component(MAX_MEMORIES_PER_COMPONENT)
            .max_tables_per_component(MAX_TABLES_PER_COMPONENT)
            .total_component_instances(instances)
            .total_core_instances(instances.saturating_mul(MAX_CORE_INSTANCES_PER_COMPONENT))
            .total_memories(instances.saturating_mul(MAX_MEMORIES_PER_COMPONENT))
            .total_tables(instances.saturating_mul(MAX_TABLES_PER_COMPONENT))
            .total_stacks(instances)
            .max_memory_size(usize::try_from(options.max_memory_bytes)?);
        // A fresh instance per call: the slot's memory is reset when the call
        // ends, by default all of it with `madvise`. `keep_resident_bytes` resets
        // that much with `memset` instead (the rest still `madvise`d). Not
        // with Linux's PAGEMAP_SCAN (faster: only dirty pages), because its scan
        // matches only pages in RAM: a dirty page swapped out at that moment
        // would be neither reset nor dropped, and the next instance in the slot
        // — maybe another provider's — would read it (wasmtime PR #14357).
        if options.keep_resident_bytes > 0 {
            pool.linear_memory_keep_resident(options.keep_resident_bytes)
                .table_keep_resident(options.keep_resident_bytes.min(64 << 10))
                .pagemap_scan(wasmtime::Enabled::No);
        }
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(options.epoch_interruption)
            .consume_fuel(options.consume_fuel)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            // Linear memories' initial images come from memory, never from a
            // mapped artifact file (see `artifact`: only the code is mapped, and
            // the guard can swap only that mapping for a copy).
            .force_memory_init_memfd(true);
        let engine = Engine::new(&config).map_err(|e| e.into_boxed_dyn_error())?;
        if options.epoch_interruption {
            spawn_epoch_ticker(&engine)?;
        }

        let mut linker = Linker::<StoreState>::new(&engine);
        let link = |r: wasmtime::Result<()>| r.map_err(|e| e.into_boxed_dyn_error());
        link(wasmtime_wasi::p2::add_to_linker_async(&mut linker))?;
        link(wasmtime_wasi_http::p2::add_only_http_to_linker_async(
            &mut linker,
        ))?;
        link(wasmtime_wasi_config::add_to_linker(
            &mut linker,
            |s: &mut StoreState| WasiConfig::from(&*s.config),
        ))?;
        // Both contract versions' `state` interfaces (0.2.0 and 0.1.0).
        link(bindings::v02::reauth::provider::state::add_to_linker::<
            _,
            HasSelf<_>,
        >(&mut linker, |s| s))?;
        link(
            bindings::v01::reauth::provider0_1_0::state::add_to_linker::<_, HasSelf<_>>(
                &mut linker,
                |s| s,
            ),
        )?;

        // Without a compiler the engine cannot say which artifacts it is
        // compatible with: `load` then tries this plugin's artifacts of any
        // engine, and wasmtime checks each one's header against this engine.
        #[cfg(feature = "cranelift")]
        let engine_hash = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut hasher);
            env!("CARGO_PKG_VERSION").hash(&mut hasher);
            format!("{:016x}", hasher.finish())
        };
        #[cfg(not(feature = "cranelift"))]
        let engine_hash = String::new();
        Ok(Runtime {
            engine,
            linker,
            cache_dir: options.cache_dir,
            engine_hash,
            clock,
            consume_fuel: options.consume_fuel,
            epoch_interruption: options.epoch_interruption,
            limit_memory: options.limit_memory,
            max_instances: instances,
            reservations: Mutex::new(BTreeMap::new()),
            state_keys: std::sync::OnceLock::new(),
            state_store: std::sync::OnceLock::new(),
        })
    }

    /// Seal providers' state files with `keys` (set once, before providers load).
    /// Without it, a provider with a state file uses the key ring beside its
    /// state directory ([`crate::store::default_key_file`]), created on first use.
    pub fn set_state_keys(&self, keys: Arc<crate::store::KeyRing>) {
        let _ = self.state_keys.set(keys);
    }

    /// Whether providers' state goes to a shared store ([`Runtime::set_state_store`]).
    pub fn has_state_store(&self) -> bool {
        self.state_store.get().is_some()
    }

    /// Keep every provider's state in `store` (a fleet's) instead of files in
    /// the state directory (set once, before providers load).
    pub fn set_state_store(&self, store: Arc<dyn crate::store::StateStore>) {
        let _ = self.state_store.set(store);
    }

    /// Reserve `count` pool instances for provider `name` (replacing its earlier
    /// reservation): the providers' reservations together never exceed
    /// `runtime.max_instances`, so a provider at its `max_concurrent_calls` can
    /// never take an instance another provider needs.
    pub(crate) fn reserve(&self, name: &str, count: u32) -> Result<(), String> {
        let mut reservations = self.reservations.lock().unwrap_or_else(|e| e.into_inner());
        let others: u64 = reservations
            .iter()
            .filter(|(n, _)| n.as_str() != name)
            .map(|(_, c)| u64::from(*c))
            .sum();
        if others + u64::from(count) > u64::from(self.max_instances) {
            return Err(format!(
                "its {count} instances (limits.max_concurrent_calls, plus instances.max_idle with reuse) do not fit: the other providers reserve {others} of runtime.max_instances = {}; raise runtime.max_instances or lower limits.max_concurrent_calls",
                self.max_instances
            ));
        }
        reservations.insert(name.to_string(), count);
        Ok(())
    }

    /// Give back provider `name`'s reservation (it was removed).
    pub(crate) fn release(&self, name: &str) {
        self.reservations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    /// Compile `bytes` (whose hex SHA-256 is `sha256`), or load the artifact the
    /// cache holds for exactly these bytes and this engine configuration.
    ///
    /// A cached artifact is used only if its meta names these source bytes and
    /// this engine, and the artifact's own digest matches; wasmtime then checks its
    /// header against the engine once more. Anything else is recompiled (and the
    /// cache entry rewritten), never trusted.
    pub fn compile(
        &self,
        bytes: &[u8],
        sha256: &str,
    ) -> Result<(Component, CompileSource), CompileError> {
        self.compile_or_load(bytes, sha256).map_err(CompileError)
    }

    fn compile_or_load(
        &self,
        bytes: &[u8],
        sha256: &str,
    ) -> Result<(Component, CompileSource), BoxError> {
        integrity::check_header(bytes)?;
        let Some(dir) = &self.cache_dir else {
            return Ok((self.compile_now(bytes)?, CompileSource::Compiled));
        };
        let path = self.artifact_path(dir, sha256);
        for (path, engine_hash) in self.artifact_candidates(dir, sha256, &path) {
            let loaded =
                ArtifactMeta::read_verified(&path, sha256, &engine_hash).and_then(|artifact| {
                    // SAFETY: the artifact was written by `Component::serialize` of an
                    // engine with the same compatibility hash for the component with
                    // this exact SHA-256 (both recorded in its meta, and its digest
                    // checked just now); the cache directory is created 0700 and
                    // owned by this user. wasmtime additionally checks the
                    // artifact's header against this engine's configuration. The
                    // bytes are in memory, so nothing done to the file later can
                    // reach the loaded code.
                    #[allow(unsafe_code)]
                    let component = unsafe { Component::deserialize(&self.engine, &artifact) };
                    component.map_err(|e| e.to_string())
                });
            match loaded {
                Ok(component) => return Ok((component, CompileSource::Cache)),
                Err(why) => {
                    tracing::warn!(path = %path.display(), "unusable precompiled artifact: {why}")
                }
            }
        }
        let component = self.compile_now(bytes)?;
        match component.serialize() {
            Ok(artifact) => {
                if let Err(e) = crate::store::file::private_dir(dir)
                    .and_then(|()| ArtifactMeta::write(&path, sha256, &artifact, &self.engine_hash))
                {
                    tracing::warn!(path = %path.display(), error = %e, "could not store precompiled artifact");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not serialize component"),
        }
        Ok((component, CompileSource::Compiled))
    }

    /// Where this engine's artifact for the plugin `sha256` lives in `dir`.
    fn artifact_path(&self, dir: &Path, sha256: &str) -> PathBuf {
        dir.join(format!("{sha256}-{}.cwasm", self.engine_hash))
    }

    /// The precompiled artifacts to try for the plugin `sha256`: this engine's
    /// (`exact`), or — in a build that cannot compile — every engine's.
    fn artifact_candidates(
        &self,
        dir: &Path,
        sha256: &str,
        exact: &Path,
    ) -> Vec<(PathBuf, String)> {
        if !self.engine_hash.is_empty() {
            return if exact.exists() {
                vec![(exact.to_path_buf(), self.engine_hash.clone())]
            } else {
                Vec::new()
            };
        }
        let prefix = format!("{sha256}-");
        let mut found: Vec<(PathBuf, String)> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let engine = name
                    .strip_prefix(&prefix)?
                    .strip_suffix(".cwasm")?
                    .to_string();
                Some((e.path(), engine))
            })
            .collect();
        found.sort();
        found
    }

    /// Map the cached artifact for the plugin `sha256` instead of reading it, if
    /// there is one and a read lease on it can be had (see [`artifact`]); `None`
    /// sends the caller to [`Runtime::compile_or_load`], which reads (or compiles).
    fn load_mapped(&self, sha256: &str) -> Option<(Component, artifact::Lease)> {
        let dir = self.cache_dir.as_ref()?;
        // Where no lease can be had, do not read the meta only to read it again
        // on the copy path.
        if !artifact::can_map(dir) {
            return None;
        }
        let exact = self.artifact_path(dir, sha256);
        for (path, engine_hash) in self.artifact_candidates(dir, sha256, &exact) {
            let Ok(mut meta) = ArtifactMeta::read_matching(&path, sha256, &engine_hash) else {
                continue;
            };
            let leased = artifact::LeasedFile::open(&path)?;
            let Ok(file_meta) = leased.file().metadata() else {
                continue;
            };
            let stamp = artifact::Stamp::of(&file_meta);
            if meta.verified != Some(stamp) {
                // Hashed under the lease: nobody can write it meanwhile.
                if artifact::digest_file(leased.file()).ok() != Some(meta.artifact_sha256.clone()) {
                    // The copy path says why (and recompiles if none is usable).
                    continue;
                }
                if artifact::fs_now(dir).is_some_and(|now| stamp.settled(now)) {
                    meta.verified = Some(stamp);
                    meta.rewrite(&path);
                }
            }
            // SAFETY: as in `compile_or_load` (an artifact of an engine with this
            // compatibility hash, for exactly these source bytes, its digest
            // checked under the lease now or when the file last had this very
            // stamp); and the file cannot change under the mapping: it is
            // read-only (0400) and under a read lease, which makes every writer
            // wait until the guard has swapped the mapping for a copy; the lease
            // holds a clone of the component and is released only after that
            // clone is dropped (see `artifact` for the one gap, a root-only
            // `O_RDONLY | O_TRUNC`). `fd_path` opens the very file the lease is on.
            #[allow(unsafe_code)]
            let component = unsafe { Component::deserialize_file(&self.engine, leased.fd_path()) };
            match component {
                Ok(component) => {
                    let lease = leased.guard(&component);
                    return Some((component, lease));
                }
                Err(e) => {
                    tracing::debug!(path = %path.display(), "unusable precompiled artifact: {e}");
                    continue;
                }
            }
        }
        None
    }

    #[cfg(feature = "cranelift")]
    fn compile_now(&self, bytes: &[u8]) -> Result<Component, BoxError> {
        Component::new(&self.engine, bytes)
            .map_err(|e| format!("not a valid WebAssembly component: {}", e.root_cause()).into())
    }

    #[cfg(not(feature = "cranelift"))]
    fn compile_now(&self, _bytes: &[u8]) -> Result<Component, BoxError> {
        Err("no precompiled artifact for this plugin in runtime.cache_dir, and this build of reauth cannot compile plugins (its `cranelift` feature is off): precompile it with a full build (`reauth check` with the same cache_dir)".into())
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// Whether precompiled artifacts in `dir` are mapped under a read lease on this
/// machine (rather than read at every load); for tests.
#[doc(hidden)]
pub fn artifacts_can_be_mapped(dir: &Path) -> bool {
    artifact::can_map(dir)
}

/// Advance the engine's epoch every [`EPOCH_TICK`] until the engine is dropped.
fn spawn_epoch_ticker(engine: &Engine) -> std::io::Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("reauth-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })
        .map(drop)
}

/// Everything needed to load one provider.
#[derive(Debug, Clone)]
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
            source,
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

    /// A new Store (not yet instantiated) for calls of `subject`.
    fn new_warm(&self, runtime: &Runtime, subject: Option<&str>) -> Warm {
        let cap = usize::try_from(self.limits.max_output_bytes).unwrap_or(usize::MAX);
        let hits = Arc::new(CallHits::default());
        let captured = Captured {
            stdout: CapturePipe::new(cap, hits.clone()),
            stderr: CapturePipe::new(cap, hits.clone()),
            hits,
        };
        // Nothing inherited: no env, args, preopened dirs or network.
        let wasi = WasiCtx::builder()
            .stdout(captured.stdout.clone())
            .stderr(captured.stderr.clone())
            .wall_clock(WasiWallClock(runtime.clock.clone()))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .max_random_size(MAX_RANDOM_BYTES)
            .build();
        // Everything the host allocates on the plugin's behalf is bounded: table
        // entries (fields, requests, streams…), each fields object's size, random
        // bytes per call, requests in flight (egress).
        let mut table = ResourceTable::new();
        table.set_max_capacity(self.limits.max_host_resources as usize);
        let mut http = WasiHttpCtx::new();
        http.set_field_size_limit(FIELD_SIZE_LIMIT);
        let mut store = Store::new(
            &runtime.engine,
            StoreState {
                table,
                wasi,
                http,
                hooks: EgressHooks::new(self.egress.clone(), captured.hits.clone()),
                config: self.config.clone(),
                state: CallState::new(self.state.clone()),
                limiter: CallLimiter {
                    memory_bytes: usize::try_from(self.limits.memory_mib << 20)
                        .unwrap_or(usize::MAX),
                    hits: captured.hits.clone(),
                    used: 0,
                },
            },
        );
        if runtime.limit_memory {
            store.limiter(|s| &mut s.limiter);
        }
        Warm {
            store,
            captured,
            instance: None,
            calls: 0,
            subject: subject.map(str::to_string),
            deadline: state::CallDeadline::default(),
        }
    }

    /// An instance for one call of `subject`: a kept one for the same subject when
    /// `instances.reuse` is on and one is idle, else a new Store. Armed for the
    /// call: deadline, fuel, a clean limit record.
    fn checkout(
        &self,
        runtime: &Runtime,
        function: &'static str,
        subject: Option<&str>,
    ) -> Result<Warm, Error> {
        let kept = if self.instances.reuse {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.iter()
                .rposition(|w| w.subject.as_deref() == subject)
                .map(|i| idle.remove(i))
        } else {
            None
        };
        let mut warm = match kept {
            Some(warm) => {
                self.stats.reused.fetch_add(1, Ordering::Relaxed);
                warm
            }
            None => self.new_warm(runtime, subject),
        };
        warm.calls += 1;
        self.arm(runtime, function, &mut warm)?;
        Ok(warm)
    }

    /// Prepare `warm` for one call: a clean limit record, the call's deadline and
    /// its fuel.
    fn arm(&self, runtime: &Runtime, function: &'static str, warm: &mut Warm) -> Result<(), Error> {
        warm.captured.hits.clear();
        let store = &mut warm.store;
        let deadline = store
            .data_mut()
            .state
            .arm(Duration::from_millis(self.limits.timeout_ms));
        warm.deadline = deadline.clone();
        if runtime.epoch_interruption {
            // Every epoch tick a running guest yields to the executor, so a plugin
            // stuck in a loop never starves the other tasks of its thread; at the
            // call's deadline it traps (`Trap::Interrupt`), even if nobody polls
            // the tokio timeout around the call. (The deadline moves later by the
            // time the call waited for its state.)
            store.set_epoch_deadline(1);
            store.epoch_deadline_callback(move |_| {
                Ok(if Instant::now() >= deadline.at() {
                    UpdateDeadline::Interrupt
                } else {
                    // tokio's yield lets the runtime poll its I/O and timer
                    // driver before the guest resumes (a plain re-wake would
                    // wait for the driver's turn, every 61 polls).
                    UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now()))
                })
            });
        }
        if runtime.consume_fuel {
            store
                .set_fuel(self.limits.fuel.unwrap_or(u64::MAX))
                .map_err(|e| self.fault(function, e))?;
        }
        Ok(())
    }

    /// After a call: keep the instance for its subject if reuse is on, the call
    /// finished cleanly (no trap, timeout or limit: `clean`) and it has calls left;
    /// otherwise drop it (and its Store) now.
    fn checkin(&self, mut warm: Warm, clean: bool) {
        // A kept instance holds only the provider's own config (a call's
        // borrowed values end with the call).
        if !self.credential_keys.is_empty() {
            warm.store.data_mut().config = self.config.clone();
        }
        // An instance with requests still in flight would keep holding egress
        // places while idle: it is not kept.
        let quiet = {
            let hooks = &warm.store.data().hooks;
            hooks.in_flight.available_permits() == hooks.policy.max_per_call
        };
        if !(self.instances.reuse
            && clean
            && quiet
            && warm.instance.is_some()
            && warm.calls < self.instances.max_calls)
        {
            return;
        }
        let evicted = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.push(warm);
            let max = usize::try_from(self.instances.max_idle).unwrap_or(usize::MAX);
            let excess = idle.len().saturating_sub(max);
            idle.drain(..excess).collect::<Vec<_>>()
        };
        drop(evicted);
    }

    /// Drop every kept instance (a reload, or a test that wants fresh ones).
    pub fn discard_idle(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        drop(idle);
    }

    /// Kept instances, idle right now.
    pub fn idle_instances(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
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

    /// Book what a finished call cost (fuel, linear memory) in the provider's
    /// metrics.
    fn account(&self, runtime: &Runtime, warm: &Warm) {
        let Some(metrics) = self.metrics.get() else {
            return;
        };
        let fuel = if runtime.consume_fuel {
            let left = warm.store.get_fuel().unwrap_or(0);
            self.limits.fuel.unwrap_or(u64::MAX).saturating_sub(left)
        } else {
            0
        };
        let memory = u64::try_from(warm.store.data().limiter.used).unwrap_or(u64::MAX);
        metrics.call_cost(fuel, memory);
    }

    /// The instance of `warm`, instantiated now if it has none yet.
    async fn instance(&self, warm: &mut Warm) -> wasmtime::Result<Arc<Provider>> {
        if let Some(instance) = &warm.instance {
            return Ok(instance.clone());
        }
        self.stats.instantiations.fetch_add(1, Ordering::Relaxed);
        let instance = Arc::new(self.pre.instantiate_async(&mut warm.store).await?);
        warm.instance = Some(instance.clone());
        Ok(instance)
    }

    /// Count this provider's state-lock waits in `metrics`.
    #[doc(hidden)]
    pub fn set_metrics(&self, metrics: Arc<crate::metrics::ProviderMetrics>) {
        self.state.set_metrics(metrics.clone());
        let _ = self.metrics.set(metrics);
    }

    /// Wait for this fetch's turn in the provider's budget (`[rate]`), or refuse
    /// it with [`Error::Throttled`] when the turn is further off than
    /// `rate.wait_ms`. For a caller that does work of its own before the call
    /// (the host resolving `{ credential = … }` values), which then calls with
    /// [`Budget::Taken`].
    pub async fn take_fetch_budget(&self) -> Result<(), Error> {
        let Some(bucket) = &self.bucket else {
            return Ok(());
        };
        match bucket.acquire().await {
            Ok(waited) => {
                if !waited.is_zero()
                    && let Some(m) = self.metrics.get()
                {
                    m.fetch_budget_waited(waited);
                }
                Ok(())
            }
            Err(over) => {
                if let Some(m) = self.metrics.get() {
                    m.fetch_throttled();
                }
                let retry_in_ms = u64::try_from(over.retry_in.as_millis()).unwrap_or(u64::MAX);
                tracing::warn!(provider = %self.name, retry_in_ms, "fetch refused: over the provider's fetch budget (rate.fetches_per_second)");
                Err(Error::Throttled {
                    provider: self.name.to_string(),
                    per_second: bucket.rate(),
                    burst: self.rate.burst,
                    retry_in_ms,
                })
            }
        }
    }

    /// A redactor for one call's output: the config values, the state's values and
    /// any secret the call returned.
    fn call_redactor(&self, returned: Option<&types::Credentials>) -> Redactor {
        let mut redactor = self.redactor.clone();
        match self.described.get() {
            Some(described) => {
                for value in &described.secrets {
                    redactor.add(value.expose());
                }
            }
            // Which keys it declares secret is not known yet (its `describe`
            // failed or has not run): every config value is redacted.
            None => {
                for (_, value) in &self.settings {
                    redactor.add(value.expose());
                }
            }
        }
        for value in self.state.values() {
            redactor.add(&value);
        }
        for (_, value) in self
            .borrowed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            redactor.add(value.expose());
        }
        if let Some(c) = returned {
            match &c.credential {
                types::Credential::Basic { password, .. } => redactor.add(password.expose()),
                types::Credential::Bearer(token) => redactor.add(token.expose()),
                types::Credential::Headers(h) => {
                    h.iter().for_each(|(_, v)| redactor.add(v.expose()))
                }
            }
        }
        redactor
    }

    /// Log what the call wrote, with the secrets known after `returned` redacted
    /// (the redactor is only built when there is output): at INFO, or at WARN when
    /// the call failed (a traceback an author must see at the default level).
    fn log_output(
        &self,
        function: &str,
        captured: &Captured,
        returned: Option<&types::Credentials>,
        failed: bool,
    ) {
        let mut redactor = None;
        for (stream, pipe) in [("stdout", &captured.stdout), ("stderr", &captured.stderr)] {
            let bytes = pipe.take();
            if bytes.is_empty() {
                continue;
            }
            let redactor = redactor.get_or_insert_with(|| self.call_redactor(returned));
            // Redact the whole capture before cutting it, so that no prefix of a
            // secret survives the cut.
            let text = String::from_utf8_lossy(&bytes);
            let text = redactor.redact(&text);
            let mut end = text.len().min(OUTPUT_LOGGED);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            for line in text[..end].lines().filter(|l| !l.trim().is_empty()) {
                if failed {
                    tracing::warn!(provider = %self.name, function, stream, "{line}");
                } else {
                    tracing::info!(provider = %self.name, function, stream, "{line}");
                }
            }
            if bytes.len() > OUTPUT_LOGGED {
                tracing::info!(provider = %self.name, function, stream, total = bytes.len(), "output truncated");
            }
        }
    }

    fn limit(&self, function: &'static str, limit: LimitKind, detail: String) -> Error {
        Error::Limit {
            provider: self.name.to_string(),
            function,
            limit,
            detail,
        }
    }

    /// Map a call's failure to the error naming what happened: a limit the call hit
    /// (whatever the guest made of it), a timeout, or the trap.
    fn fault(&self, function: &'static str, e: wasmtime::Error) -> Error {
        if let Some(StateFault(fault)) = e.downcast_ref::<StateFault>() {
            return self.state_error(fault);
        }
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => return self.timeout(function),
            Some(Trap::OutOfFuel) => {
                return self.limit(
                    function,
                    LimitKind::Fuel,
                    format!(
                        "the call used all of its {} fuel",
                        self.limits.fuel.unwrap_or(u64::MAX)
                    ),
                );
            }
            Some(Trap::StackOverflow) => {
                return self.limit(
                    function,
                    LimitKind::Stack,
                    "the WebAssembly stack overflowed (runaway recursion?)".into(),
                );
            }
            _ => {}
        }
        // The message can carry text the plugin controls (a header name, a URL):
        // it passes the redactor like everything else the plugin says.
        let message = self
            .call_redactor(None)
            .redact(&format!("{e:#}"))
            .into_owned();
        if e.downcast_ref::<wasmtime::component::ResourceTableError>()
            .is_some_and(|t| matches!(t, wasmtime::component::ResourceTableError::Full))
            || message.contains("resource table has no free keys")
        {
            return self.limit(
                function,
                LimitKind::HostResources,
                format!(
                    "the plugin held more than {} host-side objects (HTTP fields, requests, streams…) at once",
                    self.limits.max_host_resources
                ),
            );
        }
        if message.contains("requested len") && message.contains("exceeds limit") {
            return self.limit(
                function,
                LimitKind::HostResources,
                format!("a get-random-bytes call asked for more than {MAX_RANDOM_BYTES} bytes"),
            );
        }
        if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
            .is_some()
        {
            // The engine's pool ran out (reservations keep this from happening
            // but for a reload's overlap): not the provider's fault.
            tracing::warn!(provider = %self.name, function, "the engine's instance pool is exhausted: {message}");
            return Error::Busy {
                provider: self.name.to_string(),
                max_concurrent_calls: self.limits.max_concurrent_calls,
                waited_ms: 0,
            };
        }
        Error::Plugin {
            provider: self.name.to_string(),
            function,
            source: message.into(),
        }
    }

    /// Wait (at most `limits.queue_timeout_ms`) for one of the provider's
    /// `limits.max_concurrent_calls` slots: the bulkhead that keeps one provider
    /// from taking what others need. Held for the whole call.
    async fn call_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Error> {
        if let Ok(permit) = self.call_slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        self.stats.slot_waits.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let wait = Duration::from_millis(self.limits.queue_timeout_ms);
        match tokio::time::timeout(wait, self.call_slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                let waited_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                tracing::warn!(provider = %self.name, max_concurrent_calls = self.limits.max_concurrent_calls, waited_ms, "all call slots busy; call refused");
                Err(Error::Busy {
                    provider: self.name.to_string(),
                    max_concurrent_calls: self.limits.max_concurrent_calls,
                    waited_ms,
                })
            }
        }
    }

    fn state_error(&self, fault: &crate::store::StoreError) -> Error {
        let holder = match fault {
            crate::store::StoreError::Locked { holder, .. } => *holder,
            _ => None,
        };
        tracing::warn!(provider = %self.name, "{fault}");
        Error::State {
            provider: self.name.to_string(),
            detail: fault.to_string(),
            holder,
        }
    }

    fn timeout(&self, function: &'static str) -> Error {
        Error::Timeout {
            provider: self.name.to_string(),
            function,
            timeout_ms: self.limits.timeout_ms,
        }
    }

    /// Settle a finished (or timed-out) call: a limit it hit comes first (output
    /// past the cap included: the capture records it), then a timeout or trap. A
    /// call that succeeded although its output was cut keeps its result.
    fn settle<T>(
        &self,
        function: &'static str,
        outcome: Result<wasmtime::Result<T>, state::TimedOut>,
        captured: &Captured,
    ) -> Result<T, Error> {
        match (outcome, captured.hits.get()) {
            (Ok(Ok(value)), hit) => {
                if let Some((LimitKind::Output, _)) = hit {
                    tracing::warn!(provider = %self.name, function, cap = self.limits.max_output_bytes, "plugin output reached limits.max_output_bytes; the rest was dropped");
                }
                Ok(value)
            }
            (_, Some((kind, detail))) => Err(self.limit(function, kind, detail)),
            (Err(_), None) => Err(self.timeout(function)),
            (Ok(Err(e)), None) => Err(self.fault(function, e)),
        }
    }

    /// Book a call's result with the breaker and the fault counter. A call that
    /// never got a slot ([`Error::Busy`]) is neither a fault nor a success.
    fn book<T>(&self, function: &'static str, result: &Result<T, Error>) {
        if let Err(Error::Busy { .. } | Error::Throttled { .. }) = result {
            return;
        }
        let fault = match result {
            Err(e @ (Error::Plugin { .. } | Error::Timeout { .. } | Error::Limit { .. })) => {
                Some(e.to_string())
            }
            _ => None,
        };
        if let Some(message) = &fault {
            self.stats.faults.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(provider = %self.name, function, "plugin fault; its instance is discarded: {message}");
        }
        if let Some(cooldown) = self.breaker.record(fault.as_deref()) {
            tracing::error!(
                provider = %self.name,
                cooldown_ms = cooldown.as_millis() as u64,
                faults = self.breaker.status().consecutive_faults,
                "provider keeps faulting; cooling it down"
            );
        }
    }

    /// One warn line when fetches start failing (naming the last request that
    /// failed: discovery or token endpoint, and how), one info line when they
    /// recover; nothing in between (the cache's backoff bounds the attempts).
    fn track_health(&self, result: &Result<types::Credentials, Error>) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            // Not the provider's doing, or already logged by the breaker.
            Err(Error::Busy { .. } | Error::Throttled { .. } | Error::CoolingDown { .. }) => {}
            Err(e) => {
                health.failures = health.failures.saturating_add(1);
                if health.failing_since.is_none() {
                    health.failing_since = Some(Instant::now());
                    let last = self
                        .egress
                        .last_failure()
                        .unwrap_or_else(|| "none".to_string());
                    tracing::warn!(provider = %self.name, error = %e, last_failed_request = %last, "fetches are failing (logged again when they recover)");
                }
            }
            Ok(_) => {
                if let Some(since) = health.failing_since.take() {
                    let failed = std::mem::take(&mut health.failures);
                    tracing::info!(provider = %self.name, failed_fetches = failed, failing_for_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX), "fetches recovered");
                }
                self.egress.clear_failure();
            }
        }
    }

    fn admit(&self) -> Result<(), Error> {
        self.breaker.admit().map_err(|(faults, left, last_fault)| {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            Error::CoolingDown {
                provider: self.name.to_string(),
                faults,
                retry_in_ms: left.as_millis().try_into().unwrap_or(u64::MAX),
                last_fault,
            }
        })
    }

    /// What the component says about itself, asked of `provider` in `store` unless
    /// known already; with the provider's config checked against its schema. A
    /// 0.1.0 component declares nothing. An unusable descriptor is a fault.
    async fn ensure_described(
        &self,
        provider: &Provider,
        store: &mut Store<StoreState>,
    ) -> wasmtime::Result<&Described> {
        if let Some(described) = self.described.get() {
            return Ok(described);
        }
        store.data_mut().hooks.describing = true;
        let described = provider.describe(&mut *store).await;
        store.data_mut().hooks.describing = false;
        let descriptor = bindings::descriptor_from_guest(described?);
        if let Some(defect) = descriptor.defect() {
            return Err(wasmtime::Error::msg(format!(
                "describe returned an unusable descriptor: {defect}"
            )));
        }
        let violations = match &descriptor.config {
            Some(schema) => crate::schema::check(
                schema,
                self.settings
                    .iter()
                    .map(|(k, v)| (k.as_str(), Some(v.expose())))
                    .chain(self.credential_keys.iter().map(|k| (k.as_str(), None))),
            ),
            None => Vec::new(),
        };
        let secrets = descriptor
            .secret_keys()
            .filter_map(|key| self.settings.iter().find(|(k, _)| k == key))
            .map(|(_, v)| v.clone())
            .collect();
        if !violations.is_empty() {
            tracing::warn!(provider = %self.name, "the config does not fit the provider's schema: {}", violations.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "));
        }
        let _ = self.described.set(Described {
            descriptor: Arc::new(descriptor),
            violations,
            secrets,
        });
        Ok(self.described.get().expect("set above"))
    }

    /// What the component said about itself, if it was asked already.
    pub fn described(&self) -> Option<&Described> {
        self.described.get()
    }

    /// The `misconfigured` error for a config that breaks the provider's schema.
    fn schema_error(&self, described: &Described) -> Option<wit::ProviderError> {
        (!described.violations.is_empty()).then(|| {
            wit::ProviderError::Misconfigured(format!(
                "the config does not fit the provider's schema: {}",
                described
                    .violations
                    .iter()
                    .map(|v| format!("providers.{}.config.{}: {}", self.name, v.key, v.problem))
                    .collect::<Vec<_>>()
                    .join("; ")
            ))
        })
    }

    /// Instantiate the component once in a fresh Store and ask it to describe
    /// itself (what `reauth check` does to prove a provider can run), without
    /// calling it for credentials.
    pub async fn describe(&self, runtime: &Runtime) -> Result<&Described, Error> {
        const FUNCTION: &str = "describe";
        if let Some(described) = self.described.get() {
            return Ok(described);
        }
        let _slot = self.call_slot().await?;
        let mut warm = self.new_warm(runtime, None);
        self.arm(runtime, FUNCTION, &mut warm)?;
        let deadline = warm.deadline.clone();
        let call = async {
            let provider = self.pre.instantiate_async(&mut warm.store).await?;
            self.ensure_described(&provider, &mut warm.store)
                .await
                .map(drop)
        };
        let outcome = state::until(&deadline, call).await;
        warm.store
            .data_mut()
            .state
            .finish(matches!(outcome, Ok(Ok(_))));
        let captured = &warm.captured;
        let result = self.settle(FUNCTION, outcome, captured);
        self.account(runtime, &warm);
        self.log_output(FUNCTION, captured, None, result.is_err());
        self.book(FUNCTION, &result);
        result?;
        Ok(self.described.get().expect("described by the call"))
    }

    /// The contract version the component was built against (`0.2.0`, `0.1.0`).
    pub fn contract(&self) -> &'static str {
        self.pre.contract()
    }

    /// Call `get-credentials`, in a fresh instance (or, with `instances.reuse`, one
    /// kept for the same subject).
    pub async fn get_credentials(
        &self,
        runtime: &Runtime,
        request: &types::Request,
    ) -> Result<types::Credentials, Error> {
        self.get_credentials_with(runtime, request, &[], Budget::Take)
            .await
    }

    /// [`ProviderRuntime::get_credentials`] with `borrowed` config values added
    /// for this call: the values of its `{ credential = … }` keys (other
    /// providers' credentials, resolved by the host). They are redacted like
    /// config values from everything the provider says while the call runs, and
    /// are seen by `get-credentials` only (a `handle-security-error` call does not
    /// get them).
    pub async fn get_credentials_with(
        &self,
        runtime: &Runtime,
        request: &types::Request,
        borrowed: &[(String, Secret)],
        budget: Budget,
    ) -> Result<types::Credentials, Error> {
        const FUNCTION: &str = "get-credentials";
        // The budget first: a fetch refused by it never counts as a breaker probe.
        if budget == Budget::Take {
            self.take_fetch_budget().await?;
        }
        self.admit()?;
        let _slot = self.call_slot().await?;
        self.stats.get_credentials.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let mut warm = self.checkout(runtime, FUNCTION, request.subject.as_deref())?;
        let _borrowed_guard = (!borrowed.is_empty()).then(|| {
            let id = self.borrow_ids.fetch_add(1, Ordering::Relaxed);
            self.borrowed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(borrowed.iter().map(|(_, v)| (id, v.clone())));
            BorrowedGuard {
                set: &self.borrowed,
                id,
            }
        });
        if !borrowed.is_empty() {
            // This call's config: the provider's own values, then the borrowed
            // ones (a kept instance gets them afresh every call).
            warm.store.data_mut().config = Arc::new(
                self.settings
                    .iter()
                    .chain(borrowed)
                    .map(|(k, v)| (k.as_str(), v.expose()))
                    .collect(),
            );
        }
        let wit_request = wit::Request::from(request);
        let deadline = warm.deadline.clone();
        let call = async {
            let provider = self.instance(&mut warm).await?;
            let described = self.ensure_described(&provider, &mut warm.store).await?;
            if let Some(misconfigured) = self.schema_error(described) {
                return Ok(Err(misconfigured));
            }
            provider
                .get_credentials(&mut warm.store, &wit_request)
                .await
        };
        let outcome = state::until(&deadline, call).await;
        // The state is released as soon as the call ends, however it ended.
        let dead_holder = warm
            .store
            .data_mut()
            .state
            .finish(matches!(outcome, Ok(Ok(_))));
        let captured = &warm.captured;
        let settled = self.settle(FUNCTION, outcome, captured);
        // A provider error the guest returned is a clean finish, unless it was
        // how the guest reported a limit it hit.
        let clean = settled.is_ok() && captured.hits.get().is_none();
        let result = match settled {
            Err(e) => Err(e),
            Ok(Err(error)) => match captured.hits.get() {
                // The guest turned a limit it hit into an error of its own.
                Some((kind, detail)) => Err(self.limit(FUNCTION, kind, detail)),
                None => {
                    let error = types::ProviderError::from(error)
                        .map_message(|m| self.call_redactor(None).redact(&m).into_owned());
                    Err(Error::Provider {
                        provider: self.name.to_string(),
                        error: match (error, &dead_holder) {
                            (types::ProviderError::Denied(m), Some(dead)) => {
                                types::ProviderError::Denied(format!(
                                    "{m} (process {} {} while it held this provider's state{}: a refresh token it had already rotated at the identity provider was lost with it)",
                                    dead.pid,
                                    if dead.aborted {
                                        "had a call cut off (timeout or fault)"
                                    } else {
                                        "died"
                                    },
                                    dead.since
                                        .map(|t| format!(", since {}", crate::clock::rfc3339(t)))
                                        .unwrap_or_default()
                                ))
                            }
                            (error, _) => error,
                        },
                    })
                }
            },
            Ok(Ok(credentials)) => {
                bindings::credentials_from_guest(credentials, self.limits.max_credential_bytes)
                    .map_err(|violation| match violation {
                        bindings::Violation::TooLarge(size) => self.limit(
                            FUNCTION,
                            LimitKind::CredentialSize,
                            format!(
                                "returned a {size}-byte credential; at most {} bytes are allowed",
                                self.limits.max_credential_bytes
                            ),
                        ),
                        bindings::Violation::Invalid(why) => Error::Plugin {
                            provider: self.name.to_string(),
                            function: FUNCTION,
                            source: format!("returned an invalid credential: {why}").into(),
                        },
                    })
            }
        };
        self.log_output(FUNCTION, captured, result.as_ref().ok(), result.is_err());
        self.account(runtime, &warm);
        self.checkin(warm, clean);
        self.book(FUNCTION, &result);
        self.track_health(&result);
        tracing::debug!(provider = %self.name, elapsed_us = started.elapsed().as_micros() as u64, ok = result.is_ok(), "get-credentials done");
        result
    }

    /// Call `handle-security-error`, in a fresh instance (or, with
    /// `instances.reuse`, one kept for the same subject).
    pub async fn handle_security_error(
        &self,
        runtime: &Runtime,
        request: &types::Request,
        credentials: &types::Credentials,
        error: &types::SecurityError,
    ) -> Result<types::Decision, Error> {
        const FUNCTION: &str = "handle-security-error";
        self.admit()?;
        let _slot = self.call_slot().await?;
        self.stats
            .handle_security_error
            .fetch_add(1, Ordering::Relaxed);
        let mut warm = self.checkout(runtime, FUNCTION, request.subject.as_deref())?;
        let wit_request = wit::Request::from(request);
        let deadline = warm.deadline.clone();
        let wit_credentials = wit::Credentials::from(credentials);
        let wit_error = wit::SecurityError::from(error);
        let call = async {
            let provider = self.instance(&mut warm).await?;
            self.ensure_described(&provider, &mut warm.store).await?;
            provider
                .handle_security_error(&mut warm.store, &wit_request, &wit_credentials, &wit_error)
                .await
        };
        let outcome = state::until(&deadline, call).await;
        warm.store
            .data_mut()
            .state
            .finish(matches!(outcome, Ok(Ok(_))));
        let captured = &warm.captured;
        let result = self
            .settle(FUNCTION, outcome, captured)
            .map(types::Decision::from);
        let clean = result.is_ok() && captured.hits.get().is_none();
        self.log_output(FUNCTION, captured, Some(credentials), result.is_err());
        self.account(runtime, &warm);
        self.checkin(warm, clean);
        self.book(FUNCTION, &result);
        result
    }
}

/// An instance and its Store: for one call, or kept between calls of one subject
/// (`instances.reuse`).
struct Warm {
    store: Store<StoreState>,
    captured: Captured,
    /// `None` until the first call instantiates it.
    instance: Option<Arc<Provider>>,
    /// Calls served, including the current one.
    calls: u32,
    /// The only subject this instance serves.
    subject: Option<String>,
    /// The current call's deadline (set by `arm`).
    deadline: state::CallDeadline,
}

/// One call's captured output and limit record.
struct Captured {
    stdout: CapturePipe,
    stderr: CapturePipe,
    hits: Arc<CallHits>,
}

/// Presents a [`Clock`] to plugins as `wasi:clocks/wall-clock`.
pub(crate) struct WasiWallClock(pub(crate) Arc<dyn Clock>);

impl wasmtime_wasi::HostWallClock for WasiWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }

    fn now(&self) -> Duration {
        self.0
            .now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
    }
}
