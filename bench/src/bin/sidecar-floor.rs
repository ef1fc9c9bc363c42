//! The floor for the sidecar benchmark (#18 §4): a bare hyper HTTP/1 server on
//! the same runtime (tokio, multi-threaded) answering every request with the
//! same JSON a cached `POST /v1/providers/<name>/credentials` returns (a
//! 600-byte token), with nothing else: no routing, no middleware, no cache, no
//! parsing of the body beyond reading it. `wrk` against it measures what this
//! machine's loopback TCP and the HTTP stack allow.
//!
//! `sidecar-floor <127.0.0.1:port>`

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use std::convert::Infallible;

fn main() -> anyhow::Result<()> {
    let addr: std::net::SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8099".into())
        .parse()?;
    let body = Bytes::from(
        serde_json::json!({
            "token": "t".repeat(600),
            "headers": {},
            "expires_at": null,
        })
        .to_string(),
    );
    tokio::runtime::Runtime::new()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("listening on {addr}");
        loop {
            let (stream, _) = listener.accept().await?;
            let body = body.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let body = body.clone();
                        async move {
                            let _ = request.into_body().collect().await;
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(body))
                                    .expect("a valid response"),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
