//! Time as an injectable dependency: expiry logic and plugins read the same clock,
//! so tests can use a virtual one.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Latest instant the host represents: 9999-12-31T23:59:59Z (seconds since the
/// Unix epoch). Times that come from outside (plugins, JWTs, clients of the
/// sidecar) are clamped to it or refused, never added unchecked.
pub const MAX_UNIX_SECS: u64 = 253_402_300_799;

/// [`MAX_UNIX_SECS`] as a `SystemTime`.
pub fn far_future() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(MAX_UNIX_SECS)
}

/// `secs` seconds after the Unix epoch, if not later than [`MAX_UNIX_SECS`].
pub fn from_unix_secs(secs: u64) -> Option<SystemTime> {
    (secs <= MAX_UNIX_SECS).then(|| UNIX_EPOCH + Duration::from_secs(secs))
}

/// `t + d`, saturating at [`far_future`]: for durations that come from
/// configuration, plugins or peers (never panics, whatever the numbers).
pub fn saturating_add(t: SystemTime, d: Duration) -> SystemTime {
    let limit = far_future();
    match t.checked_add(d) {
        Some(sum) if sum <= limit => sum,
        _ => limit.max(t),
    }
}

/// A wall clock.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to (for tests and simulations).
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: SystemTime) -> Self {
        ManualClock(Arc::new(Mutex::new(start)))
    }

    /// Read `to` from now on (forwards or backwards).
    pub fn set(&self, to: SystemTime) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }

    /// Move forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
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

/// A wall clock driven by tokio's clock: under `tokio::time::pause()` it only
/// moves when tokio's time does (auto-advance or `tokio::time::advance`), so
/// expiry, refresh-ahead and backoff can be tested without waiting.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    base: SystemTime,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock reading `base` now, moving with tokio's time.
    pub fn starting_at(base: SystemTime) -> Self {
        TokioClock {
            base,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.base + self.start.elapsed()
    }
}
