//! The `state` interface: a small per-provider key/value store the host persists
//! (see [`crate::store`]). A call takes its provider's state the first time it
//! touches it and keeps it until the call ends, so a call that reads a refresh
//! token and writes the rotated one is one transaction, across processes too.

use crate::metrics::ProviderMetrics;
use crate::store::{
    DeadHolder, FileStateStore, KeyRing, MemoryStateStore, StateGuard, StateStore, StoreError,
    default_key_file,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// One provider's state: where it lives, and the values last seen (what the
/// redactor removes from the plugin's output).
pub(crate) struct ProviderState {
    store: Arc<dyn StateStore>,
    name: String,
    path: Option<PathBuf>,
    known: Mutex<Vec<String>>,
    metrics: OnceLock<Arc<ProviderMetrics>>,
}

impl ProviderState {
    /// The state of provider `name`: in the file `path` (`<dir>/<name>.json`,
    /// sealed with `keys` — by default the ring beside `<dir>` — and locked across
    /// processes) or, with `None`, in memory.
    pub(crate) fn open(
        name: &str,
        path: Option<PathBuf>,
        keys: Option<&Arc<KeyRing>>,
    ) -> Result<Self, StoreError> {
        let store: Arc<dyn StateStore> = match path.as_deref().and_then(Path::parent) {
            Some(dir) => {
                let keys = match keys {
                    Some(k) => k.clone(),
                    None => Arc::new(KeyRing::load_or_create(&default_key_file(dir))?),
                };
                Arc::new(FileStateStore::new(dir, keys))
            }
            None => Arc::new(MemoryStateStore::default()),
        };
        Ok(ProviderState {
            store,
            name: name.to_string(),
            path,
            known: Mutex::new(Vec::new()),
            metrics: OnceLock::new(),
        })
    }

    /// The state of provider `name` in `store` (a fleet's).
    pub(crate) fn in_store(name: &str, store: Arc<dyn StateStore>) -> Self {
        ProviderState {
            store,
            name: name.to_string(),
            path: None,
            known: Mutex::new(Vec::new()),
            metrics: OnceLock::new(),
        }
    }

    /// Where the state is persisted.
    pub(crate) fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Count lock waits in `metrics`.
    pub(crate) fn set_metrics(&self, metrics: Arc<ProviderMetrics>) {
        let _ = self.metrics.set(metrics);
    }

    /// Every value seen last (to redact them from captured output).
    pub(crate) fn values(&self) -> Vec<String> {
        self.known.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn saw(&self, guard: &dyn StateGuard) {
        *self.known.lock().unwrap_or_else(|e| e.into_inner()) =
            guard.values().values().cloned().collect();
    }
}

/// A call's failure to take its provider's state; the call traps with it and the
/// host reports [`crate::Error::State`].
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub(crate) struct StateFault(pub(crate) StoreError);

/// A call's deadline, shared by the call's timeout, its epoch callback and its
/// state: the time a call waits for its provider's state (held by another call)
/// is added to it, so a call that finally gets the state has its whole
/// `timeout_ms` left to finish with it — never a few milliseconds in which the
/// IdP rotates a token the call is then cut off before saving.
#[derive(Clone, Default)]
pub(crate) struct CallDeadline(Arc<std::sync::atomic::AtomicU64>);

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

impl CallDeadline {
    fn new() -> Self {
        CallDeadline(Arc::new(std::sync::atomic::AtomicU64::new(0)))
    }

    fn set(&self, at: Instant) {
        let nanos =
            u64::try_from(at.saturating_duration_since(base()).as_nanos()).unwrap_or(u64::MAX);
        self.0.store(nanos, std::sync::atomic::Ordering::Relaxed);
    }

    /// When the call must end.
    pub(crate) fn at(&self) -> Instant {
        base() + Duration::from_nanos(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn extend(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let _ = self.0.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |n| Some(n.saturating_add(by)),
        );
    }
}

/// A call ran past its deadline.
pub(crate) struct TimedOut;

/// Run `fut` until `deadline` (which may move later while it runs).
pub(crate) async fn until<F: std::future::Future>(
    deadline: &CallDeadline,
    fut: F,
) -> Result<F::Output, TimedOut> {
    tokio::pin!(fut);
    loop {
        let at = deadline.at();
        match tokio::time::timeout_at(tokio::time::Instant::from_std(at), &mut fut).await {
            Ok(value) => return Ok(value),
            Err(_) if deadline.at() <= Instant::now() => return Err(TimedOut),
            Err(_) => continue,
        }
    }
}

/// One call's access to its provider's state.
pub(crate) struct CallState {
    provider: Arc<ProviderState>,
    guard: Option<Box<dyn StateGuard>>,
    deadline: CallDeadline,
    /// The call's own timeout (the lock wait is bounded by it too).
    timeout: Duration,
    dead: Option<DeadHolder>,
    touched: bool,
}

impl CallState {
    pub(crate) fn new(provider: Arc<ProviderState>) -> Self {
        CallState {
            provider,
            guard: None,
            deadline: CallDeadline::new(),
            timeout: Duration::ZERO,
            dead: None,
            touched: false,
        }
    }

    /// Arm for a call of at most `timeout`; the deadline it returns moves later
    /// by the time the call waits for its state.
    pub(crate) fn arm(&mut self, timeout: Duration) -> CallDeadline {
        self.guard = None;
        self.dead = None;
        self.touched = false;
        self.timeout = timeout;
        self.deadline = CallDeadline::new();
        self.deadline.set(Instant::now() + timeout);
        self.deadline.clone()
    }

    /// End the call: release the state. A call that did not finish (trap,
    /// timeout, cancellation) after touching the state leaves a record, so that
    /// the next holder knows a rotation may have been lost. Returns the previous
    /// holder if it stopped holding the state that way.
    pub(crate) fn finish(&mut self, finished: bool) -> Option<DeadHolder> {
        if let Some(guard) = self.guard.as_mut()
            && !finished
        {
            guard.abandon();
        }
        self.guard = None;
        self.touched = false;
        self.dead.take()
    }

    async fn guard(&mut self) -> wasmtime::Result<&mut Box<dyn StateGuard>> {
        if self.guard.is_none() {
            // At most the call's timeout, and stop a little before the deadline so
            // the call fails with the cause rather than a bare timeout.
            let wait = self
                .deadline
                .at()
                .saturating_duration_since(Instant::now())
                .mul_f64(0.9);
            let started = Instant::now();
            let guard = self
                .provider
                .store
                .lock(&self.provider.name, wait)
                .await
                .map_err(|e| wasmtime::Error::new(StateFault(e)))?;
            let waited = started.elapsed();
            // The wait does not count against the call's work with the state.
            self.deadline.extend(waited.min(self.timeout));
            if waited > Duration::from_millis(1) {
                if let Some(m) = self.provider.metrics.get() {
                    m.state_lock_waited(waited);
                }
                tracing::debug!(provider = %self.provider.name, waited_ms = waited.as_millis() as u64, "state lock taken after waiting");
            }
            self.provider.saw(&*guard);
            self.dead = guard.previous_holder().cloned();
            self.touched = true;
            self.guard = Some(guard);
        }
        Ok(self.guard.as_mut().expect("just set"))
    }

    pub(crate) async fn get(&mut self, key: &str) -> wasmtime::Result<Option<String>> {
        Ok(self.guard().await?.values().get(key).cloned())
    }

    pub(crate) async fn set(
        &mut self,
        key: String,
        value: String,
    ) -> wasmtime::Result<Result<(), String>> {
        let provider = self.provider.clone();
        let guard = self.guard().await?;
        let mut values = guard.values().clone();
        if let Err(why) = crate::store::file::check_set(&values, &key, &value) {
            return Ok(Err(why));
        }
        values.insert(key, value);
        if let Err(why) = crate::store::file::check_size(&values) {
            return Ok(Err(why));
        }
        let committed = guard.commit(values).await.map_err(|e| e.to_string());
        provider.saw(&**guard);
        Ok(committed)
    }

    pub(crate) async fn delete(&mut self, key: &str) -> wasmtime::Result<Result<(), String>> {
        let guard = self.guard().await?;
        if !guard.values().contains_key(key) {
            return Ok(Ok(()));
        }
        let mut values = guard.values().clone();
        values.remove(key);
        Ok(guard.commit(values).await.map_err(|e| e.to_string()))
    }
}
