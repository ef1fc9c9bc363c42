#!/usr/bin/env bash
# Replace the text between `<!-- results:start -->` and `<!-- results:end -->` in
# FILE with the contents of RESULTS.   scripts/splice-results.sh FILE RESULTS
set -euo pipefail
file=$1 results=$2
grep -q '<!-- results:start -->' "$file" && grep -q '<!-- results:end -->' "$file" \
    || { echo "splice-results: markers missing in $file" >&2; exit 1; }
awk -v results="$results" '
    /<!-- results:start -->/ { print; while ((getline line < results) > 0) print line; skip = 1; next }
    /<!-- results:end -->/ { skip = 0 }
    !skip { print }
' "$file" > "$file.tmp"
mv "$file.tmp" "$file"
