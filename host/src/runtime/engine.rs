//! The engine a host runs every provider on: wasmtime's configuration (pooling
//! allocator, epoch interruption, fuel), the linker with the WASI and `wasi:http`
//! host functions, compilation and the precompiled-artifact cache, and the
//! clock plugins see.

use super::*;

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

/// How much of each table a finished call's instance leaves resident (reset
/// with `memset`, not `madvise`): every fresh instance initialises its tables,
/// and faulting their pages back in was a sixth of a fresh `static` miss
/// (BENCHMARKS.md, miss path: 16 KiB gained as much as 64 KiB). At most this
/// much per table slot used: 128 MiB if all of the default 256 instances' 32
/// table slots had held a table of 2,048 elements or more (1 GiB at 2,048
/// instances).
const TABLE_KEEP_RESIDENT: usize = 16 << 10;

/// Settings of the shared engine.
#[derive(Debug, Clone)]
#[allow(
    clippy::exhaustive_structs,
    reason = "engine settings read once at start, built as `RuntimeOptions { field, ..Default::default() }` (a field added later does not break that)"
)]
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
    /// How much of a linear memory is reset with
    /// `memset` when a call's instance goes away, instead of being returned to
    /// the kernel with `madvise`; every memory slot that was used keeps that
    /// much resident (`runtime.keep_resident_kib`). Default 0: only providers
    /// with big heaps gain from it (BENCHMARKS.md, polyglot section).
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
    pub(super) engine: Engine,
    pub(super) linker: Linker<StoreState>,
    pub(super) cache_dir: Option<PathBuf>,
    pub(super) engine_hash: String,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) consume_fuel: bool,
    pub(super) epoch_interruption: bool,
    pub(super) limit_memory: bool,
    pub(super) max_instances: u32,
    /// Instances reserved per provider name (see [`Runtime::reserve`]).
    pub(super) reservations: Mutex<BTreeMap<String, u32>>,
    /// The key ring sealing providers' state files (see [`Runtime::set_state_keys`]).
    pub(super) state_keys: std::sync::OnceLock<Arc<crate::store::KeyRing>>,
    /// Where every provider's state lives instead (a fleet), if set.
    pub(super) state_store: std::sync::OnceLock<Arc<dyn crate::store::StateStore>>,
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
#[non_exhaustive]
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

    pub(super) fn start(options: RuntimeOptions, clock: Arc<dyn Clock>) -> Result<Self, BoxError> {
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
        // A fresh instance per call: the slot's memory and tables are reset when
        // the call ends: the first `keep_resident_bytes` of a memory and
        // `TABLE_KEEP_RESIDENT` of a table with `memset` (back to their initial
        // contents), the rest with `madvise`. Never with Linux's PAGEMAP_SCAN
        // (faster: only dirty pages), because its scan matches only pages in
        // RAM: a dirty page swapped out at that moment would be neither reset
        // nor dropped, and the next instance in the slot — maybe another
        // provider's — would read it (wasmtime PR #14357).
        pool.linear_memory_keep_resident(options.keep_resident_bytes)
            .table_keep_resident(TABLE_KEEP_RESIDENT)
            .pagemap_scan(wasmtime::Enabled::No);
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

    pub(super) fn compile_or_load(
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
                if let Err(e) = crate::store::fs::private_dir(dir)
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
    pub(super) fn artifact_path(&self, dir: &Path, sha256: &str) -> PathBuf {
        dir.join(format!("{sha256}-{}.cwasm", self.engine_hash))
    }

    /// The precompiled artifacts to try for the plugin `sha256`: this engine's
    /// (`exact`), or — in a build that cannot compile — every engine's.
    pub(super) fn artifact_candidates(
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
    pub(super) fn load_mapped(&self, sha256: &str) -> Option<(Component, artifact::Lease)> {
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
    pub(super) fn compile_now(&self, bytes: &[u8]) -> Result<Component, BoxError> {
        Component::new(&self.engine, bytes)
            .map_err(|e| format!("not a valid WebAssembly component: {}", e.root_cause()).into())
    }

    #[cfg(not(feature = "cranelift"))]
    pub(super) fn compile_now(&self, _bytes: &[u8]) -> Result<Component, BoxError> {
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
