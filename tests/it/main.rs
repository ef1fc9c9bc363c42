//! reauth's integration tests: one binary (linking wasmtime and cranelift once),
//! one module per area. The shipped plugins and the fixtures are built from
//! source by `tests/build.rs` before this compiles (see `reauth_tests::plugins`);
//! the tests run them through the host against real peers on loopback. Run one area with
//! `cargo test -p reauth-tests --test it <module>::`.

mod adapters;
mod cli;
mod examples;
mod fleet;
mod fleet_chaos;
mod fleet_store;
mod polyglot;
mod processes;
mod providers;
mod real_idp;
mod reauth;
mod rotation;
mod sandbox;
mod secrets;
mod serve;
mod verify;
mod watch;
