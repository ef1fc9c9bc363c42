//! Loading precompiled artifacts without reading them: verified once, then mapped.
//!
//! A Python or JavaScript provider compiles to a 40 MB artifact. Reading it whole,
//! hashing it and copying it into executable memory on every load costs 70–80 ms;
//! mapping the file costs a millisecond or two and shares the pages between every
//! process that loads it. What makes a mapping safe to use:
//!
//! - **Verified once.** The first load hashes the artifact and records the file's
//!   [`Stamp`] (device, inode, size, modification and change times) in its meta; a
//!   later load whose file still has that stamp skips the hash (the plugin's
//!   source gets the same treatment). Any write to a file sets its change time to
//!   the file system's "now", which no user can set back, and a file replaced by
//!   another has another inode or change time. A stamp is only recorded for a file
//!   unchanged for [`SETTLED`] by the file system's own clock (a file just created
//!   beside it), so that a write within the timestamp granularity cannot go
//!   unseen (git's "racy clean" rule). The price: an artifact corrupted on disk
//!   after its first check is no longer caught at load (wasmtime still checks its
//!   header); delete the cache (`rm -rf`: artifacts are read-only) to re-verify.
//! - **Nobody truncates or rewrites a mapped artifact.** A mapped page whose file
//!   was truncated faults with `SIGBUS` when touched, in the middle of a call. reauth
//!   never rewrites an artifact (it writes a new file and renames it into place)
//!   and writes artifacts read-only (0400), so another tool of the same user cannot
//!   open one for writing by accident. For root, and for a user who makes it
//!   writable first, the host holds a Linux **read lease** on every artifact it
//!   maps: anyone opening the file for writing or truncating it (`cp`, `>`,
//!   `truncate`, an editor) blocks, for up to the kernel's `fs.lease-break-time`,
//!   while a guard thread, polling the leases every [`POLL`], replaces the mapping
//!   with an anonymous copy of the same bytes at the same addresses (`mremap`) and
//!   then releases the lease. The writer proceeds; the loaded code no longer
//!   depends on the file. One gap remains, known and documented: Linux lets an
//!   `open(O_RDONLY | O_TRUNC)` by someone with write permission truncate a file
//!   without breaking read leases; with 0400 artifacts only root can do that (and
//!   root can stop the process in many other ways).
//!
//! Leases are only used on local file systems whose leases see every writer (ext4,
//! XFS, Btrfs, tmpfs, F2FS, overlayfs), with `fs.lease-break-time` of at least 10 s,
//! and for at most a quarter of the open-file limit's worth of artifacts (each
//! mapped artifact holds two descriptors). Elsewhere (NFS, FUSE, 9p, another
//! user's file, a file someone has open for writing, other platforms) the artifact
//! is read into memory and hashed at every load, as before. Memory images of linear
//! memories never map the file (`Config::force_memory_init_memfd`). The scheme is
//! x86-64 Linux only: other architectures would need an instruction-cache flush
//! after the copy.
//!
//! Build hosts after `fork`, not before: a child shares the parent's mappings and
//! lease but not its guard thread (nor wasmtime's epoch thread).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a file must have been left alone before its stamp is trusted.
pub(crate) const SETTLED: Duration = Duration::from_secs(2);

/// How often the guard thread checks the leases it holds.
#[allow(dead_code)] // used only where leases are (x86-64 Linux)
pub(crate) const POLL: Duration = Duration::from_millis(50);

/// What identifies one version of a file's content without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn nanos(secs: i64, nsecs: i64) -> i128 {
    i128::from(secs) * 1_000_000_000 + i128::from(nsecs)
}

impl Stamp {
    /// The stamp of `meta`.
    pub(crate) fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: nanos(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: nanos(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether the file was last changed at least [`SETTLED`] before `fs_now` (the
    /// change time of a file the same file system created just now): only then
    /// can a later change not share its change time.
    pub(crate) fn settled(&self, fs_now: i128) -> bool {
        let settled = i128::try_from(SETTLED.as_nanos()).unwrap_or(i128::MAX);
        self.ctime_ns.max(self.mtime_ns) < fs_now.saturating_sub(settled)
    }
}

/// "Now" by the clock of the file system holding `dir` (the change time of a file
/// created there), if `dir` is writable.
pub(crate) fn fs_now(dir: &Path) -> Option<i128> {
    crate::store::fs::private_dir(dir).ok()?;
    let probe = crate::store::fs::temp_file_in(dir).ok()?;
    let meta = probe.as_file().metadata().ok()?;
    Some(nanos(meta.ctime(), meta.ctime_nsec()))
}

/// Whether the file system holding `path` is one whose change times and leases
/// reauth trusts (local, every writer goes through this kernel).
pub(crate) fn trusted_fs(path: &Path) -> bool {
    imp::trusted_fs(path)
}

/// The recorded digest of a plugin's source file, valid while the file keeps its
/// stamp (`<cache_dir>/sources/<sha256 of the path>.json`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SourceRecord {
    path: PathBuf,
    stamp: Stamp,
    sha256: String,
}

fn source_record_path(cache_dir: &Path, plugin: &Path) -> PathBuf {
    use sha2::{Digest, Sha256};
    let key = hex::encode(Sha256::digest(plugin.as_os_str().as_encoded_bytes()));
    cache_dir.join("sources").join(format!("{key}.json"))
}

/// The SHA-256 recorded for `plugin` if the file is unchanged since it was hashed.
pub(crate) fn known_source_digest(cache_dir: &Path, plugin: &Path) -> Option<String> {
    let stamp = Stamp::of(&std::fs::metadata(plugin).ok()?);
    let record: SourceRecord =
        serde_json::from_slice(&std::fs::read(source_record_path(cache_dir, plugin)).ok()?).ok()?;
    // A digest names files in the cache: hex only, whatever the record says.
    let hex = record.sha256.len() == 64 && record.sha256.bytes().all(|b| b.is_ascii_hexdigit());
    (record.path == plugin && record.stamp == stamp && hex).then_some(record.sha256)
}

/// Read `plugin` through one open file: its bytes, and its stamps before and
/// after the read (equal unless it changed meanwhile).
pub(crate) fn read_stamped(plugin: &Path) -> std::io::Result<(Vec<u8>, (Stamp, Stamp))> {
    use std::io::Read;
    let mut file = File::open(plugin)?;
    let before = Stamp::of(&file.metadata()?);
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let after = Stamp::of(&file.metadata()?);
    Ok((bytes, (before, after)))
}

/// Record that `plugin` (read through one open file whose stamps before and after
/// the read were `stamps`) hashes to `sha256`, if it did not change meanwhile, is
/// on a trusted file system, the same one as the cache, and had settled by
/// `fs_now` (the cache's file system clock, read before the plugin was opened).
/// Best effort: a failure only costs a hash next time.
pub(crate) fn record_source_digest(
    cache_dir: &Path,
    plugin: &Path,
    stamps: (Stamp, Stamp),
    fs_now: i128,
    sha256: &str,
) {
    let (stamp, after) = stamps;
    let same_fs = std::fs::metadata(cache_dir).is_ok_and(|c| c.dev() == stamp.dev);
    if stamp != after || !same_fs || !stamp.settled(fs_now) || !trusted_fs(plugin) {
        return;
    }
    let record = SourceRecord {
        path: plugin.to_path_buf(),
        stamp,
        sha256: sha256.to_string(),
    };
    if let Ok(bytes) = serde_json::to_vec(&record)
        && let Err(e) = crate::store::fs::write_atomically(
            &source_record_path(cache_dir, plugin),
            &bytes,
            false,
        )
    {
        tracing::debug!(error = %e, "could not record a plugin's digest");
    }
}

/// The SHA-256 of `file`'s content, read in chunks (no copy of the whole file).
pub(crate) fn digest_file(file: &File) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut reader = file;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Whether artifacts in `dir` would be mapped under a lease (leases usable on
/// this machine, `dir` on a trusted file system).
pub(crate) fn can_map(dir: &Path) -> bool {
    imp::leases_usable() && trusted_fs(dir)
}

pub(crate) use imp::{Lease, LeasedFile};

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[allow(unsafe_code)]
mod imp {
    //! Read leases and the guard thread (x86-64 Linux).

    use super::POLL;
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
    use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
    use wasmtime::component::Component;

    /// `fcntl` commands and types missing from `libc` for this target (the
    /// values are the same on every Linux architecture).
    const F_SETSIG: libc::c_int = 10;
    const F_SETOWN_EX: libc::c_int = 15;
    const F_OWNER_TID: libc::c_int = 0;
    #[repr(C)]
    struct FOwnerEx {
        kind: libc::c_int,
        pid: libc::pid_t,
    }

    /// Artifacts mapped now (each holds two file descriptors: the lease's and
    /// wasmtime's mapping's).
    static LIVE: AtomicUsize = AtomicUsize::new(0);

    /// At most this many artifacts are mapped at once: 256, or an eighth of the
    /// open-file limit if that is lower; beyond it, artifacts are read.
    fn max_mapped() -> usize {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct it is given.
        let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
        } else {
            1024
        };
        (soft / 8).min(256)
    }

    /// Whether leases give the guard time to act: enabled, and a writer is held
    /// for at least 10 s (read at every load: an administrator may change it).
    pub(super) fn leases_usable() -> bool {
        std::fs::read_to_string("/proc/sys/fs/leases-enable").is_ok_and(|s| s.trim() == "1")
            && std::fs::read_to_string("/proc/sys/fs/lease-break-time")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .is_some_and(|secs| secs >= 10)
    }

    pub(super) fn trusted_fs(path: &Path) -> bool {
        use std::os::unix::ffi::OsStrExt;
        const EXT4: i64 = 0xEF53;
        const XFS: i64 = 0x5846_5342;
        const BTRFS: i64 = 0x9123_683E;
        const TMPFS: i64 = 0x0102_1994;
        const F2FS: i64 = 0xF2F5_2010;
        const OVERLAYFS: i64 = 0x794C_7630;
        let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: statfs reads a NUL-terminated path and writes the struct.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
            return false;
        }
        // `f_type` is signed with glibc and unsigned with musl.
        #[allow(clippy::useless_conversion)]
        let kind = i64::try_from(st.f_type).unwrap_or(-1);
        matches!(kind, EXT4 | XFS | BTRFS | TMPFS | F2FS | OVERLAYFS)
    }

    /// An artifact opened read-only with a read lease held on it.
    #[derive(Debug)]
    pub(crate) struct LeasedFile {
        file: File,
        path: PathBuf,
    }

    impl LeasedFile {
        /// Open `path` and take a read lease on it; `None` if no lease can be had
        /// here (then the caller reads the file instead).
        pub(crate) fn open(path: &Path) -> Option<LeasedFile> {
            if !leases_usable() || LIVE.load(Ordering::Relaxed) >= max_mapped() || !trusted_fs(path)
            {
                return None;
            }
            let tid = guard().tid.load(Ordering::Acquire);
            if tid <= 0 {
                return None;
            }
            let file = File::open(path).ok()?;
            let fd = file.as_raw_fd();
            let owner = FOwnerEx {
                kind: F_OWNER_TID,
                pid: tid,
            };
            // SAFETY: fcntl calls on a descriptor this function owns, with a
            // pointer to a live `f_owner_ex`. A lease break would signal the
            // file's owner: the guard thread (set before the lease, so the lease
            // keeps it), with SIGURG, which that thread blocks; then the owner is
            // cleared, so no signal is sent at all. No other thread of the
            // embedding process ever sees one, and the guard polls instead.
            unsafe {
                if libc::fcntl(fd, F_SETSIG, libc::SIGURG) == -1
                    || libc::fcntl(fd, F_SETOWN_EX, &owner as *const FOwnerEx) == -1
                    || libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) == -1
                {
                    return None;
                }
                libc::fcntl(fd, libc::F_SETOWN, 0);
            }
            Some(LeasedFile {
                file,
                path: path.to_path_buf(),
            })
        }

        /// The open file.
        pub(crate) fn file(&self) -> &File {
            &self.file
        }

        /// A path naming exactly this open file (not whatever `path` names now).
        pub(crate) fn fd_path(&self) -> PathBuf {
            PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
        }

        /// Hand the lease to the guard thread, which watches `component`'s code
        /// mapping (of this file) from now on. The entry keeps a clone of the
        /// component, so the mapping exists for as long as the guard may touch
        /// it; dropping the returned [`Lease`] gives up that clone, then the lease.
        pub(crate) fn guard(self, component: &Component) -> Lease {
            let image = component.image_range();
            let page = page_size();
            let start = image.start as usize & !(page - 1);
            let end = (image.end as usize).div_ceil(page) * page;
            let len = self.file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
            let entry = Arc::new(Entry {
                len,
                file: self.file,
                path: self.path,
                range: (start, end),
                state: Mutex::new(State::Mapped {
                    _component: component.clone(),
                }),
                reported: std::sync::atomic::AtomicBool::new(false),
            });
            LIVE.fetch_add(1, Ordering::Relaxed);
            guard().add(Arc::downgrade(&entry));
            Lease { entry }
        }
    }

    fn page_size() -> usize {
        // SAFETY: sysconf has no preconditions.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(size).unwrap_or(4096)
    }

    enum State {
        /// The code pages come from the file, under the lease; the clone keeps
        /// them mapped.
        Mapped {
            /// Never read: holding it keeps the code mapped.
            _component: Component,
        },
        /// The pages are an anonymous copy; the lease is released.
        Detached,
        /// The lease's owner is gone.
        Retired,
    }

    struct Entry {
        /// Holds the lease; closing it releases the lease.
        file: File,
        /// The file's length when it was mapped.
        len: u64,
        path: PathBuf,
        /// Page-aligned bounds of the mapping.
        range: (usize, usize),
        state: Mutex<State>,
        /// Whether a failed copy was logged.
        reported: std::sync::atomic::AtomicBool,
    }

    impl Drop for Entry {
        fn drop(&mut self) {
            LIVE.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The guard's hold on one mapped artifact. Owned next to the component it
    /// mapped and dropped after it: it then drops its own clone of the component
    /// (unmapping the code, if it was the last), and only then the lease.
    pub(crate) struct Lease {
        entry: Arc<Entry>,
    }

    impl std::fmt::Debug for Lease {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Lease")
                .field("artifact", &self.entry.path)
                .finish_non_exhaustive()
        }
    }

    impl Drop for Lease {
        fn drop(&mut self) {
            let mut state = self.entry.state.lock().unwrap_or_else(|e| e.into_inner());
            // Unmapped here (under the lock, the lease still held) if this was
            // the last clone.
            drop(std::mem::replace(&mut *state, State::Retired));
        }
    }

    struct Guard {
        entries: Mutex<Vec<Weak<Entry>>>,
        wake: Condvar,
        /// The guard thread's id (0 until it runs, -1 if it could not start).
        tid: AtomicI32,
    }

    fn guard() -> &'static Guard {
        static GUARD: OnceLock<&'static Guard> = OnceLock::new();
        GUARD.get_or_init(|| {
            let guard: &'static Guard = Box::leak(Box::new(Guard {
                entries: Mutex::new(Vec::new()),
                wake: Condvar::new(),
                tid: AtomicI32::new(0),
            }));
            let (tx, rx) = std::sync::mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name("reauth-artifacts".into())
                .spawn(move || {
                    // SAFETY: blocking one signal in this thread's own mask, and
                    // asking for this thread's id; no preconditions.
                    let tid = unsafe {
                        let mut set: libc::sigset_t = std::mem::zeroed();
                        libc::sigemptyset(&mut set);
                        libc::sigaddset(&mut set, libc::SIGURG);
                        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                        libc::gettid()
                    };
                    let _ = tx.send(tid);
                    guard.run()
                });
            let tid = match spawned {
                Ok(_) => rx.recv().unwrap_or(-1),
                Err(e) => {
                    tracing::warn!(error = %e, "could not start the artifact guard thread: artifacts are read, not mapped");
                    -1
                }
            };
            guard.tid.store(tid, Ordering::Release);
            guard
        })
    }

    impl Guard {
        fn add(&self, entry: Weak<Entry>) {
            self.entries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(entry);
            self.wake.notify_one();
        }

        fn run(&self) {
            loop {
                let live: Vec<Weak<Entry>> = {
                    let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                    entries.retain(|e| e.strong_count() > 0);
                    while entries.is_empty() {
                        entries = self.wake.wait(entries).unwrap_or_else(|e| e.into_inner());
                        entries.retain(|e| e.strong_count() > 0);
                    }
                    entries.clone()
                };
                // One entry at a time, so the guard never keeps a dropped
                // lease's descriptor open longer than one check.
                for entry in live {
                    if let Some(entry) = entry.upgrade() {
                        entry.check();
                    }
                }
                std::thread::sleep(POLL);
            }
        }
    }

    impl Entry {
        /// If someone wants to write the file, detach the mapping and let them.
        fn check(&self) {
            let outcome = {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if !matches!(*state, State::Mapped { .. }) {
                    return;
                }
                let fd = self.file.as_raw_fd();
                // SAFETY: F_GETLEASE on a descriptor this entry owns.
                if unsafe { libc::fcntl(fd, libc::F_GETLEASE) } == libc::F_RDLCK {
                    return;
                }
                let outcome = detach(self.range, &self.file, self.len);
                if outcome.is_ok() {
                    // Our clone no longer needs to pin the mapping (dropped here,
                    // never the last one: the lease's owner holds the component).
                    *state = State::Detached;
                    // SAFETY: as above.
                    unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
                }
                outcome
            };
            // Logged outside the lock (a slow subscriber must not hold up a
            // lease's owner).
            match outcome {
                Ok(()) => tracing::info!(
                    artifact = %self.path.display(),
                    "a precompiled artifact in use is being written or truncated: the host now runs its own copy"
                ),
                // Retried at every poll (pages copied already stay copied) until
                // the kernel's break time runs out; said once.
                Err(e) if !self.reported.swap(true, Ordering::Relaxed) => tracing::error!(
                    artifact = %self.path.display(),
                    error = %e,
                    "a precompiled artifact in use is being written or truncated, and the host could not copy it; \
                     if the writer truncates it, calls of this provider will crash the process: restart it"
                ),
                Err(_) => {}
            }
        }
    }

    /// Replace the file-backed pages in `range` (the artifact's mapping, kept
    /// alive by the caller) with anonymous copies of the same bytes, read from
    /// `file` (a short read, if the file was cut already, is an error, never a
    /// fault) and with the same protections. Every copy is made first, then all
    /// are swapped in, each atomically (`mremap`); pages that are anonymous
    /// already (an earlier, partial attempt) are left alone.
    fn detach(range: (usize, usize), file: &File, len: u64) -> std::io::Result<()> {
        struct Segment {
            start: usize,
            len: usize,
            offset: u64,
            prot: libc::c_int,
        }
        let maps = std::fs::read_to_string("/proc/self/maps")?;
        let mut segments = Vec::new();
        let mut covered = 0;
        for line in maps.lines() {
            let mut fields = line.split_ascii_whitespace();
            let (Some(bounds), Some(perms), Some(offset), Some(_), Some(inode)) = (
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
            ) else {
                continue;
            };
            let Some((a, b)) = bounds.split_once('-') else {
                continue;
            };
            let (Ok(a), Ok(b), Ok(offset)) = (
                usize::from_str_radix(a, 16),
                usize::from_str_radix(b, 16),
                u64::from_str_radix(offset, 16),
            ) else {
                continue;
            };
            if b <= range.0 || a >= range.1 {
                continue;
            }
            let (start, end) = (a.max(range.0), b.min(range.1));
            covered += end - start;
            if inode == "0" {
                continue; // a copy already
            }
            let perms = perms.as_bytes();
            let mut prot = 0;
            if perms.first() == Some(&b'r') {
                prot |= libc::PROT_READ;
            }
            if perms.get(1) == Some(&b'w') {
                prot |= libc::PROT_WRITE;
            }
            if perms.get(2) == Some(&b'x') {
                prot |= libc::PROT_EXEC;
            }
            segments.push(Segment {
                start,
                len: end - start,
                offset: offset + (start - a) as u64,
                prot,
            });
        }
        if covered != range.1 - range.0 {
            return Err(std::io::Error::other(
                "the artifact's mapping is not where it was loaded",
            ));
        }
        let size = file.metadata()?.len();
        if size < len {
            return Err(std::io::Error::other(format!(
                "the artifact was cut to {size} of {len} bytes before the host could copy it"
            )));
        }
        let mut copies: Vec<(*mut libc::c_void, &Segment)> = Vec::new();
        let unmap_all = |copies: &[(*mut libc::c_void, &Segment)]| {
            for (copy, seg) in copies {
                // SAFETY: `copy` is a mapping of `seg.len` bytes made below.
                unsafe { libc::munmap(*copy, seg.len) };
            }
        };
        for seg in &segments {
            // SAFETY: a fresh anonymous mapping; the slice over it is this
            // function's alone until it is handed to mremap.
            let copy = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    seg.len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if copy == libc::MAP_FAILED {
                let e = std::io::Error::last_os_error();
                unmap_all(&copies);
                return Err(e);
            }
            copies.push((copy, seg));
            // SAFETY: see above.
            let buf = unsafe { std::slice::from_raw_parts_mut(copy.cast::<u8>(), seg.len) };
            let want = usize::try_from(size.saturating_sub(seg.offset))
                .unwrap_or(usize::MAX)
                .min(seg.len);
            if let Err(e) = file.read_exact_at(&mut buf[..want], seg.offset) {
                unmap_all(&copies);
                return Err(std::io::Error::other(format!(
                    "the artifact could not be read back (cut short already?): {e}"
                )));
            }
            // SAFETY: the copy's own pages.
            if unsafe { libc::mprotect(copy, seg.len, seg.prot) } != 0 {
                let e = std::io::Error::last_os_error();
                unmap_all(&copies);
                return Err(e);
            }
        }
        for (i, (copy, seg)) in copies.iter().enumerate() {
            // SAFETY: `seg` is a page-aligned part of the artifact's mapping,
            // which the caller keeps mapped (its entry holds a clone of the
            // component); the copy holds the same bytes (the file under the lease
            // is what the private, never-written mapping shows) with the same
            // protections, and mremap swaps it in atomically (under the mm lock),
            // so code running from these pages sees the same instructions before
            // and after.
            let moved = unsafe {
                libc::mremap(
                    *copy,
                    seg.len,
                    seg.len,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    seg.start as *mut libc::c_void,
                )
            };
            if moved == libc::MAP_FAILED {
                let e = std::io::Error::last_os_error();
                // The kernel may have unmapped the target already: this copy
                // may be the only good one of these bytes, so it is kept (a
                // leak, on a path that needs the kernel out of memory).
                unmap_all(&copies[i + 1..]);
                return Err(e);
            }
        }
        Ok(())
    }
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
mod imp {
    //! No leases here: artifacts are read into memory.

    use std::fs::File;
    use std::path::{Path, PathBuf};
    use wasmtime::component::Component;

    pub(super) fn trusted_fs(_path: &Path) -> bool {
        false
    }

    pub(super) fn leases_usable() -> bool {
        false
    }

    /// Never constructed on this platform.
    #[derive(Debug)]
    pub(crate) enum LeasedFile {}

    /// Never constructed on this platform.
    #[derive(Debug)]
    pub(crate) enum Lease {}

    impl LeasedFile {
        pub(crate) fn open(_path: &Path) -> Option<LeasedFile> {
            None
        }
        pub(crate) fn file(&self) -> &File {
            match *self {}
        }
        pub(crate) fn fd_path(&self) -> PathBuf {
            match *self {}
        }
        pub(crate) fn guard(self, _component: &Component) -> Lease {
            match self {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_see_a_same_size_rewrite_and_settle_by_the_file_systems_clock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"one").unwrap();
        let a = Stamp::of(&std::fs::metadata(&path).unwrap());
        assert_eq!(a, Stamp::of(&std::fs::metadata(&path).unwrap()));
        let settled = i128::try_from(SETTLED.as_nanos()).unwrap();
        assert!(!a.settled(a.ctime_ns + 1), "just written");
        assert!(!a.settled(a.ctime_ns + settled), "not yet");
        assert!(a.settled(a.ctime_ns + settled + 1));
        assert!(
            fs_now(dir.path()).unwrap() >= a.ctime_ns,
            "the file system's clock"
        );
        // A rewrite in place, same size, after the file system's clock moved on:
        // the change time differs (on file systems with sub-second timestamps).
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, b"two").unwrap();
        let b = Stamp::of(&std::fs::metadata(&path).unwrap());
        assert_eq!((a.size, a.ino), (b.size, b.ino));
        if a.ctime_ns % 1_000_000_000 != 0 {
            assert_ne!(a, b, "a same-size rewrite must change the stamp");
        }
    }

    #[test]
    fn source_digest_is_recorded_only_when_settled_and_forgotten_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let plugin = dir.path().join("p.wasm");
        std::fs::write(&plugin, b"plugin bytes").unwrap();
        let meta = std::fs::metadata(&plugin).unwrap();
        let now = fs_now(&cache).unwrap();
        let (_, stamps) = read_stamped(&plugin).unwrap();
        record_source_digest(&cache, &plugin, stamps, now, &"a".repeat(64));
        assert_eq!(known_source_digest(&cache, &plugin), None, "not settled");
        // Changed during the read (stamps differ): never recorded.
        let settled = i128::try_from(SETTLED.as_nanos()).unwrap();
        let mut moved = stamps.1;
        moved.size += 1;
        record_source_digest(&cache, &plugin, (stamps.0, moved), now + 2 * settled, "d");
        assert_eq!(
            known_source_digest(&cache, &plugin),
            None,
            "changed meanwhile"
        );
        // Settled by the file system's clock, on the cache's file system: recorded.
        record_source_digest(&cache, &plugin, stamps, now + 2 * settled, &"c".repeat(64));
        if trusted_fs(&plugin) {
            assert_eq!(known_source_digest(&cache, &plugin), Some("c".repeat(64)));
        }
        // An old file (mtime and ctime can only be aged by rewinding the clock,
        // so write the record as if it were settled).
        let record = SourceRecord {
            path: plugin.clone(),
            stamp: Stamp::of(&meta),
            sha256: "b".repeat(64),
        };
        crate::store::fs::write_atomically(
            &source_record_path(&cache, &plugin),
            &serde_json::to_vec(&record).unwrap(),
            false,
        )
        .unwrap();
        assert_eq!(known_source_digest(&cache, &plugin), Some("b".repeat(64)));
        // Replaced by another file (new inode): the record no longer applies.
        let other = dir.path().join("q.wasm");
        std::fs::write(&other, b"other bytes!").unwrap();
        std::fs::rename(&other, &plugin).unwrap();
        assert_eq!(known_source_digest(&cache, &plugin), None);
    }

    #[test]
    fn digest_file_matches_sha256() {
        use sha2::{Digest, Sha256};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            digest_file(&File::open(&path).unwrap()).unwrap(),
            hex::encode(Sha256::digest(&bytes))
        );
    }
}
