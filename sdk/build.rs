//! The SDK's bindings are generated from the contract's WIT in the `wit/` next to
//! `sdk/` (a reauth checkout): say so clearly when it is missing, instead of a
//! macro error deep in wit-bindgen.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let wit = std::path::Path::new(&dir).join("../wit");
    println!("cargo:rerun-if-changed=../wit");
    if !wit.join("provider.wit").exists() {
        panic!(
            "reauth-sdk generates its bindings from the contract's WIT at {}, which is missing: \
             keep sdk/ and wit/ of the reauth checkout side by side (copy both)",
            wit.display()
        );
    }
}
