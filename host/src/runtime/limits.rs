//! Per-call sandbox bookkeeping: the memory/table limiter, the record of which limit
//! a call hit (so that the error names it, whatever the guest did afterwards), the
//! circuit breaker, and the redaction of known secrets in captured output.

use crate::error::LimitKind;
use std::borrow::Cow;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The first limit a call hit, with a detail for the error message.
#[derive(Debug, Default)]
pub(crate) struct CallHits(Mutex<Option<(LimitKind, String)>>);

impl CallHits {
    /// Record `kind` unless an earlier limit was already recorded.
    pub(crate) fn hit(&self, kind: LimitKind, detail: String) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some((kind, detail));
        }
    }

    /// Forget the recorded limit (a kept instance starts its next call clean).
    pub(crate) fn clear(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The recorded limit, if any.
    pub(crate) fn get(&self) -> Option<(LimitKind, String)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Tables a plugin may grow to, in elements.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Refuses linear-memory growth past the provider's cap (trapping the guest at once,
/// rather than letting `memory.grow` fail and the guest abort somewhere else) and
/// records the hit. The cap is for all of the Store's memories together (a
/// component with several memories does not get the cap for each).
pub(crate) struct CallLimiter {
    pub(crate) memory_bytes: usize,
    pub(crate) hits: std::sync::Arc<CallHits>,
    /// Bytes of linear memory the Store's memories hold together.
    pub(crate) used: usize,
}

impl wasmtime::ResourceLimiter for CallLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.used.saturating_add(desired.saturating_sub(current));
        if total > self.memory_bytes || maximum.is_some_and(|m| desired > m) {
            let detail = format!(
                "linear memory may not grow past {} MiB (from {} to {} bytes requested, {} bytes in all memories)",
                self.memory_bytes >> 20,
                current,
                desired,
                total
            );
            self.hits.hit(LimitKind::Memory, detail.clone());
            return Err(wasmtime::Error::msg(detail));
        }
        self.used = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS || maximum.is_some_and(|m| desired > m) {
            let detail = format!("tables may not grow past {MAX_TABLE_ELEMENTS} elements");
            self.hits.hit(LimitKind::Table, detail.clone());
            return Err(wasmtime::Error::msg(detail));
        }
        Ok(true)
    }
}

/// Replaces every occurrence of known secret values with `[redacted]`.
///
/// Values shorter than [`Redactor::MIN_LEN`] are not searched for: they would
/// shred ordinary text, and a secret that short is not protected by redaction
/// anyway.
#[derive(Debug, Default, Clone)]
pub(crate) struct Redactor {
    needles: Vec<String>,
}

impl Redactor {
    /// Shortest value redacted.
    pub(crate) const MIN_LEN: usize = 6;

    /// Add a value to redact.
    pub(crate) fn add(&mut self, value: &str) {
        if value.len() >= Self::MIN_LEN && !self.needles.iter().any(|n| n == value) {
            self.needles.push(value.to_string());
            // Longest first, so that a secret containing another is removed whole.
            self.needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        }
    }

    /// `text` with every known secret replaced.
    pub(crate) fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for needle in &self.needles {
            if out.contains(needle.as_str()) {
                out = Cow::Owned(out.replace(needle.as_str(), "[redacted]"));
            }
        }
        out
    }
}

/// A provider's circuit breaker: consecutive faults open it for a cool-down that
/// doubles per further fault.
#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    cooldown: Duration,
    max_cooldown: Duration,
    state: Mutex<BreakerState>,
}

#[derive(Debug, Default)]
struct BreakerState {
    consecutive: u32,
    open_until: Option<Instant>,
    last_fault: String,
}

/// A snapshot of a breaker, for status reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BreakerStatus {
    /// Faults in a row (reset by a call that completes).
    pub consecutive_faults: u32,
    /// Time left in the current cool-down, if open.
    pub cooling_down_for: Option<Duration>,
    /// The last fault's message, if the last call faulted.
    pub last_fault: Option<String>,
}

impl Breaker {
    pub(crate) fn new(config: &crate::config::BreakerConfig) -> Self {
        Breaker {
            threshold: config.faults.max(1),
            cooldown: Duration::from_millis(config.cooldown_ms),
            max_cooldown: Duration::from_millis(config.max_cooldown_ms),
            state: Mutex::new(BreakerState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cooldown_after(&self, consecutive: u32) -> Duration {
        let doublings = consecutive.saturating_sub(self.threshold).min(20);
        self.cooldown
            .saturating_mul(1 << doublings)
            .min(self.max_cooldown)
    }

    /// May a call start now? While open: `Err((faults, time left, last fault))`.
    /// When the cool-down has passed, one trial call is admitted and the breaker
    /// stays shut for everyone else until that call settles (or another cool-down
    /// passes).
    pub(crate) fn admit(&self) -> Result<(), (u32, Duration, String)> {
        let now = Instant::now();
        let mut s = self.lock();
        match s.open_until {
            Some(until) if now < until => Err((s.consecutive, until - now, s.last_fault.clone())),
            Some(_) => {
                s.open_until = Some(now + self.cooldown_after(s.consecutive));
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Record a call's end: `Some(message)` if it faulted. Returns the cool-down
    /// if this fault opened (or re-opened) the breaker.
    pub(crate) fn record(&self, fault: Option<&str>) -> Option<Duration> {
        let mut s = self.lock();
        match fault {
            None => {
                *s = BreakerState::default();
                None
            }
            Some(message) => {
                s.consecutive = s.consecutive.saturating_add(1);
                s.last_fault = message.to_string();
                if s.consecutive >= self.threshold {
                    let cooldown = self.cooldown_after(s.consecutive);
                    s.open_until = Some(Instant::now() + cooldown);
                    Some(cooldown)
                } else {
                    None
                }
            }
        }
    }

    pub(crate) fn status(&self) -> BreakerStatus {
        let s = self.lock();
        let now = Instant::now();
        BreakerStatus {
            consecutive_faults: s.consecutive,
            cooling_down_for: s.open_until.filter(|u| *u > now).map(|u| u - now),
            last_fault: (s.consecutive > 0).then(|| s.last_fault.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BreakerConfig;

    #[test]
    fn redactor_replaces_known_values_longest_first() {
        let mut r = Redactor::default();
        r.add("s3cret-token");
        r.add("s3cret-token-and-more");
        r.add("abc"); // too short to redact
        assert_eq!(
            r.redact("a s3cret-token-and-more b s3cret-token c abc"),
            "a [redacted] b [redacted] c abc"
        );
        assert!(matches!(r.redact("nothing here"), Cow::Borrowed(_)));
    }

    /// Review finding: each memory was checked on its own, so a component with k
    /// memories got k × `memory_mib`.
    #[test]
    fn the_memory_cap_covers_all_memories_together() {
        use wasmtime::ResourceLimiter as _;
        let hits = std::sync::Arc::new(CallHits::default());
        let mut limiter = CallLimiter {
            memory_bytes: 10 << 20,
            hits: hits.clone(),
            used: 0,
        };
        assert!(limiter.memory_growing(0, 6 << 20, None).unwrap());
        assert!(
            limiter.memory_growing(0, 6 << 20, None).is_err(),
            "second memory"
        );
        assert_eq!(hits.get().map(|(k, _)| k), Some(LimitKind::Memory));
        assert!(
            limiter.memory_growing(0, 4 << 20, None).unwrap(),
            "fits beside"
        );
        assert!(limiter.memory_growing(6 << 20, 7 << 20, None).is_err());
    }

    #[test]
    fn breaker_opens_after_threshold_and_closes_on_success() {
        let b = Breaker::new(&{
            let mut c = BreakerConfig::default();
            c.faults = 2;
            c.cooldown_ms = 60_000;
            c.max_cooldown_ms = 120_000;
            c
        });
        assert!(b.admit().is_ok());
        assert_eq!(b.record(Some("trap 1")), None);
        assert!(b.admit().is_ok());
        assert_eq!(b.record(Some("trap 2")), Some(Duration::from_secs(60)));
        let (faults, left, last) = b.admit().unwrap_err();
        assert_eq!((faults, last.as_str()), (2, "trap 2"));
        assert!(left > Duration::from_secs(59));
        assert_eq!(b.status().consecutive_faults, 2);
        // A further fault doubles the cool-down, capped at the maximum.
        assert_eq!(b.record(Some("trap 3")), Some(Duration::from_secs(120)));
        assert_eq!(b.record(Some("trap 4")), Some(Duration::from_secs(120)));
        b.record(None);
        assert!(b.admit().is_ok());
        assert_eq!(b.status(), BreakerStatus::default());
    }

    #[test]
    fn breaker_admits_one_trial_after_cooldown() {
        let b = Breaker::new(&{
            let mut c = BreakerConfig::default();
            c.faults = 1;
            c.cooldown_ms = 50;
            c.max_cooldown_ms = 50;
            c
        });
        b.record(Some("trap"));
        assert!(b.admit().is_err());
        std::thread::sleep(Duration::from_millis(80));
        assert!(b.admit().is_ok(), "trial call after the cool-down");
        assert!(b.admit().is_err(), "only one trial at a time");
    }
}
