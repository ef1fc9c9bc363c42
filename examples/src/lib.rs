//! Shared bits of the example programs: the command line every example takes and
//! the loop that runs an operation through [`reauth::Host::with_credentials`].
//!
//! Each program in `src/bin/` is one recipe, self-contained apart from this module:
//! - `oauth2-api-client`: an HTTP API behind OAuth2 client-credentials tokens;
//! - `postgres-rotation`: PostgreSQL with a password that rotates;
//! - `redis-rotation`: Redis (ACL user) with a password that rotates.

use reauth::{Host, OperationError, Rejection, Request};
use std::path::PathBuf;
use std::time::Duration;

/// The options every example takes.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// The reauth configuration file (see `examples/config/`).
    #[arg(long, default_value = "reauth.toml")]
    pub config: PathBuf,
    /// The provider to take credentials from.
    #[arg(long)]
    pub provider: String,
    /// How many operations to run (0: until interrupted).
    #[arg(long, default_value_t = 0)]
    pub iterations: u64,
    /// Pause between operations.
    #[arg(long, default_value_t = 100)]
    pub interval_ms: u64,
}

/// Logs to stderr; `RUST_LOG=reauth=debug` shows fetches, refreshes and retries.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "reauth=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Run `op` `iterations` times (forever for 0) through `with_credentials`, printing
/// one line per operation; fails on the first failed operation.
pub async fn run<F, Fut>(common: &Common, mut op: F) -> anyhow::Result<()>
where
    F: FnMut(reauth::Credentials) -> Fut,
    Fut: Future<Output = Result<String, Rejection<String>>>,
{
    let host = Host::from_config_file(&common.config)?;
    let request = Request::new();
    let mut n = 0u64;
    while common.iterations == 0 || n < common.iterations {
        n += 1;
        match host
            .with_credentials(&common.provider, &request, &mut op)
            .await
        {
            Ok(line) => println!("{n}: ok {line}"),
            Err(OperationError::Credentials(e)) => anyhow::bail!("{n}: no credentials: {e}"),
            Err(OperationError::Failed(e)) => anyhow::bail!("{n}: failed: {e}"),
            Err(e) => anyhow::bail!("{n}: rejected: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(common.interval_ms)).await;
    }
    eprintln!(
        "{n} operations, {} credential fetches",
        host.plugin_calls(&common.provider)
    );
    Ok(())
}
