//! Shared by the benches: where the built plugins are.

use std::path::PathBuf;

/// The built component `name` (`REAUTH_PLUGIN_DIR`, default the guest workspace's
/// release output). Panics with the fix if it is missing.
pub fn plugin(name: &str) -> PathBuf {
    let dir = std::env::var_os("REAUTH_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../plugins/target/wasm32-wasip2/release")
        });
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} missing: run `make plugins` first",
        path.display()
    );
    path
}
