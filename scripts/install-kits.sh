#!/usr/bin/env bash
# Install the Python and JavaScript authoring kits' tools, pinned:
# - componentize-py (sdk/python/requirements.txt) into sdk/python/.venv;
# - componentize-js and esbuild (sdk/js/package-lock.json) into sdk/js/node_modules.
# Each kit's setup.sh does the work; its build.sh runs it too, so a first build
# installs what is missing. CI runs this as its own step.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(sdk/python/setup.sh)"
sdk/js/setup.sh
echo "kits: $("$venv/bin/componentize-py" --version), componentize-js $(node -p "require('./sdk/js/node_modules/@bytecodealliance/componentize-js/package.json').version")"
