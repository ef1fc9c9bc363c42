//! The `reauth` command line. The binary is a thin wrapper around [`run`], so the
//! commands are tested in-process exactly as users run them.
//!
//! One module per command: `check`, `test` (`kit`), `serve` (and `watch`),
//! `get`, `demo`; `artifacts` is the per-user cache of compiled plugins.

mod artifacts;
mod check;
mod demo;
mod get;
mod kit;
mod serve;

pub use artifacts::user_artifact_dir;
pub use demo::DEMO_PLUGIN;
pub use get::GetArgs;
pub use serve::ServeArgs;

use crate::BoxError;
use crate::config::HostConfig;
use crate::host::{Host, ProviderStatus};
use crate::issuer::{DevClient, DevIssuer, DevIssuerConfig};
use crate::retry::Rejection;
use crate::types::{Credential, Credentials, Request};
use crate::{Lookup, ProviderConfig, Reason, classify};
use clap::{Parser, Subcommand, ValueEnum};
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

/// reauth: sandboxed WebAssembly auth providers with caching and re-authentication.
#[derive(Debug, Parser)]
#[command(name = "reauth", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr (`RUST_LOG` sets the level).
    #[arg(long, global = true, value_enum, env = "REAUTH_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where an adapter gets credentials: a running `reauth serve`, or its own host.
#[derive(Debug, Clone, clap::Args)]
pub struct BackendArgs {
    /// The config file (used when no --server is given).
    #[arg(long, short, env = "REAUTH_CONFIG", default_value = "reauth.toml")]
    pub config: PathBuf,
    /// A running `reauth serve`: its Unix socket path (or `unix:PATH`) or `http://127.0.0.1:PORT`.
    #[arg(long, env = "REAUTH_SERVER")]
    pub server: Option<String>,
    /// File holding the sidecar's API token.
    #[arg(long, env = "REAUTH_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
}

impl BackendArgs {
    fn open(&self) -> Result<crate::adapters::Backend, BoxError> {
        crate::adapters::Backend::open(
            &self.config,
            self.server.as_deref(),
            self.api_token_file.as_deref(),
        )
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the config, load and instantiate every provider, report each.
    /// Exit status: 0 all providers (and the fleet) ok, 1 a check failed, 2 a
    /// usage error, 3 reauth itself could not run.
    Check {
        /// The config file.
        #[arg(long, short, env = "REAUTH_CONFIG", default_value = "reauth.toml")]
        config: PathBuf,
        /// Report format: lines (default) or one JSON document (`{"ok",
        /// "config_error", "providers": [{"name", "status", "error", "sha256",
        /// "contract", "plugin", "rollout", …}], "warnings", "fleet", "summary"}`).
        #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
        format: ReportFormat,
    },
    /// Load the config and keep the providers loaded, reloading on SIGHUP and when
    /// the config, a plugin or a referenced secret file changes; prints one line per
    /// reload. Stops on Ctrl-C / SIGTERM.
    Watch {
        /// The config file.
        #[arg(long, short, env = "REAUTH_CONFIG", default_value = "reauth.toml")]
        config: PathBuf,
    },
    /// Run the sidecar daemon: the HTTP API (see host/openapi.json) on loopback
    /// and/or a Unix socket, with /metrics and /healthz; reloads on SIGHUP and file
    /// changes; stops gracefully on Ctrl-C / SIGTERM.
    Serve(serve::ServeArgs),
    /// kubectl exec credential plugin: prints an ExecCredential (v1 or v1beta1, per
    /// KUBERNETES_EXEC_INFO) with the provider's bearer token.
    KubectlCredential {
        /// Provider name.
        #[arg(long)]
        provider: String,
        /// Where the credentials come from.
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// git credential helper (`credential.helper = "!reauth git-credential --provider P"`).
    GitCredential {
        /// Provider name.
        #[arg(long)]
        provider: String,
        /// Username paired with a bearer token.
        #[arg(long, default_value = "oauth2")]
        username: String,
        /// Where the credentials come from.
        #[command(flatten)]
        backend: BackendArgs,
        /// get, store or erase (git passes it).
        operation: String,
    },
    /// docker credential helper (wrap as `docker-credential-reauth`).
    DockerCredential {
        /// Provider name.
        #[arg(long, env = "REAUTH_PROVIDER")]
        provider: String,
        /// A registry this credential is for (repeatable): `get` answers only for
        /// these, `list` reports them.
        #[arg(long = "registry")]
        registries: Vec<String>,
        /// Where the credentials come from.
        #[command(flatten)]
        backend: BackendArgs,
        /// get, store, erase or list (docker passes it).
        operation: String,
    },
    /// AWS `credential_process`: prints Version 1 JSON with AccessKeyId,
    /// SecretAccessKey, SessionToken and Expiration.
    AwsCredentialProcess {
        /// Provider name.
        #[arg(long)]
        provider: String,
        /// Where the credentials come from.
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Print credentials from a provider.
    Get(get::GetArgs),
    /// Run the development OAuth2 issuer on loopback until interrupted.
    DevIssuer {
        /// Address to listen on (loopback only).
        #[arg(long, default_value = "127.0.0.1:9400")]
        listen: SocketAddr,
        /// Accepted client as `id:secret` (repeatable).
        #[arg(long = "client", value_parser = parse_client, required = true)]
        clients: Vec<DevClient>,
        /// Token lifetime in seconds.
        #[arg(long, default_value_t = 300)]
        lifetime: u64,
    },
    /// Run the conformance kit on a provider: scenarios against a scripted fake token
    /// endpoint on loopback, under a virtual clock; prints a pass/fail table and
    /// exits 1 if any scenario failed.
    Test {
        /// A provider directory (with `conformance.toml`), a manifest file, or a
        /// component (`.wasm`, run without a manifest: no endpoint).
        target: PathBuf,
        /// The component to test (overrides the manifest's `plugin`).
        #[arg(long)]
        plugin: Option<PathBuf>,
        /// Run only this scenario (repeatable).
        #[arg(long = "scenario")]
        scenarios: Vec<String>,
        /// Report format: the table (default) or one JSON document.
        #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
        format: ReportFormat,
    },
    /// Scaffold a provider project (Rust, Python or JavaScript) that builds with
    /// `./build.sh` and passes `reauth test .`.
    New {
        /// Provider name (lowercase letters, digits, `-`).
        name: String,
        /// Language.
        #[arg(long, value_enum, default_value_t = crate::scaffold::Lang::Rust)]
        lang: crate::scaffold::Lang,
        /// Directory to create (default: `./<name>`).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The reauth SDK directory (`sdk/` of a reauth checkout). Default:
        /// $REAUTH_SDK, else the checkout this binary was built from.
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Show the whole cycle against an in-process dev issuer: fetch, cached hits,
    /// refresh after expiry, re-authentication after a `token-expired` error.
    Demo {
        /// The oauth2-client-credentials plugin.
        #[arg(long, env = "REAUTH_DEMO_PLUGIN", default_value = DEMO_PLUGIN)]
        plugin: PathBuf,
        /// Token lifetime in seconds.
        #[arg(long, default_value_t = 3)]
        lifetime: u64,
    },
}

/// Output format of `reauth test`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    /// A pass/fail table.
    Table,
    /// `{"component", "sha256", "passed", "failed", "skipped", "scenarios": [{"name",
    /// "result", "ms", "detail"}]}`.
    Json,
}

/// The kind of security error `reauth get --after-error` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ErrorKind {
    /// The credential expired.
    TokenExpired,
    /// The credential was not accepted.
    Unauthorized,
    /// Accepted, but lacking permission.
    Forbidden,
    /// Anything else security-related.
    Other,
}

/// Output format of `reauth get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A JSON object with the credential, expiry and principal.
    Json,
    /// HTTP header lines (`Authorization: …` or the provider's headers).
    Header,
}

fn parse_client(s: &str) -> Result<DevClient, String> {
    let (id, secret) = s
        .split_once(':')
        .ok_or_else(|| "expected `id:secret`".to_string())?;
    if id.is_empty() || secret.is_empty() {
        return Err("expected `id:secret` with both parts non-empty".into());
    }
    Ok(DevClient::new(id, secret))
}

/// Run a parsed command, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut (dyn Write + Send)) -> Result<ExitCode, BoxError> {
    match cli.command {
        Command::Check { config, format } => check::check(config, format, out).await,
        Command::Test {
            target,
            plugin,
            scenarios,
            format,
        } => kit::test(&target, plugin.as_deref(), &scenarios, format, out).await,
        Command::New {
            name,
            lang,
            dir,
            sdk,
        } => {
            let sdk = crate::scaffold::find_sdk(sdk.as_deref())?;
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            let files = crate::scaffold::create(&name, lang, &dir, &sdk)?;
            writeln!(out, "created {} ({} files):", dir.display(), files.len())?;
            for f in &files {
                writeln!(out, "  {}", f.display())?;
            }
            writeln!(
                out,
                "next:\n  cd {}\n  ./build.sh\n  reauth test .",
                dir.display()
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { config } => serve::watch(config, out).await,
        Command::Serve(args) => serve::command(args, out).await,
        Command::KubectlCredential { provider, backend } => {
            crate::adapters::kubectl(&backend.open()?, &provider, out).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::GitCredential {
            provider,
            username,
            backend,
            operation,
        } => {
            let mut stdin = std::io::stdin().lock();
            crate::adapters::git(
                &backend.open()?,
                &provider,
                &operation,
                &username,
                &mut stdin,
                out,
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DockerCredential {
            provider,
            registries,
            backend,
            operation,
        } => {
            let mut stdin = std::io::stdin().lock();
            crate::adapters::docker(
                &backend.open()?,
                &provider,
                &operation,
                &registries,
                &mut stdin,
                out,
            )
            .await
        }
        Command::AwsCredentialProcess { provider, backend } => {
            crate::adapters::aws(&backend.open()?, &provider, out).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Get(args) => get::get(args, out).await,
        Command::DevIssuer {
            listen,
            clients,
            lifetime,
        } => {
            let issuer = DevIssuer::start(DevIssuerConfig {
                listen,
                clients,
                token_lifetime: Duration::from_secs(lifetime),
                ..DevIssuerConfig::default()
            })
            .await?;
            writeln!(out, "dev issuer (development only) at {}", issuer.url())?;
            writeln!(out, "  token endpoint: {}", issuer.token_url())?;
            writeln!(out, "  jwks:           {}", issuer.jwks_url())?;
            out.flush()?;
            serve::terminated().await;
            issuer.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { plugin, lifetime } => demo::demo(plugin, lifetime, out).await,
    }
}

pub use crate::clock::rfc3339;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_100_000)),
            "2025-11-25T19:46:40Z"
        );
    }
}
