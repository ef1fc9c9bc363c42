#!/usr/bin/env bash
# Benchmarks of #6: the sidecar under wrk (cached credential, loopback TCP), and
# the start-to-output time of an adapter process (hyperfine), standalone with a
# warm precompiled cache and against the sidecar. Release build. Needs Debian's
# wrk and hyperfine (installed here if missing).
#   scripts/bench-sidecar.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-10}
for tool in wrk hyperfine; do
    command -v $tool >/dev/null || { sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo; $sudo apt-get install -y -qq $tool >/dev/null; }
done
make -s plugins >/dev/null
cargo build -q --release -p reauth-cli --bin reauth
bin=target/release/reauth
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cat > "$work/reauth.toml" <<TOML
[runtime]
cache_dir = "$work/cache"
[providers.api]
plugin = "$PWD/plugins/target/wasm32-wasip2/release/static.wasm"
[providers.api.config]
token = "$(head -c 600 /dev/zero | tr '\0' 't')"
TOML
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RUST_LOG=warn $bin serve --config "$work/reauth.toml" --listen 127.0.0.1:$port --socket "$work/s.sock" > "$work/serve.log" 2>&1 &
for _ in $(seq 100); do grep -q "listening on unix" "$work/serve.log" && break; sleep 0.1; done
cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = "{}"
wrk.headers["Content-Type"] = "application/json"
LUA
curl -sf -X POST -H 'content-type: application/json' -d '{}' http://127.0.0.1:$port/v1/providers/api/credentials > /dev/null
echo "== wrk: POST /v1/providers/api/credentials (cached, 600-byte token), 2 threads"
for c in 8 16 32; do
    echo "-- $c connections"
    wrk -t2 -c$c -d${SECONDS_PER_RUN}s --latency -s "$work/post.lua" http://127.0.0.1:$port/v1/providers/api/credentials \
        | grep -E "Requests/sec|Latency  |  50%|  99%"
done
# The floor (#18 §4): bare hyper on the same runtime answering the same JSON.
cargo build -q --release -p reauth-bench --bin sidecar-floor
floor_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/release/sidecar-floor 127.0.0.1:$floor_port > "$work/floor.log" 2>&1 &
for _ in $(seq 100); do grep -q "listening" "$work/floor.log" && break; sleep 0.1; done
echo "== wrk: the floor (bare hyper, same response), 16 connections"
wrk -t2 -c16 -d${SECONDS_PER_RUN}s --latency -s "$work/post.lua" http://127.0.0.1:$floor_port/v1/providers/api/credentials \
    | grep -E "Requests/sec|Latency  |  50%|  99%"
echo "== hyperfine: adapter process start to output"
hyperfine -N --warmup 3 --runs 30 \
    -n "standalone (own host, precompiled cache)" "$bin kubectl-credential --provider api --config $work/reauth.toml" \
    -n "via sidecar (unix socket)" "$bin kubectl-credential --provider api --server $work/s.sock" 2>&1 \
    | grep -E "^Benchmark|Time \(mean|Range|faster|±" 
