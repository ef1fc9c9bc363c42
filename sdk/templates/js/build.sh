#!/usr/bin/env bash
# Build this provider into provider.wasm with the reauth JavaScript kit.
# The kit is $REAUTH_SDK/js when REAUTH_SDK is set (the sdk/ directory of a
# reauth checkout), else where `reauth new` found it.
set -euo pipefail
cd "$(dirname "$0")"
sdk="${REAUTH_SDK:-{{sdk}}}"
if [ ! -x "$sdk/js/build.sh" ]; then
    echo "build.sh: no reauth SDK at $sdk (set REAUTH_SDK to the sdk/ directory of a reauth checkout)" >&2
    exit 1
fi
"$sdk/js/build.sh" . provider.wasm
