#!/usr/bin/env bash
# Build a JavaScript provider into a component the reauth host loads unchanged.
#
#   sdk/js/build.sh <project-dir> <out.wasm>
#
# The project directory holds `app.js`, which exports `authProvider` (see
# reauth-provider.js). esbuild bundles it with its imports — `reauth-provider`
# resolves to this kit's helpers, npm packages to the project's node_modules —
# then componentize-js (both pinned by package-lock.json, installed on first use)
# turns the bundle into a component.
set -euo pipefail
kit="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The contract's WIT: $REAUTH_WIT, else the wit/ of the reauth checkout this kit
# is part of (keep sdk/ and wit/ together when copying the SDK).
wit="${REAUTH_WIT:-$kit/../../wit}"
[ -f "$wit/provider.wit" ] || { echo "build: no reauth WIT at $wit (provider.wit): keep sdk/ next to the reauth checkout's wit/, or set REAUTH_WIT to that directory" >&2; exit 1; }
wit="$(cd "$wit" && pwd)"
[ $# -eq 2 ] || { echo "usage: $0 <project-dir> <out.wasm>" >&2; exit 2; }
project="$(cd "$1" && pwd)"
out="$2"
[ -f "$project/app.js" ] || { echo "build: $project/app.js not found (the provider's module)" >&2; exit 1; }

"$kit/setup.sh"
mkdir -p "$(dirname "$out")"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
"$kit/node_modules/.bin/esbuild" "$project/app.js" --bundle --format=esm --platform=neutral \
    --alias:reauth-provider="$kit/reauth-provider.js" \
    --external:'wasi:*' --external:'reauth:*' \
    --log-level=warning --outfile="$stage/provider.js"
"$kit/node_modules/.bin/componentize-js" "$stage/provider.js" --wit "$wit" \
    --world-name reauth:provider/provider -o "$out.tmp" >/dev/null
mv "$out.tmp" "$out"
# Builds of the same source differ (the interpreter's pre-initialised heap holds
# per-build random state; see the guide's "Pinning a build"): the digest to pin
# is this artifact's, written beside it.
sha256sum "$out" | cut -d' ' -f1 > "$out.sha256"
