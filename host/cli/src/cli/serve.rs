//! `reauth serve` (the sidecar) and `reauth watch`.

use super::*;
use check::print_status;

/// Arguments of `reauth serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The config file.
    #[arg(long, short, env = "REAUTH_CONFIG", default_value = "reauth.toml")]
    pub config: PathBuf,
    /// TCP address (default 127.0.0.1:7878 when no --socket is given).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Unix socket path (created with mode 0600).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Allow --listen on a non-loopback address (the API hands out secrets).
    #[arg(long)]
    pub allow_non_loopback: bool,
    /// Require `Authorization: Bearer <token>` on /v1/*, the token read from this
    /// file (at least 16 characters, surrounding whitespace ignored).
    #[arg(long, env = "REAUTH_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Time a client has to send a request's headers; also the idle keep-alive
    /// limit (`500ms`, `10s`, `2m`).
    #[arg(long, default_value = "10s", value_parser = crate::server::parse_duration)]
    pub header_timeout: std::time::Duration,
    /// Time a client has to send a request's body once its headers arrived (then 408).
    #[arg(long, default_value = "30s", value_parser = crate::server::parse_duration)]
    pub body_timeout: std::time::Duration,
    /// Concurrent connections (TCP and socket together); at the cap, new
    /// connections wait until one closes, and a warning is logged.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// On SIGTERM/Ctrl-C, how long requests in flight may take before their
    /// connections are dropped.
    #[arg(long, default_value = "10s", value_parser = crate::server::parse_duration)]
    pub shutdown_grace: std::time::Duration,
}

/// `reauth serve`: the options from the arguments, then [`serve`].
pub(super) async fn command(
    args: ServeArgs,
    out: &mut (dyn Write + Send),
) -> Result<ExitCode, BoxError> {
    let ServeArgs {
        config,
        listen,
        socket,
        allow_non_loopback,
        api_token_file,
        header_timeout,
        body_timeout,
        max_connections,
        shutdown_grace,
    } = args;
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

/// Ctrl-C or SIGTERM: how every long-running command stops.
pub(super) async fn terminated() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        // No SIGTERM handler: Ctrl-C still stops it.
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
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

pub(super) async fn watch(
    config: PathBuf,
    out: &mut (dyn Write + Send),
) -> Result<ExitCode, BoxError> {
    let host = Host::from_config_file(&config)?;
    for (name, status) in &host.check().await {
        print_status(name, status, out)?;
    }
    let watcher = crate::watch::Watcher::new(host.clone())?;
    writeln!(out, "watching {} (SIGHUP reloads)", config.display())?;
    out.flush()?;
    let shutdown = terminated();
    let mut write_error = None;
    watcher
        .run(
            |trigger, outcome| {
                let result = (|| -> std::io::Result<()> {
                    let why = match trigger {
                        crate::watch::Trigger::Signal => "SIGHUP",
                        crate::watch::Trigger::FileChange => "file change",
                        _ => "reload",
                    };
                    match outcome {
                        Ok(report) => {
                            writeln!(out, "reload ({why}): {report}")?;
                            for (name, e) in &report.failed {
                                writeln!(out, "FAIL {name}: {e}")?;
                            }
                        }
                        // An error: on stderr, like every command's (a closed
                        // stderr is recorded, not a panic).
                        Err(e) => writeln!(
                            std::io::stderr(),
                            "reload ({why}) refused, nothing changed: {e}"
                        )?,
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
