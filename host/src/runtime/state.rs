//! The `state` interface: a small per-provider key/value store, persisted as one
//! JSON file per provider, written atomically (temp file + fsync + rename) so a
//! crash never leaves half a refresh token behind.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Most keys one provider may keep.
pub(crate) const MAX_KEYS: usize = 256;
/// Largest key or value, in bytes.
pub(crate) const MAX_VALUE: usize = 64 * 1024;

/// One provider's persisted key/value state, shared by all of its calls.
pub(crate) struct StateStore {
    path: Option<PathBuf>,
    values: Mutex<BTreeMap<String, String>>,
}

impl StateStore {
    /// Open (or start) the store at `path`; `None` keeps state in memory only.
    pub(crate) fn open(path: Option<PathBuf>) -> std::io::Result<Self> {
        let values = match &path {
            Some(p) if p.exists() => {
                let text = std::fs::read_to_string(p)?;
                serde_json::from_str(&text).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{} is not a state file: {e}", p.display()),
                    )
                })?
            }
            _ => BTreeMap::new(),
        };
        Ok(StateStore {
            path,
            values: Mutex::new(values),
        })
    }

    /// Where the state is persisted.
    pub(crate) fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Every value held (to redact them from captured output).
    pub(crate) fn values(&self) -> Vec<String> {
        self.lock().values().cloned().collect()
    }

    pub(crate) fn get(&self, key: &str) -> Option<String> {
        self.lock().get(key).cloned()
    }

    pub(crate) fn set(&self, key: String, value: String) -> Result<(), String> {
        if key.len() > MAX_VALUE || value.len() > MAX_VALUE {
            return Err(format!(
                "state keys and values are limited to {MAX_VALUE} bytes"
            ));
        }
        let mut values = self.lock();
        if !values.contains_key(&key) && values.len() >= MAX_KEYS {
            return Err(format!("state is limited to {MAX_KEYS} keys"));
        }
        let previous = values.insert(key.clone(), value);
        if let Err(e) = self.persist(&values) {
            match previous {
                Some(p) => values.insert(key, p),
                None => values.remove(&key),
            };
            return Err(e);
        }
        Ok(())
    }

    pub(crate) fn delete(&self, key: &str) -> Result<(), String> {
        let mut values = self.lock();
        if let Some(previous) = values.remove(key)
            && let Err(e) = self.persist(&values)
        {
            values.insert(key.to_string(), previous);
            return Err(e);
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.values.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn persist(&self, values: &BTreeMap<String, String>) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        write_atomically(
            path,
            &serde_json::to_vec(values).map_err(|e| e.to_string())?,
        )
        // The message names the file, never the values.
        .map_err(|e| format!("persisting state to {}: {e}", path.display()))
    }
}

/// Write `bytes` to `path` so that readers see the old or the new content, never a
/// mix: temp file in the same directory, fsync, rename, fsync the directory.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile_in(dir)?;
    tmp.1.write_all(bytes)?;
    tmp.1.sync_all()?;
    std::fs::rename(&tmp.0, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    for _ in 0..16 {
        let name = format!(".tmp-{}-{:016x}", std::process::id(), rand::random::<u64>());
        let path = dir.join(name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("could not create a temporary file"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persists_across_reopen_and_limits_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        let s = StateStore::open(Some(path.clone())).unwrap();
        s.set("refresh".into(), "r1".into()).unwrap();
        s.set("refresh".into(), "r2".into()).unwrap();
        s.set("gone".into(), "x".into()).unwrap();
        s.delete("gone").unwrap();
        let again = StateStore::open(Some(path)).unwrap();
        assert_eq!(again.get("refresh").as_deref(), Some("r2"));
        assert_eq!(again.get("gone"), None);
        let big = "x".repeat(MAX_VALUE + 1);
        assert!(again.set("k".into(), big).is_err());
        assert_eq!(again.get("k"), None);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
