#!/usr/bin/env bash
# Install the Python and JavaScript authoring kits' tools, pinned:
# - componentize-py (sdk/python/requirements.txt) into sdk/python/.venv;
# - componentize-js and esbuild (sdk/js/package-lock.json) into sdk/js/node_modules.
# The kits' build.sh scripts do the same on first use; CI runs this as its own step.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v python3 >/dev/null || { echo "install-kits: python3 (>= 3.10) is required" >&2; exit 1; }
command -v node >/dev/null || { echo "install-kits: Node.js (>= 20) is required" >&2; exit 1; }
venv="${REAUTH_PY_VENV:-sdk/python/.venv}"
want=$(sed -n 's/^componentize-py==//p' sdk/python/requirements.txt)
if ! "$venv/bin/componentize-py" --version 2>/dev/null | grep -q "$want"; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r sdk/python/requirements.txt
fi
if [ ! -x sdk/js/node_modules/.bin/componentize-js ] \
   || [ sdk/js/package-lock.json -nt sdk/js/node_modules/.package-lock.json ]; then
    (cd sdk/js && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "kits: $("$venv/bin/componentize-py" --version), componentize-js $(node -p "require('./sdk/js/node_modules/@bytecodealliance/componentize-js/package.json').version")"
