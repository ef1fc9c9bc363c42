//! Builds the guest components the tests run, once, before the tests compile (the
//! way wasmtime's `test-programs/artifacts` does): the guest workspace in
//! `plugins/` for `wasm32-wasip2` (release), then the Python and JavaScript
//! providers with `scripts/build-components.sh`. Cargo reruns this only when a
//! guest source, the SDK or the WIT changed.
//!
//! A build that fails does not fail this crate (`cargo clippy --workspace` must
//! work on a machine without the wasm target or the kits): the error is printed
//! as a cargo warning, recorded for `reauth_tests::plugins()` to report at the
//! first test that needs a component, and the next build tries again.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let tests = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let root = tests.parent().expect("tests/ has a parent").to_path_buf();
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));

    let mut watched = Vec::new();
    for dir in ["plugins", "sdk", "wit", "scripts"] {
        sources(&root.join(dir), &mut watched);
    }
    for path in &watched {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let mut failures = Vec::new();
    if let Err(e) = rust_guests(&root) {
        failures.push(e);
    }
    if let Err(e) = other_guests(&root) {
        failures.push(e);
    }
    for failure in &failures {
        for line in failure.lines().take(40) {
            println!("cargo:warning={line}");
        }
    }
    if !failures.is_empty() {
        // A path that never exists: cargo runs this script again next time.
        println!(
            "cargo:rerun-if-changed={}",
            out.join("guest-build-failed").display()
        );
    }

    let mut code = String::new();
    let guests = root.join("plugins/target/wasm32-wasip2/release");
    let components = root.join("plugins/target/components");
    let _ = writeln!(
        code,
        "/// Where the Rust guests are.\npub const GUESTS: &str = {:?};",
        guests.display().to_string()
    );
    let _ = writeln!(
        code,
        "/// Where the Python and JavaScript components are.\npub const COMPONENTS: &str = {:?};",
        components.display().to_string()
    );
    let _ = writeln!(
        code,
        "/// Why building the guests failed, if it did.\npub const BUILD_ERROR: Option<&str> = {:?};",
        (!failures.is_empty()).then(|| failures.join("\n"))
    );
    std::fs::write(out.join("guests.rs"), code).expect("writing guests.rs");
}

/// Every file under `dir` a guest build reads: not build output, installed
/// packages or caches.
fn sources(dir: &Path, into: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if matches!(
            name.as_ref(),
            "target" | "node_modules" | ".venv" | "__pycache__" | ".git"
        ) {
            continue;
        }
        match entry.file_type() {
            Ok(t) if t.is_dir() => sources(&path, into),
            Ok(_) => into.push(path),
            Err(_) => {}
        }
    }
}

/// `cargo build --release --target wasm32-wasip2` in `plugins/` (its own
/// workspace and target directory).
fn rust_guests(root: &Path) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .current_dir(root.join("plugins"))
        // The outer build's settings are for the host, not for guests (and
        // under `cargo clippy`, clippy's wrapper is for this workspace only).
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CLIPPY_ARGS")
        .env_remove("CARGO_PRIMARY_PACKAGE")
        .output()
        .map_err(|e| format!("building the guests: running cargo: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "building the guests (cd plugins && cargo build --release --target wasm32-wasip2) failed \
             (is the target installed? `make setup`):\n{}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// The Python and JavaScript providers (`scripts/build-components.sh`; it skips
/// components newer than their sources, and the kits install their tools on
/// first use).
fn other_guests(root: &Path) -> Result<(), String> {
    let output = Command::new(root.join("scripts/build-components.sh"))
        .current_dir(root)
        .output()
        .map_err(|e| format!("running scripts/build-components.sh: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "building the Python/JavaScript components (scripts/build-components.sh) failed \
             (are the kits installed? `make kits`):\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}
