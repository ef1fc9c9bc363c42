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
//! Each call runs under an epoch deadline (CPU-bound loops trap) wrapped in a
//! tokio timeout (a call stuck waiting on the network is cancelled), with a
//! `StoreLimits` memory cap. The WASI context inherits nothing: no directories, no
//! environment, no arguments, no sockets; stdout/stderr are captured into `tracing`
//! under the provider's name; HTTP leaves only through the allow-list in [`egress`].

mod bindings;
pub mod egress;
pub(crate) mod state;

use crate::clock::{Clock, WasiWallClock};
use crate::config::LimitsConfig;
use crate::error::{BoxError, Error};
use crate::secret::Secret;
use crate::types;
use bindings::{ProviderPre, wit};
use egress::{EgressHooks, EgressPolicy, HostPattern};
use sha2::{Digest, Sha256};
use state::StateStore;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime::{StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_config::{WasiConfig, WasiConfigVariables};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// How often the epoch advances: the granularity of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Captured stdout/stderr per call, in bytes.
const OUTPUT_CAPTURE: usize = 1024 * 1024;
/// At most this much captured output is logged per stream and call.
const OUTPUT_LOGGED: usize = 4096;

/// The per-call Store data.
pub(crate) struct StoreState {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: EgressHooks,
    config: Arc<WasiConfigVariables>,
    state: Arc<StateStore>,
    limits: StoreLimits,
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

impl bindings::reauth::provider::state::Host for StoreState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.state.get(&key))
    }

    fn set(&mut self, key: String, value: String) -> wasmtime::Result<Result<(), String>> {
        Ok(self.state.set(key, value))
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<Result<(), String>> {
        Ok(self.state.delete(&key))
    }
}

/// Settings of the shared engine.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Directory for precompiled artifacts; `None` compiles at every load.
    pub cache_dir: Option<PathBuf>,
    /// Largest linear memory any plugin may use (sizes the pooling allocator's slots).
    pub max_memory_bytes: u64,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            cache_dir: None,
            max_memory_bytes: crate::config::defaults::max_memory_mib() << 20,
        }
    }
}

/// The shared engine, linker and precompiled-artifact cache. Cheap to share; one per
/// host.
pub struct Runtime {
    engine: Engine,
    linker: Linker<StoreState>,
    cache_dir: Option<PathBuf>,
    engine_hash: u64,
    clock: Arc<dyn Clock>,
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
    /// Build the engine (epoch interruption, pooling allocator), start its epoch
    /// ticker and link every interface a provider may import.
    pub fn new(options: RuntimeOptions, clock: Arc<dyn Clock>) -> Result<Self, BoxError> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(256)
            .total_core_instances(1024)
            .total_memories(512)
            .total_tables(1024)
            .total_stacks(256)
            .max_memory_size(usize::try_from(options.max_memory_bytes)?);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| e.into_boxed_dyn_error())?;
        spawn_epoch_ticker(&engine)?;

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
        link(bindings::reauth::provider::state::add_to_linker::<
            _,
            HasSelf<_>,
        >(&mut linker, |s| s))?;

        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        env!("CARGO_PKG_VERSION").hash(&mut hasher);
        Ok(Runtime {
            engine,
            linker,
            cache_dir: options.cache_dir,
            engine_hash: hasher.finish(),
            clock,
        })
    }

    /// Compile `bytes` (whose hex SHA-256 is `sha256`), or load the artifact the
    /// cache holds for exactly these bytes and this engine configuration.
    pub fn compile(
        &self,
        bytes: &[u8],
        sha256: &str,
    ) -> Result<(Component, CompileSource), BoxError> {
        let Some(dir) = &self.cache_dir else {
            let component =
                Component::new(&self.engine, bytes).map_err(|e| e.into_boxed_dyn_error())?;
            return Ok((component, CompileSource::Compiled));
        };
        let path = dir.join(format!("{sha256}-{:016x}.cwasm", self.engine_hash));
        if path.exists() {
            // SAFETY: the artifact was written by `Component::serialize` of an engine
            // with the same compatibility hash (part of the file name) for the
            // component with this exact SHA-256; the cache directory is created 0700
            // and owned by this user. wasmtime additionally checks the artifact's
            // header against this engine's configuration and rejects a mismatch.
            #[allow(unsafe_code)]
            let loaded = unsafe { Component::deserialize_file(&self.engine, &path) };
            match loaded {
                Ok(component) => return Ok((component, CompileSource::Cache)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring unusable precompiled artifact")
                }
            }
        }
        let component =
            Component::new(&self.engine, bytes).map_err(|e| e.into_boxed_dyn_error())?;
        match component.serialize() {
            Ok(artifact) => {
                if let Err(e) =
                    create_private_dir(dir).and_then(|()| state::write_atomically(&path, &artifact))
                {
                    tracing::warn!(path = %path.display(), error = %e, "could not store precompiled artifact");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not serialize component"),
        }
        Ok((component, CompileSource::Compiled))
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
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
    /// Resolved config values.
    pub config: Vec<(String, Secret)>,
    /// Limits.
    pub limits: LimitsConfig,
    /// Where its `state` is persisted (`None`: in memory).
    pub state_file: Option<PathBuf>,
}

/// Call counters of one provider.
#[derive(Debug, Default)]
pub struct CallStats {
    /// `get-credentials` calls made.
    pub get_credentials: AtomicU64,
    /// `handle-security-error` calls made.
    pub handle_security_error: AtomicU64,
    /// Calls that trapped, timed out or failed to instantiate.
    pub faults: AtomicU64,
}

/// One loaded provider: its compiled component, pre-linked, plus its sandbox
/// settings. Every call gets a fresh Store.
pub struct ProviderRuntime {
    name: Arc<str>,
    pre: ProviderPre<StoreState>,
    config: Arc<WasiConfigVariables>,
    egress: Arc<EgressPolicy>,
    state: Arc<StateStore>,
    limits: LimitsConfig,
    sha256: String,
    source: CompileSource,
    stats: CallStats,
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
        let load_err = |source: BoxError| Error::Load {
            provider: spec.name.clone(),
            path: spec.plugin.clone(),
            source,
        };
        let bytes = std::fs::read(&spec.plugin).map_err(|e| load_err(Box::new(e)))?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        if let Some(expected) = &spec.sha256
            && !expected.eq_ignore_ascii_case(&sha256)
        {
            return Err(load_err(
                format!("sha256 mismatch: expected {expected}, file has {sha256}").into(),
            ));
        }
        let (component, source) = runtime.compile(&bytes, &sha256).map_err(load_err)?;
        let instance_pre = runtime
            .linker
            .instantiate_pre(&component)
            .map_err(|e| load_err(e.into_boxed_dyn_error()))?;
        let pre = ProviderPre::new(instance_pre).map_err(|e| {
            load_err(
                format!(
                    "not a reauth:provider@0.1.0 component (it must export `reauth:provider/auth-provider@0.1.0`): {e}"
                )
                .into(),
            )
        })?;
        let state = StateStore::open(spec.state_file.clone()).map_err(|e| load_err(Box::new(e)))?;
        let name: Arc<str> = Arc::from(spec.name.as_str());
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
                max_timeout: Duration::from_millis(spec.limits.timeout_ms),
            }),
            state: Arc::new(state),
            limits: spec.limits,
            sha256,
            source,
            stats: CallStats::default(),
            name,
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

    fn new_store(
        &self,
        runtime: &Runtime,
    ) -> (Store<StoreState>, MemoryOutputPipe, MemoryOutputPipe) {
        let stdout = MemoryOutputPipe::new(OUTPUT_CAPTURE);
        let stderr = MemoryOutputPipe::new(OUTPUT_CAPTURE);
        // Nothing inherited: no env, args, preopened dirs or network.
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .wall_clock(WasiWallClock(runtime.clock.clone()))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(usize::try_from(self.limits.memory_mib << 20).unwrap_or(usize::MAX))
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            &runtime.engine,
            StoreState {
                table: ResourceTable::new(),
                wasi,
                http: WasiHttpCtx::new(),
                hooks: EgressHooks(self.egress.clone()),
                config: self.config.clone(),
                state: self.state.clone(),
                limits,
            },
        );
        store.limiter(|s| &mut s.limits);
        let ticks = self
            .limits
            .timeout_ms
            .div_ceil(EPOCH_TICK.as_millis() as u64)
            + 1;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();
        (store, stdout, stderr)
    }

    fn log_output(&self, function: &str, stdout: &MemoryOutputPipe, stderr: &MemoryOutputPipe) {
        for (stream, pipe) in [("stdout", stdout), ("stderr", stderr)] {
            let bytes = pipe.contents();
            if bytes.is_empty() {
                continue;
            }
            let shown = &bytes[..bytes.len().min(OUTPUT_LOGGED)];
            let text = String::from_utf8_lossy(shown);
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                tracing::info!(provider = %self.name, function, stream, "{line}");
            }
            if bytes.len() > OUTPUT_LOGGED {
                tracing::info!(provider = %self.name, function, stream, total = bytes.len(), "output truncated");
            }
        }
    }

    fn fault(&self, function: &'static str, e: wasmtime::Error) -> Error {
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
        if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
            return Error::Timeout {
                provider: self.name.to_string(),
                function,
                timeout_ms: self.limits.timeout_ms,
            };
        }
        tracing::warn!(provider = %self.name, function, error = %e, "plugin fault; its instance is discarded");
        Error::Plugin {
            provider: self.name.to_string(),
            function,
            source: e.into_boxed_dyn_error(),
        }
    }

    fn timeout(&self, function: &'static str) -> Error {
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
        Error::Timeout {
            provider: self.name.to_string(),
            function,
            timeout_ms: self.limits.timeout_ms,
        }
    }

    /// Instantiate the component once in a fresh Store (what `reauth check` does to
    /// prove a provider can run), without calling it.
    pub async fn instantiate_check(&self, runtime: &Runtime) -> Result<(), Error> {
        let (mut store, _, _) = self.new_store(runtime);
        let instantiate = self.pre.instantiate_async(&mut store);
        match tokio::time::timeout(Duration::from_millis(self.limits.timeout_ms), instantiate).await
        {
            Err(_) => Err(self.timeout("instantiate")),
            Ok(Err(e)) => Err(self.fault("instantiate", e)),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Call `get-credentials` in a fresh instance.
    pub async fn get_credentials(
        &self,
        runtime: &Runtime,
        request: &types::Request,
    ) -> Result<types::Credentials, Error> {
        const FUNCTION: &str = "get-credentials";
        self.stats.get_credentials.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let (mut store, stdout, stderr) = self.new_store(runtime);
        let wit_request = wit::Request::from(request);
        let call = async {
            let provider = self.pre.instantiate_async(&mut store).await?;
            provider
                .reauth_provider_auth_provider()
                .call_get_credentials(&mut store, &wit_request)
                .await
        };
        let outcome =
            tokio::time::timeout(Duration::from_millis(self.limits.timeout_ms), call).await;
        self.log_output(FUNCTION, &stdout, &stderr);
        tracing::debug!(provider = %self.name, elapsed_us = started.elapsed().as_micros() as u64, "get-credentials done");
        match outcome {
            Err(_) => Err(self.timeout(FUNCTION)),
            Ok(Err(e)) => Err(self.fault(FUNCTION, e)),
            Ok(Ok(Err(error))) => Err(Error::Provider {
                provider: self.name.to_string(),
                error: error.into(),
            }),
            Ok(Ok(Ok(credentials))) => Ok(credentials.into()),
        }
    }

    /// Call `handle-security-error` in a fresh instance.
    pub async fn handle_security_error(
        &self,
        runtime: &Runtime,
        request: &types::Request,
        credentials: &types::Credentials,
        error: &types::SecurityError,
    ) -> Result<types::Decision, Error> {
        const FUNCTION: &str = "handle-security-error";
        self.stats
            .handle_security_error
            .fetch_add(1, Ordering::Relaxed);
        let (mut store, stdout, stderr) = self.new_store(runtime);
        let wit_request = wit::Request::from(request);
        let wit_credentials = wit::Credentials::from(credentials);
        let wit_error = wit::SecurityError::from(error);
        let call = async {
            let provider = self.pre.instantiate_async(&mut store).await?;
            provider
                .reauth_provider_auth_provider()
                .call_handle_security_error(&mut store, &wit_request, &wit_credentials, &wit_error)
                .await
        };
        let outcome =
            tokio::time::timeout(Duration::from_millis(self.limits.timeout_ms), call).await;
        self.log_output(FUNCTION, &stdout, &stderr);
        match outcome {
            Err(_) => Err(self.timeout(FUNCTION)),
            Ok(Err(e)) => Err(self.fault(FUNCTION, e)),
            Ok(Ok(decision)) => Ok(decision.into()),
        }
    }
}
