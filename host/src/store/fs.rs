//! Private files: 0700 directories, 0600 temporary files named after their
//! writer, atomic replacement, and the clean-up of a dead writer's debris. Used by
//! the state files, the key ring, the shared cache and the artifact cache.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

/// Create `dir` (and its parents) as 0700 if missing.
pub(crate) fn private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Write `bytes` to `path` so that readers see the old or the new content, never a
/// mix: a temp file (0600) in the same directory, fsync when `durable`, rename
/// (`tempfile`'s `persist`), fsync the directory. A failed write or rename removes
/// its temp file.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    private_dir(dir)?;
    let mut tmp = temp_file_in(dir)?;
    tmp.write_all(bytes)?;
    if durable {
        tmp.as_file().sync_all()?;
    }
    // On failure the error hands the file back; dropping it removes it.
    tmp.persist(path).map_err(|e| e.error)?;
    if durable && let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

pub(crate) const TMP_PREFIX: &str = ".tmp-";

/// A temporary file (0600) in `dir` named `.tmp-<pid>-<random>`, so that
/// [`remove_debris`] can tell a dead writer's leftovers from a live one's. Removed
/// when dropped unless persisted.
pub(crate) fn temp_file_in(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(&format!("{TMP_PREFIX}{}-", std::process::id()))
        .rand_bytes(16)
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
}

/// Remove the temporary files that writers killed mid-write left in `dir`
/// (`.tmp-<pid>-<rand>` of a process that no longer runs). Returns how many.
pub(crate) fn remove_debris(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TMP_PREFIX)) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        let alive = pid
            .and_then(|pid| rustix::process::Pid::from_raw(i32::try_from(pid).ok()?))
            .is_some_and(|pid| {
                // Signal 0 checks the process exists; EPERM: it does, another user's.
                matches!(
                    rustix::process::test_kill_process(pid),
                    Ok(()) | Err(rustix::io::Errno::PERM)
                )
            });
        // Old enough that no writer can still be busy with it (a PID check alone
        // is blind across PID namespaces).
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(600));
        if !alive && old && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(dir = %dir.display(), removed, "removed temporary files left by interrupted writes");
    }
    removed
}

/// The mode bits of `path` beyond the owner's (`reauth check` reports them).
pub fn loose_permissions(path: &Path) -> Option<u32> {
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}
