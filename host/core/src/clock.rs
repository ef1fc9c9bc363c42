//! Time as an injectable dependency: expiry logic and plugins read the same clock,
//! so tests can use a virtual one.
//!
//! reauth reads time from two sources, each for one purpose:
//! - the wall clock, through the host's [`Clock`]: credential validity, refresh
//!   times, backoff, what plugins see, timestamps in metrics (so a manual clock
//!   moves all of them together);
//! - tokio's monotonic clock (`tokio::time`): sleeps, the fetch budget, the circuit
//!   breaker's cool-down and the rollout window (paused and advanced in tests).
//!
//! `std::time::Instant` is read directly where real elapsed time is the point:
//! the sandbox's call deadlines (enforced by wasmtime's epoch ticker, which runs in
//! real time), lock and lease waits of the state stores and the fleet (bounded
//! against other processes), and the durations recorded in metrics.

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

    /// Now, read cheaply: never later than [`Clock::now`] and at most
    /// [`COARSE_LAG`] earlier. The cache-hit path reads it (a precise read of the
    /// wall clock costs more than the rest of a hit) and decides with the
    /// precise clock whenever the lag could matter. By default, [`Clock::now`].
    fn now_coarse(&self) -> SystemTime {
        self.now()
    }

    /// [`Clock::now_coarse`] as the time since the Unix epoch (zero before it):
    /// what the cache-hit path compares, without a round trip through
    /// `SystemTime`. An override must keep [`Clock::now_coarse`]'s bounds (never
    /// later than [`Clock::now`], at most [`COARSE_LAG`] earlier) and agree with
    /// it.
    fn now_coarse_since_epoch(&self) -> Duration {
        self.now_coarse()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
    }
}

/// The most [`Clock::now_coarse`] may lag behind [`Clock::now`]. The kernel's
/// coarse clock ticks every 1–10 ms (a paused vCPU may delay a few ticks); one
/// second is far beyond that and costs nothing: refresh times are jittered by
/// minutes, and within this margin of one the hit path reads the precise clock.
pub const COARSE_LAG: Duration = Duration::from_secs(1);

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
#[allow(
    clippy::exhaustive_structs,
    reason = "a unit struct callers name as a value"
)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    /// `CLOCK_REALTIME_COARSE`: the time of the kernel's last tick, read from
    /// the vDSO without a clock read (~5 ns instead of ~40 ns on a VM), through
    /// libc. Under libfaketime (`FAKETIME`, `FAKETIME_TIMESTAMP_FILE` or
    /// `LD_PRELOAD` naming it: a speed factor would multiply the tick's lag) and
    /// off Linux, the precise clock.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn now_coarse(&self) -> SystemTime {
        coarse_since_epoch()
            .and_then(|d| UNIX_EPOCH.checked_add(d))
            .unwrap_or_else(SystemTime::now)
    }

    /// See [`SystemClock::now_coarse`]; the kernel's reading as it comes, with no
    /// conversion to `SystemTime` and back.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[inline]
    fn now_coarse_since_epoch(&self) -> Duration {
        coarse_since_epoch().unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
        })
    }
}

/// `CLOCK_REALTIME_COARSE` since the epoch; `None` under libfaketime, when there
/// is no coarse clock, or before 1970 (the callers then read the precise clock).
#[cfg(any(target_os = "linux", target_os = "android"))]
#[inline]
fn coarse_since_epoch() -> Option<Duration> {
    {
        static FAKED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let faked = || {
            std::env::var_os("FAKETIME").is_some()
                || std::env::var_os("FAKETIME_TIMESTAMP_FILE").is_some()
                || std::env::var("LD_PRELOAD").is_ok_and(|v| v.contains("faketime"))
        };
        if *FAKED.get_or_init(faked) {
            return None;
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec that outlives the call, and
        // clock_gettime writes only into it.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
        match (rc, u64::try_from(ts.tv_sec), u32::try_from(ts.tv_nsec)) {
            (0, Ok(secs), Ok(nanos)) if nanos < 1_000_000_000 => Some(Duration::new(secs, nanos)),
            // No coarse clock (or a time before 1970): the precise one.
            _ => None,
        }
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

/// A duration written for people: one or more `<number><unit>` parts, units `ms`,
/// `s`, `m`, `h`, `d` (`"250ms"`, `"5s"`, `"10 s"`, `"2m"`, `"1h30m"`; spaces
/// between a number and its unit and between parts allowed). The config's duration keys and the CLI's duration flags take it.
/// Errors say what is wrong; a sum past `u64::MAX` milliseconds is an error, never
/// a wrap.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let whole = text.trim();
    if whole.is_empty() {
        return Err("an empty duration (e.g. 500ms, 10s, 2m, 1h30m)".into());
    }
    let mut rest = whole;
    let mut total_ms: u64 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "`{whole}` is not a duration (e.g. 500ms, 10s, 2m, 1h30m)"
            ));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{whole}`: the number is too large"))?;
        rest = rest[digits..].trim_start();
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let per_unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => {
                return Err(format!(
                    "`{whole}`: a unit is needed after {number} (ms, s, m, h or d)"
                ));
            }
            other => {
                return Err(format!(
                    "`{whole}`: unknown unit `{other}` (ms, s, m, h or d)"
                ));
            }
        };
        total_ms = number
            .checked_mul(per_unit_ms)
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or_else(|| format!("`{whole}` is too long"))?;
        rest = rest[unit_len..].trim_start();
    }
    Ok(Duration::from_millis(total_ms))
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a system time (UTC, through `humantime`), cut to
/// whole seconds (rounded down); times before 1970 print as the epoch, times
/// past the year-9999 cap ([`MAX_UNIX_SECS`]) as the cap.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .min(MAX_UNIX_SECS);
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The coarse clock never runs ahead of the precise one, nor further behind
    /// than the hit path allows for.
    #[test]
    fn the_coarse_clock_lags_the_precise_one_by_less_than_coarse_lag() {
        for _ in 0..1000 {
            let coarse = SystemClock.now_coarse();
            let precise = SystemClock.now();
            assert!(coarse <= precise, "{coarse:?} > {precise:?}");
            let lag = precise.duration_since(coarse).unwrap();
            assert!(lag < COARSE_LAG, "lag {lag:?}");
        }
        let manual = ManualClock::new(UNIX_EPOCH + Duration::from_secs(5));
        assert_eq!(manual.now_coarse(), manual.now());
    }

    #[test]
    fn human_durations_parse_and_extremes_are_errors() {
        let ms = |t: &str| parse_duration(t).map(|d| d.as_millis() as u64);
        assert_eq!(ms("250ms"), Ok(250));
        assert_eq!(ms("5s"), Ok(5_000));
        assert_eq!(ms(" 2m "), Ok(120_000));
        assert_eq!(ms("1h30m"), Ok(5_400_000));
        assert_eq!(ms("1h 30m 5s"), Ok(5_405_000));
        assert_eq!(ms("1d"), Ok(86_400_000));
        assert_eq!(ms("0s"), Ok(0));
        assert_eq!(ms("10 s"), Ok(10_000));
        for bad in ["", "s", "5", "5x", "-5s", "5.5s", "1h30", "ms5", "5 5s"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        assert!(
            parse_duration("5x")
                .unwrap_err()
                .contains("unknown unit `x`")
        );
        assert!(
            parse_duration("5")
                .unwrap_err()
                .contains("a unit is needed")
        );
        // No wrap, no panic at the extremes.
        assert!(parse_duration("18446744073709551615ms").is_ok());
        assert!(
            parse_duration("18446744073709551615s")
                .unwrap_err()
                .contains("too long")
        );
        assert!(
            parse_duration("18446744073709551616ms")
                .unwrap_err()
                .contains("too large")
        );
        assert!(
            parse_duration("18446744073709551615ms1ms")
                .unwrap_err()
                .contains("too long")
        );
        assert!(parse_duration(&"9".repeat(10_000)).is_err());
    }

    #[test]
    fn rfc3339_is_utc_seconds_and_never_panics() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(1_764_100_000_999)),
            "2025-11-25T19:46:40Z"
        );
        let before = UNIX_EPOCH - Duration::from_secs(86_400);
        assert_eq!(rfc3339(before), "1970-01-01T00:00:00Z");
        let cap = UNIX_EPOCH + Duration::from_secs(MAX_UNIX_SECS);
        assert_eq!(rfc3339(cap), "9999-12-31T23:59:59Z");
        let past = UNIX_EPOCH + Duration::from_secs(MAX_UNIX_SECS + 86_400 * 400);
        assert_eq!(rfc3339(past), "9999-12-31T23:59:59Z");
    }
}
