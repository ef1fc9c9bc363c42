//! Fleet mode: the replicas of a service share fresh credentials and provider
//! state through Redis or PostgreSQL, so that the whole fleet calls the identity
//! provider once per token lifetime and never spends one refresh token twice.
//!
//! [`Fleet`] implements both store traits on top of a [`FleetBackend`] (one per
//! engine: [`RedisBackend`], [`PostgresBackend`]):
//!
//! - **Leases with fencing.** One replica per key holds a lease (a random token
//!   with a time-to-live in the backend's clock, and a fencing number that grows
//!   with every lease of the key). The holder renews it every third of
//!   `lease_ms` while its provider runs; a holder that dies blocks the key for at
//!   most `lease_ms`. Every write under a lease is a compare-and-set on the lease
//!   token in the backend (one script / one statement): a holder whose lease
//!   lapsed (stopped, partitioned) cannot overwrite what the next holder wrote.
//! - **Waiters are woken by the backend** (Redis pub/sub, PostgreSQL
//!   `LISTEN/NOTIFY`) when a lease is released, with a bounded poll as a fallback
//!   for lost messages, then read the shared entry.
//! - **State** (`s.<provider>`) is read and written under the provider's state
//!   lease: a call that rotates a refresh token is one transaction fleet-wide.
//! - **Sealed at rest.** Every value is sealed with the fleet's [`KeyRing`]
//!   (ChaCha20-Poly1305); the associated data binds the fleet name, the record's
//!   name and its version (the writer's fence), so a ciphertext moved to another
//!   key, fleet or version does not open. Record names are keyed hashes (no
//!   provider, subject or secret visible), except `s.<provider>`.
//! - **The backend's clock.** Every answer carries the backend's time; the
//!   host's clock is corrected by the measured offset ([`Fleet::clock`]), so a
//!   replica whose clock is minutes off neither serves an expired token nor
//!   refreshes early.
//! - **Backend down.** Operations fail fast for a second after a failure (a
//!   breaker; `reauth_fleet_backend_up` in the metrics, one log line when it
//!   goes down and one when it comes back): L1 keeps serving, fetches go ahead
//!   per replica, and provider state (a rotating refresh token) is refused with
//!   a typed error rather than risked.

mod postgres;
mod redis;

pub use postgres::PostgresBackend;
pub use redis::RedisBackend;

use super::keys::{KeyRing, OpenError, wipe};
use super::shared::{entry_from_bytes, entry_to_bytes};
use super::{
    DeadHolder, Lease, RemoteEvent, SharedCache, SharedEntry, SharedFailure, StateGuard,
    StateStore, StoreError, StoreFuture,
};
use crate::clock::Clock;
use crate::types::Credentials;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

/// A stream of bus messages (ends when the subscription is lost).
pub type BusStream = Pin<Box<dyn futures_util::Stream<Item = String> + Send>>;

/// A lease the backend handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(
    clippy::exhaustive_structs,
    reason = "what a `FleetBackend` answers to a lease: backends outside this crate build it"
)]
pub struct Acquired {
    /// Its fencing number (grows with every lease of the name).
    pub fence: u64,
    /// The holder record the previous holder left, when it did not release the
    /// lease cleanly (it died, was stopped past the lease, or was cut off).
    pub previous: Option<String>,
    /// The backend's time, in milliseconds since the Unix epoch.
    pub now_ms: u64,
}

/// A stored value: sealed bytes, the version they were sealed for, and a tag to
/// compare without opening them.
#[derive(Clone, PartialEq, Eq)]
#[allow(
    clippy::exhaustive_structs,
    reason = "what a `FleetBackend` stores and returns: backends outside this crate build it"
)]
pub struct Record {
    /// The writer's fence (bound into the seal).
    pub version: u64,
    /// What compare-and-delete compares (a keyed hash; may be empty).
    pub tag: String,
    /// The sealed value.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("version", &self.version)
            .field("bytes", &self.data.len())
            .finish_non_exhaustive()
    }
}

/// One engine a fleet shares its data through. Names are `<group>:<kind>`; the
/// backend keeps every name of one group together (one Redis Cluster hash slot)
/// and prefixes them with the fleet's name. Every time is the backend's.
pub trait FleetBackend: Send + Sync + 'static {
    /// Where it is, for messages (never a password).
    fn describe(&self) -> String;
    /// Take lease `name` for `ttl_ms` if nobody holds it; `holder` describes
    /// this holder for the next one.
    fn acquire<'a>(
        &'a self,
        name: &'a str,
        token: &'a str,
        holder: &'a str,
        ttl_ms: u64,
    ) -> StoreFuture<'a, Result<Option<Acquired>, StoreError>>;
    /// Extend lease `name` by `ttl_ms` from now if `token` still holds it.
    fn renew<'a>(
        &'a self,
        name: &'a str,
        token: &'a str,
        ttl_ms: u64,
    ) -> StoreFuture<'a, Result<bool, StoreError>>;
    /// Give lease `name` up if `token` holds it. `leave` is left for the next
    /// holder (a call cut off holding provider state); `None` is a clean release.
    fn release<'a>(
        &'a self,
        name: &'a str,
        token: &'a str,
        leave: Option<&'a str>,
    ) -> StoreFuture<'a, Result<(), StoreError>>;
    /// Record `name` (if present and not expired) and the backend's time (ms).
    fn get<'a>(
        &'a self,
        name: &'a str,
    ) -> StoreFuture<'a, Result<(Option<Record>, u64), StoreError>>;
    /// Store `record` under `name`, expiring after `ttl_ms` (0: never). With
    /// `lease` (`(lease name, token)`), only if that token still holds it, in one
    /// atomic step; false when it does not.
    fn put<'a>(
        &'a self,
        name: &'a str,
        record: &'a Record,
        ttl_ms: u64,
        lease: Option<(&'a str, &'a str)>,
    ) -> StoreFuture<'a, Result<bool, StoreError>>;
    /// Delete `name`, only if its tag is `tag` (any tag with `None`). True if
    /// deleted.
    fn delete_if<'a>(
        &'a self,
        name: &'a str,
        tag: Option<&'a str>,
    ) -> StoreFuture<'a, Result<bool, StoreError>>;
    /// Announce `message` to every replica of the fleet.
    fn publish<'a>(&'a self, message: &'a str) -> StoreFuture<'a, Result<(), StoreError>>;
    /// Listen to the announcements and to this replica's own `inbox` (16 hex
    /// digits; see [`FleetBackend::heartbeat`]); the stream ends when the
    /// subscription is lost.
    fn subscribe<'a>(&'a self, inbox: &'a str) -> StoreFuture<'a, Result<BusStream, StoreError>>;
    /// Send `message` to one replica's `inbox` only (the listener's heartbeat to
    /// itself: it proves the subscription alive without N² traffic).
    fn heartbeat<'a>(
        &'a self,
        inbox: &'a str,
        message: &'a str,
    ) -> StoreFuture<'a, Result<(), StoreError>>;
    /// Housekeeping (drop what expired long ago), run now and then by one
    /// background task per replica, never on a caller's path.
    fn maintain(&self) -> StoreFuture<'_, Result<(), StoreError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// How a fleet behaves (from `[fleet]`; [`Fleet::new`] brings values outside
/// the ranges `[fleet]` accepts into them).
#[derive(Debug, Clone)]
#[allow(
    clippy::exhaustive_structs,
    reason = "every setting of a fleet handle, all required (no default to fall back on)"
)]
pub struct FleetOptions {
    /// The fleet's name (prefix of every key or row).
    pub name: String,
    /// Lease time-to-live; renewed every third of it.
    pub lease: Duration,
    /// Longest wait for another replica's fetch.
    pub wait: Duration,
    /// Longest wait for one backend operation.
    pub timeout: Duration,
}

impl FleetOptions {
    /// Within the bounds `[fleet]` validates (lease 1 s–10 min, wait 0.1 s–10
    /// min, timeout 50 ms–half the lease).
    fn sane(self) -> Self {
        let lease = self
            .lease
            .clamp(Duration::from_secs(1), Duration::from_secs(600));
        FleetOptions {
            lease,
            wait: self
                .wait
                .clamp(Duration::from_millis(100), Duration::from_secs(600)),
            timeout: self.timeout.clamp(Duration::from_millis(50), lease / 2),
            name: self.name,
        }
    }
}

const MAGIC: &[u8] = b"reauth-fleet\x01";
/// After a backend failure, operations fail fast for this long.
const BREAKER_OPEN: Duration = Duration::from_secs(1);
/// Waiters re-check at least this often when no announcement arrives.
const POLL: Duration = Duration::from_millis(250);
/// The bus listener's heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How often the backend's housekeeping runs (per replica).
const MAINTENANCE: Duration = Duration::from_secs(60);

/// A fleet: [`SharedCache`] and [`StateStore`] on a [`FleetBackend`]. See the
/// [module docs](self).
#[derive(Clone)]
pub struct Fleet {
    inner: Arc<Inner>,
}

struct Inner {
    options: FleetOptions,
    backend: Arc<dyn FleetBackend>,
    keys: Arc<KeyRing>,
    ids: ring::hmac::Key,
    tags: ring::hmac::Key,
    holder: String,
    /// The host's own clock (what the offset corrects).
    base: Mutex<Arc<dyn Clock>>,
    /// Backend time minus local time, in ms.
    offset_ms: Arc<AtomicI64>,
    offset_known: AtomicBool,
    health: Health,
    bus: broadcast::Sender<RemoteEvent>,
    released: broadcast::Sender<String>,
    /// Signs and checks bus messages.
    bus_key: ring::hmac::Key,
    /// This replica's private channel (heartbeats).
    inbox: String,
    subscriber: OnceLock<tokio::task::AbortHandle>,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    errors: AtomicU64,
    lease_lost: AtomicU64,
    unopenable: AtomicU64,
    bus_messages: AtomicU64,
    forged: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.subscriber.get() {
            task.abort();
        }
    }
}

#[cfg(feature = "metrics")]
impl crate::metrics::prometheus_client::collector::Collector for Fleet {
    fn encode(
        &self,
        mut encoder: crate::metrics::prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        self.encode_metrics(&mut encoder)
    }
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("name", &self.inner.options.name)
            .field("backend", &self.inner.backend.describe())
            .field("key_id", &self.inner.keys.key_id())
            .finish_non_exhaustive()
    }
}

/// The backend breaker: fail fast after a failure, log the transitions.
struct Health {
    up: AtomicBool,
    retry_at: Mutex<Option<Instant>>,
}

impl Fleet {
    /// A fleet on `backend`, sealing with `keys`.
    pub fn new(backend: Arc<dyn FleetBackend>, keys: Arc<KeyRing>, options: FleetOptions) -> Self {
        let ids = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &keys.derive(format!("reauth-fleet ids {}", options.name).as_bytes()),
        );
        let tags = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &keys.derive(format!("reauth-fleet tags {}", options.name).as_bytes()),
        );
        let bus_key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &keys.derive(format!("reauth-fleet bus {}", options.name).as_bytes()),
        );
        let options = options.sane();
        let host = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .trim()
            .to_string();
        let host: String = host
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
            .take(64)
            .collect();
        Fleet {
            inner: Arc::new(Inner {
                holder: format!("pid={} host={host}", std::process::id()),
                base: Mutex::new(Arc::new(crate::clock::SystemClock)),
                options,
                backend,
                keys,
                ids,
                tags,
                offset_ms: Arc::new(AtomicI64::new(0)),
                offset_known: AtomicBool::new(false),
                health: Health {
                    up: AtomicBool::new(true),
                    retry_at: Mutex::new(None),
                },
                bus: broadcast::channel(1024).0,
                released: broadcast::channel(1024).0,
                bus_key,
                inbox: random_token()[..16].to_string(),
                subscriber: OnceLock::new(),
                counters: Counters::default(),
            }),
        }
    }

    /// The fleet's name.
    pub fn name(&self) -> &str {
        &self.inner.options.name
    }

    /// `base` corrected to the backend's clock (by the offset measured on every
    /// answer): give it to the host, so that every replica places expiries on the
    /// same timeline.
    pub fn clock(&self, base: Arc<dyn Clock>) -> Arc<dyn Clock> {
        *self.inner.base.lock().unwrap_or_else(|e| e.into_inner()) = base.clone();
        Arc::new(FleetClock {
            base,
            offset_ms: self.inner.offset_ms.clone(),
        })
    }

    /// How long a lease lasts without renewal.
    pub fn lease(&self) -> Duration {
        self.inner.options.lease
    }

    /// Where the backend is (never a password).
    pub fn backend(&self) -> String {
        self.inner.backend.describe()
    }

    /// The key id new values are sealed with.
    pub fn key_id(&self) -> &str {
        self.inner.keys.key_id()
    }

    /// Ask the backend for its time now (a diagnostic: `reauth check`): the
    /// backend's clock minus this host's, in milliseconds.
    pub async fn probe(&self) -> Result<i64, StoreError> {
        let sent = Instant::now();
        let (_, now_ms) = self
            .inner
            .run("probing", self.inner.backend.get("probe:probe"))
            .await?;
        self.inner
            .observe_time(now_ms, Some((sent, Instant::now())));
        Ok(self.inner.offset_ms.load(Ordering::Relaxed))
    }

    /// Whether the last backend operation succeeded.
    pub fn backend_up(&self) -> bool {
        self.inner.health.up.load(Ordering::Relaxed)
    }

    /// The fleet's metrics alone in the OpenMetrics text format (a host's
    /// `render_metrics` includes them).
    #[cfg(feature = "metrics")]
    pub fn render_metrics(&self) -> String {
        crate::metrics::exposition::render(self.clone())
    }

    /// The fleet's metrics (`reauth_fleet_*`), labelled with its name.
    #[cfg(feature = "metrics")]
    pub fn encode_metrics(
        &self,
        encoder: &mut crate::metrics::prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        use crate::metrics::exposition::{MetricType::*, family};
        let i = &self.inner;
        let fleet: &str = &i.options.name;
        let c = &i.counters;
        family(
            encoder,
            "reauth_fleet_backend_up",
            "Whether the fleet backend answered the last operation.",
            Gauge,
            |s| s.gauge(&[("fleet", fleet)], u32::from(self.backend_up())),
        )?;
        for (name, help, value) in [
            (
                "reauth_fleet_backend_errors_total",
                "Fleet backend operations that failed or timed out.",
                &c.errors,
            ),
            (
                "reauth_fleet_lease_lost_total",
                "Writes refused because the writer's lease had lapsed.",
                &c.lease_lost,
            ),
            (
                "reauth_fleet_unopenable_total",
                "Stored values that did not open (tampered, foreign, unknown key): treated as missing.",
                &c.unopenable,
            ),
            (
                "reauth_fleet_bus_messages_total",
                "Announcements received from the fleet's bus.",
                &c.bus_messages,
            ),
            (
                "reauth_fleet_bus_forged_total",
                "Bus messages ignored because their MAC did not check out (sent without the fleet's key).",
                &c.forged,
            ),
        ] {
            family(encoder, name, help, Counter, |s| {
                s.counter(&[("fleet", fleet)], value.load(Ordering::Relaxed))
            })?;
        }
        family(
            encoder,
            "reauth_fleet_clock_offset_seconds",
            "The backend's clock minus this host's.",
            Gauge,
            |s| {
                s.gauge(
                    &[("fleet", fleet)],
                    i.offset_ms.load(Ordering::Relaxed) as f64 / 1000.0,
                )
            },
        )
    }

    /// Start listening to the fleet's bus (once; needs a tokio runtime). The
    /// listener publishes a heartbeat every [`HEARTBEAT`]; a subscription that
    /// delivers nothing (not even its own heartbeat) for three of them is taken
    /// as dead and replaced. After any gap (a lost or failed subscription) the
    /// host is told to re-read what it holds in memory ([`RemoteEvent::Resync`]).
    /// It also runs the backend's housekeeping ([`FleetBackend::maintain`]).
    fn listen(&self) {
        if self.inner.subscriber.get().is_some() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        let backend = self.inner.backend.clone();
        let timeout = self.inner.options.timeout;
        let inbox = self.inner.inbox.clone();
        let task = handle.spawn(async move {
            use futures_util::StreamExt;
            let mut gap = false;
            let mut delay = Duration::from_millis(100);
            let mut last_maintenance = Instant::now();
            loop {
                // Subscribing has its own bound: a server that accepts the
                // connection and never answers must not stall the bus.
                let subscribed = match tokio::time::timeout(timeout * 2, backend.subscribe(&inbox)).await {
                    Ok(result) => result,
                    Err(_) => Err(StoreError::Backend {
                        what: "subscribing".into(),
                        detail: "no answer in time".into(),
                    }),
                };
                match subscribed {
                    Ok(mut stream) => {
                        delay = Duration::from_millis(100);
                        let Some(inner) = weak.upgrade() else { return };
                        if gap {
                            tracing::info!(fleet = %inner.options.name, "fleet bus reconnected; entries cached in memory are re-read from the backend");
                            let _ = inner.bus.send(RemoteEvent::Resync);
                            // Close the breaker now rather than at the next call.
                            if !inner.health.up.load(Ordering::Relaxed) {
                                *inner.health.retry_at.lock().unwrap_or_else(|e| e.into_inner()) = None;
                                let _ = inner
                                    .run("probing", inner.backend.get("probe:probe"))
                                    .await;
                            }
                        }
                        drop(inner);
                        gap = true;
                        let mut heartbeat = tokio::time::interval(HEARTBEAT);
                        let mut last_heard = Instant::now();
                        loop {
                            tokio::select! {
                                message = stream.next() => {
                                    let Some(message) = message else { break };
                                    last_heard = Instant::now();
                                    let Some(inner) = weak.upgrade() else { return };
                                    inner.counters.bus_messages.fetch_add(1, Ordering::Relaxed);
                                    inner.on_message(&message);
                                }
                                _ = heartbeat.tick() => {
                                    let Some(inner) = weak.upgrade() else { return };
                                    if last_heard.elapsed() > HEARTBEAT * 3 {
                                        tracing::warn!(fleet = %inner.options.name, "fleet bus silent (not even its own heartbeat came back); resubscribing");
                                        break;
                                    }
                                    let beat = inner.sign(&format!("hb {}", random_token()));
                                    let _ = tokio::time::timeout(timeout, inner.backend.heartbeat(&inbox, &beat)).await;
                                    if last_maintenance.elapsed() > MAINTENANCE {
                                        last_maintenance = Instant::now();
                                        let _ = tokio::time::timeout(timeout * 4, inner.backend.maintain()).await;
                                    }
                                }
                            }
                        }
                        if let Some(inner) = weak.upgrade() {
                            tracing::warn!(fleet = %inner.options.name, "fleet bus disconnected; reconnecting");
                        }
                    }
                    Err(e) => {
                        let Some(inner) = weak.upgrade() else { return };
                        gap = true;
                        tracing::debug!(error = %e, "fleet bus: cannot subscribe yet");
                        // Say so (log line, `reauth_fleet_backend_up`) now, not
                        // at the first cache miss.
                        if inner.health.up.load(Ordering::Relaxed) {
                            let _ = inner
                                .run("probing", inner.backend.get("probe:probe"))
                                .await;
                        }
                    }
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        });
        if self.inner.subscriber.set(task.abort_handle()).is_err() {
            task.abort();
        }
    }

    fn lease_name(group: &str) -> String {
        format!("{group}:lease")
    }

    fn aad(&self, name: &str, version: u64) -> Vec<u8> {
        let mut aad = Vec::new();
        for part in [self.inner.options.name.as_bytes(), name.as_bytes()] {
            aad.extend_from_slice(&(part.len() as u64).to_le_bytes());
            aad.extend_from_slice(part);
        }
        aad.extend_from_slice(&version.to_le_bytes());
        aad
    }

    fn seal(&self, name: &str, version: u64, plain: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        self.inner.keys.seal(MAGIC, &self.aad(name, version), plain)
    }

    /// Open `record` (stored under `name`); `None` (logged, counted) when it
    /// does not open.
    fn open<T>(
        &self,
        name: &str,
        record: Record,
        parse: impl FnOnce(&[u8]) -> Result<T, String>,
    ) -> Option<T> {
        let mut bytes = record.data;
        let result = match self
            .inner
            .keys
            .open(MAGIC, &self.aad(name, record.version), &mut bytes)
        {
            Ok(plain) => {
                let parsed = parse(plain);
                wipe(plain);
                parsed
            }
            Err(OpenError::UnknownKey(id)) => Err(format!(
                "is sealed with unknown key `{}`",
                id.chars()
                    .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                    .take(64)
                    .collect::<String>()
            )),
            Err(e) => Err(e.to_string()),
        };
        wipe(&mut bytes);
        match result {
            Ok(value) => Some(value),
            Err(why) => {
                self.inner
                    .counters
                    .unopenable
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(fleet = %self.inner.options.name, record = %name, "fleet record {why}; treated as missing");
                None
            }
        }
    }

    /// Take lease `group` within `wait`: `Ok(None)` when another holder kept it.
    async fn take(
        &self,
        group: &str,
        wait: Duration,
    ) -> Result<Option<(Acquired, HeldLease)>, StoreError> {
        self.listen();
        let name = Self::lease_name(group);
        let token = random_token();
        // Only a provider state's lease leaves a holder record (it tells the
        // next holder that this one died with the state): per-key leases leave
        // nothing behind, whatever the number of keys.
        let holder = if group.starts_with("s.") {
            self.inner.holder.as_str()
        } else {
            ""
        };
        let deadline = Instant::now()
            .checked_add(wait)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(600));
        let mut released = self.inner.released.subscribe();
        loop {
            let ttl = ms(self.inner.options.lease);
            let sent = Instant::now();
            let got = self
                .inner
                .run(
                    "taking a lease",
                    self.inner.backend.acquire(&name, &token, holder, ttl),
                )
                .await;
            let got = match got {
                Ok(got) => got,
                Err(e) => {
                    // The answer may have been lost after the lease was granted:
                    // give it back rather than block the key for a lease.
                    let (inner, name, token) = (self.inner.clone(), name.clone(), token.clone());
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(
                            inner.options.timeout,
                            inner.backend.release(&name, &token, None),
                        )
                        .await;
                    });
                    return Err(e);
                }
            };
            if let Some(acquired) = got {
                self.inner
                    .observe_time(acquired.now_ms, Some((sent, Instant::now())));
                let held = HeldLease::start(self.inner.clone(), name, token, sent);
                return Ok(Some((acquired, held)));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let nap = (deadline - now).min(POLL);
            // Woken when a holder announces its release; a poll covers lost
            // announcements.
            let _ = tokio::time::timeout(nap, async {
                loop {
                    match released.recv().await {
                        Ok(g) if g == group => return,
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await
                        }
                    }
                }
            })
            .await;
        }
    }
}

impl Inner {
    /// Run one backend operation: bounded by `timeout_ms`, failing fast while
    /// the breaker is open, counted and logged.
    async fn run<T>(
        &self,
        what: &str,
        op: StoreFuture<'_, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let backend = || self.backend.describe();
        {
            let retry_at = self
                .health
                .retry_at
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(at) = *retry_at
                && Instant::now() < at
            {
                return Err(StoreError::Backend {
                    what: format!("fleet `{}`: {what} ({})", self.options.name, backend()),
                    detail: "the backend failed moments ago; not retried yet".into(),
                });
            }
        }
        let result = match tokio::time::timeout(self.options.timeout, op).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Backend {
                what: format!("fleet `{}`: {what} ({})", self.options.name, backend()),
                detail: format!(
                    "no answer within {} ms (fleet.timeout_ms)",
                    self.options.timeout.as_millis()
                ),
            }),
        };
        match &result {
            Ok(_) => {
                *self
                    .health
                    .retry_at
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
                if !self.health.up.swap(true, Ordering::Relaxed) {
                    tracing::warn!(fleet = %self.options.name, backend = %backend(), "fleet backend reachable again");
                }
            }
            Err(StoreError::LeaseLost { .. }) => {}
            Err(e) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                *self
                    .health
                    .retry_at
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + BREAKER_OPEN);
                if self.health.up.swap(false, Ordering::Relaxed) {
                    tracing::error!(fleet = %self.options.name, error = %e, "fleet backend unreachable: tokens held in memory keep serving; fetches go ahead per replica; provider state (refresh tokens) is refused until it is back");
                }
            }
        }
        result
    }

    /// Correct the clock offset with the backend time `backend_ms` observed
    /// around `sent` (or now).
    fn base_now(&self) -> SystemTime {
        self.base.lock().unwrap_or_else(|e| e.into_inner()).now()
    }

    /// Now on the fleet's timeline (the host's clock corrected by the offset).
    fn now(&self) -> SystemTime {
        FleetClock {
            base: self.base.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            offset_ms: self.offset_ms.clone(),
        }
        .now()
    }

    /// Correct the clock offset with the backend time `backend_ms` of an answer
    /// received at `received` to a request sent at `sent` (monotonic instants).
    /// Only quick round trips count (a slow one says little about when the
    /// backend read its clock), and an offset beyond an hour is refused: a
    /// backend that far off is wrong, not this host.
    fn observe_time(&self, backend_ms: u64, timing: Option<(Instant, Instant)>) {
        let Some((sent, received)) = timing else {
            return;
        };
        let rtt = received.saturating_duration_since(sent);
        if rtt > Duration::from_millis(250) {
            return;
        }
        // This host's clock at the midpoint of the round trip.
        let midpoint = self
            .base_now()
            .checked_sub(received.elapsed() + rtt / 2)
            .unwrap_or(UNIX_EPOCH);
        let sample = i64::try_from(backend_ms)
            .unwrap_or(i64::MAX)
            .saturating_sub(ms_since_epoch(midpoint));
        if sample.unsigned_abs() > 3_600_000 {
            tracing::error!(fleet = %self.options.name, offset_ms = sample, "the fleet backend's clock is more than an hour off this host's; not followed");
            return;
        }
        let current = self.offset_ms.load(Ordering::Relaxed);
        // Move only for a real difference: jitter of a few ms does not shift
        // every replica's timeline back and forth.
        if !self.offset_known.swap(true, Ordering::Relaxed)
            || sample.saturating_sub(current).unsigned_abs() > 100
        {
            self.offset_ms.store(sample, Ordering::Relaxed);
            if sample.unsigned_abs() > 1000 {
                tracing::warn!(fleet = %self.options.name, offset_ms = sample, "this host's clock differs from the fleet backend's; the backend's clock is used");
            }
        }
    }

    /// `message` with a MAC under the fleet's key: only replicas with the key
    /// can announce (a backend user without it cannot flood or forge).
    fn sign(&self, message: &str) -> String {
        let tag = ring::hmac::sign(&self.bus_key, message.as_bytes());
        format!("{message} {}", hex::encode(&tag.as_ref()[..16]))
    }

    fn on_message(&self, signed: &str) {
        let Some((message, mac)) = signed.rsplit_once(' ') else {
            return;
        };
        let expected = ring::hmac::sign(&self.bus_key, message.as_bytes());
        let valid = hex::decode(mac).is_ok_and(|mac| {
            mac.len() == 16 && crate::constant_time_eq(&mac, &expected.as_ref()[..16])
        });
        if !valid {
            self.counters.forged.fetch_add(1, Ordering::Relaxed);
            let kind: String = message
                .split(' ')
                .next()
                .unwrap_or("")
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(8)
                .collect();
            tracing::debug!(fleet = %self.options.name, kind = %kind, "fleet bus: a message without a valid MAC ignored");
            return;
        }
        let mut parts = message.splitn(3, ' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("hb"), Some(_), None) => {}
            (Some("rel"), Some(group), None) => {
                let _ = self.released.send(group.to_string());
            }
            (Some("inv"), Some(id), Some(tag)) => {
                let _ = self.released.send(id.to_string());
                let _ = self.bus.send(RemoteEvent::Invalidated {
                    id: id.to_string(),
                    tag: tag.to_string(),
                });
            }
            _ => tracing::debug!("fleet bus: unknown message ignored"),
        }
    }
}

/// A clock corrected to the backend's.
struct FleetClock {
    base: Arc<dyn Clock>,
    offset_ms: Arc<AtomicI64>,
}

impl FleetClock {
    /// `now` moved by the backend's offset.
    fn corrected(&self, now: SystemTime) -> SystemTime {
        let offset = self.offset_ms.load(Ordering::Relaxed);
        let by = Duration::from_millis(offset.unsigned_abs());
        if offset >= 0 {
            crate::clock::saturating_add(now, by)
        } else {
            now.checked_sub(by)
                .filter(|t| *t >= UNIX_EPOCH)
                .unwrap_or(UNIX_EPOCH)
        }
    }
}

impl Clock for FleetClock {
    fn now(&self) -> SystemTime {
        self.corrected(self.base.now())
    }

    /// The base clock's coarse reading moved by the same offset: the same lag
    /// bound against [`FleetClock::now`].
    fn now_coarse(&self) -> SystemTime {
        self.corrected(self.base.now_coarse())
    }
}

/// A lease this process holds: renewed in the background, released (and
/// announced) when dropped.
struct HeldLease {
    inner: Arc<Inner>,
    name: String,
    token: String,
    lost: Arc<AtomicBool>,
    /// Until when the lease is surely held: the time its last successful
    /// acquire or renewal was *sent*, plus the lease (the backend counts from
    /// later), in nanoseconds since [`epoch`].
    valid_until: Arc<AtomicU64>,
    renewal: tokio::task::JoinHandle<()>,
    leave: Option<String>,
}

/// A fixed instant to store others as numbers.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn to_nanos(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

fn from_nanos(n: u64) -> Instant {
    epoch()
        .checked_add(Duration::from_nanos(n))
        .unwrap_or_else(epoch)
}

impl HeldLease {
    /// Hold the lease `sent` at: renew it a third of the lease after each
    /// success, retry soon after a failure while it is surely held, and give it
    /// up (`lost`) once it may have lapsed. Renewals bypass the breaker: one
    /// failed operation elsewhere must not cost every lease.
    fn start(inner: Arc<Inner>, name: String, token: String, sent: Instant) -> Self {
        let lost = Arc::new(AtomicBool::new(false));
        let lease = inner.options.lease;
        let valid_until = Arc::new(AtomicU64::new(to_nanos(sent + lease)));
        let renewal = {
            let (inner, name, token, lost, valid_until) = (
                inner.clone(),
                name.clone(),
                token.clone(),
                lost.clone(),
                valid_until.clone(),
            );
            tokio::spawn(async move {
                let mut next = lease / 3;
                loop {
                    tokio::time::sleep(next).await;
                    let until = from_nanos(valid_until.load(Ordering::Relaxed));
                    let sent = Instant::now();
                    let left = until.saturating_duration_since(sent);
                    if left.is_zero() {
                        lost.store(true, Ordering::Relaxed);
                        tracing::warn!(fleet = %inner.options.name, lease = %name, "lease could not be renewed in time (backend unreachable); its holder's writes will be refused");
                        return;
                    }
                    let attempt = tokio::time::timeout(
                        inner.options.timeout.min(left),
                        inner.backend.renew(&name, &token, ms(lease)),
                    )
                    .await;
                    match attempt {
                        Ok(Ok(true)) => {
                            valid_until.store(to_nanos(sent + lease), Ordering::Relaxed);
                            next = lease / 3;
                        }
                        Ok(Ok(false)) => {
                            lost.store(true, Ordering::Relaxed);
                            inner.counters.lease_lost.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(fleet = %inner.options.name, lease = %name, "lease lapsed while its holder worked (stopped or partitioned past fleet.lease_ms); its writes will be refused");
                            return;
                        }
                        // Retry soon while the lease is surely still held.
                        _ => next = (lease / 10).max(Duration::from_millis(50)),
                    }
                }
            })
        };
        HeldLease {
            inner,
            name,
            token,
            lost,
            valid_until,
            renewal,
            leave: None,
        }
    }

    /// Whether the lease is surely still held (a write under it may go ahead;
    /// the backend checks again).
    fn held(&self) -> bool {
        !self.lost.load(Ordering::Relaxed)
            && Instant::now() < from_nanos(self.valid_until.load(Ordering::Relaxed))
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        self.renewal.abort();
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            // No runtime: the lease lapses after fleet.lease_ms.
            return;
        };
        let (inner, name, token, leave) = (
            self.inner.clone(),
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.token),
            self.leave.take(),
        );
        handle.spawn(async move {
            let released = inner
                .run(
                    "releasing a lease",
                    inner.backend.release(&name, &token, leave.as_deref()),
                )
                .await;
            if released.is_ok() {
                let group = name.strip_suffix(":lease").unwrap_or(&name);
                let _ = inner
                    .run(
                        "announcing a release",
                        inner.backend.publish(&inner.sign(&format!("rel {group}"))),
                    )
                    .await;
            }
        });
    }
}

fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn ms_since_epoch(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn parse_holder(text: &str) -> Option<DeadHolder> {
    let mut pid = None;
    let mut since = None;
    let mut aborted = false;
    for field in text.split_whitespace() {
        match field.split_once('=') {
            Some(("pid", v)) => pid = v.parse().ok(),
            Some(("since", v)) => {
                since = v
                    .parse::<u64>()
                    .ok()
                    .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
            }
            Some(("aborted", "1")) => aborted = true,
            _ => {}
        }
    }
    Some(DeadHolder {
        pid: pid?,
        since,
        aborted,
    })
}

#[derive(serde::Serialize, serde::Deserialize)]
struct FailurePlain {
    message: String,
    failures: u32,
    retry_at_ms: u64,
}

impl SharedCache for Fleet {
    fn read<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<SharedEntry>> {
        Box::pin(async move {
            let name = format!("{id}:entry");
            let sent = Instant::now();
            let (record, now_ms) = self
                .inner
                .run("reading a shared entry", self.inner.backend.get(&name))
                .await
                .ok()?;
            self.inner
                .observe_time(now_ms, Some((sent, Instant::now())));
            self.open(&name, record?, entry_from_bytes)
        })
    }

    fn write<'a>(
        &'a self,
        id: &'a str,
        entry: &'a SharedEntry,
        lease: Option<&'a Lease>,
    ) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            // Never a write without the key's lease: a replica that could not get
            // it (the backend was down, or the holder kept it past the wait)
            // keeps its credential to itself.
            let Some(lease) = lease else {
                return Ok(());
            };
            let name = format!("{id}:entry");
            let sealed = self.seal(&name, lease.fence, entry_to_bytes(entry)?)?;
            let record = Record {
                version: lease.fence,
                tag: self.credential_tag(&entry.credentials),
                data: sealed,
            };
            // Kept until the credential expires (in the backend's clock, which
            // the host's clock follows).
            let now = self.inner.now();
            let ttl = match entry.credentials.expires_at {
                Some(expires) => match expires.duration_since(now) {
                    Ok(left) if !left.is_zero() => ms(left).max(1),
                    // Already expired on the fleet's clock: nothing to share.
                    _ => return Ok(()),
                },
                None => 0,
            };
            let lease_name = Self::lease_name(id);
            let written = self
                .inner
                .run(
                    "writing a shared entry",
                    self.inner
                        .backend
                        .put(&name, &record, ttl, Some((&lease_name, &lease.token))),
                )
                .await?;
            if written {
                Ok(())
            } else {
                self.inner
                    .counters
                    .lease_lost
                    .fetch_add(1, Ordering::Relaxed);
                Err(StoreError::LeaseLost {
                    what: format!("fleet `{}`: shared entry", self.inner.options.name),
                })
            }
        })
    }

    fn remove_if<'a>(&'a self, id: &'a str, fingerprint: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let tag = self.tag_of_fingerprint(fingerprint);
            let name = format!("{id}:entry");
            let removed = self
                .inner
                .run(
                    "invalidating a shared entry",
                    self.inner.backend.delete_if(&name, Some(&tag)),
                )
                .await
                .unwrap_or(false);
            if removed {
                let _ = self
                    .inner
                    .run(
                        "announcing an invalidation",
                        self.inner
                            .backend
                            .publish(&self.inner.sign(&format!("inv {id} {tag}"))),
                    )
                    .await;
            }
            removed
        })
    }

    fn fetching<'a>(&'a self, id: &'a str, wait: Duration) -> StoreFuture<'a, Option<Lease>> {
        Box::pin(async move {
            let wait = wait.min(self.inner.options.wait);
            match self.take(id, wait).await {
                Ok(Some((acquired, held))) => Some(Lease {
                    fence: acquired.fence,
                    token: held.token.clone(),
                    _hold: Box::new(held),
                }),
                Ok(None) => {
                    tracing::warn!(fleet = %self.inner.options.name, wait_ms = ms(wait), "another replica kept fetching a shared key; fetching without it");
                    None
                }
                Err(_) => {
                    // The backend is down: fetch per replica, spread out so that
                    // replicas do not reach the IdP in one burst.
                    use rand::Rng;
                    let jitter = rand::rng().random_range(0..200u64);
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                    None
                }
            }
        })
    }

    fn entry_id(&self, material: &[u8]) -> String {
        hex::encode(&ring::hmac::sign(&self.inner.ids, material).as_ref()[..16])
    }

    fn key_id(&self) -> String {
        self.inner.keys.key_id().to_string()
    }

    fn read_failure<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<SharedFailure>> {
        Box::pin(async move {
            let name = format!("{id}:failure");
            let (record, _) = self
                .inner
                .run("reading a shared failure", self.inner.backend.get(&name))
                .await
                .ok()?;
            self.open(&name, record?, |plain| {
                let p: FailurePlain =
                    serde_json::from_slice(plain).map_err(|_| "has malformed content")?;
                Ok(SharedFailure {
                    message: p.message,
                    failures: p.failures,
                    retry_at: UNIX_EPOCH
                        .checked_add(Duration::from_millis(p.retry_at_ms))
                        .unwrap_or(UNIX_EPOCH),
                })
            })
        })
    }

    fn write_failure<'a>(
        &'a self,
        id: &'a str,
        failure: Option<&'a SharedFailure>,
        lease: Option<&'a Lease>,
    ) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let Some(lease) = lease else {
                return Ok(());
            };
            let name = format!("{id}:failure");
            let Some(failure) = failure else {
                self.inner
                    .run(
                        "clearing a shared failure",
                        self.inner.backend.delete_if(&name, None),
                    )
                    .await?;
                return Ok(());
            };
            let plain = serde_json::to_vec(&FailurePlain {
                message: failure.message.clone(),
                failures: failure.failures,
                retry_at_ms: u64::try_from(ms_since_epoch(failure.retry_at)).unwrap_or(0),
            })
            .map_err(|e| StoreError::Corrupt {
                what: "shared failure".into(),
                why: e.to_string(),
            })?;
            let record = Record {
                version: lease.fence,
                tag: String::new(),
                data: self.seal(&name, lease.fence, plain)?,
            };
            // Forgotten a minute after its retry time.
            let ttl = failure
                .retry_at
                .duration_since(self.inner.now())
                .map_or(0, ms)
                .saturating_add(60_000);
            let lease_name = Self::lease_name(id);
            self.inner
                .run(
                    "writing a shared failure",
                    self.inner
                        .backend
                        .put(&name, &record, ttl, Some((&lease_name, &lease.token))),
                )
                .await?;
            Ok(())
        })
    }

    fn events(&self) -> Option<broadcast::Receiver<RemoteEvent>> {
        self.listen();
        Some(self.inner.bus.subscribe())
    }

    fn announces(&self) -> bool {
        true
    }

    fn credential_tag(&self, credentials: &Credentials) -> String {
        self.tag_of_fingerprint(&SharedEntry::fingerprint(credentials))
    }
}

impl Fleet {
    fn tag_of_fingerprint(&self, fingerprint: &str) -> String {
        hex::encode(&ring::hmac::sign(&self.inner.tags, fingerprint.as_bytes()).as_ref()[..16])
    }
}

/// One call's hold on a provider's state in the fleet.
struct FleetGuard {
    fleet: Fleet,
    provider: String,
    lease: HeldLease,
    fence: u64,
    values: BTreeMap<String, String>,
    dead: Option<DeadHolder>,
}

impl StateGuard for FleetGuard {
    fn values(&self) -> &BTreeMap<String, String> {
        &self.values
    }

    fn commit(
        &mut self,
        values: BTreeMap<String, String>,
    ) -> StoreFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let what = || {
                format!(
                    "fleet `{}`: state of provider `{}`",
                    self.fleet.inner.options.name, self.provider
                )
            };
            if !self.lease.held() {
                return Err(StoreError::LeaseLost { what: what() });
            }
            let name = format!("s.{}:state", self.provider);
            let plain = serde_json::to_vec(&values).map_err(|e| StoreError::Corrupt {
                what: what(),
                why: e.to_string(),
            })?;
            let record = Record {
                version: self.fence,
                tag: String::new(),
                data: self.fleet.seal(&name, self.fence, plain)?,
            };
            let inner = &self.fleet.inner;
            let written = inner
                .run(
                    "writing provider state",
                    inner.backend.put(
                        &name,
                        &record,
                        0,
                        Some((&self.lease.name, &self.lease.token)),
                    ),
                )
                .await?;
            if !written {
                inner.counters.lease_lost.fetch_add(1, Ordering::Relaxed);
                self.lease.lost.store(true, Ordering::Relaxed);
                return Err(StoreError::LeaseLost { what: what() });
            }
            self.values = values;
            Ok(())
        })
    }

    fn previous_holder(&self) -> Option<&DeadHolder> {
        self.dead.as_ref()
    }

    fn abandon(&mut self) {
        self.lease.leave = Some(format!(
            "{} since={} aborted=1",
            self.fleet.inner.holder,
            ms_since_epoch(self.fleet.inner.now())
        ));
    }
}

impl StateStore for Fleet {
    fn lock<'a>(
        &'a self,
        provider: &'a str,
        wait: Duration,
    ) -> StoreFuture<'a, Result<Box<dyn StateGuard>, StoreError>> {
        Box::pin(async move {
            let group = format!("s.{provider}");
            let started = Instant::now();
            let Some((acquired, lease)) = self.take(&group, wait).await? else {
                return Err(StoreError::Locked {
                    what: self.describe(provider),
                    holder: None,
                    waited_ms: ms(started.elapsed()),
                });
            };
            let dead = acquired.previous.as_deref().and_then(parse_holder);
            if let Some(dead) = &dead {
                // Text from the backend: printable and short in a log line.
                let previous: String = acquired
                    .previous
                    .as_deref()
                    .unwrap_or("")
                    .chars()
                    .filter(|c| c.is_ascii_graphic() || *c == ' ')
                    .take(200)
                    .collect();
                tracing::warn!(fleet = %self.inner.options.name, provider, previous_holder = %previous, aborted = dead.aborted, "the previous holder of this provider's state did not release it (it died, was stopped past fleet.lease_ms or was cut off); a refresh token it rotated but did not save is lost");
            }
            let name = format!("s.{provider}:state");
            let (record, _) = self
                .inner
                .run("reading provider state", self.inner.backend.get(&name))
                .await?;
            let values = match record {
                None => BTreeMap::new(),
                Some(record) => self
                    .open(&name, record, |plain| {
                        serde_json::from_slice::<BTreeMap<String, String>>(plain)
                            .map_err(|_| "has malformed content".to_string())
                    })
                    .ok_or_else(|| StoreError::Corrupt {
                        what: self.describe(provider),
                        why: "does not open with the fleet's key ring (tampered, or sealed with a key this replica lacks)".into(),
                    })?,
            };
            Ok(Box::new(FleetGuard {
                fleet: self.clone(),
                provider: provider.to_string(),
                lease,
                fence: acquired.fence,
                values,
                dead,
            }) as Box<dyn StateGuard>)
        })
    }

    fn describe(&self, provider: &str) -> String {
        format!(
            "the state of provider `{provider}` in fleet `{}` ({})",
            self.inner.options.name,
            self.inner.backend.describe()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_records_parse() {
        let d = parse_holder("pid=42 host=a since=1000 aborted=1").unwrap();
        assert_eq!(d.pid, 42);
        assert!(d.aborted);
        assert_eq!(d.since, Some(UNIX_EPOCH + Duration::from_secs(1)));
        assert!(parse_holder("host=a").is_none());
        assert!(!parse_holder("pid=1 host=x since=5").unwrap().aborted);
    }

    #[test]
    fn clock_follows_the_offset_both_ways() {
        let base = Arc::new(crate::clock::ManualClock::new(
            UNIX_EPOCH + Duration::from_secs(1000),
        ));
        let offset = Arc::new(AtomicI64::new(-300_000));
        let clock = FleetClock {
            base: base.clone(),
            offset_ms: offset.clone(),
        };
        assert_eq!(clock.now(), UNIX_EPOCH + Duration::from_secs(700));
        offset.store(i64::MAX, Ordering::Relaxed);
        assert_eq!(clock.now(), crate::clock::far_future());
        offset.store(i64::MIN, Ordering::Relaxed);
        assert_eq!(clock.now(), UNIX_EPOCH);
    }
}
