//! Query PostgreSQL with a password that rotates, taken from reauth's
//! `password-rotation` provider (for example reading a Vault database static role).
//!
//! ```sh
//! cargo run -p reauth-examples --bin postgres-rotation -- \
//!     --config examples/config/postgres.toml --provider orders-db \
//!     --pg "host=127.0.0.1 port=5432 dbname=orders"
//! ```
//!
//! When the password rotates, the next connection fails with SQLSTATE 28P01; the
//! provider says refresh-and-retry, reauth fetches the new password once and the
//! operation is retried with it. (A pool would do the same on its reconnects.)

use clap::Parser;
use reauth::{Credential, Credentials, Rejection, classify};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: reauth_examples::Common,
    /// libpq-style connection parameters, without user and password.
    #[arg(long)]
    pg: String,
    /// The query each operation runs.
    #[arg(long, default_value = "SELECT current_user::text")]
    query: String,
}

async fn query(args: &Args, c: Credentials) -> Result<String, Rejection<String>> {
    let Credential::Basic { username, password } = &c.credential else {
        return Err(Rejection::Other(
            "the provider did not return a username and password".into(),
        ));
    };
    let mut config: tokio_postgres::Config = args
        .pg
        .parse()
        .map_err(|e| Rejection::Other(format!("--pg: {e}")))?;
    config.user(username).password(password.expose());
    let (client, connection) = match config.connect(tokio_postgres::NoTls).await {
        Ok(pair) => pair,
        Err(e) => {
            // 28P01 invalid_password / 28000 invalid_authorization → security error.
            let state = e.code().map(|s| s.code().to_string());
            return Err(
                match state
                    .as_deref()
                    .and_then(|s| classify::from_postgres(s, None))
                {
                    Some(error) => Rejection::security(error, e.to_string()),
                    None => Rejection::Other(e.to_string()),
                },
            );
        }
    };
    let conn = tokio::spawn(connection);
    let row = client
        .query_one(args.query.as_str(), &[])
        .await
        .map_err(|e| Rejection::Other(e.to_string()))?;
    drop(client);
    let _ = conn.await;
    Ok(row.try_get::<_, String>(0).unwrap_or_default())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    reauth_examples::init_logging();
    let args = Args::parse();
    reauth_examples::run(&args.common, |c| query(&args, c)).await
}
