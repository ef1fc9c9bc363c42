//! `reauth serve`: the host as a sidecar daemon, over HTTP on loopback and/or a Unix
//! socket, for programs in any language and for the tool adapters
//! ([`crate::adapters`]). The API is described in `host/openapi.json`.
//!
//! - `GET /healthz`: liveness and provider counts;
//! - `GET /metrics`: Prometheus text ([`crate::metrics`]);
//! - `GET /v1/providers`: names and status, no secrets;
//! - `POST /v1/providers/{name}/credentials`: `{subject?, scopes?, audience?}` →
//!   the credential and its expiry (cached, single-flight across requests);
//! - `POST /v1/providers/{name}/security-errors`: `{request?, credential, error}` —
//!   a server rejected `credential`; returns the provider's decision and, on
//!   refresh-and-retry, the fresh credential.
//!
//! The API hands out secrets, so: TCP binds to loopback unless
//! [`ServeOptions::allow_non_loopback`]; the Unix socket is created `0600` (bound
//! inside a private directory, then moved into place, so it is never reachable with
//! looser permissions); an API token (`Authorization: Bearer …`) can be required on
//! `/v1/*`; bodies are limited (413 beyond); malformed JSON is a 400 naming the
//! field. Shutdown is graceful: requests in flight finish.

use crate::error::Error;
use crate::host::{Host, ProviderStatus};
use crate::secret::Secret;
use crate::types::{Decision, ProviderError, Reason, Request};
use crate::wire::{WireCredentials, WireRequest, WireSecurityError};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// How `reauth serve` listens.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// TCP address (loopback unless `allow_non_loopback`).
    pub listen: Option<SocketAddr>,
    /// Unix socket path (created 0600; an existing dead socket is replaced).
    pub socket: Option<PathBuf>,
    /// Allow a non-loopback TCP address (the API hands out secrets).
    pub allow_non_loopback: bool,
    /// Require `Authorization: Bearer <token>` on `/v1/*`.
    pub api_token: Option<Secret>,
    /// Largest request body (default 64 KiB).
    pub max_body_bytes: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            listen: None,
            socket: None,
            allow_non_loopback: false,
            api_token: None,
            max_body_bytes: 64 * 1024,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Neither a TCP address nor a socket was given.
    #[error("nothing to listen on: give --listen and/or --socket")]
    NoListener,
    /// A non-loopback address without the explicit opt-in.
    #[error(
        "refusing to listen on {0}: it is not a loopback address and this API hands out \
         secrets; pass --allow-non-loopback if that is really intended"
    )]
    NotLoopback(SocketAddr),
    /// Binding or preparing a listener failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let context = context.into();
    move |source| ServeError::Io { context, source }
}

#[derive(Clone)]
struct AppState {
    host: Host,
    token: Option<Arc<Secret>>,
}

/// The API as an axum router (for embedding in an existing server, or tests).
pub fn router(host: Host, options: &ServeOptions) -> Router {
    let state = AppState {
        host,
        token: options.api_token.clone().map(Arc::new),
    };
    let v1 = Router::new()
        .route("/v1/providers", get(list_providers))
        .route("/v1/providers/{name}/credentials", post(credentials))
        .route(
            "/v1/providers/{name}/security-errors",
            post(security_errors),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(|| async { api_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(DefaultBodyLimit::max(options.max_body_bytes))
        .with_state(state)
}

/// A bound server: listeners open, not serving yet.
pub struct Server {
    app: Router,
    tcp: Option<tokio::net::TcpListener>,
    unix: Option<(tokio::net::UnixListener, PathBuf)>,
    addresses: Vec<String>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addresses", &self.addresses)
            .finish()
    }
}

impl Server {
    /// Check the options and bind the listeners (failing fast on a non-loopback
    /// address, a port in use or a live socket).
    pub async fn bind(host: Host, options: &ServeOptions) -> Result<Server, ServeError> {
        if options.listen.is_none() && options.socket.is_none() {
            return Err(ServeError::NoListener);
        }
        if let Some(addr) = options.listen
            && !addr.ip().is_loopback()
            && !options.allow_non_loopback
        {
            return Err(ServeError::NotLoopback(addr));
        }
        let mut addresses = Vec::new();
        let tcp = match options.listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(io(format!("binding {addr}")))?;
                let local = listener
                    .local_addr()
                    .map_err(io("reading the bound address"))?;
                addresses.push(format!("http://{local}"));
                Some(listener)
            }
            None => None,
        };
        let unix = match &options.socket {
            Some(path) => {
                let listener = bind_private_socket(path).await?;
                addresses.push(format!("unix:{}", path.display()));
                Some((listener, path.clone()))
            }
            None => None,
        };
        Ok(Server {
            app: router(host, options),
            tcp,
            unix,
            addresses,
        })
    }

    /// `http://host:port` and/or `unix:path`, as bound.
    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    /// Serve until `shutdown` completes; requests in flight finish first. The
    /// socket file is removed afterwards.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let mut servers = tokio::task::JoinSet::new();
        if let Some(listener) = self.tcp {
            let (app, stop) = (self.app.clone(), stopped());
            servers.spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await
            });
        }
        let socket = self.unix.as_ref().map(|(_, p)| p.clone());
        if let Some((listener, _)) = self.unix {
            let (app, stop) = (self.app.clone(), stopped());
            servers.spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await
            });
        }
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        while let Some(done) = servers.join_next().await {
            if let Ok(Err(e)) = done {
                tracing::error!("server stopped with an error: {e}");
            }
        }
        if let Some(path) = socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Bind a Unix socket that is `0600` from the moment it is reachable: bind it in a
/// fresh `0700` directory beside `path`, chmod it, then rename it into place. A
/// stale socket at `path` (nobody answering) is replaced; a live one is an error.
async fn bind_private_socket(
    path: &std::path::Path,
) -> Result<tokio::net::UnixListener, ServeError> {
    use std::os::unix::fs::PermissionsExt as _;
    let shown = path.display().to_string();
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServeError::Io {
                context: format!("socket {shown}"),
                source: std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another server is listening on it",
                ),
            });
        }
        std::fs::remove_file(path).map_err(io(format!("removing the stale socket {shown}")))?;
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let private = tempfile::Builder::new()
        .prefix(".reauth-sock-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)
        .map_err(io(format!(
            "creating a private directory in {}",
            parent.display()
        )))?;
    let staging = private.path().join("s");
    let listener =
        tokio::net::UnixListener::bind(&staging).map_err(io(format!("binding socket {shown}")))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("chmod 0600 socket {shown}")))?;
    std::fs::rename(&staging, path).map_err(io(format!("moving the socket to {shown}")))?;
    Ok(listener)
}

/// `{"error": {"kind": …, "message": …}}` with `status`.
fn api_error(status: StatusCode, kind: &str, message: impl std::fmt::Display) -> Response {
    (
        status,
        axum::Json(json!({"error": {"kind": kind, "message": message.to_string()}})),
    )
        .into_response()
}

fn error_response(e: &Error) -> Response {
    let (status, kind) = match e {
        Error::UnknownProvider { .. } => (StatusCode::NOT_FOUND, "unknown_provider"),
        Error::Provider { error, .. } => match error {
            ProviderError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ProviderError::Denied(_) => (StatusCode::BAD_GATEWAY, "denied"),
            ProviderError::Misconfigured(_) => (StatusCode::BAD_GATEWAY, "misconfigured"),
        },
        Error::CoolingDown { retry_in_ms, .. } => {
            let mut r = api_error(StatusCode::SERVICE_UNAVAILABLE, "cooling_down", e);
            let secs = retry_in_ms.div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return r;
        }
        Error::NotLoaded { .. } | Error::Load { .. } => {
            (StatusCode::SERVICE_UNAVAILABLE, "load_failed")
        }
        _ => (StatusCode::BAD_GATEWAY, "fault"),
    };
    api_error(status, kind, e)
}

/// Constant-time comparison (the token is a secret).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(expected) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same(g.as_bytes(), expected.expose().as_bytes())) {
            let mut r = api_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this API requires `Authorization: Bearer <api token>`",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"reauth\""),
            );
            return r;
        }
    }
    next.run(request).await
}

/// A request the API refuses before doing anything: status and message.
struct Refused(StatusCode, String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        api_error(self.0, "bad_request", self.1)
    }
}

/// Parse a JSON body; a 400 naming the offending field otherwise. An empty body
/// is `{}`.
fn parse<T: for<'de> Deserialize<'de>>(headers: &HeaderMap, body: &Bytes) -> Result<T, Refused> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.starts_with("application/json"));
    if !is_json {
        return Err(Refused(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the body as application/json".into(),
        ));
    }
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let at = e.path().to_string();
        let inner = e.into_inner();
        let message = if at == "." {
            format!("invalid JSON body: {inner}")
        } else {
            format!("invalid JSON body at `{at}`: {inner}")
        };
        Refused(StatusCode::BAD_REQUEST, message)
    })
}

async fn healthz(State(state): State<AppState>) -> Response {
    let status = state.host.status();
    let ready = status
        .values()
        .filter(|s| matches!(s, ProviderStatus::Ready { .. }))
        .count();
    axum::Json(
        json!({"status": "ok", "providers": {"ready": ready, "failed": status.len() - ready}}),
    )
    .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.host.metrics().render(),
    )
        .into_response()
}

async fn list_providers(State(state): State<AppState>) -> Response {
    let providers: Vec<_> = state
        .host
        .status()
        .into_iter()
        .map(|(name, status)| match status {
            ProviderStatus::Ready {
                sha256,
                from_cache,
                breaker,
                reload_error,
            } => json!({
                "name": name,
                "status": if breaker.cooling_down_for.is_some() { "cooling_down" } else { "ready" },
                "sha256": sha256,
                "precompiled": from_cache,
                "consecutive_faults": breaker.consecutive_faults,
                "last_error": breaker.last_fault.or(reload_error),
            }),
            ProviderStatus::Failed(why) => {
                json!({"name": name, "status": "failed", "last_error": why})
            }
        })
        .collect();
    axum::Json(json!({ "providers": providers })).into_response()
}

async fn credentials(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: WireRequest = match parse(&headers, &body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let request = Request::from(request);
    match state.host.get_credentials_traced(&name, &request).await {
        Ok((c, _)) => axum::Json(WireCredentials::from(&c)).into_response(),
        Err(e) => error_response(&e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecurityErrorBody {
    #[serde(default)]
    request: WireRequest,
    credential: WireCredentials,
    error: WireSecurityError,
}

async fn security_errors(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: SecurityErrorBody = match parse(&headers, &body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let request = Request::from(body.request);
    // Parsing already refused out-of-range values; the conversion is checked too.
    let rejected = match crate::types::Credentials::try_from(body.credential) {
        Ok(c) => c,
        Err(e) => {
            return Refused(
                StatusCode::BAD_REQUEST,
                format!("invalid JSON body at `credential`: {e}"),
            )
            .into_response();
        }
    };
    let error = body.error.into();
    let decision = match state
        .host
        .handle_security_error(&name, &request, &rejected, &error)
        .await
    {
        Ok(d) => d,
        Err(e) => return error_response(&e),
    };
    match decision {
        Decision::Fail => axum::Json(json!({"decision": "fail"})).into_response(),
        Decision::RetryAfter(wait) => axum::Json(json!({
            "decision": "retry_after",
            "retry_after_ms": u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        }))
        .into_response(),
        Decision::RefreshAndRetry => match state
            .host
            .get_credentials(
                &name,
                &Request {
                    reason: Reason::AfterSecurityError,
                    ..request
                },
            )
            .await
        {
            Ok(fresh) => axum::Json(json!({
                "decision": "refresh_and_retry",
                "credentials": WireCredentials::from(&fresh),
            }))
            .into_response(),
            Err(e) => error_response(&e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn token_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
