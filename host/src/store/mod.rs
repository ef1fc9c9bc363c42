//! Where provider state and shared credentials live, and the locks that make them
//! correct when several processes use them at once.
//!
//! Two abstractions, each with a local backend here and room for distributed ones
//! (Redis, PostgreSQL) behind the same traits:
//!
//! - [`StateStore`]: each provider's `state` (the rotating refresh token). A call
//!   takes the provider's state **the first time it touches it** ([`StateStore::lock`]):
//!   the lock excludes every other call of the provider, in this process and in every
//!   other one; the state is read as it is at that moment (never a copy from
//!   start-up), each write is durable before the plugin continues, and the lock is
//!   held until the call ends. So two processes can never spend one refresh token.
//!   Calls that never touch state take no lock. [`FileStateStore`] keeps one file per
//!   provider (`<state_dir>/<provider>.json`) and locks `<provider>.lock` with
//!   `flock(2)`: a holder that dies releases it, and the next holder learns that it
//!   died holding it (see [`StateGuard::previous_holder`]).
//! - [`SharedCache`] (L2): fresh credentials shared by the processes of one user on
//!   one machine, so a `reauth get` or a `kubectl` adapter run does not call the
//!   identity provider while another process holds a valid token. The in-memory cache
//!   (L1) stays the hot path; L2 is read on an L1 miss, before the provider is called,
//!   and a cross-process lock per key (one of 4,096 lock stripes) makes one process
//!   fetch while the others wait for its result. [`FileSharedCache`] seals every
//!   entry with an AEAD.
//!
//! **Trust model.** Both local backends protect against *other* users (directories
//! 0700, files 0600), against copies of the files alone (backups, an accidental
//! commit: state files and L2 entries are sealed with a [`KeyRing`] kept beside, not
//! inside, their directory), and against a tampered, swapped or renamed file (it
//! does not open: a miss for L2, an error naming the provider for state). They do
//! not protect against the same Unix user, who can read the key file.

pub(crate) mod file;
#[cfg(feature = "fleet")]
pub mod fleet;
pub(crate) mod fs;
pub(crate) mod keys;
mod shared;

pub use file::{FileStateStore, MemoryStateStore};
pub use fs::loose_permissions;
pub use keys::{KeyRing, default_key_file};
pub use shared::{FileSharedCache, SharedEntry};

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

/// A boxed future, as the store traits return them (object-safe).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A failure of a state store or shared cache. Messages name the provider and the
/// file, never a value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another call held the provider's state for longer than the wait allowed.
    #[error("{what} stayed locked for {waited_ms} ms{}", holder_text(*.holder))]
    Locked {
        /// What was locked (the provider's state file).
        what: String,
        /// The process holding it, when it said so.
        holder: Option<u32>,
        /// How long the call waited.
        waited_ms: u64,
    },
    /// The stored data could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What the store was doing, and where.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A write under a lease (a fetch's or a provider state's) came after the
    /// lease lapsed: another holder may have written since. Nothing was written.
    #[error(
        "{what}: the lease lapsed before the write (another holder may have written since); not written"
    )]
    LeaseLost {
        /// What was being written.
        what: String,
    },
    /// The fleet backend could not be reached or failed.
    #[error("{what}: {detail}")]
    Backend {
        /// What the store was doing, and with which backend (never a password).
        what: String,
        /// The backend's error.
        detail: String,
    },
    /// The stored data is not what the store wrote.
    #[error("{what}: {why}")]
    Corrupt {
        /// The file.
        what: String,
        /// What is wrong with it (never its content).
        why: String,
    },
}

fn holder_text(holder: Option<u32>) -> String {
    match holder {
        Some(pid) => format!(" (held by process {pid})"),
        None => String::new(),
    }
}

/// A call that held a provider's state and ended without releasing it cleanly:
/// its process died (or was killed), or the call was cut off (timeout, trap)
/// after touching the state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadHolder {
    /// Its process id.
    pub pid: u32,
    /// When it took the lock.
    pub since: Option<SystemTime>,
    /// The call was cut off (the process itself may still run); otherwise the
    /// process died.
    pub aborted: bool,
}

/// Exclusive access to one provider's state for one call. Dropping it releases the
/// lock.
pub trait StateGuard: Send {
    /// The state as it was when the lock was taken, with this call's commits.
    fn values(&self) -> &BTreeMap<String, String>;
    /// Make `values` the provider's state, durably (it survives a crash once this
    /// returns). A distributed store refuses it when this guard's lease was lost
    /// (another holder may have written since).
    fn commit(
        &mut self,
        values: BTreeMap<String, String>,
    ) -> StoreFuture<'_, Result<(), StoreError>>;
    /// The previous holder, when it died holding the lock: a refresh token it had
    /// rotated at the identity provider but not yet written is lost.
    fn previous_holder(&self) -> Option<&DeadHolder>;
    /// This call ends without finishing (timeout, trap, cancellation): leave a
    /// record for the next holder instead of a clean release.
    fn abandon(&mut self) {}
}

/// Where providers' state lives. See the [module docs](self).
pub trait StateStore: Send + Sync + 'static {
    /// Take `provider`'s state: wait, at most `wait`, until no other call (of this
    /// process or another) holds it, then read it. [`StoreError::Locked`] when the
    /// wait ran out.
    fn lock<'a>(
        &'a self,
        provider: &'a str,
        wait: Duration,
    ) -> StoreFuture<'a, Result<Box<dyn StateGuard>, StoreError>>;

    /// Where `provider`'s state is kept, for messages and `reauth check`.
    fn describe(&self, provider: &str) -> String;
}

/// The right to fetch one key for every process sharing the cache (see
/// [`SharedCache::fetching`]). Dropping it releases it.
pub struct Lease {
    /// The fencing token: it grows with every lease of the key the backend hands
    /// out (0 for the local backend). A write under a lease that lapsed is refused.
    pub fence: u64,
    /// The holder's secret proof of the lease (random per lease).
    #[cfg_attr(not(feature = "fleet"), allow(dead_code))]
    pub(crate) token: String,
    /// Whatever keeps the lease (a file lock, a renewal task); released on drop.
    pub(crate) _hold: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("fence", &self.fence)
            .finish_non_exhaustive()
    }
}

/// What another replica of a fleet announced (see [`SharedCache::events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemoteEvent {
    /// A replica removed entry `id` because a server rejected the credential
    /// whose [`SharedCache::credential_tag`] is `tag`: drop it from the L1 cache.
    Invalidated {
        /// The entry id.
        id: String,
        /// The rejected credential's tag.
        tag: String,
    },
    /// Announcements may have been missed (the bus was disconnected): entries
    /// held in L1 may be stale; re-read them from the shared cache.
    Resync,
}

/// A fetch of a key that failed, shared so that the other processes back off
/// too instead of calling the identity provider again.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SharedFailure {
    /// The error's message (as the host reports it: redacted).
    pub message: String,
    /// Consecutive failures of the key.
    pub failures: u32,
    /// No process calls the provider for this key before then.
    pub retry_at: SystemTime,
}

/// The cross-process token cache (L2). Keys are opaque ids the host derives from
/// the provider's identity and the request; see the [module docs](self).
pub trait SharedCache: Send + Sync + 'static {
    /// The entry for `id`, if there is one that opens. A tampered, foreign or
    /// undecryptable entry is `None` (and logged), never an error.
    fn read<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<SharedEntry>>;
    /// Store `entry` under `id`; with a lease, only while it is still held
    /// ([`StoreError::LeaseLost`] otherwise: a newer entry may be there).
    fn write<'a>(
        &'a self,
        id: &'a str,
        entry: &'a SharedEntry,
        lease: Option<&'a Lease>,
    ) -> StoreFuture<'a, Result<(), StoreError>>;
    /// Remove `id`'s entry, only if it still holds a credential whose fingerprint is
    /// `fingerprint` (compare-and-invalidate across processes). True if removed.
    fn remove_if<'a>(&'a self, id: &'a str, fingerprint: &'a str) -> StoreFuture<'a, bool>;
    /// Become the one process fetching `id`: wait (at most `wait`) for another
    /// fetcher of `id` to finish. `None` when the wait ran out or the backend is
    /// unreachable (the caller fetches anyway). The fetch ends when the returned
    /// lease is dropped.
    fn fetching<'a>(&'a self, id: &'a str, wait: Duration) -> StoreFuture<'a, Option<Lease>>;
    /// The id of the entry for `material` (the provider's identity and the request):
    /// opaque, so that names in the backend reveal nothing.
    fn entry_id(&self, material: &[u8]) -> String;
    /// The key id of the key new entries are sealed with.
    fn key_id(&self) -> String;
    /// The last failed fetch of `id`, while the processes should back off.
    fn read_failure<'a>(&'a self, _id: &'a str) -> StoreFuture<'a, Option<SharedFailure>> {
        Box::pin(std::future::ready(None))
    }
    /// Share a failed fetch of `id` (`None`: the key fetched fine, forget it).
    fn write_failure<'a>(
        &'a self,
        _id: &'a str,
        _failure: Option<&'a SharedFailure>,
        _lease: Option<&'a Lease>,
    ) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(std::future::ready(Ok(())))
    }
    /// Announcements of other replicas (fleet backends); `None` when the backend
    /// has none (every process re-reads the shared entry on its own L1 miss).
    fn events(&self) -> Option<tokio::sync::broadcast::Receiver<RemoteEvent>> {
        None
    }
    /// Whether [`SharedCache::events`] delivers anything (without starting to
    /// listen): the host keeps track of keys for announcements only then.
    fn announces(&self) -> bool {
        false
    }
    /// The tag [`RemoteEvent::Invalidated`] names a credential by (a keyed hash
    /// of its fingerprint; never the secret).
    fn credential_tag(&self, _credentials: &crate::types::Credentials) -> String {
        String::new()
    }
}

/// A current-thread runtime for the stores' unit tests.
#[cfg(test)]
fn test_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a test runtime")
}
