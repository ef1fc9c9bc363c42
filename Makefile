# One place for the project's commands. `make demo` and `make test` are the
# README's two set-up commands; both install what a fresh machine lacks.
SHELL := /bin/bash
CARGO ?= cargo
# Where `reauth test` / `reauth check` (and the tests that run them) keep compiled
# plugins: inside the project, not the user's ~/.cache (override it from the
# environment).
export REAUTH_CACHE_DIR ?= $(CURDIR)/target/artifacts

.PHONY: setup peers kits plugins demo-plugin conformance demo test lint fmt wit-check bench bench-report bench-extism fuzz clean

## Toolchain pieces a fresh machine lacks (RUSTUP_AUTO_INSTALL=0 here: be explicit).
setup:
	@rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
	@rustup component list --installed | grep -q '^clippy' || rustup component add clippy
	@rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt

## The real peers of the integration tests (oidc-provider, PostgreSQL, Redis).
peers:
	scripts/install-peers.sh

## The Python and JavaScript authoring kits' tools (componentize-py, componentize-js).
kits:
	scripts/install-kits.sh

## Build the shipped providers and the test fixtures: Rust (guest workspace,
## wasm32-wasip2), then Python and JavaScript (plugins/target/components/).
plugins: setup kits
	cd plugins && $(CARGO) build --release --target wasm32-wasip2
	flock plugins/target/components.lock scripts/build-components.sh

## `reauth test` on every shipped provider (Rust, Python, JavaScript).
SHIPPED := static password-rotation oauth2-client-credentials oidc-refresh-token \
	oauth2-client-credentials-py password-rotation-js acme-sts acme-sts-py acme-sts-js aws-sts
conformance: plugins
	$(CARGO) build --workspace --all-targets
	@for p in $(SHIPPED); do echo "== reauth test plugins/$$p"; target/debug/reauth test plugins/$$p || exit 1; done

## The main job: fetch → cached hits → refresh after expiry → re-authentication,
## against the embedded dev issuer.
## Only what the demo loads (one Rust plugin): no kits, no Python/JS components.
demo-plugin: setup
	cd plugins && $(CARGO) build --release --target wasm32-wasip2 -p oauth2-client-credentials
demo: demo-plugin
	$(CARGO) run --release -p reauth-cli --bin reauth -- demo

## Everything CI checks: formatting, lints, WIT drift, unit + integration tests,
## the conformance kit on every shipped provider, then the audit of every log line
## the tests wrote for leaked secrets.
test: plugins peers lint
	rm -rf target/test-logs
	$(CARGO) test --workspace --all-targets
	$(CARGO) test --workspace --doc
	cd sdk && $(CARGO) test --lib --target-dir ../target/sdk-native
	$(MAKE) --no-print-directory conformance
	$(CARGO) run -q -p reauth-tests --bin audit-logs

lint: setup wit-check
	$(CARGO) fmt --all -- --check
	cd plugins && $(CARGO) fmt --all -- --check
	cd sdk && $(CARGO) fmt -- --check
	cd bench/extism && $(CARGO) fmt --all -- --check
	cd sdk && $(CARGO) clippy --target wasm32-wasip2 --all-features -- -D warnings
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	# The lean builds an embedder gets (a workspace build unites every member's
	# features and would hide code that needs a feature it does not enable).
	$(CARGO) clippy -p reauth-core --no-default-features -- -D warnings
	$(CARGO) clippy -p reauth --no-default-features -- -D warnings
	$(CARGO) clippy -p reauth --no-default-features --features fleet -- -D warnings
	$(CARGO) clippy -p reauth-embedder-example -- -D warnings
	cd plugins && $(CARGO) clippy --release --target wasm32-wasip2 --workspace -- -D warnings

## wit/deps must match the WIT inside the pinned wasmtime crates.
wit-check:
	scripts/vendor-wit.sh --check

bench: plugins
	$(CARGO) bench -p reauth

## Side-by-side comparisons (bench/, release build): regenerate BENCHMARKS.md's results.
bench-report: plugins peers bench-extism
	$(CARGO) build --release -p reauth-bench --bins
	target/release/reauth-bench > target/bench-results.md
	scripts/splice-results.sh BENCHMARKS.md target/bench-results.md

## The Extism side of the comparison: its own workspace (Extism pins its own wasmtime).
bench-extism:
	@rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
	cd bench/extism && $(CARGO) build --release --target wasm32-unknown-unknown -p extism-bench-plugin --target-dir ../../target
	cd bench/extism && $(CARGO) build --release -p extism-bench --target-dir ../../target

## Coverage-guided fuzzing (nightly + cargo-fuzz; not part of `make test`).
FUZZ_SECONDS ?= 60
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	for target in config_parse www_authenticate credential_from_guest sidecar_credentials_body sidecar_security_error_body; do \
		$(CARGO) +nightly fuzz run -s none -a $$target -- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 || exit 1; \
	done

clean:
	$(CARGO) clean
	cd plugins && $(CARGO) clean

## Format everything (host workspace, guest workspace, SDK).
fmt:
	$(CARGO) fmt --all
	cd plugins && $(CARGO) fmt --all
	cd sdk && $(CARGO) fmt
	cd bench/extism && $(CARGO) fmt --all
