#!/usr/bin/env bash
# Install the JavaScript kit's build tools: componentize-js and esbuild, pinned by
# package-lock.json, into sdk/js/node_modules. A no-op when they are current.
set -euo pipefail
kit="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
command -v node >/dev/null || { echo "setup: Node.js (>= 20) is required" >&2; exit 1; }
if [ ! -x "$kit/node_modules/.bin/componentize-js" ] \
   || [ "$kit/package-lock.json" -nt "$kit/node_modules/.package-lock.json" ]; then
    (cd "$kit" && npm ci --no-audit --no-fund --loglevel=error) >&2
fi
