//! The per-user cache of compiled plugins of `reauth test` and `reauth check`.

use super::*;

/// Where `reauth test` and `reauth check` keep compiled plugins between runs, so
/// that the second run of a 15–20 MB Python or JavaScript component loads it in
/// milliseconds instead of compiling it for seconds: `$REAUTH_CACHE_DIR` (empty:
/// none), else `$XDG_CACHE_HOME/reauth/artifacts`, else
/// `~/.cache/reauth/artifacts`.
///
/// Loading a precompiled artifact runs its code, so the directory is used only
/// when no other user can change it or any directory above it (see
/// `private_to`); otherwise there is no cache, with a warning. An artifact is
/// also loaded only after its digest and engine are checked.
pub fn user_artifact_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("REAUTH_CACHE_DIR") {
        Some(d) if d.is_empty() => return None,
        Some(d) => std::path::absolute(PathBuf::from(d)).ok()?,
        None => {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .or_else(|| {
                    std::env::var_os("HOME")
                        .map(PathBuf::from)
                        .filter(|p| p.is_absolute())
                        .map(|h| h.join(".cache"))
                })?;
            base.join("reauth").join("artifacts")
        }
    };
    match private_to(&dir, rustix::process::geteuid().as_raw()) {
        Ok(dir) => Some(dir),
        Err(why) => {
            tracing::warn!(dir = %dir.display(), "not caching compiled plugins here: {why}");
            None
        }
    }
}

/// `dir` with its symbolic links resolved, when it is a directory that user `me`
/// owns, that no other user can write to, and whose every ancestor is owned by
/// `me` or root and not writable by others (unless sticky, as `/tmp`): then no
/// other user can rename or replace anything on the way to its files. A missing
/// `dir` is created (0700), only under a directory `me` owns (never, say, inside
/// the home directory of the user who ran `sudo`).
fn private_to(dir: &Path, me: u32) -> Result<PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if !dir.exists() {
        let base = dir
            .ancestors()
            .find(|a| a.exists())
            .ok_or("no existing ancestor")?;
        let owner = std::fs::metadata(base).map_err(|e| e.to_string())?.uid();
        if owner != me {
            return Err(format!(
                "{} belongs to uid {owner}, not to this user (uid {me}): not creating a cache under it",
                base.display()
            ));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create it: {e}"))?;
    }
    let real = std::fs::canonicalize(dir).map_err(|e| e.to_string())?;
    let meta = std::fs::metadata(&real).map_err(|e| e.to_string())?;
    if !meta.is_dir() {
        return Err("not a directory".into());
    }
    if meta.uid() != me {
        return Err(format!(
            "owned by uid {}, not this user (uid {me})",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "mode {:o}: other users can write to it",
            meta.mode() & 0o777
        ));
    }
    for ancestor in real.ancestors().skip(1) {
        let m = std::fs::metadata(ancestor).map_err(|e| e.to_string())?;
        let trusted_owner = m.uid() == me || m.uid() == 0;
        let open = m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0;
        if !trusted_owner || open {
            return Err(format!(
                "{} (owner uid {}, mode {:o}): another user could replace what is below it",
                ancestor.display(),
                m.uid(),
                m.mode() & 0o7777
            ));
        }
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiled plugins are loaded (and so run) only from a directory no other
    /// user can change, nor any directory above it.
    #[test]
    fn the_artifact_cache_is_refused_when_others_can_change_it() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let me = rustix::process::geteuid().as_raw();
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("a/b/artifacts");
        let real = private_to(&fresh, me).unwrap();
        assert_eq!(real, std::fs::canonicalize(&fresh).unwrap());
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "created private");
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o777)).unwrap();
        let why = private_to(&fresh, me).unwrap_err();
        assert!(why.contains("other users can write"), "{why}");
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o700)).unwrap();
        // A private directory below one that others can write to (not sticky):
        // they could rename it away and put their own in its place.
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let below = open.join("artifacts");
        std::fs::create_dir(&below).unwrap();
        std::fs::set_permissions(&below, std::fs::Permissions::from_mode(0o700)).unwrap();
        let why = private_to(&below, me).unwrap_err();
        assert!(why.contains("another user could replace"), "{why}");
        // A symbolic link is followed, and the real directory checked and used.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        assert_eq!(private_to(&link, me).unwrap(), real);
        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(
            private_to(&file, me)
                .unwrap_err()
                .contains("not a directory")
        );
        // Nothing is created under a directory of another user.
        let other = std::fs::metadata(tmp.path()).unwrap().uid().wrapping_add(1);
        let why = private_to(&tmp.path().join("x/y"), other).unwrap_err();
        assert!(why.contains("not creating"), "{why}");
        assert!(!tmp.path().join("x").exists());
    }
}
