//! The token cache: one entry per (provider, subject, scopes, audience).
//!
//! Why per-key single-flight: when a credential expires, every caller that needs it
//! at that moment would otherwise ask the identity provider at once. Each key has
//! its own async lock; the first caller fetches while the others wait and then find
//! the fresh entry, so N callers cause one plugin call.
//!
//! Why compare-and-invalidate: after a server rejects a credential, every operation
//! that used it fails at about the same time. Only the first report may drop the
//! entry; later reports carry a credential that is no longer cached and change
//! nothing, so a burst of failures causes one refresh, not N.

use crate::clock::Clock;
use crate::config::CacheConfig;
use crate::types::{Credential, Credentials, Reason, Request};
use base64::Engine as _;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Identifies one cached credential.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// Provider name.
    pub provider: Arc<str>,
    /// Subject (`None`: the provider's own identity).
    pub subject: Option<String>,
    /// Scopes, sorted and de-duplicated so that order does not split the cache.
    pub scopes: Vec<String>,
    /// Audience.
    pub audience: Option<String>,
}

impl CacheKey {
    /// The key of `request` for `provider`.
    pub fn new(provider: Arc<str>, request: &Request) -> Self {
        let mut scopes = request.scopes.clone();
        scopes.sort();
        scopes.dedup();
        CacheKey {
            provider,
            subject: request.subject.clone(),
            scopes,
            audience: request.audience.clone(),
        }
    }
}

/// A cached credential and when the host stops using it.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) credentials: Credentials,
    /// The host's own deadline: stated expiry minus the skew margin.
    pub(crate) use_until: SystemTime,
}

type Slot = Arc<tokio::sync::Mutex<Option<Entry>>>;

/// Where a credential came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Served from the cache.
    Hit,
    /// Fetched from the provider for the given reason.
    Fetched(Reason),
}

/// The cache of every provider's credentials.
pub(crate) struct TokenCache {
    slots: Mutex<HashMap<CacheKey, Slot>>,
    clock: Arc<dyn Clock>,
}

impl TokenCache {
    pub(crate) fn new(clock: Arc<dyn Clock>) -> Self {
        TokenCache {
            slots: Mutex::new(HashMap::new()),
            clock,
        }
    }

    fn slot(&self, key: &CacheKey) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(key.clone()).or_default().clone()
    }

    /// The cached credential for `key`, or the result of `fetch` (called at most
    /// once at a time per key). `requested` is the caller's reason; when it is not
    /// [`Reason::Initial`] it overrides the one the cache infers.
    pub(crate) async fn get_or_fetch<F, Fut, E>(
        &self,
        key: &CacheKey,
        settings: &CacheConfig,
        requested: Reason,
        fetch: F,
    ) -> Result<(Credentials, Lookup), E>
    where
        F: FnOnce(Reason) -> Fut,
        Fut: Future<Output = Result<Credentials, E>>,
    {
        let slot = self.slot(key);
        let mut guard = slot.lock().await;
        let now = self.clock.now();
        let reason = match &*guard {
            Some(entry) if now < entry.use_until => {
                return Ok((entry.credentials.clone(), Lookup::Hit));
            }
            _ if requested != Reason::Initial => requested,
            Some(_) => Reason::Expired,
            None => Reason::Initial,
        };
        let credentials = fetch(reason).await?;
        let use_until = use_until(&credentials, settings, self.clock.now());
        *guard = Some(Entry {
            credentials: credentials.clone(),
            use_until,
        });
        Ok((credentials, Lookup::Fetched(reason)))
    }

    /// Drop `key`'s entry if it still holds `failed`; returns whether it did.
    pub(crate) async fn invalidate_if(&self, key: &CacheKey, failed: &Credentials) -> bool {
        let slot = self.slot(key);
        let mut guard = slot.lock().await;
        if guard
            .as_ref()
            .is_some_and(|e| e.credentials.credential == failed.credential)
        {
            *guard = None;
            true
        } else {
            false
        }
    }

    /// When the entry for `key` stops being served, if there is one.
    pub(crate) async fn use_until(&self, key: &CacheKey) -> Option<SystemTime> {
        let slot = self.slot(key);
        let guard = slot.lock().await;
        guard.as_ref().map(|e| e.use_until)
    }
}

/// The stated expiry: the provider's `expires-at`, else the bearer JWT's `exp`,
/// else `default_ttl`; capped by `max_lifetime`. Then minus the skew margin, which
/// for short-lived tokens shrinks to a tenth of the lifetime so that a 5-second
/// token is still used for most of its life.
pub(crate) fn use_until(c: &Credentials, s: &CacheConfig, now: SystemTime) -> SystemTime {
    let stated = c
        .expires_at
        .or_else(|| jwt_exp(&c.credential))
        .unwrap_or(now + Duration::from_secs(s.default_ttl_secs));
    let stated = match s.max_lifetime_secs {
        Some(max) => stated.min(now + Duration::from_secs(max)),
        None => stated,
    };
    let lifetime = stated.duration_since(now).unwrap_or(Duration::ZERO);
    let skew = Duration::from_secs(s.skew_secs).min(lifetime / 10);
    stated - skew
}

/// The `exp` claim of a bearer JWT, read without verification (the host does not
/// need to trust it, only to know when the server will stop accepting it).
pub(crate) fn jwt_exp(credential: &Credential) -> Option<SystemTime> {
    let Credential::Bearer(token) = credential else {
        return None;
    };
    let payload = token.expose().split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    Some(UNIX_EPOCH + Duration::from_secs(exp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::secret::Secret;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn bearer(token: &str, expires_at: Option<SystemTime>) -> Credentials {
        Credentials {
            credential: Credential::Bearer(Secret::new(token)),
            expires_at,
            principal: None,
        }
    }

    #[test]
    fn expiry_sources_and_skew() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = CacheConfig::default();
        // Stated expiry, minus 30 s skew.
        let c = bearer("opaque", Some(now + Duration::from_secs(3600)));
        assert_eq!(use_until(&c, &s, now), now + Duration::from_secs(3570));
        // JWT exp when the provider states none.
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{{\"exp\":{}}}", 1_000_000 + 600));
        let c = bearer(&format!("h.{payload}.s"), None);
        assert_eq!(use_until(&c, &s, now), now + Duration::from_secs(570));
        // Default TTL for opaque tokens; max lifetime caps it.
        let c = bearer("opaque", None);
        assert_eq!(use_until(&c, &s, now), now + Duration::from_secs(3570));
        let capped = CacheConfig {
            max_lifetime_secs: Some(100),
            ..CacheConfig::default()
        };
        assert_eq!(use_until(&c, &capped, now), now + Duration::from_secs(90));
        // A 5 s token keeps most of its life.
        let c = bearer("short", Some(now + Duration::from_secs(5)));
        assert_eq!(use_until(&c, &s, now), now + Duration::from_millis(4500));
    }

    #[tokio::test]
    async fn single_flight_and_compare_and_invalidate() {
        let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_000_000));
        let cache = Arc::new(TokenCache::new(Arc::new(clock.clone())));
        let key = CacheKey::new(Arc::from("p"), &Request::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let settings = CacheConfig::default();
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (cache, key, calls, settings) =
                (cache.clone(), key.clone(), calls.clone(), settings.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_fetch(&key, &settings, Reason::Initial, |_| async {
                        let n = calls.fetch_add(1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        Ok::<_, ()>(bearer(&format!("t{n}"), None))
                    })
                    .await
                    .unwrap()
                    .0
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), bearer("t0", None));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // Only the first report about t0 invalidates.
        assert!(cache.invalidate_if(&key, &bearer("t0", None)).await);
        assert!(!cache.invalidate_if(&key, &bearer("t0", None)).await);
        let (c, how) = cache
            .get_or_fetch(&key, &settings, Reason::Initial, |r| async move {
                assert_eq!(r, Reason::Initial);
                Ok::<_, ()>(bearer("t1", None))
            })
            .await
            .unwrap();
        assert_eq!(
            (c, how),
            (bearer("t1", None), Lookup::Fetched(Reason::Initial))
        );
        assert!(!cache.invalidate_if(&key, &bearer("t0", None)).await);

        // Expiry on the injected clock.
        clock.advance(Duration::from_secs(3600));
        let (_, how) = cache
            .get_or_fetch(&key, &settings, Reason::Initial, |_| async {
                Ok::<_, ()>(bearer("t2", None))
            })
            .await
            .unwrap();
        assert_eq!(how, Lookup::Fetched(Reason::Expired));
    }
}
