//! Versioned rollout of a provider (`[providers.<name>.candidate]`): a candidate
//! version takes a share of the keys — by key, so one key sticks to one version —
//! and is rolled back automatically when it fails too often.
//!
//! A candidate fetch that fails is retried on the stable version at once, so its
//! callers never see the candidate's failures; the failures count toward the
//! rollback bounds (error rate over a window once enough fetches were made, or a
//! number of faults). A rolled-back candidate takes no more keys until a reload.

use crate::error::Error;
use crate::runtime::ProviderRuntime;
use crate::types::{Credentials, ProviderError, Request};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
// tokio's monotonic clock, as the cache's sleeps and the fetch budget use: one
// time source that tests can pause and advance.
use tokio::time::Instant;

/// How one fetch of a version ended, for the rollback bounds and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A credential.
    Ok,
    /// An error of the version's own (not a full bulkhead or a spent budget).
    Error,
    /// A trap, a timeout or a limit hit.
    Fault,
    /// Not the version's doing (busy, throttled): not counted.
    Neutral,
}

impl Outcome {
    pub(crate) fn of(result: &Result<Credentials, Error>) -> Outcome {
        match result {
            Ok(_) => Outcome::Ok,
            Err(Error::Busy { .. } | Error::Throttled { .. }) => Outcome::Neutral,
            Err(Error::Plugin { .. } | Error::Timeout { .. } | Error::Limit { .. }) => {
                Outcome::Fault
            }
            Err(_) => Outcome::Error,
        }
    }

    /// The metrics label.
    pub(crate) fn name(self) -> Option<&'static str> {
        match self {
            Outcome::Ok => Some("ok"),
            Outcome::Error => Some("error"),
            Outcome::Fault => Some("fault"),
            Outcome::Neutral => None,
        }
    }
}

/// The window's outcomes, oldest first, and their counts (fetches, errors,
/// faults).
type Window = (VecDeque<(Instant, Outcome)>, [u64; 3]);

/// Most outcomes kept in the window (older ones are dropped first).
const MAX_OUTCOMES: usize = 100_000;

/// A candidate version and its rollout state.
pub(crate) struct Rollout {
    pub(crate) candidate: Arc<ProviderRuntime>,
    share: f64,
    window: Duration,
    max_error_rate: f64,
    min_fetches: u32,
    max_faults: u32,
    /// The window's outcomes and their running counts (fetches, errors, faults).
    outcomes: Mutex<Window>,
    rolled_back: AtomicBool,
    reason: Mutex<Option<String>>,
}

/// Where a provider's rollout stands (`reauth check`, `GET /v1/providers`).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RolloutStatus {
    /// Hex SHA-256 of the candidate's component.
    pub candidate_sha256: String,
    /// The share of keys it takes while active.
    pub share: f64,
    /// Why it was rolled back, if it was (it then takes no keys until a reload).
    pub rolled_back: Option<String>,
    /// Its fetches in the current window: made, failed, faulted.
    pub fetches: u64,
    /// Of those, errors.
    pub errors: u64,
    /// Of those, faults (traps, timeouts, limit hits).
    pub faults: u64,
}

impl RolloutStatus {
    /// The status of a configured candidate that did not load.
    pub(crate) fn failed_to_load(share: f64, why: &str) -> RolloutStatus {
        RolloutStatus {
            candidate_sha256: String::new(),
            share,
            rolled_back: Some(format!("the candidate failed to load: {why}")),
            fetches: 0,
            errors: 0,
            faults: 0,
        }
    }
}

impl Rollout {
    pub(crate) fn new(
        candidate: Arc<ProviderRuntime>,
        config: &crate::config::CandidateConfig,
    ) -> Rollout {
        Rollout {
            candidate,
            share: config.share,
            window: Duration::from_secs(config.window_secs),
            max_error_rate: config.max_error_rate,
            min_fetches: config.min_fetches,
            max_faults: config.max_faults,
            outcomes: Mutex::new((VecDeque::new(), [0; 3])),
            rolled_back: AtomicBool::new(false),
            reason: Mutex::new(None),
        }
    }

    /// Whether the candidate serves `request`'s key: it is active and the key's
    /// hash falls in its share (the same answer for one key every time, in every
    /// process running the same build).
    pub(crate) fn takes(&self, request: &Request) -> bool {
        if self.rolled_back.load(Ordering::Relaxed) {
            return false;
        }
        // FNV-1a over the key's fields, each length-prefixed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(request.subject.as_deref().unwrap_or("\u{0}").as_bytes());
        // The scopes as the cache keys them (sorted, without duplicates), so one
        // key goes to one version whatever order its callers name them in.
        let mut scopes: Vec<&str> = request.scopes.iter().map(String::as_str).collect();
        scopes.sort_unstable();
        scopes.dedup();
        for s in scopes {
            eat(s.as_bytes());
        }
        eat(request.audience.as_deref().unwrap_or("\u{0}").as_bytes());
        // The top 53 bits as a fraction in [0, 1).
        let fraction = (h >> 11) as f64 / (1u64 << 53) as f64;
        fraction < self.share
    }

    /// Record a candidate fetch; roll back (once) when a bound is crossed.
    /// Returns the reason when this call rolled it back.
    pub(crate) fn record(&self, provider: &str, outcome: Outcome) -> Option<String> {
        if outcome == Outcome::Neutral {
            return None;
        }
        let now = Instant::now();
        let [fetches, errors, faults] = {
            let mut guard = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
            let (outcomes, counts) = &mut *guard;
            outcomes.push_back((now, outcome));
            tally(counts, outcome, true);
            while outcomes.len() > MAX_OUTCOMES
                || outcomes
                    .front()
                    .is_some_and(|(t, _)| now.saturating_duration_since(*t) > self.window)
            {
                if let Some((_, old)) = outcomes.pop_front() {
                    tally(counts, old, false);
                }
            }
            *counts
        };
        let failed = errors + faults;
        let reason = if faults >= u64::from(self.max_faults.max(1)) {
            Some(format!(
                "{faults} faults in the last {} s (candidate.max_faults = {})",
                self.window.as_secs(),
                self.max_faults
            ))
        } else if fetches >= u64::from(self.min_fetches.max(1))
            && failed as f64 > self.max_error_rate * fetches as f64
        {
            Some(format!(
                "{failed} of {fetches} fetches failed in the last {} s (candidate.max_error_rate = {})",
                self.window.as_secs(),
                self.max_error_rate
            ))
        } else {
            None
        }?;
        {
            // The reason first, then the flag: whoever sees the flag finds it.
            let mut why = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if why.is_some() {
                return None;
            }
            *why = Some(reason.clone());
        }
        self.rolled_back.store(true, Ordering::Release);
        tracing::error!(provider, candidate = self.candidate.sha256(), %reason, "candidate rolled back: every key goes to the stable version until a reload");
        Some(reason)
    }

    /// Whether it was rolled back.
    #[cfg(feature = "metrics")]
    pub(crate) fn rolled_back(&self) -> bool {
        self.rolled_back.load(Ordering::Relaxed)
    }

    pub(crate) fn status(&self) -> RolloutStatus {
        let now = Instant::now();
        let [fetches, errors, faults] = {
            let mut guard = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
            let (outcomes, counts) = &mut *guard;
            while outcomes
                .front()
                .is_some_and(|(t, _)| now.saturating_duration_since(*t) > self.window)
            {
                if let Some((_, old)) = outcomes.pop_front() {
                    tally(counts, old, false);
                }
            }
            *counts
        };
        RolloutStatus {
            candidate_sha256: self.candidate.sha256().to_string(),
            share: self.share,
            rolled_back: self
                .reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            fetches,
            errors,
            faults,
        }
    }
}

/// Add (`added`) or take away one outcome from the counts (fetches, errors,
/// faults).
fn tally(counts: &mut [u64; 3], outcome: Outcome, added: bool) {
    let which: &[usize] = match outcome {
        Outcome::Ok => &[0],
        Outcome::Error => &[0, 1],
        Outcome::Fault => &[0, 2],
        Outcome::Neutral => &[],
    };
    for &i in which {
        counts[i] = if added {
            counts[i].saturating_add(1)
        } else {
            counts[i].saturating_sub(1)
        };
    }
}

/// The error a candidate fetch failed with, for the log line (the stable version
/// then serves the fetch).
pub(crate) fn describe(e: &Error) -> String {
    match e {
        Error::Provider {
            error: ProviderError::Denied(m) | ProviderError::Misconfigured(m),
            ..
        } => m.clone(),
        other => other.to_string(),
    }
}
