#!/usr/bin/env bash
# Install the real peers the integration tests start on 127.0.0.1:
# - Node.js packages of the test IdP (npm `oidc-provider`, pinned by the lockfile);
# - PostgreSQL, Redis, lighttpd (git over HTTP) and faketime (clock skew) from
#   Debian's packages (only if missing);
# - moto's server mode (a local AWS STS) and botocore, from PyPI, pinned
#   (tests/peers/moto/requirements.txt), in target/peers/moto;
# - Debian's kubectl (`kubernetes-client`), unpacked under target/peers/kubectl
#   rather than installed: these machines may carry another `kubectl` on PATH.
# Idempotent; the tests start and stop the processes themselves.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v node >/dev/null || { echo "install-peers: Node.js (>= 20.19) is required" >&2; exit 1; }
if [ ! -d tests/peers/idp/node_modules/oidc-provider ] \
   || [ tests/peers/idp/package-lock.json -nt tests/peers/idp/node_modules/.package-lock.json ]; then
    (cd tests/peers/idp && npm ci --no-audit --no-fund --loglevel=error)
fi

missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v lighttpd >/dev/null || [ -x /usr/sbin/lighttpd ] || missing+=(lighttpd)
# libfaketime: a fleet replica whose clock is minutes off (tests/it/fleet.rs).
command -v faketime >/dev/null || missing+=(faketime)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    # The packages' own services are not needed: tests run private instances.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# moto's server mode: the local AWS STS of the aws-sts tests, and botocore (its
# dependency) as the credential_process consumer. Pinned; its own virtualenv.
moto=target/peers/moto
if [ ! -x "$moto/bin/moto_server" ] || [ tests/peers/moto/requirements.txt -nt "$moto/bin/moto_server" ]; then
    rm -rf "$moto"
    python3 -m venv "$moto"
    "$moto/bin/pip" install --quiet --disable-pip-version-check -r tests/peers/moto/requirements.txt
    touch "$moto/bin/moto_server"
fi

kubectl=target/peers/kubectl/usr/bin/kubectl
if [ ! -x "$kubectl" ]; then
    mkdir -p target/peers/kubectl
    (cd target/peers && apt-get download kubernetes-client >/dev/null 2>&1 \
        || { sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"; $sudo apt-get update -qq && apt-get download kubernetes-client; })
    dpkg-deb -x target/peers/kubernetes-client_*.deb target/peers/kubectl
    rm -f target/peers/kubernetes-client_*.deb
fi
"$kubectl" version --client >/dev/null
