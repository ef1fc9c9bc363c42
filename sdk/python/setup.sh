#!/usr/bin/env bash
# Install the Python kit's build tool: componentize-py, pinned in requirements.txt,
# into a private venv ($REAUTH_PY_VENV, default sdk/python/.venv). A no-op when the
# pinned version is there. Prints the venv's path.
set -euo pipefail
kit="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
command -v python3 >/dev/null || { echo "setup: python3 (>= 3.10) is required" >&2; exit 1; }
venv="${REAUTH_PY_VENV:-$kit/.venv}"
want=$(sed -n 's/^componentize-py==//p' "$kit/requirements.txt")
if ! "$venv/bin/componentize-py" --version 2>/dev/null | grep -q "$want"; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$kit/requirements.txt" >&2
fi
echo "$venv"
