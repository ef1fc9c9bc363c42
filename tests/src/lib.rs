//! Test support: builds the guest workspace (`plugins/`, shipped providers and
//! fixtures) from source for `wasm32-wasip2` and hands out paths to the components.
//!
//! Test tiers (see `tests/README.md`): unit tests live next to the code in `host/`;
//! everything here runs real components through the real host against real peers
//! on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Paths to the built components.
#[derive(Debug, Clone)]
pub struct Plugins {
    /// `plugins/static`.
    pub static_: PathBuf,
    /// `plugins/basic`.
    pub basic: PathBuf,
    /// `plugins/oauth2-client-credentials`.
    pub oauth2: PathBuf,
    /// `plugins/fixtures/testkit`.
    pub testkit: PathBuf,
}

/// Build every guest component once per test binary (cargo makes repeat builds a
/// no-op) and return their paths. Panics with cargo's output if the build fails.
pub fn plugins() -> &'static Plugins {
    static PLUGINS: OnceLock<Plugins> = OnceLock::new();
    PLUGINS.get_or_init(|| {
        let dir = root().join("plugins");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let output = Command::new(cargo)
            .args(["build", "--release", "--target", "wasm32-wasip2"])
            .current_dir(&dir)
            // The outer cargo's settings are for the host, not for guests.
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET")
            .output()
            .expect("running cargo to build the plugins");
        assert!(
            output.status.success(),
            "building plugins failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let out = dir.join("target/wasm32-wasip2/release");
        let path = |name: &str| {
            let p = out.join(format!("{name}.wasm"));
            assert!(p.exists(), "{} was not built", p.display());
            p
        };
        Plugins {
            static_: path("static"),
            basic: path("basic"),
            oauth2: path("oauth2_client_credentials"),
            testkit: path("fixture_testkit"),
        }
    })
}

/// A `tracing` writer that keeps everything logged, so tests can assert what
/// appeared (and, above all, what did not).
#[derive(Clone, Default)]
pub struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Everything logged so far.
    pub fn contents(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Install as the process-wide subscriber at TRACE level (once per test
    /// binary: a per-thread subscriber misses events from other threads).
    pub fn install_global(&self) {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in this test binary");
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
