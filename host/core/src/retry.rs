//! Re-authentication as a policy object (in the spirit of tower's `retry`).
//!
//! Why a *budget of one* re-authentication by default (Geode's "re-authenticate
//! only once"): if a server rejects a credential that was fetched a moment ago, the
//! next one will be rejected too — the problem is a permission, an audience or a
//! clock, not staleness — and every further try is a request to the identity
//! provider. A total time budget bounds `retry-after` waits the same way. Retries
//! of the operation for other reasons are the caller's call: only the caller knows
//! whether it is idempotent.

use crate::config::RetryConfig;
use crate::error::Error;
use crate::types::{Decision, SecurityError};
use std::fmt;
use std::time::Duration;

/// How an operation run through `Host::with_credentials` failed, as reported by
/// the caller's closure.
#[derive(Debug)]
#[allow(
    clippy::exhaustive_enums,
    reason = "what an operation reports: a server's security error or any other failure; the two cases are the contract of `with_credentials`"
)]
pub enum Rejection<E> {
    /// The server rejected the credential (classify it with [`crate::classify`]).
    Security {
        /// The classification handed to the provider.
        error: SecurityError,
        /// The caller's original error.
        source: E,
    },
    /// Any other failure: returned as is, never retried here.
    Other(E),
}

impl<E> Rejection<E> {
    /// A security rejection.
    pub fn security(error: SecurityError, source: E) -> Self {
        Rejection::Security { error, source }
    }
}

/// Why `Host::with_credentials` gave up.
#[derive(Debug)]
#[non_exhaustive]
pub enum OperationError<E> {
    /// No credentials could be obtained.
    Credentials(Error),
    /// The operation failed for a reason other than authentication.
    Failed(E),
    /// The server kept rejecting credentials; this is its last rejection.
    Rejected {
        /// The caller's original error from the last attempt.
        source: E,
        /// Its classification.
        error: SecurityError,
        /// How many times the operation ran.
        attempts: u32,
        /// How many of those ran on a re-fetched credential.
        reauths: u32,
        /// What the provider decided last.
        decision: Decision,
    },
}

impl<E: fmt::Display> fmt::Display for OperationError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OperationError::Credentials(e) => write!(f, "no credentials: {e}"),
            OperationError::Failed(e) => write!(f, "{e}"),
            OperationError::Rejected {
                source,
                error,
                attempts,
                reauths,
                ..
            } => write!(
                f,
                "rejected after {attempts} attempt(s), {reauths} re-authentication(s): {error}: {source}"
            ),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for OperationError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            OperationError::Credentials(e) => Some(e),
            OperationError::Failed(e) | OperationError::Rejected { source: e, .. } => Some(e),
        }
    }
}

/// An invalid [`RetryPolicy`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid retry policy: {0}")]
pub struct InvalidRetryPolicy(&'static str);

/// What a provider's decision allows, within the operation's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(
    clippy::exhaustive_enums,
    reason = "the three things a retry can do; the host handles each"
)]
pub enum Action {
    /// Drop the credential, fetch a new one and run the operation again.
    Reauthenticate,
    /// Wait, then run the operation again with the same credential.
    Wait(Duration),
    /// Return the rejection to the caller.
    GiveUp,
}

/// The per-provider retry policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    max_reauth: u32,
    max_waits: u32,
    max_retry_after: Duration,
    budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::from_config(&RetryConfig::default()).expect("defaults are valid")
    }
}

impl RetryPolicy {
    /// A policy allowing `max_reauth` re-authentications and `max_waits` waits of at
    /// most `max_retry_after` each, all within `budget`.
    pub fn new(
        max_reauth: u32,
        max_waits: u32,
        max_retry_after: Duration,
        budget: Duration,
    ) -> Result<Self, InvalidRetryPolicy> {
        if budget.is_zero() {
            return Err(InvalidRetryPolicy("the time budget must be positive"));
        }
        if max_retry_after > budget {
            return Err(InvalidRetryPolicy(
                "the longest retry-after wait must fit in the time budget",
            ));
        }
        Ok(RetryPolicy {
            max_reauth,
            max_waits,
            max_retry_after,
            budget,
        })
    }

    /// The policy of a `[providers.<name>.retry]` section.
    pub fn from_config(c: &RetryConfig) -> Result<Self, InvalidRetryPolicy> {
        Self::new(
            c.max_reauth,
            c.max_waits,
            Duration::from_millis(c.max_retry_after_ms.min(c.budget_ms)),
            Duration::from_millis(c.budget_ms),
        )
    }

    /// The longest `retry-after` wait this policy allows: a provider's longer
    /// `retry-after` is cut to it wherever a decision leaves the host.
    pub fn max_retry_after(&self) -> Duration {
        self.max_retry_after
    }

    /// `decision` with a `retry-after` wait clamped to [`Self::max_retry_after`].
    pub fn clamp(&self, decision: Decision) -> Decision {
        match decision {
            Decision::RetryAfter(wait) => Decision::RetryAfter(wait.min(self.max_retry_after)),
            other => other,
        }
    }

    /// What to do after the provider decided `decision`, given the re-authentications
    /// and waits already spent and the time `elapsed` since the operation started.
    pub fn next(&self, decision: Decision, reauths: u32, waits: u32, elapsed: Duration) -> Action {
        if elapsed >= self.budget {
            return Action::GiveUp;
        }
        match decision {
            Decision::RefreshAndRetry if reauths < self.max_reauth => Action::Reauthenticate,
            Decision::RetryAfter(wait) if waits < self.max_waits => {
                let wait = wait.min(self.max_retry_after);
                if elapsed + wait < self.budget {
                    Action::Wait(wait)
                } else {
                    Action::GiveUp
                }
            }
            _ => Action::GiveUp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (hardening review, item 10): a plugin's `retry-after` of
    /// 2^64−1 ms reached sidecar clients unclamped.
    #[test]
    fn retry_after_is_clamped_to_the_policy() {
        let p = RetryPolicy::default();
        let max = p.max_retry_after();
        assert_eq!(
            p.clamp(Decision::RetryAfter(Duration::from_millis(u64::MAX))),
            Decision::RetryAfter(max)
        );
        let short = Decision::RetryAfter(Duration::from_millis(1));
        assert_eq!(p.clamp(short), short);
        assert_eq!(p.clamp(Decision::Fail), Decision::Fail);
    }

    #[test]
    fn budget_of_one_reauthentication() {
        let p = RetryPolicy::default();
        let z = Duration::ZERO;
        assert_eq!(
            p.next(Decision::RefreshAndRetry, 0, 0, z),
            Action::Reauthenticate
        );
        assert_eq!(p.next(Decision::RefreshAndRetry, 1, 0, z), Action::GiveUp);
        assert_eq!(p.next(Decision::Fail, 0, 0, z), Action::GiveUp);
    }

    #[test]
    fn waits_are_capped_counted_and_within_the_budget() {
        let p = RetryPolicy::new(1, 2, Duration::from_secs(1), Duration::from_secs(10)).unwrap();
        let d = |ms| Decision::RetryAfter(Duration::from_millis(ms));
        assert_eq!(
            p.next(d(200), 0, 0, Duration::ZERO),
            Action::Wait(Duration::from_millis(200))
        );
        assert_eq!(
            p.next(d(60_000), 0, 1, Duration::ZERO),
            Action::Wait(Duration::from_secs(1))
        );
        assert_eq!(p.next(d(200), 0, 2, Duration::ZERO), Action::GiveUp);
        assert_eq!(
            p.next(d(900), 0, 0, Duration::from_millis(9_500)),
            Action::GiveUp
        );
        assert_eq!(
            p.next(Decision::RefreshAndRetry, 0, 0, Duration::from_secs(10)),
            Action::GiveUp
        );
    }

    #[test]
    fn invalid_policies_are_refused() {
        assert!(RetryPolicy::new(1, 1, Duration::from_secs(1), Duration::ZERO).is_err());
        assert!(RetryPolicy::new(1, 1, Duration::from_secs(5), Duration::from_secs(1)).is_err());
    }
}
