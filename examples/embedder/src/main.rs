//! The smallest embedder of reauth: load the providers of a config file, get
//! credentials from one of them (cached, refreshed ahead of expiry), and say what
//! came back — never the secret itself.
//!
//! ```sh
//! cargo run -p reauth-embedder-example -- reauth.toml orders-db
//! ```
//!
//! Its dependency tree is the point: `cargo tree -p reauth-embedder-example -e normal`
//! has no CLI, HTTP server, file watcher, log formatter or JWT crates.

use reauth::{Credential, Host, Request};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(config), Some(provider)) = (args.next(), args.next()) else {
        eprintln!("usage: reauth-embedder-example <reauth.toml> <provider>");
        return ExitCode::from(2);
    };
    match run(&config, &provider).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // reauth's errors name the provider and the config key, never a secret.
            eprintln!("reauth-embedder-example: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: &str, provider: &str) -> Result<(), reauth::Error> {
    let host = Host::from_config_file(config)?;
    let credentials = host.get_credentials(provider, &Request::new()).await?;
    let kind = match &credentials.credential {
        Credential::Bearer(_) => "a bearer token",
        Credential::Basic { .. } => "a username and password",
        Credential::Headers(_) => "headers",
    };
    println!(
        "{provider}: {kind}{}{}",
        credentials
            .principal
            .as_deref()
            .map(|p| format!(" for {p}"))
            .unwrap_or_default(),
        credentials
            .expires_at
            .map(|t| format!(", valid until {}", reauth::clock::rfc3339(t)))
            .unwrap_or_default()
    );
    // A second call is served from the cache.
    let again = host.get_credentials(provider, &Request::new()).await?;
    assert_eq!(again, credentials);
    Ok(())
}
