//! Integrity checks at load: is this a WebAssembly component at all, does it fit
//! the `reauth:provider` world, and is a precompiled artifact really the one for
//! these bytes.

use sha2::{Digest, Sha256};
use std::path::Path;
use wasmtime::Engine;
use wasmtime::component::Component;

/// The export every provider must have (0.2.x; 0.1.x components load too).
pub(crate) const REQUIRED_EXPORT: &str = "reauth:provider/auth-provider@0.2.0";

/// Interfaces the host's linker offers, without versions (WASI 0.2.x, wasi:config
/// 0.2.0-rc.1, reauth:provider 0.2.x and 0.1.x). Used only to explain a link failure; the
/// linker itself decides.
const OFFERED: &[&str] = &[
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
    "wasi:sockets/network",
    "wasi:sockets/instance-network",
    "wasi:sockets/udp",
    "wasi:sockets/udp-create-socket",
    "wasi:sockets/tcp",
    "wasi:sockets/tcp-create-socket",
    "wasi:sockets/ip-name-lookup",
    "wasi:http/types",
    "wasi:http/outgoing-handler",
    "wasi:config/store",
    "reauth:provider/types",
    "reauth:provider/state",
    "reauth:provider/metadata",
];

/// Refuse what is not a WebAssembly component before handing it to the compiler,
/// with a message an operator can act on.
pub(crate) fn check_header(bytes: &[u8]) -> Result<(), String> {
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err(format!(
            "not a WebAssembly file ({} bytes, no `\\0asm` header): truncated or the wrong file?",
            bytes.len()
        ));
    }
    match (&bytes[4..6], &bytes[6..8]) {
        (_, [1, 0]) => Ok(()),
        ([1, 0], [0, 0]) => Err(
            "this is a core WebAssembly module, not a component: build the provider for \
             wasm32-wasip2 (or wrap the module with `wasm-tools component new`)"
                .into(),
        ),
        _ => Err("unsupported WebAssembly binary version/layer".into()),
    }
}

fn unversioned(name: &str) -> &str {
    name.split_once('@').map_or(name, |(n, _)| n)
}

/// Why `component` does not fit: the missing export and the imports the host does
/// not offer, each listed; `None` if neither is the case (a type mismatch — the
/// linker's own message then says which).
pub(crate) fn world_mismatch(engine: &Engine, component: &Component) -> Option<String> {
    let ty = component.component_type();
    let exports_ok = ty.exports(engine).any(|(name, _)| {
        name.starts_with("reauth:provider/auth-provider@0.2.")
            || name.starts_with("reauth:provider/auth-provider@0.1.")
    });
    let extra: Vec<String> = ty
        .imports(engine)
        .map(|(name, _)| name)
        .filter(|name| !OFFERED.contains(&unversioned(name)))
        .map(|name| format!("`{name}`"))
        .collect();
    let mut parts = Vec::new();
    if !exports_ok {
        let exports: Vec<String> = ty
            .exports(engine)
            .map(|(name, _)| format!("`{name}`"))
            .collect();
        parts.push(format!(
            "missing export `{REQUIRED_EXPORT}` or `…@0.1.0` (it exports {})",
            if exports.is_empty() {
                "nothing".to_string()
            } else {
                exports.join(", ")
            }
        ));
    }
    if !extra.is_empty() {
        parts.push(format!(
            "imports the host does not offer: {}",
            extra.join(", ")
        ));
    }
    (!parts.is_empty()).then(|| {
        format!(
            "not a reauth:provider component (0.2.0 or 0.1.0): {}",
            parts.join("; ")
        )
    })
}

/// Sidecar of a precompiled artifact: which source bytes it was compiled from and a
/// digest of the artifact itself, so a cache entry is only used for exactly the
/// bytes it was built from, and a corrupted or swapped file is recompiled.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub(crate) struct ArtifactMeta {
    pub(crate) source_sha256: String,
    pub(crate) artifact_sha256: String,
    /// The compiling engine's compatibility hash (wasmtime version and settings).
    pub(crate) engine: String,
    /// The artifact file as it was when its digest was last checked (see
    /// [`super::artifact`]): a load finding the file with this stamp skips the hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) verified: Option<super::artifact::Stamp>,
}

impl ArtifactMeta {
    pub(crate) fn new(source_sha256: &str, artifact: &[u8], engine: &str) -> Self {
        ArtifactMeta {
            source_sha256: source_sha256.to_string(),
            artifact_sha256: hex::encode(Sha256::digest(artifact)),
            engine: engine.to_string(),
            verified: None,
        }
    }

    /// The meta beside the artifact at `path`, if it names `source_sha256` and
    /// `engine`.
    pub(crate) fn read_matching(
        path: &Path,
        source_sha256: &str,
        engine: &str,
    ) -> Result<ArtifactMeta, String> {
        let meta_path = path.with_extension("meta.json");
        let meta: ArtifactMeta = std::fs::read(&meta_path)
            .map_err(|e| format!("no readable meta ({e})"))
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("bad meta: {e}")))?;
        if meta.source_sha256 != source_sha256 {
            return Err(format!(
                "artifact was compiled from {} but the plugin is {source_sha256}",
                meta.source_sha256
            ));
        }
        if meta.engine != engine {
            return Err(format!(
                "artifact is from another engine ({}), this one is {engine}",
                meta.engine
            ));
        }
        Ok(meta)
    }

    /// Rewrite the meta beside the artifact at `path` (best effort: a failure only
    /// costs a hash at the next load).
    pub(crate) fn rewrite(&self, path: &Path) {
        let written = serde_json::to_vec(self)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                crate::store::fs::write_atomically(&path.with_extension("meta.json"), &bytes, true)
            });
        if let Err(e) = written {
            tracing::debug!(path = %path.display(), error = %e, "could not record a verified artifact");
        }
    }

    /// Read the artifact at `path` with its meta; `Err(why)` unless the meta says it
    /// was compiled from `source_sha256` by an engine like `engine` and the bytes
    /// match.
    pub(crate) fn read_verified(
        path: &Path,
        source_sha256: &str,
        engine: &str,
    ) -> Result<Vec<u8>, String> {
        let meta = Self::read_matching(path, source_sha256, engine)?;
        // Read whole, not memory-mapped: a mapped file that someone truncates or
        // rewrites in place (`cp` over it) would crash the host with SIGBUS.
        let artifact = std::fs::read(path).map_err(|e| format!("unreadable: {e}"))?;
        let digest = hex::encode(Sha256::digest(&artifact));
        if digest != meta.artifact_sha256 {
            return Err("artifact bytes do not match their recorded digest".into());
        }
        Ok(artifact)
    }

    pub(crate) fn write(
        path: &Path,
        source_sha256: &str,
        artifact: &[u8],
        engine: &str,
    ) -> std::io::Result<()> {
        let meta = ArtifactMeta::new(source_sha256, artifact, engine);
        crate::store::fs::write_atomically(path, artifact, true)?;
        // Read-only: written once, never opened for writing again (a mapped
        // artifact must not change; see `artifact`). Replaced by renaming.
        {
            use std::os::unix::fs::PermissionsExt;
            // Best effort (some file systems refuse modes): the lease is the
            // guard that matters.
            if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400)) {
                tracing::debug!(path = %path.display(), error = %e, "could not make an artifact read-only");
            }
        }
        crate::store::fs::write_atomically(
            &path.with_extension("meta.json"),
            &serde_json::to_vec(&meta).map_err(std::io::Error::other)?,
            true,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        assert!(check_header(b"").unwrap_err().contains("0 bytes"));
        assert!(check_header(b"\0as").unwrap_err().contains("truncated"));
        assert!(check_header(b"ELF\x7f....").is_err());
        assert!(
            check_header(b"\0asm\x01\0\0\0")
                .unwrap_err()
                .contains("core WebAssembly module, not a component")
        );
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
    }

    #[test]
    fn meta_round_trip_and_tamper() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.cwasm");
        ArtifactMeta::write(&path, "aaaa", b"artifact", "e1").unwrap();
        let read = |sha, engine| ArtifactMeta::read_verified(&path, sha, engine);
        assert_eq!(read("aaaa", "e1").unwrap(), b"artifact");
        assert!(
            read("bbbb", "e1")
                .unwrap_err()
                .contains("compiled from aaaa")
        );
        assert!(read("aaaa", "e2").unwrap_err().contains("another engine"));
        {
            use std::os::unix::fs::PermissionsExt;
            // Written read-only (0400): a user makes it writable first.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        std::fs::write(&path, b"artifacT").unwrap();
        assert!(read("aaaa", "e1").unwrap_err().contains("do not match"));
        std::fs::remove_file(path.with_extension("meta.json")).unwrap();
        assert!(read("aaaa", "e1").unwrap_err().contains("no readable meta"));
    }
}
