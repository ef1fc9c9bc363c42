//! Call an HTTP API with OAuth2 access tokens from reauth.
//!
//! ```sh
//! export ORDERS_CLIENT_SECRET=…
//! cargo run -p reauth-examples --bin oauth2-api-client -- \
//!     --config examples/config/oauth2.toml --provider orders-api \
//!     --url https://api.example.com/orders
//! ```
//!
//! The token is cached and refreshed ahead of its expiry by reauth; when the API
//! answers 401 (`WWW-Authenticate: Bearer error="invalid_token"`), the provider is
//! asked what to do and the call is retried once with a fresh token.

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use reauth::{Credential, Credentials, Rejection, classify};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: reauth_examples::Common,
    /// The API URL to GET (http:// here; put a TLS-capable client in its place for https).
    #[arg(long)]
    url: http::Uri,
}

async fn get(url: &http::Uri, c: Credentials) -> Result<String, Rejection<String>> {
    let Credential::Bearer(token) = &c.credential else {
        return Err(Rejection::Other(
            "the provider did not return a bearer token".into(),
        ));
    };
    let authority = url.authority().map(|a| a.to_string()).unwrap_or_default();
    let fail = |e: &dyn std::fmt::Display| Rejection::Other(format!("GET {url}: {e}"));
    let stream = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| fail(&e))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| fail(&e))?;
    let conn = tokio::spawn(conn);
    let request = http::Request::get(url.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, &authority)
        .header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", token.expose()),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(&e))?;
    let response = sender.send_request(request).await.map_err(|e| fail(&e))?;
    let status = response.status();
    let challenge = response
        .headers()
        .get(http::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| fail(&e))?
        .to_bytes();
    conn.abort();
    let body = String::from_utf8_lossy(&body).into_owned();
    if status.is_success() {
        return Ok(format!(
            "HTTP {status} {}",
            body.chars().take(80).collect::<String>()
        ));
    }
    // 401/403 become security errors the provider decides on; anything else fails.
    match classify::from_http(status.as_u16(), challenge.as_deref(), Some(&body)) {
        Some(error) => Err(Rejection::security(error, format!("HTTP {status}"))),
        None => Err(Rejection::Other(format!("HTTP {status}"))),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    reauth_examples::init_logging();
    let args = Args::parse();
    reauth_examples::run(&args.common, |c| get(&args.url, c)).await
}
