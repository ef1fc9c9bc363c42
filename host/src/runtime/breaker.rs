//! A provider's circuit breaker: consecutive faults open it for a cool-down that
//! doubles per further fault; then one trial call is let through.

use std::sync::Mutex;
use std::time::Duration;
// tokio's monotonic clock, as the cache's sleeps and the fetch budget use: one
// time source that tests can pause and advance.
use tokio::time::Instant;

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
#[non_exhaustive]
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
