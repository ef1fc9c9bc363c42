//! Herd protection as a policy: a token bucket on a provider's fetches
//! ([`FetchBucket`], `[providers.<name>.rate]`) and a retry budget shared by all
//! operations of a provider ([`RetryBudget`], tower's `TpsBudget`: re-runs may
//! add only a fraction of the normal traffic).
//!
//! Both run on tokio's clock (`tokio::time::Instant`), so tests drive them with
//! paused time. Every number may come from a config at its extreme: the
//! arithmetic saturates and never panics.

use crate::config::{RateConfig, RetryConfig};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// A token bucket: `rate` tokens a second, at most `burst` saved up. A fetch
/// takes one token; without one it reserves the next (the bucket goes into debt)
/// and waits for it, unless that wait would exceed `wait`.
#[derive(Debug)]
pub struct FetchBucket {
    rate: f64,
    burst: f64,
    wait: Duration,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Tokens now (negative: reservations not yet covered).
    tokens: f64,
    at: Instant,
}

/// A fetch the bucket could not fit within its wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct OverBudget {
    /// How long the fetch would have had to wait for its turn.
    pub retry_in: Duration,
}

impl FetchBucket {
    /// The bucket of `config`, or `None` when it sets no budget
    /// (`fetches_per_second = 0`).
    pub fn new(config: &RateConfig) -> Option<FetchBucket> {
        let rate = config.fetches_per_second;
        if !(rate.is_finite() && rate > 0.0) {
            return None;
        }
        let burst = f64::from(config.burst.max(1));
        Some(FetchBucket {
            rate,
            burst,
            wait: Duration::from_millis(config.wait_ms),
            state: Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
            }),
        })
    }

    /// Take a token now, or reserve one and say how long to wait for it (`Ok`
    /// with a zero wait: go ahead now). `Err` when the wait would exceed the
    /// bucket's `wait` (nothing is reserved then).
    pub fn reserve(&self) -> Result<Duration, OverBudget> {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(Duration::ZERO);
        }
        // The next token comes when the debt (and this one) is paid off.
        let wait =
            Duration::try_from_secs_f64((1.0 - b.tokens) / self.rate).unwrap_or(Duration::MAX);
        if wait > self.wait {
            return Err(OverBudget { retry_in: wait });
        }
        b.tokens -= 1.0;
        Ok(wait)
    }

    /// Wait for a token (see [`FetchBucket::reserve`]); the time waited.
    pub async fn acquire(&self) -> Result<Duration, OverBudget> {
        let wait = self.reserve()?;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(wait)
    }

    /// The sustained rate, per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }
}

/// The retry budget of one provider (tower's `TpsBudget`): over a sliding window
/// of 10 s, re-runs may number at most `min_per_sec × 10 + ratio × operations`.
/// Every operation deposits one; every re-run (refresh-and-retry or retry-after)
/// withdraws one, or is refused when the budget is spent.
///
/// Lock-free (every operation deposits): one slot per second of the window,
/// stamped with its second; a slot of an older second counts as empty and is
/// reset by the first writer of the new one.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    reserve: f64,
    start: Instant,
    slots: [Slot; SLOTS],
}

#[derive(Debug, Default)]
struct Slot {
    /// The second (since `start`, plus one: 0 is "never") this slot counts.
    second: AtomicU64,
    deposits: AtomicU64,
    withdrawals: AtomicU64,
}

const SLOTS: usize = 10;

impl RetryBudget {
    /// The budget of `config` (`retry.retry_ratio`, `retry.min_retries_per_sec`).
    pub fn new(config: &RetryConfig) -> RetryBudget {
        let ratio = if config.retry_ratio.is_finite() {
            config.retry_ratio.clamp(0.0, 10.0)
        } else {
            0.0
        };
        RetryBudget {
            ratio,
            reserve: f64::from(config.min_retries_per_sec) * SLOTS as f64,
            start: Instant::now(),
            slots: Default::default(),
        }
    }

    /// The current second's stamp and its slot, reset if it last counted an
    /// older second.
    fn current(&self) -> (u64, &Slot) {
        let stamp = Instant::now()
            .saturating_duration_since(self.start)
            .as_secs()
            .saturating_add(1);
        let slot = &self.slots[(stamp % SLOTS as u64) as usize];
        let seen = slot.second.load(Ordering::Acquire);
        if seen != stamp
            && slot
                .second
                .compare_exchange(seen, stamp, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // (A count racing with this reset may be lost: the budget is an
            // estimate, never a correctness bound.)
            slot.deposits.store(0, Ordering::Release);
            slot.withdrawals.store(0, Ordering::Release);
        }
        (stamp, slot)
    }

    /// Record an operation.
    pub fn deposit(&self) {
        let (_, slot) = self.current();
        slot.deposits.fetch_add(1, Ordering::Relaxed);
    }

    /// Take one re-run from the budget; `false` when it is spent.
    pub fn withdraw(&self) -> bool {
        let (stamp, slot) = self.current();
        let (deposits, withdrawals) = self
            .slots
            .iter()
            .filter(|s| {
                let second = s.second.load(Ordering::Acquire);
                second != 0 && stamp.saturating_sub(second) < SLOTS as u64
            })
            .fold((0u64, 0u64), |(d, r), s| {
                (
                    d.saturating_add(s.deposits.load(Ordering::Relaxed)),
                    r.saturating_add(s.withdrawals.load(Ordering::Relaxed)),
                )
            });
        let allowed = self.reserve + self.ratio * deposits as f64;
        if (withdrawals as f64) + 1.0 > allowed {
            return false;
        }
        slot.withdrawals.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: f64, burst: u32, wait_ms: u64) -> RateConfig {
        RateConfig {
            fetches_per_second: per_second,
            burst,
            wait_ms,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_lets_a_burst_through_then_paces_and_refuses_long_waits() {
        assert!(
            FetchBucket::new(&rate(0.0, 10, 0)).is_none(),
            "0 = no budget"
        );
        let b = FetchBucket::new(&rate(10.0, 5, 1000)).unwrap();
        for _ in 0..5 {
            assert_eq!(b.reserve(), Ok(Duration::ZERO));
        }
        // Then one every 100 ms, queued: 100, 200, … 1000 ms.
        for i in 1..=10u64 {
            assert_eq!(b.reserve(), Ok(Duration::from_millis(100 * i)), "{i}");
        }
        // The 11th would wait 1.1 s > wait_ms: refused, nothing reserved.
        let over = b.reserve().unwrap_err();
        assert_eq!(over.retry_in, Duration::from_millis(1100));
        assert_eq!(
            b.reserve().unwrap_err().retry_in,
            Duration::from_millis(1100)
        );
        // After the debt is paid and a quiet second, a burst of 5 again (not more).
        tokio::time::advance(Duration::from_secs(2)).await;
        let now: Vec<_> = (0..6).map(|_| b.reserve().unwrap()).collect();
        assert_eq!(now.iter().filter(|w| w.is_zero()).count(), 5, "{now:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn over_a_minute_the_bucket_admits_the_rate_and_the_burst() {
        let b = FetchBucket::new(&rate(2.0, 4, 0)).unwrap();
        let mut admitted = 0;
        for _ in 0..600 {
            // 10 attempts a second for 60 s.
            if b.reserve() == Ok(Duration::ZERO) {
                admitted += 1;
            }
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        assert!((120..=124).contains(&admitted), "{admitted}");
    }

    #[tokio::test(start_paused = true)]
    async fn extreme_settings_never_panic() {
        for (r, burst, wait) in [
            (1_000_000.0, 1_000_000, 600_000),
            (1e-300, 1, u64::MAX),
            (f64::MIN_POSITIVE, 1, 0),
        ] {
            let b = FetchBucket::new(&rate(r, burst, wait)).unwrap();
            for _ in 0..3 {
                let _ = b.reserve();
            }
        }
        for (ratio, min) in [(f64::NAN, u32::MAX), (f64::INFINITY, 0), (10.0, 1_000_000)] {
            let budget = RetryBudget::new(&RetryConfig {
                retry_ratio: ratio,
                min_retries_per_sec: min,
                ..RetryConfig::default()
            });
            budget.deposit();
            let _ = budget.withdraw();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_budget_is_a_fraction_of_the_traffic_plus_a_reserve() {
        let budget = RetryBudget::new(&RetryConfig {
            retry_ratio: 0.2,
            min_retries_per_sec: 1,
            ..RetryConfig::default()
        });
        // No traffic: the reserve, 1/s over the 10 s window.
        let taken = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(taken, 10);
        // 100 operations add 20 re-runs.
        for _ in 0..100 {
            budget.deposit();
        }
        let taken = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(taken, 20);
        // After the window slid past all of it, the reserve is back.
        tokio::time::advance(Duration::from_secs(11)).await;
        let taken = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(taken, 10);
    }
}
