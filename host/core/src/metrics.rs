//! Metrics of a host, per provider: atomics recorded on the hot paths, encoded at
//! scrape time through `prometheus-client` ([`exposition`]; the `reauth` crate's
//! `Host::register_metrics` puts them into an embedder's registry, and
//! `Host::render_metrics` gives the OpenMetrics text `reauth serve` serves at
//! `/metrics`).
//!
//! Every label value is a provider name or a fixed word (outcome, reason, kind,
//! decision, limit). Subjects, scopes, principals and credentials never appear in a
//! label or a value.
//!
//! All counters are atomics in per-provider blocks created once per provider name
//! (kept across reloads), so recording costs a few relaxed atomic adds.

/// The `prometheus-client` reauth encodes with: register a host's metrics into
/// your own registry of this version (`reauth::Host::register_metrics`).
#[cfg(feature = "prometheus")]
pub use prometheus_client;

use crate::error::{Error, LimitKind};
use crate::types::{Decision, ProviderError, Reason, SecurityErrorKind};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Histogram bucket upper bounds for plugin call durations, in seconds.
const CALL_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Histogram bucket upper bounds for credential lifetimes at issue, in seconds.
const TTL_BUCKETS: [f64; 10] = [
    10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 43200.0, 86400.0,
];

struct Histogram<const N: usize> {
    buckets: [AtomicU64; N],
    count: AtomicU64,
    /// Sum in microseconds (durations) or milliseconds (TTLs) to stay integral.
    sum: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Histogram<N> {
    fn observe(&self, bounds: &[f64; N], value: f64, sum_unit: f64) {
        for (i, bound) in bounds.iter().enumerate() {
            if value <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum
            .fetch_add((value * sum_unit) as u64, Ordering::Relaxed);
    }

    /// Its sample: per-bucket counts from the cumulative ones, `+Inf` last.
    #[cfg(feature = "prometheus")]
    fn sample(
        &self,
        s: &mut exposition::Samples<'_>,
        labels: exposition::Labels<'_>,
        bounds: &[f64; N],
        sum_unit: f64,
    ) -> std::fmt::Result {
        let count = self.count.load(Ordering::Relaxed);
        let mut buckets = Vec::with_capacity(N + 1);
        let mut below = 0u64;
        for (i, bound) in bounds.iter().enumerate() {
            let cumulative = self.buckets[i].load(Ordering::Relaxed).max(below);
            buckets.push((*bound, cumulative - below));
            below = cumulative;
        }
        buckets.push((f64::MAX, count.saturating_sub(below)));
        let sum = self.sum.load(Ordering::Relaxed) as f64 / sum_unit;
        s.histogram(labels, sum, count.max(below), &buckets)
    }
}

/// What a plugin call ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallOutcome {
    /// Returned a result (credentials or a decision).
    Ok,
    /// Returned `unavailable`.
    Unavailable,
    /// Returned `denied`.
    Denied,
    /// Returned `misconfigured`.
    Misconfigured,
    /// Trapped, broke the contract, timed out or hit a limit.
    Fault,
    /// Refused without a call: the provider is cooling down after faults.
    CoolingDown,
    /// Refused without a call: all of the provider's call slots stayed busy
    /// (its bulkhead, `limits.max_concurrent_calls`).
    Busy,
}

names!(CallOutcome {
    Ok => "ok",
    Unavailable => "unavailable",
    Denied => "denied",
    Misconfigured => "misconfigured",
    Fault => "fault",
    CoolingDown => "cooling_down",
    Busy => "busy",
});

impl CallOutcome {
    /// The outcome of a call that returned `result`.
    pub fn of<T>(result: &Result<T, Error>) -> CallOutcome {
        match result {
            Ok(_) => CallOutcome::Ok,
            Err(Error::Provider { error, .. }) => match error {
                ProviderError::Unavailable { .. } => CallOutcome::Unavailable,
                ProviderError::Denied(_) => CallOutcome::Denied,
                ProviderError::Misconfigured(_) => CallOutcome::Misconfigured,
            },
            Err(Error::CoolingDown { .. }) => CallOutcome::CoolingDown,
            Err(Error::Busy { .. }) => CallOutcome::Busy,
            Err(_) => CallOutcome::Fault,
        }
    }
}

/// How a cache lookup was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LookupKind {
    /// From the cache.
    Hit,
    /// Waited for another caller's fetch of the same key and took its result.
    Join,
    /// Fetched (the caller waited for a plugin call).
    Miss,
    /// A still-valid credential served past its use-until because refreshing failed.
    Stale,
    /// Failed (no credential).
    Error,
}

names!(LookupKind {
    Hit => "hit",
    Join => "join",
    Miss => "miss",
    Stale => "stale",
    Error => "error",
});

const DECISIONS: [&str; 4] = ["refresh_and_retry", "retry_after", "fail", "error"];

/// Limit labels beyond [`LimitKind`]'s: a call that timed out, a call refused
/// because every call slot stayed busy.
const OTHER_LIMITS: [&str; 2] = ["timeout", "concurrent_calls"];
/// Every limit label: [`LimitKind`]'s, then [`OTHER_LIMITS`].
const LIMITS: usize = LimitKind::ALL.len() + OTHER_LIMITS.len();

fn limit_index(e: &Error) -> Option<usize> {
    Some(match e {
        Error::Limit { limit, .. } => limit.index(),
        Error::Timeout { .. } => LimitKind::ALL.len(),
        Error::Busy { .. } => LimitKind::ALL.len() + 1,
        _ => return None,
    })
}

#[cfg(feature = "prometheus")]
fn limit_label(i: usize) -> &'static str {
    match LimitKind::ALL.get(i) {
        Some(limit) => limit.as_str(),
        None => OTHER_LIMITS[i - LimitKind::ALL.len()],
    }
}

/// The functions a plugin exports.
#[cfg(feature = "prometheus")]
const FUNCTIONS: [&str; 2] = ["get-credentials", "handle-security-error"];

/// The counters of one provider.
#[derive(Default)]
pub struct ProviderMetrics {
    calls: [[AtomicU64; CallOutcome::ALL.len()]; 2],
    durations: [Histogram<12>; 2],
    /// Sharded: a hit on every core counts without a shared cache line.
    lookups: [crate::sharded::Counter; LookupKind::ALL.len()],
    fetches: [AtomicU64; Reason::ALL.len()],
    security_errors: [[AtomicU64; DECISIONS.len()]; SecurityErrorKind::ALL.len()],
    reauthentications: AtomicU64,
    retry_after_waits: AtomicU64,
    ttl: Histogram<10>,
    last_success_ms: AtomicU64,
    limits: [AtomicU64; LIMITS],
    contract_violations: AtomicU64,
    shared: [AtomicU64; SharedEvent::ALL.len()],
    state_lock_waits: AtomicU64,
    state_lock_wait_us: AtomicU64,
    budget_waits: AtomicU64,
    budget_wait_us: AtomicU64,
    fuel_consumed: AtomicU64,
    memory_peak: AtomicU64,
    /// Rollout fetches: [stable, candidate] × [ok, error, fault].
    rollout: [[AtomicU64; 3]; 2],
    throttled: AtomicU64,
    retries_refused: AtomicU64,
}

impl std::fmt::Debug for ProviderMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderMetrics")
            .field("lookups", &self.lookups)
            .field("fetches", &self.fetches)
            .field("contract_violations", &self.contract_violations)
            .finish_non_exhaustive()
    }
}

/// What happened in the shared (cross-process) token cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SharedEvent {
    /// A fresh entry served an L1 miss: no provider call.
    Hit,
    /// Another process was fetching the key; its result was taken.
    Join,
    /// Nothing usable: this process called the provider.
    Miss,
    /// A fetched credential was written.
    Write,
    /// A rejected credential was removed for every process.
    Invalidation,
    /// The backend failed (the call went on without it).
    Error,
}

names!(SharedEvent {
    Hit => "hit",
    Join => "join",
    Miss => "miss",
    Write => "write",
    Invalidation => "invalidation",
    Error => "error",
});

impl ProviderMetrics {
    /// Record one `get-credentials` call made for `reason`.
    #[doc(hidden)]
    pub fn fetched<T: CredentialsLike>(
        &self,
        reason: Reason,
        elapsed: Duration,
        result: &Result<T, Error>,
        now: SystemTime,
    ) {
        self.fetches[reason.index()].fetch_add(1, Ordering::Relaxed);
        self.call(0, elapsed, result);
        if let Ok(c) = result {
            if let Some(ttl) = c.expires_at().and_then(|e| e.duration_since(now).ok()) {
                self.ttl.observe(&TTL_BUCKETS, ttl.as_secs_f64(), 1000.0);
            }
            let ms = now
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis();
            self.last_success_ms
                .store(ms.try_into().unwrap_or(u64::MAX), Ordering::Relaxed);
        }
    }

    /// Record one `handle-security-error` call for an error of `kind`.
    #[doc(hidden)]
    pub fn security_error(
        &self,
        kind: SecurityErrorKind,
        elapsed: Duration,
        result: &Result<Decision, Error>,
    ) {
        self.call(1, elapsed, result);
        let decision = match result {
            Ok(Decision::RefreshAndRetry) => 0,
            Ok(Decision::RetryAfter(_)) => 1,
            Ok(Decision::Fail) => 2,
            Err(_) => 3,
        };
        self.security_errors[kind.index()][decision].fetch_add(1, Ordering::Relaxed);
    }

    fn call<T>(&self, function: usize, elapsed: Duration, result: &Result<T, Error>) {
        let outcome = CallOutcome::of(result);
        let i = outcome.index();
        self.calls[function][i].fetch_add(1, Ordering::Relaxed);
        if outcome != CallOutcome::CoolingDown {
            self.durations[function].observe(&CALL_BUCKETS, elapsed.as_secs_f64(), 1e6);
        }
        if let Err(e) = result
            && let Some(i) = limit_index(e)
        {
            self.limits[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Record how a lookup was served.
    #[doc(hidden)]
    #[inline]
    pub fn lookup(&self, kind: LookupKind) {
        let i = kind.index();
        self.lookups[i].incr();
    }

    /// Record a credential refused for breaking the contract
    /// ([`Error::Contract`]: already expired, principal switched).
    #[doc(hidden)]
    pub fn contract_violation(&self) {
        self.contract_violations.fetch_add(1, Ordering::Relaxed);
    }

    /// Record a shared-cache event.
    #[doc(hidden)]
    pub fn shared(&self, event: SharedEvent) {
        let i = event.index();
        self.shared[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Shared-cache events of `event`'s kind so far.
    pub fn shared_events(&self, event: SharedEvent) -> u64 {
        let i = event.index();
        self.shared[i].load(Ordering::Relaxed)
    }

    /// Record a call that waited `waited` for its provider's state (held by
    /// another call of this or another process).
    #[doc(hidden)]
    pub fn state_lock_waited(&self, waited: Duration) {
        self.state_lock_waits.fetch_add(1, Ordering::Relaxed);
        self.state_lock_wait_us.fetch_add(
            u64::try_from(waited.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Record a fetch that waited `waited` for its turn in the provider's fetch
    /// budget (`[rate]`).
    #[doc(hidden)]
    pub fn fetch_budget_waited(&self, waited: Duration) {
        self.budget_waits.fetch_add(1, Ordering::Relaxed);
        self.budget_wait_us.fetch_add(
            u64::try_from(waited.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Record what one plugin call cost: fuel it burnt and the linear memory its
    /// instance held at the end (the peak: memories only grow).
    #[doc(hidden)]
    pub fn call_cost(&self, fuel: u64, memory_bytes: u64) {
        self.fuel_consumed.fetch_add(fuel, Ordering::Relaxed);
        self.memory_peak.fetch_max(memory_bytes, Ordering::Relaxed);
    }

    /// Record a fetch of a provider with a candidate version: which version,
    /// and how it ended (`ok`, `error`, `fault`; `None`: not counted).
    #[doc(hidden)]
    pub fn rollout_fetch(&self, candidate: bool, outcome: Option<&str>) {
        let o = match outcome {
            Some("ok") => 0,
            Some("error") => 1,
            Some("fault") => 2,
            _ => return,
        };
        self.rollout[usize::from(candidate)][o].fetch_add(1, Ordering::Relaxed);
    }

    /// Rollout fetches of the candidate (`true`) or the stable version that
    /// ended in `outcome` (`ok`, `error`, `fault`).
    pub fn rollout_fetches(&self, candidate: bool, outcome: &str) -> u64 {
        let o = match outcome {
            "ok" => 0,
            "error" => 1,
            "fault" => 2,
            _ => return 0,
        };
        self.rollout[usize::from(candidate)][o].load(Ordering::Relaxed)
    }

    /// Fuel the provider's calls consumed so far.
    pub fn fuel_consumed(&self) -> u64 {
        self.fuel_consumed.load(Ordering::Relaxed)
    }

    /// The most linear memory one of the provider's calls held.
    pub fn memory_peak_bytes(&self) -> u64 {
        self.memory_peak.load(Ordering::Relaxed)
    }

    /// Record a fetch refused by the provider's fetch budget
    /// ([`crate::Error::Throttled`]).
    #[doc(hidden)]
    pub fn fetch_throttled(&self) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
    }

    /// Record a re-run refused because the provider's retry budget was spent.
    #[doc(hidden)]
    pub fn retry_refused(&self) {
        self.retries_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Fetches refused by the fetch budget so far.
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    /// Fetches that waited for the fetch budget so far.
    pub fn budget_waits(&self) -> u64 {
        self.budget_waits.load(Ordering::Relaxed)
    }

    /// Re-runs refused by the retry budget so far.
    pub fn retries_refused(&self) -> u64 {
        self.retries_refused.load(Ordering::Relaxed)
    }

    /// Credentials refused for breaking the contract so far.
    pub fn contract_violations(&self) -> u64 {
        self.contract_violations.load(Ordering::Relaxed)
    }

    /// Record a re-authentication by `with_credentials`.
    #[doc(hidden)]
    pub fn reauthenticated(&self) {
        self.reauthentications.fetch_add(1, Ordering::Relaxed);
    }

    /// Record a retry-after wait by `with_credentials`.
    #[doc(hidden)]
    pub fn waited(&self) {
        self.retry_after_waits.fetch_add(1, Ordering::Relaxed);
    }

    /// Lookups of `kind` so far.
    pub fn lookups(&self, kind: LookupKind) -> u64 {
        let i = kind.index();
        self.lookups[i].get()
    }
}

/// What the fetch metrics need of a credential.
#[doc(hidden)]
pub trait CredentialsLike {
    fn expires_at(&self) -> Option<SystemTime>;
}

impl CredentialsLike for crate::types::Credentials {
    fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }
}

/// The metrics of every provider a host has had.
#[derive(Default)]
pub struct Metrics {
    providers: RwLock<BTreeMap<String, Arc<ProviderMetrics>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.providers.read().map(|p| p.len()).unwrap_or(0);
        f.debug_struct("Metrics").field("providers", &n).finish()
    }
}

/// Writing metric families through `prometheus-client`'s encoder (OpenMetrics
/// text, or whatever encoder an embedder's registry uses): reauth keeps its own
/// atomics (recording is a relaxed add on the hot path) and encodes them at
/// scrape time as a [`Collector`](prometheus_client::collector::Collector).
#[cfg(feature = "prometheus")]
pub mod exposition {
    use prometheus_client::encoding::{
        DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelValue,
        LabelValueEncoder, MetricEncoder, NoLabelSet,
    };
    pub use prometheus_client::metrics::MetricType;
    use prometheus_client::registry::Unit;
    use std::fmt::{self, Write as _};

    /// A sample's labels: `(name, value)` pairs. Values are escaped here
    /// (`prometheus-client` writes label values as given).
    pub type Labels<'a> = &'a [(&'static str, &'a str)];

    #[derive(Clone, Copy)]
    struct Escaped<'a>(&'a str);

    impl EncodeLabelValue for Escaped<'_> {
        fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
            for c in self.0.chars() {
                match c {
                    '\\' => encoder.write_str("\\\\")?,
                    '"' => encoder.write_str("\\\"")?,
                    '\n' => encoder.write_str("\\n")?,
                    c => encoder.write_char(c)?,
                }
            }
            Ok(())
        }
    }

    /// `collector`'s metrics in the OpenMetrics text format (what `/metrics`
    /// serves; content type [`CONTENT_TYPE`]).
    pub fn render(collector: impl prometheus_client::collector::Collector) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(collector));
        let mut out = String::with_capacity(8192);
        // Writing into a String does not fail; an encoder error would be a bug
        // in a collector, and leaves what was written so far.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    /// The content type of [`render`]'s text.
    pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

    /// The samples of one family (see [`family`]).
    pub struct Samples<'m>(MetricEncoder<'m>);

    impl std::fmt::Debug for Samples<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Samples").finish_non_exhaustive()
        }
    }

    impl Samples<'_> {
        fn with<R>(
            &mut self,
            labels: Labels<'_>,
            write: impl FnOnce(&mut MetricEncoder<'_>) -> Result<R, fmt::Error>,
        ) -> Result<R, fmt::Error> {
            if labels.is_empty() {
                return write(&mut self.0);
            }
            let escaped: Vec<(&str, Escaped<'_>)> =
                labels.iter().map(|(k, v)| (*k, Escaped(v))).collect();
            write(&mut self.0.encode_family(&escaped)?)
        }

        /// A counter sample.
        pub fn counter(
            &mut self,
            labels: Labels<'_>,
            value: impl EncodeCounterValue,
        ) -> fmt::Result {
            self.with(labels, |m| {
                m.encode_counter::<NoLabelSet, _, u64>(&value, None)
            })
        }

        /// A gauge sample.
        pub fn gauge(&mut self, labels: Labels<'_>, value: impl EncodeGaugeValue) -> fmt::Result {
            self.with(labels, |m| m.encode_gauge(&value))
        }

        /// A counter or gauge sample, as `kind` says (other kinds: a gauge).
        pub fn counter_or_gauge(
            &mut self,
            kind: MetricType,
            labels: Labels<'_>,
            value: u64,
        ) -> fmt::Result {
            match kind {
                MetricType::Counter => self.counter(labels, value),
                // The encoder refuses a gauge above i64::MAX (failing the whole
                // scrape): saturate.
                _ => self.gauge(labels, i64::try_from(value).unwrap_or(i64::MAX)),
            }
        }

        /// A histogram sample: `buckets` are `(upper bound, count in that bucket)`
        /// (not cumulative), the last bound `f64::MAX` for `+Inf`.
        pub fn histogram(
            &mut self,
            labels: Labels<'_>,
            sum: f64,
            count: u64,
            buckets: &[(f64, u64)],
        ) -> fmt::Result {
            self.with(labels, |m| {
                m.encode_histogram::<NoLabelSet>(sum, count, buckets, None)
            })
        }

        /// An info sample (value 1).
        pub fn info(&mut self, labels: Labels<'_>) -> fmt::Result {
            let escaped: Vec<(&str, Escaped<'_>)> =
                labels.iter().map(|(k, v)| (*k, Escaped(v))).collect();
            self.0.encode_info(&escaped)
        }
    }

    /// Write the family `name` (as exposed: counters end in `_total`, info metrics
    /// in `_info`; a `_seconds` or `_bytes` suffix becomes its unit) and its
    /// samples.
    pub fn family(
        encoder: &mut DescriptorEncoder<'_>,
        name: &str,
        help: &str,
        kind: MetricType,
        samples: impl FnOnce(&mut Samples<'_>) -> fmt::Result,
    ) -> fmt::Result {
        let base = match kind {
            MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
            MetricType::Info => name.strip_suffix("_info").unwrap_or(name),
            _ => name,
        };
        let (base, unit) = if let Some(b) = base.strip_suffix("_seconds") {
            (b, Some(Unit::Seconds))
        } else if let Some(b) = base.strip_suffix("_bytes") {
            (b, Some(Unit::Bytes))
        } else {
            (base, None)
        };
        let metric = encoder.encode_descriptor(base, help, unit.as_ref(), kind)?;
        samples(&mut Samples(metric))
    }
}

impl Metrics {
    /// The block of `provider`, created on first use (and kept across reloads).
    pub fn provider(&self, provider: &str) -> Arc<ProviderMetrics> {
        if let Some(m) = self
            .providers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(provider)
        {
            return m.clone();
        }
        self.providers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(provider.to_string())
            .or_default()
            .clone()
    }

    /// Every provider's metrics through a `prometheus-client` encoder (the
    /// embedder's crate wraps this in its host collector, with the host's
    /// gauges).
    #[cfg(feature = "prometheus")]
    pub fn encode_families(
        &self,
        encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        use exposition::{MetricType::*, family};
        let providers = self
            .providers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        family(
            encoder,
            "reauth_plugin_calls_total",
            "Plugin calls by provider, function and outcome.",
            Counter,
            |s| {
                for (p, m) in &providers {
                    for (f, function) in FUNCTIONS.iter().enumerate() {
                        for (i, outcome) in CallOutcome::ALL.iter().enumerate() {
                            s.counter(
                                &[
                                    ("provider", p),
                                    ("function", function),
                                    ("outcome", outcome.as_str()),
                                ],
                                load(&m.calls[f][i]),
                            )?;
                        }
                    }
                }
                Ok(())
            },
        )?;
        family(
            encoder,
            "reauth_plugin_call_duration_seconds",
            "Wall time of plugin calls (fresh instance included).",
            Histogram,
            |s| {
                for (p, m) in &providers {
                    for (f, function) in FUNCTIONS.iter().enumerate() {
                        m.durations[f].sample(
                            s,
                            &[("provider", p), ("function", function)],
                            &CALL_BUCKETS,
                            1e6,
                        )?;
                    }
                }
                Ok(())
            },
        )?;
        family(
            encoder,
            "reauth_cache_lookups_total",
            "Credential lookups by how they were served (join: waited for another caller's fetch).",
            Counter,
            |s| {
                for (p, m) in &providers {
                    for (i, kind) in LookupKind::ALL.iter().enumerate() {
                        s.counter(
                            &[("provider", p), ("result", kind.as_str())],
                            m.lookups[i].get(),
                        )?;
                    }
                }
                Ok(())
            },
        )?;
        family(
            encoder,
            "reauth_fetches_total",
            "get-credentials calls by reason (refresh_ahead: callers keep the old credential meanwhile; initial, expired, after_security_error: a caller waits).",
            Counter,
            |s| {
                for (p, m) in &providers {
                    for (i, reason) in Reason::ALL.iter().enumerate() {
                        // The contract's name, in the snake_case of label values.
                        let name = reason.as_str().replace('-', "_");
                        s.counter(&[("provider", p), ("reason", &name)], load(&m.fetches[i]))?;
                    }
                }
                Ok(())
            },
        )?;
        family(
            encoder,
            "reauth_security_errors_total",
            "Security errors reported to providers, by kind and the provider's decision.",
            Counter,
            |s| {
                for (p, m) in &providers {
                    for (k, kind) in SecurityErrorKind::ALL.iter().enumerate() {
                        for (d, decision) in DECISIONS.iter().enumerate() {
                            s.counter(
                                &[
                                    ("provider", p),
                                    ("kind", kind.as_str()),
                                    ("decision", decision),
                                ],
                                load(&m.security_errors[k][d]),
                            )?;
                        }
                    }
                }
                Ok(())
            },
        )?;
        family(
            encoder,
            "reauth_retries_total",
            "Operation retries by with_credentials: re-authentications and retry-after waits.",
            Counter,
            |s| {
                for (p, m) in &providers {
                    s.counter(
                        &[("provider", p), ("kind", "reauthenticate")],
                        load(&m.reauthentications),
                    )?;
                    s.counter(
                        &[("provider", p), ("kind", "retry_after")],
                        load(&m.retry_after_waits),
                    )?;
                }
                Ok(())
            },
        )?;
        family(
            encoder,
            "reauth_credential_ttl_seconds",
            "Lifetime of credentials when issued (those with an expiry).",
            Histogram,
            |s| {
                for (p, m) in &providers {
                    m.ttl.sample(s, &[("provider", p)], &TTL_BUCKETS, 1000.0)?;
                }
                Ok(())
            },
        )?;
        family(
            encoder,
            "reauth_last_refresh_timestamp_seconds",
            "When the provider last returned credentials, in Unix seconds of the host's clock (absent: never). Alert on time() minus it.",
            Gauge,
            |s| {
                for (p, m) in &providers {
                    let last = load(&m.last_success_ms);
                    if last > 0 {
                        s.gauge(&[("provider", p)], last as f64 / 1000.0)?;
                    }
                }
                Ok(())
            },
        )?;
        let per_provider = |encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
                            name: &str,
                            help: &str,
                            value: &dyn Fn(&ProviderMetrics) -> u64|
         -> std::fmt::Result {
            family(encoder, name, help, Counter, |s| {
                for (p, m) in &providers {
                    s.counter(&[("provider", p)], value(m))?;
                }
                Ok(())
            })
        };
        per_provider(
            encoder,
            "reauth_contract_violations_total",
            "Credentials refused because the provider broke the contract (already expired, principal switched).",
            &|m| load(&m.contract_violations),
        )?;
        family(
            encoder,
            "reauth_shared_cache_events_total",
            "Shared (cross-process) token cache events: hit, join (took another process's fetch), miss, write, invalidation, error.",
            Counter,
            |s| {
                for (p, m) in &providers {
                    for (i, event) in SharedEvent::ALL.iter().enumerate() {
                        s.counter(
                            &[("provider", p), ("event", event.as_str())],
                            load(&m.shared[i]),
                        )?;
                    }
                }
                Ok(())
            },
        )?;
        per_provider(
            encoder,
            "reauth_state_lock_waits_total",
            "Calls that waited for their provider's state, held by another call of this or another process.",
            &|m| load(&m.state_lock_waits),
        )?;
        family(
            encoder,
            "reauth_state_lock_wait_seconds_total",
            "Time calls spent waiting for their provider's state.",
            Counter,
            |s| {
                for (p, m) in &providers {
                    s.counter(&[("provider", p)], load(&m.state_lock_wait_us) as f64 / 1e6)?;
                }
                Ok(())
            },
        )?;
        per_provider(
            encoder,
            "reauth_fetch_budget_waits_total",
            "Fetches that waited for their turn in the provider's fetch budget ([rate]).",
            &|m| load(&m.budget_waits),
        )?;
        per_provider(
            encoder,
            "reauth_fetch_budget_refused_total",
            "Fetches refused because their turn in the fetch budget was further off than rate.wait_ms.",
            &|m| load(&m.throttled),
        )?;
        per_provider(
            encoder,
            "reauth_retry_budget_refused_total",
            "Re-runs (refresh-and-retry, retry-after) refused because the provider's retry budget was spent.",
            &|m| load(&m.retries_refused),
        )?;
        family(
            encoder,
            "reauth_rollout_fetches_total",
            "Fetches of providers with a candidate version, by version (stable, candidate) and outcome (ok, error, fault).",
            Counter,
            |s| {
                for (p, m) in &providers {
                    for (v, version) in ["stable", "candidate"].iter().enumerate() {
                        for (o, outcome) in ["ok", "error", "fault"].iter().enumerate() {
                            let n = load(&m.rollout[v][o]);
                            if n > 0 {
                                s.counter(
                                    &[("provider", p), ("version", version), ("outcome", outcome)],
                                    n,
                                )?;
                            }
                        }
                    }
                }
                Ok(())
            },
        )?;
        per_provider(
            encoder,
            "reauth_plugin_fuel_consumed_total",
            "WebAssembly fuel (roughly instructions) the provider's calls consumed.",
            &|m| load(&m.fuel_consumed),
        )?;
        family(
            encoder,
            "reauth_plugin_memory_peak_bytes",
            "The most linear memory one of the provider's calls held (since start).",
            Gauge,
            |s| {
                for (p, m) in &providers {
                    s.gauge(
                        &[("provider", p)],
                        i64::try_from(load(&m.memory_peak)).unwrap_or(i64::MAX),
                    )?;
                }
                Ok(())
            },
        )?;
        family(
            encoder,
            "reauth_fetch_budget_wait_seconds_total",
            "Time fetches spent waiting for their turn in the provider's fetch budget.",
            Counter,
            |s| {
                for (p, m) in &providers {
                    s.counter(&[("provider", p)], load(&m.budget_wait_us) as f64 / 1e6)?;
                }
                Ok(())
            },
        )?;
        family(
            encoder,
            "reauth_limit_hits_total",
            "Sandbox limits hit by plugin calls, by limit.",
            Counter,
            |s| {
                for (p, m) in &providers {
                    for (i, count) in m.limits.iter().enumerate() {
                        s.counter(&[("provider", p), ("limit", limit_label(i))], load(count))?;
                    }
                }
                Ok(())
            },
        )
    }
}

#[cfg(feature = "prometheus")]
impl prometheus_client::collector::Collector for Metrics {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        self.encode_families(&mut encoder)
    }
}

#[cfg(all(test, feature = "prometheus"))]
mod tests {
    use super::*;
    use crate::types::{Credential, Credentials};

    fn creds(ttl: u64, now: SystemTime) -> Credentials {
        Credentials {
            credential: Credential::Bearer("secret-token-value".into()),
            expires_at: Some(now + Duration::from_secs(ttl)),
            principal: Some("alice".into()),
        }
    }

    #[test]
    fn renders_counters_and_histograms() {
        let metrics = Arc::new(Metrics::default());
        let m = metrics.provider("api \"x\"");
        let now = SystemTime::now();
        m.fetched(
            Reason::Initial,
            Duration::from_millis(3),
            &Ok(creds(300, now)),
            now,
        );
        m.fetched(
            Reason::RefreshAhead,
            Duration::from_millis(2),
            &Ok(creds(300, now)),
            now,
        );
        let limit: Result<Credentials, Error> = Err(Error::Limit {
            provider: "api".into(),
            function: "get-credentials",
            limit: LimitKind::Memory,
            detail: "x".into(),
        });
        m.fetched(Reason::Expired, Duration::from_millis(9), &limit, now);
        // The two limit labels that are not a `LimitKind`.
        let timeout: Result<Credentials, Error> = Err(Error::Timeout {
            provider: "api".into(),
            function: "get-credentials",
            timeout_ms: 5,
        });
        let q = metrics.provider("limits");
        q.fetched(Reason::Expired, Duration::from_millis(9), &limit, now);
        q.fetched(Reason::Expired, Duration::from_millis(9), &timeout, now);
        let busy: Result<Credentials, Error> = Err(Error::Busy {
            provider: "api".into(),
            max_concurrent_calls: 1,
            waited_ms: 5,
        });
        q.fetched(Reason::Expired, Duration::from_millis(9), &busy, now);
        m.lookup(LookupKind::Hit);
        m.lookup(LookupKind::Join);
        m.security_error(
            SecurityErrorKind::TokenExpired,
            Duration::from_millis(1),
            &Ok(Decision::RefreshAndRetry),
        );
        m.reauthenticated();
        let text = exposition::render(metrics.clone());
        let line = |needle: &str| {
            text.lines()
                .find(|l| l.starts_with(needle))
                .unwrap_or_else(|| panic!("no `{needle}` in\n{text}"))
                .to_string()
        };
        let p = "provider=\"api \\\"x\\\"\"";
        for (limit, n) in [
            ("memory", 1),
            ("timeout", 1),
            ("concurrent_calls", 1),
            ("fuel", 0),
        ] {
            assert!(
                line(&format!(
                    "reauth_limit_hits_total{{provider=\"limits\",limit=\"{limit}\"}}"
                ))
                .ends_with(&format!(" {n}")),
                "{limit}"
            );
        }
        assert!(
            line(&format!(
                "reauth_plugin_calls_total{{{p},function=\"get-credentials\",outcome=\"ok\"}}"
            ))
            .ends_with(" 2")
        );
        assert!(
            line(&format!(
                "reauth_plugin_calls_total{{{p},function=\"get-credentials\",outcome=\"fault\"}}"
            ))
            .ends_with(" 1")
        );
        // `le` first: prometheus-client writes it before the family's labels.
        assert!(line(&format!("reauth_plugin_call_duration_seconds_bucket{{le=\"0.005\",{p},function=\"get-credentials\"}}")).ends_with(" 2"));
        assert!(line(&format!("reauth_plugin_call_duration_seconds_bucket{{le=\"+Inf\",{p},function=\"get-credentials\"}}")).ends_with(" 3"));
        assert!(
            line(&format!(
                "reauth_plugin_call_duration_seconds_count{{{p},function=\"get-credentials\"}}"
            ))
            .ends_with(" 3")
        );
        assert!(
            line(&format!(
                "reauth_fetches_total{{{p},reason=\"refresh_ahead\"}}"
            ))
            .ends_with(" 1")
        );
        assert!(
            line(&format!(
                "reauth_cache_lookups_total{{{p},result=\"join\"}}"
            ))
            .ends_with(" 1")
        );
        assert!(line(&format!("reauth_security_errors_total{{{p},kind=\"token_expired\",decision=\"refresh_and_retry\"}}")).ends_with(" 1"));
        assert!(line(&format!("reauth_limit_hits_total{{{p},limit=\"memory\"}}")).ends_with(" 1"));
        assert!(
            line(&format!(
                "reauth_credential_ttl_seconds_bucket{{le=\"300.0\",{p}}}"
            ))
            .ends_with(" 2")
        );
        assert!(
            line(&format!(
                "reauth_credential_ttl_seconds_bucket{{le=\"60.0\",{p}}}"
            ))
            .ends_with(" 0")
        );
        assert!(
            line(&format!(
                "reauth_retries_total{{{p},kind=\"reauthenticate\"}}"
            ))
            .ends_with(" 1")
        );
        assert!(line(&format!("reauth_last_refresh_timestamp_seconds{{{p}}}")).len() > 10);
        assert!(!text.contains("secret-token-value") && !text.contains("alice"));
        // OpenMetrics: counters are typed without `_total`, units declared.
        assert!(
            text.contains("# TYPE reauth_plugin_calls counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# UNIT reauth_plugin_call_duration_seconds seconds\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    /// A label value cannot break out of its quotes or its line, whatever the
    /// provider is called.
    #[test]
    fn label_values_are_escaped() {
        let metrics = Arc::new(Metrics::default());
        metrics.provider("a\\\"}\nreauth_forged_total 1\n");
        let text = exposition::render(metrics);
        assert!(
            !text.lines().any(|l| l.starts_with("reauth_forged")),
            "{text}"
        );
        assert!(
            text.contains("reauth_contract_violations_total{provider=\"a\\\\\\\"}\\nreauth_forged_total 1\\n\"} 0\n"),
            "{text}"
        );
    }
}
