#!/usr/bin/env bash
# Build a Python provider into a component the reauth host loads unchanged.
#
#   sdk/python/build.sh <project-dir> <out.wasm>
#
# The project directory holds `app.py` (class AuthProvider) and any other modules
# it imports. componentize-py (pinned in requirements.txt) is installed into a
# private venv on first use (setup.sh): $REAUTH_PY_VENV, default sdk/python/.venv.
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
[ -f "$project/app.py" ] || { echo "build: $project/app.py not found (the provider's module)" >&2; exit 1; }

venv="$("$kit/setup.sh")"
mkdir -p "$(dirname "$out")"
# -p: the project first (it may shadow nothing of ours), then the kit's helpers.
"$venv/bin/componentize-py" -d "$wit" -w reauth:provider/provider componentize \
    -p "$project" -p "$kit" app -o "$out.tmp"
mv "$out.tmp" "$out"
# Builds of the same source differ (the interpreter's pre-initialised heap holds
# per-build random state; see the guide's "Pinning a build"): the digest to pin
# is this artifact's, written beside it.
sha256sum "$out" | cut -d' ' -f1 > "$out.sha256"
