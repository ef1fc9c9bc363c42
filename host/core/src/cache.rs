//! The token cache: one entry per (provider, subject, scopes, audience), with
//! refresh-ahead, single-flight, compare-and-invalidate, backoff and events.
//!
//! **Two tiers (botocore).** A credential is *fresh* until its refresh time,
//! *advisory* from then until its use-until time, and *mandatory* after. In the
//! advisory window exactly one caller starts a background refresh and everyone
//! keeps getting the cached credential; if the refresh fails, the old one is kept.
//! In the mandatory window callers wait for the single in-flight fetch.
//!
//! **Refresh time (Kafka's OAUTHBEARER knobs).**
//! `issued + lifetime × (window_factor + window_jitter × rand)`, but never sooner than `min_period` after issue and never
//! later than `buffer` before expiry — unless the token is too short-lived for those
//! clamps, in which case only the window applies (a 5 s token is refreshed at ~4 s).
//! The jitter spreads the refreshes of many keys so they do not hit the IdP at once.
//!
//! **Single-flight.** Each key has one fetch lock. However many callers find a key
//! missing or expired at the same moment, one plugin call is made; the others wait
//! and take its result — its credential, or its error (they do not each retry).
//!
//! **Compare-and-invalidate.** After a server rejects a credential every operation
//! that used it fails at about the same time. Only a report about the credential the
//! entry *still holds* drops it, so a burst of failures with the same old credential
//! causes one refresh, not N.
//!
//! **Never flood the IdP.** Failed fetches back off exponentially with jitter
//! (`backoff_initial_ms` → `backoff_max_ms`); `denied` and `misconfigured` wait the
//! maximum at once; an `unavailable` error that carries the identity provider's
//! `Retry-After` waits at least that long (at most 5 minutes, or `backoff_max_ms`
//! if longer); while a key has nothing to serve its retries come every
//! `outage_retry_ms` (1 s) instead of growing to `backoff_max_ms`; two plugin
//! calls for one key are at least `min_interval_ms` apart. While backing off, a
//! credential that is past its use-until time but not yet expired is still served
//! (stale-if-error); otherwise the last error is.

// Every number here may come from a plugin, a JWT or a config: no unchecked
// arithmetic (see `clock::saturating_add`).
#![deny(clippy::arithmetic_side_effects)]

use crate::clock::{Clock, saturating_add};
use crate::config::CacheConfig;
use crate::error::Error;
use crate::sharded::Replicated;
use crate::types::{Credential, Credentials, Reason, Request};
use base64::Engine as _;
use hashbrown::Equivalent;
use papaya::Guard as _;
use std::borrow::Cow;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

/// Identifies one cached credential.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[allow(
    clippy::exhaustive_structs,
    reason = "the cache key is exactly these four parts; a new part would change which credentials are shared"
)]
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
        KeyRef::new(&provider, request).to_owned()
    }

    /// A borrowed view of this key.
    pub fn as_ref(&self) -> KeyRef<'_> {
        KeyRef {
            provider: &self.provider,
            subject: self.subject.as_deref(),
            scopes: Cow::Borrowed(&self.scopes),
            audience: self.audience.as_deref(),
        }
    }
}

/// A borrowed cache key: looking up a cached credential allocates nothing unless
/// the request's scopes need sorting. Hashes exactly like [`CacheKey`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyRef<'a> {
    provider: &'a Arc<str>,
    subject: Option<&'a str>,
    scopes: Cow<'a, [String]>,
    audience: Option<&'a str>,
}

impl<'a> KeyRef<'a> {
    /// The key of `request` for `provider`.
    #[inline]
    pub fn new(provider: &'a Arc<str>, request: &'a Request) -> Self {
        let normalized = request.scopes.windows(2).all(|w| w[0] < w[1]);
        let scopes = if normalized {
            Cow::Borrowed(request.scopes.as_slice())
        } else {
            let mut scopes = request.scopes.clone();
            scopes.sort();
            scopes.dedup();
            Cow::Owned(scopes)
        };
        KeyRef {
            provider,
            subject: request.subject.as_deref(),
            scopes,
            audience: request.audience.as_deref(),
        }
    }

    /// The owned key.
    pub fn to_owned(&self) -> CacheKey {
        CacheKey {
            provider: self.provider.clone(),
            subject: self.subject.map(str::to_string),
            scopes: self.scopes.to_vec(),
            audience: self.audience.map(str::to_string),
        }
    }
}

impl Equivalent<CacheKey> for KeyRef<'_> {
    #[inline]
    fn equivalent(&self, key: &CacheKey) -> bool {
        // Keys of one provider usually share its name's allocation.
        (Arc::ptr_eq(self.provider, &key.provider) || **self.provider == *key.provider)
            && self.subject == key.subject.as_deref()
            && *self.scopes == *key.scopes
            && self.audience == key.audience.as_deref()
    }
}

/// Where a credential came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lookup {
    /// Served from the cache.
    Hit,
    /// Another caller was fetching this key; this one waited and took its result
    /// (single-flight).
    Joined,
    /// Served from the cache after its use-until time because a refresh failed and
    /// it has not expired yet.
    Stale,
    /// Fetched from the provider for the given reason.
    Fetched(Reason),
}

/// What happened to a key, for embedders holding long-lived connections.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheEvent {
    /// The key's credential was replaced by a newly fetched one
    /// (`generation` counts the credentials this key has had).
    Rotated {
        /// The key.
        key: CacheKey,
        /// The new credential's generation.
        generation: u64,
        /// Why it was fetched.
        reason: Reason,
    },
    /// The key's credential was dropped after a server rejected it.
    Invalidated {
        /// The key.
        key: CacheKey,
        /// The dropped credential's generation.
        generation: u64,
    },
    /// The key was evicted: idle while the cache was full, or its provider was
    /// changed or removed by a reload.
    Evicted {
        /// The key.
        key: CacheKey,
    },
}

/// Fetches a credential for a request; called with the fetch lock held.
#[doc(hidden)]
pub type Fetcher = Arc<
    dyn Fn(Request) -> Pin<Box<dyn Future<Output = Result<Credentials, Error>> + Send>>
        + Send
        + Sync,
>;

#[derive(Clone, Debug)]
struct Entry {
    credentials: Arc<Credentials>,
    generation: u64,
    /// Start of the advisory window.
    refresh_at: SystemTime,
    /// Start of the mandatory window.
    use_until: SystemTime,
    /// Stated expiry: served as stale-if-error until then.
    expires: SystemTime,
}

#[derive(Default)]
struct SlotState {
    entry: Option<Entry>,
    generation: u64,
    refreshing: bool,
    last_fetch: Option<SystemTime>,
    failures: u32,
    retry_at: Option<SystemTime>,
    last_error: Option<Error>,
    /// The principal of the last credential accepted for this key (kept across
    /// invalidations): a provider never switches identity for one key.
    principal: Option<String>,
    /// When a security error last dropped this key's entry (forced refreshes are
    /// at most one per `cache.min_reauth_interval_ms`).
    last_forced: Option<SystemTime>,
}

struct Slot {
    key: CacheKey,
    state: RwLock<SlotState>,
    fetch: tokio::sync::Mutex<()>,
    /// Set (with `fetch` held) when eviction took the slot out of the map.
    evicted: AtomicBool,
}

/// A key's place in the map: what the hit path reads sits inline, in the map's
/// own allocation (one pointer less to follow on every hit), beside the slot.
struct Place {
    /// The entry's credential and refresh-at (null: none), republished under the
    /// slot's state lock whenever the entry changes. Owned by the place: read
    /// only under a guard of the map's collector, which also keeps the place
    /// itself alive; a replaced one is retired into that collector (freed once
    /// no guard that could have read it is left), the last one freed with the
    /// place. An `ArcSwap` here cost a fenced write per hit (its debt slot).
    hot: AtomicPtr<Hot>,
    /// Last use, in seconds since the epoch (for eviction: keys used within the
    /// same second are equally recent); written only when it changes, so hits
    /// write to it at most once a second.
    last_used: AtomicU64,
    slot: Arc<Slot>,
}

impl Drop for Place {
    fn drop(&mut self) {
        let hot = *self.hot.get_mut();
        if !hot.is_null() {
            // SAFETY: `hot` came from `Box::into_raw` (in `publish`) and is owned
            // by this place: a replaced pointer is retired, never left here. The
            // map drops a place only once no guard that could have read it (or
            // a pointer loaded from it) is left, so nothing else refers to it.
            #[allow(unsafe_code)]
            drop(unsafe { Box::from_raw(hot) });
        }
    }
}

// Retired `Hot`s are freed by whichever thread reclaims them.
const _: () = {
    const fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<Hot>()
};

impl Place {
    fn touch(&self, now: SystemTime) {
        self.touch_secs(now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()));
    }

    #[inline]
    fn touch_secs(&self, secs: u64) {
        if self.last_used.load(Ordering::Relaxed) != secs {
            self.last_used.store(secs, Ordering::Relaxed);
        }
    }
}

/// A fresh entry as the hit path sees it.
struct Hot {
    refresh_at: SystemTime,
    /// `refresh_at` less [`crate::clock::COARSE_LAG`], since the epoch: before it
    /// the coarse clock decides; from it on, the precise one.
    coarse_until: Duration,
    credentials: Replicated<Credentials>,
}

impl Slot {
    fn lock(&self) -> RwLockWriteGuard<'_, SlotState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Told the provider's name whenever a fetched credential is refused for
/// breaking the contract (for metrics: counted once per refusal).
#[doc(hidden)]
pub type ViolationHook = Arc<dyn Fn(&str) + Send + Sync>;

/// The slots by key: lock-free reads (the hit path), writes serialised by
/// `Inner::structure`.
type Slots = papaya::HashMap<CacheKey, Place, foldhash::fast::RandomState>;

struct Inner {
    slots: Slots,
    /// Held to add or remove keys (so eviction and the per-provider counts see one
    /// consistent map); lookups never take it.
    structure: std::sync::Mutex<()>,
    /// Keys per provider, changed only with `structure` held (metrics read it
    /// without touching `slots`).
    counts: std::sync::Mutex<std::collections::BTreeMap<Arc<str>, usize>>,
    clock: Arc<dyn Clock>,
    events: broadcast::Sender<CacheEvent>,
    max_entries: usize,
    on_violation: Option<ViolationHook>,
}

/// What [`TokenCache::invalidate_if`] did with a report of a rejected credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[doc(hidden)]
#[non_exhaustive]
pub enum Invalidation {
    /// The entry held the rejected credential and was dropped: the next lookup
    /// fetches.
    Dropped,
    /// The entry holds another credential (already refreshed) or none: nothing to
    /// do, the next lookup serves the current one.
    NotCurrent,
    /// The entry holds the rejected credential, but a forced refresh happened
    /// less than `min_reauth_interval` ago: not dropped again.
    Suppressed,
}

/// The cache of every provider's credentials. Cheap to clone.
#[derive(Clone)]
#[doc(hidden)]
pub struct TokenCache(Arc<Inner>);

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Counts only: keys name subjects, entries hold credentials.
        // `try_lock`: printing the cache never waits on it (or deadlocks).
        let keys: Option<usize> = self.0.counts.try_lock().ok().map(|c| c.values().sum());
        f.debug_struct("TokenCache")
            .field("keys", &keys)
            .field("max_entries", &self.0.max_entries)
            .finish_non_exhaustive()
    }
}

/// Counts of what the cache did for one key (for tests, metrics and the demo).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyStats {
    /// Consecutive failed fetches.
    pub failures: u32,
    /// Generation of the cached credential (0: never fetched).
    pub generation: u64,
}

impl TokenCache {
    #[cfg(test)]
    #[doc(hidden)]
    pub fn new(clock: Arc<dyn Clock>, max_entries: usize) -> Self {
        Self::with_violation_hook(clock, max_entries, None)
    }

    /// Like [`TokenCache::new`], calling `on_violation` for every credential
    /// refused for breaking the contract.
    #[doc(hidden)]
    pub fn with_violation_hook(
        clock: Arc<dyn Clock>,
        max_entries: usize,
        on_violation: Option<ViolationHook>,
    ) -> Self {
        let (events, _) = broadcast::channel(1024);
        TokenCache(Arc::new(Inner {
            // Every retirement tries to reclaim at once (seize's default waits
            // for 32 per thread): a replaced or invalidated credential is freed
            // — and wiped — as soon as no lookup may hold it if no other thread
            // is inside a lookup at that moment, else at this thread's next
            // retirement (an `ArcSwap` freed it when its last reader left).
            slots: papaya::HashMap::builder()
                .hasher(foldhash::fast::RandomState::default())
                .collector(seize::Collector::new().batch_size(1))
                .build(),
            structure: std::sync::Mutex::new(()),
            counts: Default::default(),
            clock,
            events,
            max_entries: max_entries.max(1),
            on_violation,
        }))
    }

    /// [`accept`] a fetch's result, telling the violation hook about a refusal.
    fn accepted(
        &self,
        st: &SlotState,
        key: &CacheKey,
        result: Result<Credentials, Error>,
        settings: &CacheConfig,
        now: SystemTime,
    ) -> Result<Entry, Error> {
        let accepted = result.and_then(|c| accept(st, key, c, settings, now));
        if let (Err(Error::Contract { .. }), Some(hook)) = (&accepted, &self.0.on_violation) {
            hook(&key.provider);
        }
        accepted
    }

    /// Receive every later [`CacheEvent`].
    #[doc(hidden)]
    pub fn subscribe(&self) -> broadcast::Receiver<CacheEvent> {
        self.0.events.subscribe()
    }

    fn slot(&self, key: &KeyRef<'_>) -> Arc<Slot> {
        if let Some(slot) = self.existing_slot(key) {
            return slot;
        }
        let _structure = self.0.structure.lock().unwrap_or_else(|e| e.into_inner());
        let slots = self.0.slots.pin();
        if let Some(place) = slots.get(key) {
            return place.slot.clone();
        }
        if slots.len() >= self.0.max_entries {
            self.evict_idle(&slots);
        }
        let owned = key.to_owned();
        let slot = Arc::new(Slot {
            key: owned.clone(),
            state: RwLock::default(),
            evicted: AtomicBool::new(false),
            fetch: tokio::sync::Mutex::default(),
        });
        self.count(&owned.provider, true);
        slots.insert(
            owned,
            Place {
                hot: AtomicPtr::new(std::ptr::null_mut()),
                last_used: AtomicU64::new(0),
                slot: slot.clone(),
            },
        );
        slot
    }

    /// One key more (`added`) or less for `provider`.
    fn count(&self, provider: &Arc<str>, added: bool) {
        let mut counts = self.0.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(provider.clone()).or_default();
        *n = if added {
            n.saturating_add(1)
        } else {
            n.saturating_sub(1)
        };
        if *n == 0 {
            counts.remove(provider);
        }
    }

    fn existing_slot<Q: Hash + Equivalent<CacheKey> + ?Sized>(&self, key: &Q) -> Option<Arc<Slot>> {
        self.0.slots.pin().get(key).map(|p| p.slot.clone())
    }

    /// Drop the least recently used tenth of the keys that nobody is fetching.
    fn evict_idle<G: papaya::Guard>(
        &self,
        slots: &papaya::HashMapRef<'_, CacheKey, Place, foldhash::fast::RandomState, G>,
    ) {
        let mut idle: Vec<(CacheKey, u64)> = slots
            .iter()
            .filter(|(_, p)| Arc::strong_count(&p.slot) == 1)
            .map(|(k, p)| (k.clone(), p.last_used.load(Ordering::Relaxed)))
            .collect();
        idle.sort_by_key(|(_, used)| *used);
        let excess = slots
            .len()
            .saturating_add(1)
            .saturating_sub(self.0.max_entries);
        let target = excess.max(self.0.max_entries / 10).min(idle.len());
        for (key, _) in idle.into_iter().take(target) {
            // Lookups clone slots without any lock: decide with the slot's fetch
            // lock held, and mark it, so that a lookup that picked it up meanwhile
            // sees the mark when it takes that lock and starts over on a live slot
            // (never two fetches for one key).
            let Some(Place { slot, .. }) = slots.get(&key) else {
                continue;
            };
            let Ok(_fetching) = slot.fetch.try_lock() else {
                continue;
            };
            if Arc::strong_count(slot) != 1 {
                continue;
            }
            slot.evicted.store(true, Ordering::Release);
            if slots.remove(&key).is_some() {
                self.count(&key.provider, false);
            }
            let _ = self.0.events.send(CacheEvent::Evicted { key });
        }
    }

    /// Drop every key of `provider` (changed or removed by a reload); returns how
    /// many. A fetch already running finishes for its own callers.
    #[doc(hidden)]
    pub fn remove_provider(&self, provider: &str) -> usize {
        let _structure = self.0.structure.lock().unwrap_or_else(|e| e.into_inner());
        let slots = self.0.slots.pin();
        let doomed: Vec<CacheKey> = slots
            .keys()
            .filter(|k| &*k.provider == provider)
            .cloned()
            .collect();
        self.0
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(provider);
        for key in &doomed {
            slots.remove(key);
            let _ = self.0.events.send(CacheEvent::Evicted { key: key.clone() });
        }
        doomed.len()
    }

    /// Number of keys held.
    #[doc(hidden)]
    pub fn len(&self) -> usize {
        self.0.slots.len()
    }

    /// Keys held per provider (kept up to date as keys come and go: reading it
    /// never holds up the cache).
    #[doc(hidden)]
    pub fn len_by_provider(&self) -> std::collections::BTreeMap<Arc<str>, usize> {
        self.0
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether no key is held.
    #[doc(hidden)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cached credential for `key`, fetching it with `fetch` when missing or
    /// expired (see the module docs for the exact rules).
    #[doc(hidden)]
    pub async fn get(
        &self,
        key: &KeyRef<'_>,
        request: &Request,
        settings: &Arc<CacheConfig>,
        fetch: &Fetcher,
    ) -> Result<(Arc<Credentials>, Lookup), Error> {
        if let Some(credentials) = self.fresh_hit(key) {
            return Ok((credentials, Lookup::Hit));
        }
        let mut slot = self.slot(key);
        loop {
            {
                let mut st = slot.lock();
                let now = self.0.clock.now();
                if let Some(place) = self.0.slots.pin().get(&slot.key) {
                    place.touch(now);
                }
                if let Some(entry) = &st.entry
                    && now < entry.use_until
                {
                    let credentials = entry.credentials.clone();
                    if now >= entry.refresh_at
                        && !st.refreshing
                        && st.retry_at.is_none_or(|t| now >= t)
                    {
                        st.refreshing = true;
                        self.spawn_refresh(slot.clone(), request, settings, fetch);
                    }
                    return Ok((credentials, Lookup::Hit));
                }
            }

            // Mandatory: one fetch at a time; whoever comes later takes its outcome.
            let fetching = slot.fetch.lock().await;
            if slot.evicted.load(Ordering::Acquire) {
                // Evicted since this lookup found it: start over on the live slot.
                drop(fetching);
                slot = self.slot(key);
                continue;
            }
            let reason = {
                let st = slot.lock();
                let now = self.0.clock.now();
                if let Some(entry) = &st.entry
                    && now < entry.use_until
                {
                    return Ok((entry.credentials.clone(), Lookup::Joined));
                }
                if let Some(retry_at) = st.retry_at
                    && now < retry_at
                {
                    if let Some(entry) = &st.entry
                        && now < entry.expires
                    {
                        return Ok((entry.credentials.clone(), Lookup::Stale));
                    }
                    if let Some(error) = &st.last_error {
                        return Err(error.clone());
                    }
                }
                if request.reason != Reason::Initial {
                    request.reason
                } else if st.entry.is_some() {
                    Reason::Expired
                } else {
                    Reason::Initial
                }
            };
            self.pace(&slot, settings).await;
            let result = fetch(Request {
                reason,
                ..request.clone()
            })
            .await;
            let now = self.0.clock.now();
            let mut st = slot.lock();
            return match self.accepted(&st, &slot.key, result, settings, now) {
                Ok(entry) => {
                    let credentials = entry.credentials.clone();
                    self.store(&slot, &mut st, entry, reason);
                    Ok((credentials, Lookup::Fetched(reason)))
                }
                // The call never reached the plugin (its bulkhead was full, or its
                // fetch budget spent): not a failure of the provider, no backoff,
                // nothing to replay.
                Err(error @ (Error::Busy { .. } | Error::Throttled { .. })) => {
                    if let Some(entry) = &st.entry
                        && now < entry.expires
                    {
                        return Ok((entry.credentials.clone(), Lookup::Stale));
                    }
                    Err(error)
                }
                Err(error) => {
                    record_failure(&mut st, &error, settings, now);
                    if let Some(entry) = &st.entry
                        && now < entry.expires
                        && !error.is_permanent()
                    {
                        tracing::warn!(provider = %slot.key.provider, error = %error, "refresh failed; serving the still-valid cached credential");
                        return Ok((entry.credentials.clone(), Lookup::Stale));
                    }
                    st.last_error = Some(error.clone());
                    Err(error)
                }
            };
        }
    }

    /// The hot path: a credential before its refresh time, read without a lock and
    /// without writing to a cache line another core reads (a lock-free map, the
    /// slot's published entry, this thread's copy of the credential), so hits
    /// scale with cores. `None`: not cached, or due for a refresh (the caller
    /// takes the path that starts one).
    #[doc(hidden)]
    #[inline]
    pub fn fresh_hit(&self, key: &KeyRef<'_>) -> Option<Arc<Credentials>> {
        let guard = self.0.slots.guard();
        let place = self.0.slots.get(key, &guard)?;
        let hot = guard.protect(&place.hot, Ordering::Acquire);
        // SAFETY: a non-null `hot` points to a `Hot` published by `publish`
        // (`Box::into_raw`), freed only when retired into the map's collector
        // or with its place, both after every guard that could have loaded it
        // — `guard`, alive for this whole function, among them — is gone.
        #[allow(unsafe_code)]
        let hot = unsafe { hot.as_ref() }?;
        let coarse = self.0.clock.now_coarse_since_epoch();
        if coarse >= hot.coarse_until {
            let now = self.0.clock.now();
            if now >= hot.refresh_at {
                return None;
            }
            place.touch(now);
        } else {
            place.touch_secs(coarse.as_secs());
        }
        Some(hot.credentials.get())
    }

    /// Keep plugin calls for one key at least `min_interval_ms` apart.
    async fn pace(&self, slot: &Slot, settings: &CacheConfig) {
        let last = slot.lock().last_fetch;
        if let Some(last) = last {
            let next = saturating_add(last, Duration::from_millis(settings.min_interval_ms));
            if let Ok(wait) = next.duration_since(self.0.clock.now()) {
                // Never longer than the interval, even after the wall clock
                // stepped backwards.
                tokio::time::sleep(wait.min(Duration::from_millis(settings.min_interval_ms))).await;
            }
        }
        slot.lock().last_fetch = Some(self.0.clock.now());
    }

    /// Make the hit path see `slot`'s entry (call with its state locked, after
    /// every change of the entry). Nothing to do for a slot no longer in the map.
    fn publish(&self, slot: &Arc<Slot>, st: &SlotState) {
        let guard = self.0.slots.guard();
        let Some(place) = self.0.slots.get(&slot.key, &guard) else {
            return;
        };
        if !Arc::ptr_eq(&place.slot, slot) {
            return;
        }
        let hot = st.entry.as_ref().map_or(std::ptr::null_mut(), |e| {
            Box::into_raw(Box::new(Hot {
                refresh_at: e.refresh_at,
                coarse_until: e
                    .refresh_at
                    .checked_sub(crate::clock::COARSE_LAG)
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .unwrap_or(Duration::ZERO),
                credentials: Replicated::new(e.credentials.clone()),
            }))
        });
        // Publishes of one slot are serialised by its state lock (held here).
        let replaced = place.hot.swap(hot, Ordering::AcqRel);
        if !replaced.is_null() {
            // SAFETY: `replaced` came from `Box::into_raw` and was owned by the
            // place until this swap took it out: it is retired once, into the
            // collector of the guards the hit path reads it under.
            #[allow(unsafe_code)]
            unsafe {
                guard.defer_retire(replaced, |hot, _| {
                    // SAFETY: called once per retired pointer, once no guard
                    // that could have loaded it is left.
                    drop(Box::from_raw(hot))
                })
            };
            // Freed (and its credential wiped) once no guard that could have
            // loaded it is left: at once if no other thread is in a lookup
            // right now, else at this thread's next retirement or flush.
            guard.flush();
        }
    }

    /// Make `entry` (checked by [`accept`]) the key's credential.
    fn store(&self, slot: &Arc<Slot>, st: &mut SlotState, mut entry: Entry, reason: Reason) {
        let key = &slot.key;
        st.generation = st.generation.saturating_add(1);
        st.failures = 0;
        st.retry_at = None;
        st.last_error = None;
        if entry.credentials.principal.is_some() {
            st.principal.clone_from(&entry.credentials.principal);
        }
        entry.generation = st.generation;
        st.entry = Some(entry);
        self.publish(slot, st);
        let _ = self.0.events.send(CacheEvent::Rotated {
            key: key.clone(),
            generation: st.generation,
            reason,
        });
    }

    fn spawn_refresh(
        &self,
        slot: Arc<Slot>,
        request: &Request,
        settings: &Arc<CacheConfig>,
        fetch: &Fetcher,
    ) {
        let (cache, settings, fetch) = (self.clone(), settings.clone(), fetch.clone());
        let request = Request {
            reason: Reason::RefreshAhead,
            ..request.clone()
        };
        tokio::spawn(async move {
            let _fetching = slot.fetch.lock().await;
            let still_needed = {
                let st = slot.lock();
                let now = cache.0.clock.now();
                !slot.evicted.load(Ordering::Acquire)
                    && st.entry.as_ref().is_some_and(|e| now >= e.refresh_at)
            };
            if still_needed {
                cache.pace(&slot, &settings).await;
                let result = fetch(request).await;
                let now = cache.0.clock.now();
                let mut st = slot.lock();
                match cache.accepted(&st, &slot.key, result, &settings, now) {
                    Ok(entry) => cache.store(&slot, &mut st, entry, Reason::RefreshAhead),
                    Err(Error::Busy { .. }) => {}
                    Err(error) => {
                        tracing::warn!(provider = %slot.key.provider, error = %error, "refresh-ahead failed; keeping the cached credential");
                        record_failure(&mut st, &error, &settings, now);
                    }
                }
            }
            slot.lock().refreshing = false;
        });
    }

    /// Drop `key`'s entry if it still holds `failed` (compare-and-invalidate).
    ///
    /// At most one such forced refresh per key per `min_reauth_interval`: a
    /// client reporting rejections in a loop (a bug, or a server that rejects every
    /// token) cannot turn into a flood of IdP calls; within the interval the
    /// report is [`Invalidation::Suppressed`] and the current credential stays.
    #[doc(hidden)]
    pub fn invalidate_if(
        &self,
        key: &KeyRef<'_>,
        failed: &Credentials,
        min_reauth_interval: Duration,
    ) -> Invalidation {
        let Some(slot) = self.existing_slot(key) else {
            return Invalidation::NotCurrent;
        };
        let mut st = slot.lock();
        let generation = match &st.entry {
            Some(e) if e.credentials.credential == failed.credential => e.generation,
            _ => return Invalidation::NotCurrent,
        };
        let now = self.0.clock.now();
        // (A last forced refresh "in the future" means the wall clock stepped
        // back: that does not extend the interval.)
        if let Some(last) = st.last_forced
            && last <= now
            && now < saturating_add(last, min_reauth_interval)
        {
            tracing::warn!(provider = %slot.key.provider, min_reauth_interval_ms = u64::try_from(min_reauth_interval.as_millis()).unwrap_or(u64::MAX), "security error reported again within cache.min_reauth_interval_ms of the last forced refresh; not refreshing");
            return Invalidation::Suppressed;
        }
        st.last_forced = Some(now);
        st.entry = None;
        self.publish(&slot, &st);
        let _ = self.0.events.send(CacheEvent::Invalidated {
            key: slot.key.clone(),
            generation,
        });
        Invalidation::Dropped
    }

    /// Drop `key`'s entry if `stale` says its credential is stale (another
    /// process or replica found it rejected and told this one). Not a forced
    /// refresh of this process: `min_reauth_interval` is not touched. True if
    /// dropped.
    #[doc(hidden)]
    pub fn drop_if(&self, key: &KeyRef<'_>, stale: impl FnOnce(&Credentials) -> bool) -> bool {
        let Some(slot) = self.existing_slot(key) else {
            return false;
        };
        let mut st = slot.lock();
        let generation = match &st.entry {
            Some(e) if stale(&e.credentials) => e.generation,
            _ => return false,
        };
        st.entry = None;
        self.publish(&slot, &st);
        let _ = self.0.events.send(CacheEvent::Invalidated {
            key: slot.key.clone(),
            generation,
        });
        true
    }

    /// When the entry for `key` stops being served, if there is one.
    #[doc(hidden)]
    pub fn use_until(&self, key: &KeyRef<'_>) -> Option<SystemTime> {
        let slot = self.existing_slot(key)?;
        let st = slot.lock();
        st.entry.as_ref().map(|e| e.use_until)
    }

    /// When the entry for `key` enters its advisory (refresh-ahead) window.
    #[doc(hidden)]
    pub fn refresh_at(&self, key: &KeyRef<'_>) -> Option<SystemTime> {
        let slot = self.existing_slot(key)?;
        let st = slot.lock();
        st.entry.as_ref().map(|e| e.refresh_at)
    }

    /// Failure and generation counters for `key`.
    #[doc(hidden)]
    pub fn stats(&self, key: &KeyRef<'_>) -> KeyStats {
        self.existing_slot(key)
            .map(|slot| {
                let st = slot.lock();
                KeyStats {
                    failures: st.failures,
                    generation: st.generation,
                }
            })
            .unwrap_or_default()
    }
}

fn record_failure(st: &mut SlotState, error: &Error, s: &CacheConfig, now: SystemTime) {
    st.failures = st.failures.saturating_add(1);
    let serving = st.entry.as_ref().is_some_and(|e| now < e.expires);
    let delay = failure_delay(s, error, st.failures, serving, rand::random());
    st.retry_at = Some(saturating_add(now, delay));
}

/// How long a key waits before its next fetch after its `failures`-th failure in
/// a row with `error`: the maximum after `denied`/`misconfigured`; the identity
/// provider's `Retry-After` (contract 0.2) when the provider passed one on; else
/// the exponential backoff — capped at `outage_retry_ms` (jittered by `unit` in
/// [0, 1)) while the key has no credential to serve (`serving` false), so waiting
/// callers recover soon after the identity provider does. Never more than
/// `backoff_max_ms`.
#[doc(hidden)]
pub fn failure_delay(
    s: &CacheConfig,
    error: &Error,
    failures: u32,
    serving: bool,
    unit: f64,
) -> Duration {
    let max = Duration::from_millis(s.backoff_max_ms);
    if error.is_permanent() {
        return max;
    }
    let mut step = backoff(s, failures, unit);
    if !serving && s.outage_retry_ms > 0 {
        let cap =
            Duration::from_millis(s.outage_retry_ms).mul_f64(0.9 + 0.1 * unit.clamp(0.0, 1.0));
        step = step.min(cap);
    }
    match error.provider_error().and_then(|e| e.retry_after()) {
        // The identity provider said when: at least that long (a `Retry-After:
        // 0` does not turn the backoff off), up to MAX_IDP_RETRY_AFTER (or the
        // provider's backoff_max_ms, if larger).
        Some(after) => after.max(step).min(max.max(MAX_IDP_RETRY_AFTER)),
        None => step,
    }
}

/// The longest identity-provider `Retry-After` a key waits (unless the
/// provider's `backoff_max_ms` is longer): 5 minutes.
pub const MAX_IDP_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Exponential backoff with ±20 % jitter (`unit` in [0, 1)), capped at the maximum.
#[doc(hidden)]
pub fn backoff(s: &CacheConfig, failures: u32, unit: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let base = (s.backoff_initial_ms as f64) * f64::from(1u32 << exp.min(20));
    let jittered = base * (0.8 + 0.4 * unit);
    Duration::from_millis(jittered.min(s.backoff_max_ms as f64) as u64)
}

/// Place a freshly fetched credential on the timeline: stated expiry (the
/// provider's `expires-at`, else the bearer JWT's `exp`, else `default_ttl`, capped
/// by `max_lifetime`), use-until (expiry minus skew, the skew at most a tenth of the
/// lifetime) and refresh-at (see the module docs). `unit` in [0, 1) is the jitter.
///
/// Every number here may come from a plugin, a JWT or the configuration, so all
/// arithmetic saturates (a JWT `exp` of 2^64−1 is "the far future", not a panic).
fn schedule(
    credentials: Credentials,
    s: &CacheConfig,
    now: SystemTime,
    generation: u64,
    unit: f64,
) -> Entry {
    let stated = known_expiry(&credentials)
        .unwrap_or_else(|| saturating_add(now, Duration::from_secs(s.default_ttl_secs)));
    let expires = match s.max_lifetime_secs {
        Some(max) => stated.min(saturating_add(now, Duration::from_secs(max))),
        None => stated,
    };
    let lifetime = expires.duration_since(now).unwrap_or(Duration::ZERO);
    let use_until = expires
        .checked_sub(
            Duration::from_secs(s.skew_secs).min(lifetime.checked_div(10).unwrap_or_default()),
        )
        .unwrap_or(expires);
    let factor = (s.window_factor + s.window_jitter * unit).clamp(0.0, 1.0);
    let window = lifetime.mul_f64(factor);
    let min_period = Duration::from_secs(s.min_period_secs);
    let buffer = Duration::from_secs(s.buffer_secs);
    let refresh_in = match min_period.checked_add(buffer) {
        Some(clamps) if clamps < lifetime => {
            window.max(min_period).min(lifetime.saturating_sub(buffer))
        }
        _ => window,
    };
    let refresh_at = saturating_add(now, refresh_in).min(use_until);
    Entry {
        credentials: Arc::new(credentials),
        generation,
        refresh_at,
        use_until,
        expires,
    }
}

/// Where a credential fetched at `now` lands on the cache's timeline, without
/// jitter: (expiry, use-until, refresh-at). What the shared cache (L2) records so
/// that other processes refresh it on the writer's schedule.
#[doc(hidden)]
pub fn timeline(
    credentials: &Credentials,
    s: &CacheConfig,
    now: SystemTime,
) -> (SystemTime, SystemTime, SystemTime) {
    let mut credentials = credentials.clone();
    credentials.expires_at = known_expiry(&credentials);
    let e = schedule(credentials, s, now, 0, 0.0);
    (e.expires, e.use_until, e.refresh_at)
}

/// The earliest expiry the host can know for `credentials`: the provider's
/// `expires-at` and, for a bearer JWT, its `exp` claim (a provider that computes
/// `expires-at` from `expires_in` on arrival can be later than the token's own
/// `exp`, which a strict server enforces).
#[doc(hidden)]
pub fn known_expiry(credentials: &Credentials) -> Option<SystemTime> {
    match (credentials.expires_at, jwt_exp(&credentials.credential)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Check a freshly fetched credential against what the host knows and place it
/// on the timeline: refused if it is already expired (a credential is never
/// handed out at or past an expiry the host can know) or if it stands for
/// another principal than the key's earlier credentials (a provider never
/// switches identity, unless `cache.allow_principal_change`). The credential's
/// `expires_at` becomes the earliest known expiry.
fn accept(
    st: &SlotState,
    key: &CacheKey,
    mut credentials: Credentials,
    s: &CacheConfig,
    now: SystemTime,
) -> Result<Entry, Error> {
    credentials.expires_at = known_expiry(&credentials);
    if let Some(expires) = credentials.expires_at
        && expires <= now
    {
        let ago = now.duration_since(expires).unwrap_or_default();
        tracing::error!(provider = %key.provider, expired_ms_ago = u64::try_from(ago.as_millis()).unwrap_or(u64::MAX), "provider returned an already-expired credential; refused");
        return Err(Error::Contract {
            provider: key.provider.to_string(),
            detail: format!(
                "returned a credential that expired {} ms ago (by its expires-at or JWT exp); it was not handed out",
                ago.as_millis()
            ),
        });
    }
    if !s.allow_principal_change
        && let (Some(before), Some(now_principal)) = (&st.principal, &credentials.principal)
        && before != now_principal
    {
        // The principals are plugin-controlled text: shown as fingerprints.
        let (before, after) = (fingerprint(before), fingerprint(now_principal));
        tracing::error!(provider = %key.provider, %before, %after, "provider switched principal for one key; credential refused");
        return Err(Error::Contract {
            provider: key.provider.to_string(),
            detail: format!(
                "returned a credential for another principal (fingerprint {after}) than this key's earlier credentials ({before}); a provider must not switch identity (set cache.allow_principal_change = true if this is intended)"
            ),
        });
    }
    Ok(schedule(credentials, s, now, 0, rand::random()))
}

/// A short, stable fingerprint of a principal for logs and errors (the value
/// itself is plugin-controlled text).
fn fingerprint(principal: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(principal.as_bytes());
    format!("sha256:{}", hex::encode(&digest[..6]))
}

/// The claims of a JWT, **unverified** (base64url payload, padding tolerated):
/// for scheduling and reporting only, never for trusting a token.
pub fn jwt_claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The `exp` claim of a bearer JWT, read without verification (the host does not
/// need to trust it, only to know when the server will stop accepting it).
/// Clamped to [`crate::clock::MAX_UNIX_SECS`]; a non-integer or negative `exp` is
/// ignored.
#[doc(hidden)]
pub fn jwt_exp(credential: &Credential) -> Option<SystemTime> {
    let Credential::Bearer(token) = credential else {
        return None;
    };
    let claims = jwt_claims(token.expose())?;
    let exp = claims.get("exp")?;
    // RFC 7519 allows a fractional NumericDate: round it down.
    let secs = match exp.as_u64() {
        Some(secs) => secs,
        None => {
            let x = exp.as_f64().filter(|x| x.is_finite() && *x >= 0.0)?;
            if x >= crate::clock::MAX_UNIX_SECS as f64 {
                crate::clock::MAX_UNIX_SECS
            } else {
                x.floor() as u64
            }
        }
    };
    crate::clock::from_unix_secs(secs.min(crate::clock::MAX_UNIX_SECS))
}

/// Every second-valued cache setting at its largest representable value (beyond
/// what validation allows: the timeline must hold even so).
fn extreme_settings() -> CacheConfig {
    CacheConfig {
        default_ttl_secs: u64::MAX,
        max_lifetime_secs: Some(u64::MAX),
        skew_secs: u64::MAX,
        min_period_secs: u64::MAX,
        buffer_secs: u64::MAX,
        ..CacheConfig::default()
    }
}

/// For the fuzz targets: take `credentials` as a fetch at `now` would (every
/// number hostile), under the default and the most extreme cache settings, and
/// check the timeline's invariants. Must never panic.
#[doc(hidden)]
pub fn fuzz_accept(credentials: &Credentials, now: SystemTime) {
    let key = CacheKey::new(Arc::from("fuzz"), &Request::new());
    for settings in [CacheConfig::default(), extreme_settings()] {
        match accept(
            &SlotState::default(),
            &key,
            credentials.clone(),
            &settings,
            now,
        ) {
            Ok(entry) => {
                assert!(entry.refresh_at <= entry.use_until && entry.use_until <= entry.expires);
                if let Some(known) = known_expiry(credentials) {
                    assert!(
                        known > now,
                        "a credential past its known expiry was accepted"
                    );
                    assert!(entry.expires <= known, "served past a known expiry");
                }
            }
            Err(e) => assert!(matches!(e, Error::Contract { .. })),
        }
    }
}

#[cfg(test)]
mod tests;
