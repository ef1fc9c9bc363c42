#!/usr/bin/env bash
# Build this provider into target/wasm32-wasip2/release/{{crate}}.wasm.
set -euo pipefail
cd "$(dirname "$0")"
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cargo build --release --target wasm32-wasip2
