//! The `reauth` command line. The binary is a thin wrapper around [`run`], so the
//! commands are tested in-process exactly as users run them.

use crate::config::HostConfig;
use crate::error::BoxError;
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

/// Where `reauth demo` looks for the shipped OAuth2 plugin unless told otherwise.
pub const DEMO_PLUGIN: &str = "plugins/target/wasm32-wasip2/release/oauth2_client_credentials.wasm";

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
    Serve {
        /// The config file.
        #[arg(long, short, env = "REAUTH_CONFIG", default_value = "reauth.toml")]
        config: PathBuf,
        /// TCP address (default 127.0.0.1:7878 when no --socket is given).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Unix socket path (created with mode 0600).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Allow --listen on a non-loopback address (the API hands out secrets).
        #[arg(long)]
        allow_non_loopback: bool,
        /// Require `Authorization: Bearer <token>` on /v1/*, the token read from this
        /// file (at least 16 characters, surrounding whitespace ignored).
        #[arg(long, env = "REAUTH_API_TOKEN_FILE")]
        api_token_file: Option<PathBuf>,
        /// Time a client has to send a request's headers; also the idle keep-alive
        /// limit (`500ms`, `10s`, `2m`).
        #[arg(long, default_value = "10s", value_parser = crate::server::parse_duration)]
        header_timeout: std::time::Duration,
        /// Time a client has to send a request's body once its headers arrived (then 408).
        #[arg(long, default_value = "30s", value_parser = crate::server::parse_duration)]
        body_timeout: std::time::Duration,
        /// Concurrent connections (TCP and socket together); at the cap, new
        /// connections wait until one closes, and a warning is logged.
        #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
        max_connections: u32,
        /// On SIGTERM/Ctrl-C, how long requests in flight may take before their
        /// connections are dropped.
        #[arg(long, default_value = "10s", value_parser = crate::server::parse_duration)]
        shutdown_grace: std::time::Duration,
    },
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
    Get {
        /// Provider name.
        provider: String,
        /// The config file.
        #[arg(long, short, env = "REAUTH_CONFIG", default_value = "reauth.toml")]
        config: PathBuf,
        /// Subject (per-user credentials).
        #[arg(long)]
        subject: Option<String>,
        /// Scope (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Audience / resource.
        #[arg(long)]
        audience: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
        /// Then report that a server rejected the credential with this kind of
        /// error (the security-error path, without writing code): the provider's
        /// decision goes to stderr, and the credential in effect after it (a
        /// fresh one after `refresh-and-retry`) to stdout.
        #[arg(long, value_enum, value_name = "KIND")]
        after_error: Option<ErrorKind>,
        /// With `--after-error`: the server's HTTP status.
        #[arg(long, requires = "after_error")]
        status: Option<u16>,
        /// With `--after-error`: the server's error code (`invalid_token`, `28P01`…).
        #[arg(long, requires = "after_error")]
        code: Option<String>,
        /// With `--after-error`: the server's `WWW-Authenticate` value, any scheme
        /// (e.g. `AcmeSession error="expired"`).
        #[arg(long, requires = "after_error", value_name = "VALUE")]
        www_authenticate: Option<String>,
        /// With `--after-error`: the server's `Retry-After` (seconds or HTTP date).
        #[arg(long, requires = "after_error", value_name = "VALUE")]
        retry_after: Option<String>,
    },
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
        /// Directory to create (default: ./<name>).
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

/// Where `reauth test` and `reauth check` keep compiled plugins between runs, so
/// that the second run of a 15–20 MB Python or JavaScript component loads it in
/// milliseconds instead of compiling it for seconds: `$REAUTH_CACHE_DIR` (empty:
/// none), else `$XDG_CACHE_HOME/reauth/artifacts`, else
/// `~/.cache/reauth/artifacts`.
///
/// Loading a precompiled artifact runs its code, so the directory is used only
/// when no other user can change it or any directory above it (see
/// [`private_to`]); otherwise there is no cache, with a warning. An artifact is
/// also loaded only after its digest and engine are checked.
pub fn user_artifact_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("REAUTH_CACHE_DIR") {
        Some(d) if d.is_empty() => return None,
        Some(d) => std::path::absolute(PathBuf::from(d)).ok()?,
        None => {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .or_else(|| {
                    std::env::var_os("HOME")
                        .map(PathBuf::from)
                        .filter(|p| p.is_absolute())
                        .map(|h| h.join(".cache"))
                })?;
            base.join("reauth").join("artifacts")
        }
    };
    match private_to(&dir, rustix::process::geteuid().as_raw()) {
        Ok(dir) => Some(dir),
        Err(why) => {
            tracing::warn!(dir = %dir.display(), "not caching compiled plugins here: {why}");
            None
        }
    }
}

/// `dir` with its symbolic links resolved, when it is a directory that user `me`
/// owns, that no other user can write to, and whose every ancestor is owned by
/// `me` or root and not writable by others (unless sticky, as `/tmp`): then no
/// other user can rename or replace anything on the way to its files. A missing
/// `dir` is created (0700), only under a directory `me` owns (never, say, inside
/// the home directory of the user who ran `sudo`).
fn private_to(dir: &Path, me: u32) -> Result<PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if !dir.exists() {
        let base = dir
            .ancestors()
            .find(|a| a.exists())
            .ok_or("no existing ancestor")?;
        let owner = std::fs::metadata(base).map_err(|e| e.to_string())?.uid();
        if owner != me {
            return Err(format!(
                "{} belongs to uid {owner}, not to this user (uid {me}): not creating a cache under it",
                base.display()
            ));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create it: {e}"))?;
    }
    let real = std::fs::canonicalize(dir).map_err(|e| e.to_string())?;
    let meta = std::fs::metadata(&real).map_err(|e| e.to_string())?;
    if !meta.is_dir() {
        return Err("not a directory".into());
    }
    if meta.uid() != me {
        return Err(format!(
            "owned by uid {}, not this user (uid {me})",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "mode {:o}: other users can write to it",
            meta.mode() & 0o777
        ));
    }
    for ancestor in real.ancestors().skip(1) {
        let m = std::fs::metadata(ancestor).map_err(|e| e.to_string())?;
        let trusted_owner = m.uid() == me || m.uid() == 0;
        let open = m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0;
        if !trusted_owner || open {
            return Err(format!(
                "{} (owner uid {}, mode {:o}): another user could replace what is below it",
                ancestor.display(),
                m.uid(),
                m.mode() & 0o7777
            ));
        }
    }
    Ok(real)
}

/// The host `reauth check` loads: the config's own `runtime.cache_dir`, else the
/// per-user artifact cache ([`user_artifact_dir`]) for compiled plugins.
fn check_host(config: HostConfig) -> Result<Host, BoxError> {
    let options = reauth::runtime::RuntimeOptions {
        cache_dir: match config.runtime.cache_dir {
            Some(_) => None,
            None => user_artifact_dir(),
        },
        ..Default::default()
    };
    Ok(Host::builder_from_config(config)
        .runtime_options(options)
        .build()?)
}

/// `reauth test`: run the conformance kit and print its table.
async fn conformance(
    target: &std::path::Path,
    plugin: Option<&std::path::Path>,
    scenarios: &[String],
    format: ReportFormat,
    out: &mut (dyn Write + Send),
) -> Result<ExitCode, BoxError> {
    let (manifest, manifest_path, component) = crate::conformance::resolve_target(target, plugin)?;
    if format == ReportFormat::Table {
        writeln!(
            out,
            "reauth test: {} (manifest {}, endpoint {:?})",
            component.display(),
            manifest_path.display(),
            manifest.endpoint
        )?;
    }
    let started = Instant::now();
    let artifacts = user_artifact_dir();
    let report =
        crate::conformance::run_with_cache(&manifest, &component, scenarios, artifacts.as_deref())
            .await?;
    match format {
        ReportFormat::Table => {
            writeln!(out, "component sha256 {}", &report.sha256[..12])?;
            write!(out, "{}", report.table())?;
            writeln!(out, "({:.1} s)", started.elapsed().as_secs_f64())?;
        }
        ReportFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, &report.to_json())?;
            writeln!(out)?;
        }
    }
    Ok(if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Run a parsed command, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut (dyn Write + Send)) -> Result<ExitCode, BoxError> {
    match cli.command {
        Command::Check { config, format } => check(config, format, out).await,
        Command::Test {
            target,
            plugin,
            scenarios,
            format,
        } => conformance(&target, plugin.as_deref(), &scenarios, format, out).await,
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
        Command::Watch { config } => watch(config, out).await,
        Command::Serve {
            config,
            listen,
            socket,
            allow_non_loopback,
            api_token_file,
            header_timeout,
            body_timeout,
            max_connections,
            shutdown_grace,
        } => {
            let api_token = match api_token_file {
                Some(f) => {
                    let token = std::fs::read_to_string(&f)
                        .map_err(|e| format!("reading the API token {}: {e}", f.display()))?;
                    let token = token.trim().to_string();
                    if token.len() < 16 {
                        return Err(format!(
                            "the API token in {} is shorter than 16 characters",
                            f.display()
                        )
                        .into());
                    }
                    Some(crate::Secret::new(token))
                }
                None => None,
            };
            let listen = match (listen, &socket) {
                (None, None) => Some(SocketAddr::from(([127, 0, 0, 1], 7878))),
                (l, _) => l,
            };
            let options = crate::server::ServeOptions {
                listen,
                socket,
                allow_non_loopback,
                api_token,
                header_read_timeout: header_timeout,
                body_read_timeout: body_timeout,
                max_connections: max_connections as usize,
                shutdown_grace,
                ..Default::default()
            };
            serve(config, options, out).await
        }
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
        Command::Get {
            provider,
            config,
            subject,
            scopes,
            audience,
            format,
            after_error,
            status,
            code,
            www_authenticate,
            retry_after,
        } => {
            let host = Host::from_config_file(&config)?;
            let request = Request {
                subject,
                scopes,
                audience,
                reason: Reason::Initial,
            };
            let mut credentials = host.get_credentials(&provider, &request).await?;
            if let Some(kind) = after_error {
                let error = crate::wire::WireSecurityError {
                    kind: match kind {
                        ErrorKind::TokenExpired => crate::wire::WireErrorKind::TokenExpired,
                        ErrorKind::Unauthorized => crate::wire::WireErrorKind::Unauthorized,
                        ErrorKind::Forbidden => crate::wire::WireErrorKind::Forbidden,
                        ErrorKind::Other => crate::wire::WireErrorKind::Other,
                    },
                    status,
                    code,
                    message: None,
                    www_authenticate,
                    retry_after,
                }
                .into_security_error(host.now());
                let decision = host
                    .handle_security_error(&provider, &request, &credentials, &error)
                    .await?;
                match decision {
                    crate::types::Decision::RefreshAndRetry => {
                        let again = Request {
                            reason: Reason::AfterSecurityError,
                            ..request
                        };
                        credentials = host.get_credentials(&provider, &again).await?;
                        eprintln!("decision: refresh-and-retry (fetched a new credential)");
                    }
                    crate::types::Decision::RetryAfter(wait) => eprintln!(
                        "decision: retry-after {} ms (the same credential)",
                        wait.as_millis()
                    ),
                    crate::types::Decision::Fail => {
                        eprintln!("decision: fail (the caller would get the error)")
                    }
                }
            }
            print_credentials(&credentials, format, out)?;
            Ok(ExitCode::SUCCESS)
        }
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
            tokio::signal::ctrl_c().await?;
            issuer.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { plugin, lifetime } => demo(plugin, lifetime, out).await,
    }
}

async fn check(
    config: PathBuf,
    format: ReportFormat,
    out: &mut (dyn Write + Send),
) -> Result<ExitCode, BoxError> {
    if format == ReportFormat::Json {
        return check_json(config, out).await;
    }
    let parsed = match HostConfig::from_file(&config) {
        Ok(c) => c,
        Err(e) => {
            // An error, so on stderr like every command's; the exit status says
            // the check failed.
            eprintln!("FAIL config: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let at_rest = at_rest_paths(&parsed);
    let host = check_host(parsed)?;
    // Secrets at rest are sealed, but their files should still be private.
    for path in at_rest {
        if let Some(mode) = reauth::store::loose_permissions(&path) {
            writeln!(
                out,
                "WARN {}: mode {mode:o} lets other users in (reauth creates 0700 directories and 0600 files); chmod go-rwx it",
                path.display()
            )?;
        }
    }
    let mut failed = 0;
    let status = host.check().await;
    for (name, status) in &status {
        if !print_status(name, status, out)? {
            failed += 1;
        }
    }
    // The fleet's backend: reachable, and how far this host's clock is off.
    let mut fleet_failed = false;
    if let Some(fleet) = host.fleet() {
        match fleet.probe().await {
            Ok(offset_ms) => writeln!(
                out,
                "ok   fleet `{}`: {} reachable; key {}; its clock minus this host's: {:+.3} s",
                fleet.name(),
                fleet.backend(),
                fleet.key_id(),
                offset_ms as f64 / 1000.0
            )?,
            Err(e) => {
                fleet_failed = true;
                writeln!(
                    out,
                    "FAIL fleet `{}`: {e} (tokens are then fetched per replica; shared provider state is refused)",
                    fleet.name()
                )?
            }
        }
    }
    writeln!(
        out,
        "{} provider(s): {} ok, {failed} failed",
        status.len(),
        status.len() - failed
    )?;
    Ok(if failed == 0 && !fleet_failed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `reauth check --format json`: the same checks as the lines, as one document.
async fn check_json(config: PathBuf, out: &mut (dyn Write + Send)) -> Result<ExitCode, BoxError> {
    use serde_json::json;
    let parsed = match HostConfig::from_file(&config) {
        Ok(c) => c,
        Err(e) => {
            let doc = json!({
                "config": config.display().to_string(),
                "ok": false,
                "config_error": e.to_string(),
                "providers": [],
                "warnings": [],
                "fleet": null,
                "summary": {"providers": 0, "ok": 0, "failed": 0},
            });
            writeln!(out, "{doc}")?;
            return Ok(ExitCode::FAILURE);
        }
    };
    let at_rest = at_rest_paths(&parsed);
    let host = check_host(parsed)?;
    let warnings: Vec<String> = at_rest
        .iter()
        .filter_map(|path| {
            reauth::store::loose_permissions(path).map(|mode| {
                format!(
                    "{}: mode {mode:o} lets other users in (reauth creates 0700 directories and 0600 files); chmod go-rwx it",
                    path.display()
                )
            })
        })
        .collect();
    let status = host.check().await;
    let mut failed = 0usize;
    let providers: Vec<serde_json::Value> = status
        .iter()
        .map(|(name, status)| match status {
            ProviderStatus::Ready {
                sha256,
                from_cache,
                breaker,
                reload_error,
                contract,
                descriptor,
                rollout,
            } => json!({
                "name": name,
                "status": "ok",
                "error": null,
                "sha256": sha256,
                "precompiled": from_cache,
                "contract": contract,
                "plugin": descriptor.as_deref().map(crate::server::plugin_json),
                "cooling_down_ms": breaker.cooling_down_for.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                "consecutive_faults": breaker.consecutive_faults,
                "reload_error": reload_error,
                "rollout": rollout.as_ref().map(crate::server::rollout_json),
            }),
            ProviderStatus::Failed(e) => {
                failed += 1;
                json!({"name": name, "status": "failed", "error": e})
            }
        })
        .collect();
    let mut fleet_failed = false;
    let fleet = match host.fleet() {
        None => serde_json::Value::Null,
        Some(fleet) => match fleet.probe().await {
            Ok(offset_ms) => json!({
                "name": fleet.name(),
                "backend": fleet.backend().to_string(),
                "reachable": true,
                "key_id": fleet.key_id().to_string(),
                "clock_offset_ms": offset_ms,
                "error": null,
            }),
            Err(e) => {
                fleet_failed = true;
                json!({
                    "name": fleet.name(),
                    "backend": fleet.backend().to_string(),
                    "reachable": false,
                    "error": e.to_string(),
                })
            }
        },
    };
    let ok = failed == 0 && !fleet_failed;
    let doc = json!({
        "config": config.display().to_string(),
        "ok": ok,
        "config_error": null,
        "providers": providers,
        "warnings": warnings,
        "fleet": fleet,
        "summary": {"providers": status.len(), "ok": status.len() - failed, "failed": failed},
    });
    writeln!(out, "{doc}")?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The directories and files where reauth keeps data at rest (state, key ring,
/// shared cache, precompiled artifacts) and what they hold, as far as they exist.
fn at_rest_paths(config: &HostConfig) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = [&config.runtime.state_dir, &config.runtime.cache_dir]
        .into_iter()
        .flatten()
        .map(|d| config.resolve(d))
        .collect();
    dirs.extend(config.shared_cache_dir());
    let mut paths = Vec::new();
    if let Some(key) = config.key_file() {
        paths.extend(key.parent().map(Path::to_path_buf));
        paths.push(key);
    }
    for dir in dirs {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            paths.extend(entries.flatten().map(|e| e.path()));
        }
        paths.push(dir);
    }
    paths.retain(|p| p.exists());
    paths.sort();
    paths.dedup();
    paths
}

/// One `check`/`watch` status line; returns whether the provider is serving.
fn print_status(
    name: &str,
    status: &ProviderStatus,
    out: &mut (dyn Write + Send),
) -> Result<bool, BoxError> {
    match status {
        ProviderStatus::Ready {
            sha256,
            from_cache,
            breaker,
            reload_error,
            contract,
            descriptor,
            rollout,
        } => {
            let about = match descriptor.as_deref() {
                Some(d) if !d.name.is_empty() => format!(
                    "{} {}, contract {contract}{}; ",
                    d.name,
                    d.version,
                    match &d.config {
                        Some(keys) => format!(", {} config keys declared", keys.len()),
                        None => String::new(),
                    }
                ),
                _ => format!("contract {contract}; "),
            };
            writeln!(
                out,
                "ok   {name}: {about}sha256 {}… ({}){}{}",
                &sha256[..12],
                if *from_cache {
                    "precompiled cache"
                } else {
                    "compiled"
                },
                match breaker.cooling_down_for {
                    Some(left) => format!(
                        "; cooling down for {} ms after {} faults",
                        left.as_millis(),
                        breaker.consecutive_faults
                    ),
                    None => String::new(),
                },
                match reload_error {
                    Some(e) => format!("; previous version kept, reload failed: {e}"),
                    None => String::new(),
                }
            )?;
            if let Some(r) = rollout {
                writeln!(
                    out,
                    "     {name}: candidate sha256 {}… for {} % of keys: {} ({} fetches, {} errors, {} faults in the window)",
                    r.candidate_sha256.get(..12).unwrap_or(&r.candidate_sha256),
                    (r.share * 1000.0).round() / 10.0,
                    match &r.rolled_back {
                        Some(why) => format!("rolled back ({why})"),
                        None => "active".to_string(),
                    },
                    r.fetches,
                    r.errors,
                    r.faults
                )?;
            }
            Ok(true)
        }
        ProviderStatus::Failed(e) => {
            writeln!(out, "FAIL {name}: {e}")?;
            Ok(false)
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn terminated() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn serve(
    config: PathBuf,
    options: crate::server::ServeOptions,
    out: &mut (dyn Write + Send),
) -> Result<ExitCode, BoxError> {
    let host = Host::from_config_file(&config)?;
    for (name, status) in &host.check().await {
        print_status(name, status, out)?;
    }
    let server = crate::server::Server::bind(host.clone(), &options).await?;
    for address in server.addresses() {
        writeln!(out, "listening on {address}")?;
    }
    out.flush()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    // Reload on SIGHUP and file changes, like `reauth watch`.
    let watcher = crate::watch::Watcher::new(host)?;
    let reloads = tokio::spawn(watcher.run(
        |trigger, outcome| match outcome {
            Ok(report) => tracing::info!(?trigger, %report, "reloaded"),
            Err(e) => tracing::error!(?trigger, "reload refused, nothing changed: {e}"),
        },
        stopped(),
    ));
    let serving = tokio::spawn(server.run(stopped()));
    terminated().await;
    tracing::info!("shutting down: finishing requests in flight");
    let _ = stop_tx.send(true);
    let _ = serving.await;
    let _ = reloads.await;
    writeln!(out, "stopped")?;
    Ok(ExitCode::SUCCESS)
}

async fn watch(config: PathBuf, out: &mut (dyn Write + Send)) -> Result<ExitCode, BoxError> {
    let host = Host::from_config_file(&config)?;
    for (name, status) in &host.check().await {
        print_status(name, status, out)?;
    }
    let watcher = crate::watch::Watcher::new(host.clone())?;
    writeln!(out, "watching {} (SIGHUP reloads)", config.display())?;
    out.flush()?;
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let mut write_error = None;
    watcher
        .run(
            |trigger, outcome| {
                let result = (|| -> std::io::Result<()> {
                    let why = match trigger {
                        crate::watch::Trigger::Signal => "SIGHUP",
                        crate::watch::Trigger::FileChange => "file change",
                    };
                    match outcome {
                        Ok(report) => {
                            writeln!(out, "reload ({why}): {report}")?;
                            for (name, e) in &report.failed {
                                writeln!(out, "FAIL {name}: {e}")?;
                            }
                        }
                        Err(e) => writeln!(out, "reload ({why}) refused, nothing changed: {e}")?,
                    }
                    out.flush()
                })();
                if let Err(e) = result {
                    write_error.get_or_insert(e);
                }
            },
            shutdown,
        )
        .await;
    if let Some(e) = write_error {
        return Err(e.into());
    }
    Ok(ExitCode::SUCCESS)
}

fn print_credentials(
    c: &Credentials,
    format: Format,
    out: &mut (dyn Write + Send),
) -> Result<(), BoxError> {
    // Printing the credential is this command's job: this is the one place where
    // secrets are exposed on purpose.
    match format {
        Format::Header => match &c.credential {
            Credential::Headers(headers) => {
                for (k, v) in headers {
                    writeln!(out, "{k}: {}", v.expose())?;
                }
            }
            other => {
                let value = other
                    .authorization_header()
                    .ok_or("credential has no Authorization form")?;
                writeln!(out, "Authorization: {}", value.expose())?;
            }
        },
        Format::Json => {
            let v = serde_json::to_value(crate::wire::WireCredentials::from(c))?;
            writeln!(out, "{v}")?;
        }
    }
    Ok(())
}

pub use crate::clock::rfc3339;

/// Numbers tokens in order of first appearance so the demo never prints one.
struct TokenNames(HashMap<String, usize>);

impl TokenNames {
    fn name(&mut self, c: &Credentials) -> String {
        let key = match &c.credential {
            Credential::Bearer(t) => t.expose().to_string(),
            other => format!("{other:?}"),
        };
        let next = self.0.len() + 1;
        format!("token #{}", self.0.entry(key).or_insert(next))
    }
}

async fn demo(
    plugin: PathBuf,
    lifetime: u64,
    out: &mut (dyn Write + Send),
) -> Result<ExitCode, BoxError> {
    if !plugin.exists() {
        return Err(format!(
            "demo plugin not found at {}: build the shipped plugins first (`make plugins`) or pass --plugin",
            plugin.display()
        )
        .into());
    }
    let lifetime = lifetime.max(1);
    let issuer = DevIssuer::start(DevIssuerConfig {
        clients: vec![DevClient::new("demo-client", "demo-secret")],
        token_lifetime: Duration::from_secs(lifetime),
        default_audience: Some("demo-api".into()),
        ..DevIssuerConfig::default()
    })
    .await?;
    let host = Host::builder()
        .provider(
            "demo",
            ProviderConfig::new(&plugin)
                .allow_host(issuer.addr().to_string())
                .config("token_url", issuer.token_url())
                .config("client_id", "demo-client")
                .config("client_secret", "demo-secret"),
        )
        .build()?;
    if let Some(ProviderStatus::Failed(e)) = host.status().get("demo") {
        return Err(e.clone().into());
    }

    let started = Instant::now();
    let mut names = TokenNames(HashMap::new());
    let request = Request::new();
    writeln!(out, "reauth demo")?;
    writeln!(
        out,
        "  identity provider: dev issuer at {} (tokens live {lifetime}s)",
        issuer.url()
    )?;
    writeln!(
        out,
        "  provider `demo`:   {} (sandboxed WebAssembly component)",
        plugin.display()
    )?;
    writeln!(out)?;

    macro_rules! step {
        ($($arg:tt)*) => {{
            writeln!(out, "[{:>6.3}s] {}", started.elapsed().as_secs_f64(), format!($($arg)*))?;
            out.flush()?;
        }};
    }
    let describe = |lookup: Lookup| match lookup {
        Lookup::Hit => "cache hit".to_string(),
        Lookup::Joined => "joined another caller's fetch".to_string(),
        Lookup::Stale => "stale cache hit (IdP failing)".to_string(),
        Lookup::Fetched(reason) => format!("fetched from the IdP ({})", reason_name(reason)),
    };
    let until = |t: Option<SystemTime>| {
        t.and_then(|t| t.duration_since(SystemTime::now()).ok())
            .unwrap_or_default()
    };

    // 1. First fetch.
    let (creds, lookup) = host.get_credentials_traced("demo", &request).await?;
    step!(
        "get-credentials → {}: {}, expires in {:.1}s, principal {}",
        describe(lookup),
        names.name(&creds),
        until(creds.expires_at).as_secs_f64(),
        creds.principal.as_deref().unwrap_or("-")
    );
    // 2. Single-flight: a herd on a cold key makes one plugin call.
    let reports = Request::new().scope("reports");
    let calls_before = host.plugin_calls("demo");
    let herd: Vec<_> = (0..100)
        .map(|_| {
            let (host, reports) = (host.clone(), reports.clone());
            tokio::spawn(async move { host.get_credentials("demo", &reports).await })
        })
        .collect();
    let mut herd_creds = None;
    for task in herd {
        herd_creds = Some(task.await??);
    }
    if let Some(c) = &herd_creds {
        step!(
            "100 concurrent callers for scope `reports` → {} plugin call (single-flight): {}",
            host.plugin_calls("demo") - calls_before,
            names.name(c)
        );
    }
    // 3. Cached hits.
    for _ in 0..2 {
        let (c, lookup) = host.get_credentials_traced("demo", &request).await?;
        step!("get-credentials → {}: {}", describe(lookup), names.name(&c));
    }
    // 4. Refresh ahead: inside the advisory window the cached token is served while
    //    one background refresh replaces it.
    let wait = until(host.refresh_at("demo", &request)) + Duration::from_millis(20);
    step!(
        "… {:.1}s until the refresh-ahead window",
        wait.as_secs_f64()
    );
    tokio::time::sleep(wait).await;
    let (c, lookup) = host.get_credentials_traced("demo", &request).await?;
    step!(
        "get-credentials → {} (advisory window: one background refresh started): {}",
        describe(lookup),
        names.name(&c)
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (c, lookup) = host.get_credentials_traced("demo", &request).await?;
    step!(
        "get-credentials → {}: {} (refreshed ahead of expiry, no caller waited)",
        describe(lookup),
        names.name(&c)
    );
    // 5. Refresh after expiry: the `reports` key saw no traffic in its window.
    let wait = until(host.cached_until("demo", &reports)) + Duration::from_millis(20);
    step!(
        "… {:.1}s until the `reports` token expires unused",
        wait.as_secs_f64()
    );
    tokio::time::sleep(wait).await;
    let (c, lookup) = host.get_credentials_traced("demo", &reports).await?;
    step!(
        "get-credentials (scope `reports`) → {}: {}",
        describe(lookup),
        names.name(&c)
    );
    // 6. Re-authentication: the resource server rejects the current token once
    //    (as if revoked early); with_credentials asks the provider and retries.
    let rejected_once = std::sync::atomic::AtomicBool::new(false);
    let log = std::sync::Mutex::new(Vec::<String>::new());
    let outcome = host
        .with_credentials("demo", &request, |creds| {
            let (issuer, names_seen, rejected_once, log) = (&issuer, creds, &rejected_once, &log);
            async move {
                let Credential::Bearer(token) = &names_seen.credential else {
                    return Err(Rejection::Other(
                        "the demo provider returned a non-bearer credential".to_string(),
                    ));
                };
                let verified = issuer.verify(token.expose(), Some("demo-api"));
                let record =
                    |line: String| log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                if !rejected_once.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    record("resource server → 401 invalid_token (simulated: revoked early)".into());
                    let error = classify::from_http(
                        401,
                        Some(r#"Bearer error="invalid_token", error_description="token expired""#),
                        None,
                    )
                    .ok_or_else(|| Rejection::Other("unclassified".to_string()))?;
                    return Err(Rejection::security(error, "401 invalid_token".to_string()));
                }
                match verified {
                    Ok(_) => {
                        record("resource server → 200: verified against the issuer's JWKS".into());
                        Ok(())
                    }
                    Err(e) => Err(Rejection::Other(format!("resource server → 401: {e}"))),
                }
            }
        })
        .await;
    let lines = log.into_inner().unwrap_or_else(|e| e.into_inner());
    for line in lines {
        step!("with_credentials: {line}");
    }
    match outcome {
        Ok(()) => {
            let (c, _) = host.get_credentials_traced("demo", &request).await?;
            step!(
                "with_credentials → provider decided refresh-and-retry; succeeded on re-authenticated {}",
                names.name(&c)
            );
        }
        Err(e) => step!("with_credentials → failed: {e}"),
    }
    writeln!(out)?;
    writeln!(
        out,
        "summary: {} plugin calls, {} tokens issued by the IdP, {:.1}s",
        host.plugin_calls("demo"),
        issuer.issued(),
        started.elapsed().as_secs_f64()
    )?;
    issuer.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

fn reason_name(r: Reason) -> &'static str {
    match r {
        Reason::Initial => "initial",
        Reason::RefreshAhead => "refresh-ahead",
        Reason::Expired => "expired",
        Reason::AfterSecurityError => "after-security-error",
    }
}

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

    /// Compiled plugins are loaded (and so run) only from a directory no other
    /// user can change, nor any directory above it.
    #[test]
    fn the_artifact_cache_is_refused_when_others_can_change_it() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let me = rustix::process::geteuid().as_raw();
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("a/b/artifacts");
        let real = private_to(&fresh, me).unwrap();
        assert_eq!(real, std::fs::canonicalize(&fresh).unwrap());
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "created private");
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o777)).unwrap();
        let why = private_to(&fresh, me).unwrap_err();
        assert!(why.contains("other users can write"), "{why}");
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o700)).unwrap();
        // A private directory below one that others can write to (not sticky):
        // they could rename it away and put their own in its place.
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let below = open.join("artifacts");
        std::fs::create_dir(&below).unwrap();
        std::fs::set_permissions(&below, std::fs::Permissions::from_mode(0o700)).unwrap();
        let why = private_to(&below, me).unwrap_err();
        assert!(why.contains("another user could replace"), "{why}");
        // A symbolic link is followed, and the real directory checked and used.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        assert_eq!(private_to(&link, me).unwrap(), real);
        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(
            private_to(&file, me)
                .unwrap_err()
                .contains("not a directory")
        );
        // Nothing is created under a directory of another user.
        let other = std::fs::metadata(tmp.path()).unwrap().uid().wrapping_add(1);
        let why = private_to(&tmp.path().join("x/y"), other).unwrap_err();
        assert!(why.contains("not creating"), "{why}");
        assert!(!tmp.path().join("x").exists());
    }
}
