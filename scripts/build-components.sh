#!/usr/bin/env bash
# Build every Python and JavaScript provider under plugins/ (shipped ones and test
# fixtures: directories holding app.py or app.js) into
# plugins/target/components/<dir name>.wasm, with the kits in sdk/python and sdk/js.
# A component newer than its sources and its kit is not rebuilt.
#
#   scripts/build-components.sh            # all of them
#   scripts/build-components.sh NAME...    # only these
set -euo pipefail
cd "$(dirname "$0")/.."
out=plugins/target/components
mkdir -p "$out"

newest() { find "$@" -type f \( -name '*.py' -o -name '*.js' -o -name '*.txt' -o -name '*.json' -o -name '*.sh' -o -name '*.wit' \) \
    -not -path '*/node_modules/*' -not -path '*/.venv/*' -not -path '*/__pycache__/*' -printf '%T@\n' | sort -n | tail -1; }

# The kits' and the WIT's newest change, found once per kit.
declare -A tools
built=0
for dir in plugins/*/ plugins/fixtures/*/; do
    dir=${dir%/}
    name=$(basename "$dir")
    if [ $# -gt 0 ] && ! printf '%s\n' "$@" | grep -qx "$name"; then continue; fi
    if [ -f "$dir/app.py" ]; then kit=sdk/python
    elif [ -f "$dir/app.js" ]; then kit=sdk/js
    else continue; fi
    target="$out/$name.wasm"
    if [ -f "$target" ]; then
        stamp=$(stat -c %Y "$target")
        [ -n "${tools[$kit]:-}" ] || tools[$kit]=$(newest "$kit" wit)
        sources=$(printf '%s\n%s\n' "$(newest "$dir")" "${tools[$kit]}" | sort -n | tail -1)
        if [ "${sources%.*}" -lt "$stamp" ]; then continue; fi
    fi
    started=$(date +%s%N)
    "$kit/build.sh" "$dir" "$target" >/dev/null
    echo "built $target (${kit#sdk/}, $(( ($(date +%s%N) - started) / 1000000 )) ms, $(stat -c %s "$target") bytes)"
    built=$((built + 1))
done
echo "components: $built built, in $out"
