#!/usr/bin/env bash
# Refresh wit/deps/ from the WIT shipped inside the pinned wasmtime crates, so the
# contract plugins compile against is exactly what the host implements.
#   scripts/vendor-wit.sh          copy the files
#   scripts/vendor-wit.sh --check  fail if wit/deps/ has drifted from the pinned crates
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
meta=$(cargo metadata --format-version 1 --locked 2>/dev/null || cargo metadata --format-version 1)
dir_of() {
  printf '%s' "$meta" | python3 -c '
import json, os, sys
name = sys.argv[1]
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == name:
        print(os.path.dirname(p["manifest_path"]))
        break
else:
    sys.exit("package %s not in cargo metadata" % name)
' "$1"
}
http=$(dir_of wasmtime-wasi-http)
config=$(dir_of wasmtime-wasi-config)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
for f in cli clocks filesystem http io random sockets; do
  cp "$http/wit/deps/$f.wit" "$stage/$f.wit"
done
mkdir -p "$stage/config"
cp "$config/wit/deps/config/store.wit" "$config/wit/deps/config/world.wit" "$stage/config/"

if [ "${1:-}" = "--check" ]; then
  if ! diff -r "$stage" wit/deps >/dev/null; then
    diff -r "$stage" wit/deps | head -20 >&2 || true
    echo "wit/deps/ has drifted from the pinned wasmtime crates: run scripts/vendor-wit.sh" >&2
    exit 1
  fi
  echo "wit/deps/ matches the pinned wasmtime crates"
else
  rm -rf wit/deps
  cp -r "$stage" wit/deps
  echo "wit/deps/ refreshed from $http and $config"
fi
