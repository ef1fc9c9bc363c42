//! # reauth-cli: the `reauth` command and its tools
//!
//! The binary `reauth` ([`cli`]) and what it runs: the sidecar HTTP API
//! ([`server`], `reauth serve`), the adapters for kubectl, git, docker and the AWS
//! SDKs ([`adapters`]), the conformance kit for provider authors
//! ([`conformance`], `reauth test`), project scaffolding ([`scaffold`],
//! `reauth new`) and the development OAuth2 issuer the demo and the tests run
//! against ([`issuer`]). Embedders depend on the `reauth` crate instead and
//! compile none of this.

#![deny(missing_docs)]

/// What a command that failed at run time reports (printed on stderr, exit code
/// 3): the tools' own error, not part of the embedder's API.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub mod adapters;
pub mod cli;
pub mod conformance;
pub mod issuer;
pub mod scaffold;
pub mod server;

// The paths the tools were written against (`crate::config::…`).
use reauth::{runtime, watch};
use reauth_core::{Lookup, ProviderConfig, Reason, Secret};
use reauth_core::{cache, classify, clock, config, error, retry, secret, types, wire};

/// The host, as the tools use it.
mod host {
    pub use reauth::{Host, ProviderStatus};
}
