#!/usr/bin/env bash
# Build this provider into provider.wasm with the reauth Python kit.
set -euo pipefail
cd "$(dirname "$0")"
"{{kit}}/build.sh" . provider.wasm
