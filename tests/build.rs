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
//! `REAUTH_SKIP_GUEST_BUILD=1` skips it (for an editor's build-script runs).

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

    let guests = root.join("plugins/target/wasm32-wasip2/release");
    let components = root.join("plugins/target/components");
    // The outputs too: a deleted component (`cargo clean` in plugins/) is a
    // missing path, which makes cargo run this again.
    for name in RUST_GUESTS {
        println!(
            "cargo:rerun-if-changed={}",
            guests.join(format!("{name}.wasm")).display()
        );
    }
    for name in OTHER_GUESTS {
        println!(
            "cargo:rerun-if-changed={}",
            components.join(format!("{name}.wasm")).display()
        );
    }
    println!("cargo:rerun-if-env-changed=REAUTH_SKIP_GUEST_BUILD");

    let mut failures = Vec::new();
    if std::env::var_os("REAUTH_SKIP_GUEST_BUILD").is_some() {
        // For editors' build-script runs (rust-analyzer): the tests then report
        // this at the first component they need.
        failures.push("REAUTH_SKIP_GUEST_BUILD is set: the guests were not built".to_string());
    } else {
        if let Err(e) = rust_guests(&root) {
            failures.push(e);
        }
        if let Err(e) = other_guests(&root) {
            failures.push(e);
        }
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
    // Unchanged content, untouched file: nothing that includes it recompiles.
    let path = out.join("guests.rs");
    if std::fs::read_to_string(&path).ok().as_deref() != Some(code.as_str()) {
        std::fs::write(&path, code).expect("writing guests.rs");
    }
}

/// The Rust guests `reauth_tests::plugins()` hands out (file stems).
const RUST_GUESTS: &[&str] = &[
    "static",
    "password_rotation",
    "oidc_refresh_token",
    "oauth2_client_credentials",
    "fixture_testkit",
    "fixture_hostile",
    "fixture_other_world",
    "fixture_bench_logic",
    "fixture_flawed",
    "acme_sts",
    "aws_sts",
    "fixture_contract_0_1",
];

/// The Python and JavaScript components it hands out.
const OTHER_GUESTS: &[&str] = &[
    "oauth2-client-credentials-py",
    "password-rotation-js",
    "hostile-py",
    "hostile-js",
    "acme-sts-py",
    "acme-sts-js",
];

/// What cargo tells a build script about the outer build, which must not reach
/// the nested one (a nested build script would see the host's `cfg`s).
fn outer_build_env(name: &str) -> bool {
    [
        "CARGO_CFG_",
        "CARGO_FEATURE_",
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "DEP_",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix))
        || matches!(
            name,
            "CARGO_TARGET_DIR"
                | "CARGO_BUILD_TARGET_DIR"
                | "RUSTFLAGS"
                | "CARGO_ENCODED_RUSTFLAGS"
                | "CARGO_BUILD_TARGET"
                | "RUSTC_WORKSPACE_WRAPPER"
                | "RUSTC_LINKER"
                | "CLIPPY_ARGS"
                | "CARGO_PRIMARY_PACKAGE"
                | "OUT_DIR"
                | "TARGET"
                | "HOST"
                | "OPT_LEVEL"
                | "PROFILE"
                | "DEBUG"
                | "NUM_JOBS"
        )
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
    let mut command = Command::new(cargo);
    command
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .current_dir(root.join("plugins"));
    // The outer build's settings are for the host, not for guests (and under
    // `cargo clippy`, clippy's wrapper is for this workspace only). The
    // jobserver (CARGO_MAKEFLAGS) stays: the nested build shares the cores.
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(outer_build_env) {
            command.env_remove(&name);
        }
    }
    let output = command
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
    // Under a lock: two builds at once (another target directory, an editor)
    // never write one component together.
    std::fs::create_dir_all(root.join("plugins/target"))
        .map_err(|e| format!("creating plugins/target: {e}"))?;
    let output = Command::new("flock")
        .arg(root.join("plugins/target/components.lock"))
        .arg(root.join("scripts/build-components.sh"))
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
