//! Talk to Redis as an ACL user whose password rotates, taken from reauth's
//! `password-rotation` provider.
//!
//! ```sh
//! cargo run -p reauth-examples --bin redis-rotation -- \
//!     --config examples/config/redis.toml --provider cache --redis 127.0.0.1:6379
//! ```
//!
//! When the password rotates, the next AUTH fails with `WRONGPASS`; the provider
//! says refresh-and-retry, reauth fetches the new password once and the operation
//! is retried with it.

use clap::Parser;
use reauth::{Credential, Credentials, Rejection, classify};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: reauth_examples::Common,
    /// Redis `host:port`.
    #[arg(long)]
    redis: String,
}

async fn incr(args: &Args, c: Credentials) -> Result<String, Rejection<String>> {
    let Credential::Basic { username, password } = &c.credential else {
        return Err(Rejection::Other(
            "the provider did not return a username and password".into(),
        ));
    };
    let (host, port) = args
        .redis
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| Rejection::Other(format!("--redis `{}`: expected host:port", args.redis)))?;
    let info = redis::ConnectionInfo {
        addr: redis::ConnectionAddr::Tcp(host, port),
        redis: redis::RedisConnectionInfo {
            username: Some(username.clone()),
            password: Some(password.expose().to_string()),
            ..Default::default()
        },
    };
    let connected = async {
        redis::Client::open(info)?
            .get_multiplexed_async_connection()
            .await
    };
    let mut conn = match connected.await {
        Ok(conn) => conn,
        Err(e) => {
            // redis-rs reports the server's `-WRONGPASS …` as AuthenticationFailed.
            let reply = match (e.kind(), e.code()) {
                (redis::ErrorKind::AuthenticationFailed, _) => format!("WRONGPASS {e}"),
                (_, Some(code)) => format!("{code} {}", e.detail().unwrap_or_default()),
                _ => e.to_string(),
            };
            return Err(match classify::from_redis(&reply) {
                Some(error) => Rejection::security(error, reply),
                None => Rejection::Other(reply),
            });
        }
    };
    let n: i64 = redis::cmd("INCR")
        .arg("reauth:example:ops")
        .query_async(&mut conn)
        .await
        .map_err(|e| Rejection::Other(e.to_string()))?;
    Ok(format!("ops={n}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    reauth_examples::init_logging();
    let args = Args::parse();
    reauth_examples::run(&args.common, |c| incr(&args, c)).await
}
