//! `reauth serve`: the host as a sidecar daemon, over HTTP on loopback and/or a Unix
//! socket, for programs in any language and for the tool adapters
//! ([`crate::adapters`]). The API is described in `host/openapi.json`.
//!
//! - `GET /healthz`: liveness and provider counts;
//! - `GET /metrics`: OpenMetrics text (`reauth::metrics`);
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
//! looser permissions); an API token (`Authorization: Bearer …`, scheme matched
//! case-insensitively) can be required on `/v1/*`; malformed JSON is a 400 naming
//! the field. Every error status carries `{"error": {"kind", "message"}}`, axum's
//! own rejections (405, 413 …) included.
//!
//! A client can hold resources only for bounded times, so a slow or hostile client
//! cannot pin the server (issue #14): [`Server::run`] runs its own accept loop
//! (`axum::serve` has no header-read timeout) over hyper's HTTP/1 connection with
//!
//! - a header read timeout (also the idle keep-alive limit): a client that never
//!   finishes its headers is disconnected; a request head over 64 KiB is refused
//!   (431; like a malformed request line's 400, it comes from the HTTP layer
//!   before any request exists, so it has no JSON body);
//! - a body read timeout and a body size limit: an announced `Content-Length` over
//!   the limit is answered 413 at once, before any of the body is read; a body that
//!   does not arrive in time is answered 408;
//! - a cap on concurrent connections (TCP and socket together): at the cap the
//!   accept loop stops accepting, so new connections wait in the kernel's listen
//!   backlog until a connection closes (which the timeouts above guarantee), and a
//!   log line says so; file descriptors can never run out because of idle clients;
//! - a graceful-shutdown deadline: requests in flight get [`ServeOptions::shutdown_grace`]
//!   to finish, then their connections are dropped;
//! - a handler that panics answers 500 (JSON) and is logged; the process keeps
//!   serving.

use crate::error::Error;
use crate::host::{Host, ProviderStatus};
use crate::secret::Secret;
use crate::types::{Credentials, Decision, ProviderError, Reason, Request, SecurityError};
use crate::wire::{WireCredentials, WireRequest, WireSecurityError};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

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
    /// Largest request body (default 64 KiB); a larger announced `Content-Length`
    /// is answered 413 before the body is read.
    pub max_body_bytes: usize,
    /// How long a client may take to send a request's headers, from the first
    /// moment the server waits for them (so also how long an idle keep-alive
    /// connection stays open). Default 10 s.
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request's body once its headers have
    /// arrived; then it is answered 408 and disconnected. Default 30 s.
    pub body_read_timeout: Duration,
    /// Concurrent connections, TCP and Unix socket together (default 512, at
    /// least 1). At the cap new connections wait in the listen backlog until one
    /// closes, and a warning is logged.
    pub max_connections: usize,
    /// After shutdown begins, how long requests in flight may take to finish;
    /// connections still open then are dropped. Default 10 s.
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            listen: None,
            socket: None,
            allow_non_loopback: false,
            api_token: None,
            max_body_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 512,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Parse a duration given on the command line: `250ms`, `10s`, `2m`, `1h30m` (see
/// [`reauth_core::clock::parse_duration`]), or a bare number
/// of seconds (`10`). Zero is refused (it would disable the server).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    // A bare number is seconds (as it always was for these flags).
    let d = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        crate::clock::parse_duration(&format!("{text}s"))?
    } else {
        crate::clock::parse_duration(text)?
    };
    if d.is_zero() {
        return Err("the duration must be more than 0".into());
    }
    Ok(d)
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
    let body = BodyLimits {
        max_bytes: options.max_body_bytes,
        timeout: options.body_read_timeout,
    };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(|| async { api_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(DefaultBodyLimit::max(options.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(body, read_body))
        .with_state(state);
    harden(app)
}

/// The layers every response passes: error statuses get JSON bodies
/// ([`json_errors`]), a panicking handler a 500 ([`catch_panic`]).
fn harden(app: Router) -> Router {
    app.layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn(catch_panic))
}

/// The body limits [`read_body`] enforces.
#[derive(Clone, Copy)]
struct BodyLimits {
    max_bytes: usize,
    timeout: Duration,
}

/// Read the whole request body before anything else runs, within the size limit
/// and the body read timeout: an announced `Content-Length` over the limit is a
/// 413 at once (nothing read), a body that does not arrive in time a 408. Both
/// close the connection.
async fn read_body(
    State(limits): State<BodyLimits>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let too_large = || {
        closing(api_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the body is larger than {} bytes", limits.max_bytes),
        ))
    };
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > limits.max_bytes as u64) {
        return too_large();
    }
    let (parts, body) = request.into_parts();
    let read =
        http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limits.max_bytes));
    let bytes = match tokio::time::timeout(limits.timeout, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Ok(Err(e)) => {
            return closing(api_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("reading the request body failed: {e}"),
            ));
        }
        Err(_) => {
            return closing(api_error(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} ms",
                    limits.timeout.as_millis()
                ),
            ));
        }
    };
    next.run(axum::extract::Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// `response` with `Connection: close` (the request's body was not read to its end).
fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Give every error status a JSON body: responses the handlers build already have
/// one; axum's own rejections (405 with an empty body, text/plain 400/413 …) get
/// `{"error": {"kind", "message"}}` with their text as the message.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let reason = status.canonical_reason().unwrap_or("error");
    let message = match axum::body::to_bytes(body, 4096).await {
        Ok(text) if !text.trim_ascii().is_empty() => {
            String::from_utf8_lossy(text.trim_ascii()).into_owned()
        }
        _ => reason.to_owned(),
    };
    let kind: String = reason
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let body = json!({"error": {"kind": kind, "message": message}}).to_string();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body))
}

/// Defence in depth: a handler that panics answers 500 (JSON) and is logged, and
/// the connection and the process keep serving. (The panic's own message goes to
/// stderr through the panic hook; the log line names the request only.)
async fn catch_panic(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    match (CatchUnwind(Box::pin(next.run(request)))).await {
        Ok(response) => response,
        Err(_) => {
            tracing::error!(%method, %path, "request handler panicked: answered 500");
            api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error: the request handler failed (see the server log)",
            )
        }
    }
}

/// A future that turns a panic while polling `F` into `Err` (never polled again
/// afterwards).
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// A bound server: listeners open, not serving yet.
pub struct Server {
    app: Router,
    tcp: Option<tokio::net::TcpListener>,
    unix: Option<(tokio::net::UnixListener, PathBuf)>,
    addresses: Vec<String>,
    limits: ConnectionLimits,
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
            limits: ConnectionLimits::from(options),
        })
    }

    /// `http://host:port` and/or `unix:path`, as bound.
    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    /// Serve until `shutdown` completes. Then the listeners close, requests in
    /// flight get [`ServeOptions::shutdown_grace`] to finish, and connections still
    /// open are dropped. The socket file is removed afterwards.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            app: self.app,
            http: http_builder(&self.limits),
            slots: Arc::new(Semaphore::new(
                self.limits.max_connections.clamp(1, Semaphore::MAX_PERMITS),
            )),
            limits: self.limits,
            throttle: Throttle::default(),
        });
        let mut servers = tokio::task::JoinSet::new();
        if let Some(listener) = self.tcp {
            servers.spawn(accept_loop(listener, shared.clone(), stop_rx.clone()));
        }
        let socket = self.unix.as_ref().map(|(_, p)| p.clone());
        if let Some((listener, _)) = self.unix {
            servers.spawn(accept_loop(listener, shared.clone(), stop_rx.clone()));
        }
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        while let Some(done) = servers.join_next().await {
            if let Err(e) = done {
                tracing::error!("a listener task failed: {e}");
            }
        }
        if let Some(path) = socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The connection limits of [`ServeOptions`].
#[derive(Debug, Clone, Copy)]
struct ConnectionLimits {
    header_read_timeout: Duration,
    max_connections: usize,
    shutdown_grace: Duration,
}

impl From<&ServeOptions> for ConnectionLimits {
    fn from(o: &ServeOptions) -> Self {
        ConnectionLimits {
            header_read_timeout: o.header_read_timeout,
            max_connections: o.max_connections,
            shutdown_grace: o.shutdown_grace,
        }
    }
}

/// The read buffer of a connection, so the largest request head.
const MAX_HEADER_BUFFER: usize = 64 * 1024;

fn http_builder(limits: &ConnectionLimits) -> hyper::server::conn::http1::Builder {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // Headers beyond 64 KiB are refused (431): with the connection cap this
        // bounds what slow clients can make the server buffer (hyper's default is
        // ~400 KiB per connection).
        .max_header_size(MAX_HEADER_BUFFER)
        .max_buf_size(MAX_HEADER_BUFFER);
    http
}

/// What every accept loop and connection shares.
struct Shared {
    app: Router,
    http: hyper::server::conn::http1::Builder,
    /// One permit per open connection.
    slots: Arc<Semaphore>,
    limits: ConnectionLimits,
    throttle: Throttle,
}

/// At most one log line per `EVERY` for a recurring condition (a flood must not
/// flood the log too).
#[derive(Default)]
struct Throttle(Mutex<Option<Instant>>);

impl Throttle {
    const EVERY: Duration = Duration::from_secs(10);

    fn ready(&self) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Self::EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// A listener the accept loop can serve (TCP or Unix socket).
trait Accept: Send + 'static {
    /// The accepted connection.
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    /// The next connection.
    fn accept_stream(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&self) -> std::io::Result<Self::Stream> {
        let (stream, _) = self.accept().await?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

impl Accept for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> std::io::Result<Self::Stream> {
        Ok(self.accept().await?.0)
    }
}

/// Resolves once shutdown has begun (or the sender is gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Accept connections while a slot is free, each served on its own task, until
/// shutdown; then close the listener and give the connections the grace period.
async fn accept_loop<L: Accept>(listener: L, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let permit = match shared.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if shared.throttle.ready() {
                    tracing::warn!(
                        max_connections = shared.limits.max_connections,
                        "connection limit reached: new connections wait until one closes \
                         (raise --max-connections if this is expected load)"
                    );
                }
                tokio::select! {
                    permit = shared.slots.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                    () = stopping(&mut stop) => break,
                }
            }
        };
        let stream = tokio::select! {
            accepted = listener.accept_stream() => accepted,
            () = stopping(&mut stop) => break,
        };
        match stream {
            Ok(stream) => {
                connections.spawn(serve_connection(
                    stream,
                    shared.clone(),
                    stop.clone(),
                    permit,
                ));
            }
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                // Typically out of file descriptors: wait a little instead of spinning.
                if shared.throttle.ready() {
                    tracing::error!("accepting a connection failed: {e}");
                }
                drop(permit);
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    () = stopping(&mut stop) => break,
                }
            }
        }
    }
    drop(listener);
    let grace = shared.limits.shutdown_grace;
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drain).await.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "shutdown grace of {} ms over: dropping the connections still open",
            grace.as_millis()
        );
        connections.shutdown().await;
    }
}

/// Accept errors that concern one connection only (the next accept may succeed).
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    )
}

/// One connection: HTTP/1 with the header read timeout; on shutdown it finishes
/// the request in flight (if any) and closes. Holds its connection slot until it
/// ends.
async fn serve_connection<S>(
    stream: S,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(shared.app.clone());
    let conn = shared
        .http
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = stopping(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    match result {
        Ok(()) => {}
        Err(e) if e.is_timeout() => {
            tracing::debug!("connection closed: its request headers did not arrive in time");
        }
        Err(e) => tracing::debug!("connection ended: {e}"),
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
            ProviderError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ProviderError::Denied(_) => (StatusCode::BAD_GATEWAY, "denied"),
            ProviderError::Misconfigured(_) => (StatusCode::BAD_GATEWAY, "misconfigured"),
            _ => (StatusCode::BAD_GATEWAY, "provider_error"),
        },
        Error::CoolingDown { retry_in_ms, .. } => {
            let mut r = api_error(StatusCode::SERVICE_UNAVAILABLE, "cooling_down", e);
            let secs = retry_in_ms.div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return r;
        }
        Error::Busy { .. } => {
            // The provider's bulkhead is full: not a fault, retry shortly.
            let mut r = api_error(StatusCode::SERVICE_UNAVAILABLE, "busy", e);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
        Error::Throttled { retry_in_ms, .. } => {
            // The provider's fetch budget is spent: not a fault, retry later.
            let mut r = api_error(StatusCode::SERVICE_UNAVAILABLE, "throttled", e);
            let secs = retry_in_ms.div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return r;
        }
        Error::State { .. } => {
            // The provider's state (a refresh token) is held elsewhere or its
            // store is unreachable: refused rather than risked; retry shortly.
            let mut r = api_error(StatusCode::SERVICE_UNAVAILABLE, "state_unavailable", e);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
        Error::Contract { .. } => (StatusCode::BAD_GATEWAY, "contract"),
        Error::NotLoaded { .. } | Error::Load { .. } => {
            (StatusCode::SERVICE_UNAVAILABLE, "load_failed")
        }
        _ => (StatusCode::BAD_GATEWAY, "fault"),
    };
    api_error(status, kind, e)
}

/// Constant-time comparison (the token is a secret).
/// The token of an `Authorization: Bearer <token>` value; the scheme is
/// case-insensitive (RFC 9110 §11.1), one or more spaces follow it.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim_start_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
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
            .and_then(bearer_token);
        if !given
            .is_some_and(|g| reauth::constant_time_eq(g.as_bytes(), expected.expose().as_bytes()))
        {
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
            reauth::metrics::exposition::CONTENT_TYPE,
        )],
        state.host.render_metrics(),
    )
        .into_response()
}

/// What a component said about itself, as `GET /v1/providers` and `reauth check
/// --format json` show it.
pub(crate) fn plugin_json(d: &reauth::schema::Descriptor) -> serde_json::Value {
    json!({
        "name": d.name,
        "version": d.version,
        "config_keys": d.config.as_ref().map(Vec::len),
    })
}

/// Where a candidate's rollout stands, as `GET /v1/providers` and `reauth check
/// --format json` show it.
pub(crate) fn rollout_json(r: &reauth::RolloutStatus) -> serde_json::Value {
    json!({
        "candidate_sha256": r.candidate_sha256,
        "share": r.share,
        "state": if r.rolled_back.is_some() { "rolled_back" } else { "active" },
        "rolled_back_because": r.rolled_back,
        "window": {"fetches": r.fetches, "errors": r.errors, "faults": r.faults},
    })
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
                contract,
                descriptor,
                rollout,
                ..
            } => json!({
                "name": name,
                "status": if breaker.cooling_down_for.is_some() { "cooling_down" } else { "ready" },
                "sha256": sha256,
                "precompiled": from_cache,
                "consecutive_faults": breaker.consecutive_faults,
                "last_error": breaker.last_fault.or(reload_error),
                "contract": contract,
                "plugin": descriptor.as_deref().map(plugin_json),
                "rollout": rollout.as_ref().map(rollout_json),
            }),
            ProviderStatus::Failed(why) => {
                json!({"name": name, "status": "failed", "last_error": why})
            }
            other => json!({"name": name, "status": "failed", "last_error": format!("{other:?}")}),
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
    let request = match credentials_body(&headers, &body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let result = state.host.get_credentials_traced(&name, &request).await;
    if result.is_ok() {
        // An operation of the client's: the base of the provider's retry budget.
        state.host.record_operation(&name);
    }
    match result {
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

/// The body of `POST …/credentials`, parsed and converted as the handler does.
fn credentials_body(headers: &HeaderMap, body: &Bytes) -> Result<Request, Refused> {
    parse::<WireRequest>(headers, body).map(Request::from)
}

/// The body of `POST …/security-errors`, parsed and converted (checked) as the
/// handler does.
fn security_error_body(
    headers: &HeaderMap,
    body: &Bytes,
    now: std::time::SystemTime,
) -> Result<(Request, Credentials, SecurityError), Refused> {
    let body: SecurityErrorBody = parse(headers, body)?;
    // Parsing already refused out-of-range values; the conversion is checked too.
    let rejected = Credentials::try_from(body.credential).map_err(|e| {
        Refused(
            StatusCode::BAD_REQUEST,
            format!("invalid JSON body at `credential`: {e}"),
        )
    })?;
    Ok((
        Request::from(body.request),
        rejected,
        body.error.into_security_error(now),
    ))
}

async fn security_errors(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request, rejected, error) = match security_error_body(&headers, &body, state.host.now()) {
        Ok(parts) => parts,
        Err(r) => return r.into_response(),
    };
    let decision = match state
        .host
        .handle_security_error(&name, &request, &rejected, &error)
        .await
    {
        Ok(d) => d,
        Err(e) => return error_response(&e),
    };
    // A re-run comes out of the provider's retry budget, shared by all clients.
    let decision = match decision {
        Decision::RefreshAndRetry | Decision::RetryAfter(_) if !state.host.take_retry(&name) => {
            tracing::warn!(provider = %name, "retry budget spent (retry.retry_ratio, retry.min_retries_per_sec): answering fail");
            Decision::Fail
        }
        d => d,
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
        // A decision newer than this sidecar: the safe answer is not to retry.
        _ => axum::Json(json!({"decision": "fail"})).into_response(),
    }
}

/// Entry points for the fuzz targets in `fuzz/` (not a stable API).
#[doc(hidden)]
pub mod fuzzing {
    use super::*;
    use crate::types::Credential;

    fn headers(content_type: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(v) = content_type.and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.insert(header::CONTENT_TYPE, v);
        }
        headers
    }

    /// Parse and convert a `POST …/credentials` body as the server does: a request
    /// or a refusal (4xx with a message), never a panic.
    pub fn credentials_body(content_type: Option<&str>, body: &[u8]) {
        match super::credentials_body(&headers(content_type), &Bytes::copy_from_slice(body)) {
            Ok(request) => assert_eq!(request.reason, Reason::Initial),
            Err(Refused(status, message)) => {
                assert!(status.is_client_error() && !message.is_empty());
            }
        }
    }

    /// Parse and convert a `POST …/security-errors` body as the server does: the
    /// parts or a refusal, never a panic; what converts goes back to the wire and
    /// converts again to the same credentials, and its `Debug` shows no secret.
    pub fn security_error_body(content_type: Option<&str>, body: &[u8]) {
        match super::security_error_body(
            &headers(content_type),
            &Bytes::copy_from_slice(body),
            std::time::SystemTime::now(),
        ) {
            Ok((_, credentials, error)) => {
                let wire = WireCredentials::from(&credentials);
                let back = Credentials::try_from(wire.clone())
                    .expect("a converted credential converts back");
                assert_eq!(back, credentials, "round trip");
                let json = serde_json::to_vec(&wire).expect("serialises");
                let again: WireCredentials = serde_json::from_slice(&json).expect("parses back");
                assert_eq!(again, wire);
                // A secret leaks when it shows up more often than in the same text
                // rendered with every secret blanked (it may equal a header name,
                // the username or the principal).
                let secrets: Vec<&str> = match &wire.credential {
                    crate::wire::WireCredential::Bearer { token } => vec![token.as_str()],
                    crate::wire::WireCredential::Basic { password, .. } => vec![password.as_str()],
                    crate::wire::WireCredential::Headers { headers } => {
                        headers.values().map(String::as_str).collect()
                    }
                };
                let blanked = Credentials {
                    credential: match &credentials.credential {
                        Credential::Bearer(_) => Credential::Bearer(Secret::new("")),
                        Credential::Basic { username, .. } => Credential::Basic {
                            username: username.clone(),
                            password: Secret::new(""),
                        },
                        Credential::Headers(h) => Credential::Headers(
                            h.iter()
                                .map(|(k, _)| (k.clone(), Secret::new("")))
                                .collect(),
                        ),
                    },
                    ..credentials.clone()
                };
                let real = format!("{credentials:?} {wire:?} {error:?}");
                let public = format!(
                    "{blanked:?} {:?} {error:?}",
                    WireCredentials::from(&blanked)
                );
                for s in secrets.iter().filter(|s| s.len() >= 8) {
                    assert!(
                        real.matches(s).count() <= public.matches(s).count(),
                        "Debug output shows a secret"
                    );
                }
            }
            Err(Refused(status, message)) => {
                assert!(status.is_client_error() && !message.is_empty());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::service::Service as _;
    use serde_json::Value;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for value in ["Bearer tok", "bearer tok", "BEARER tok", "bEaReR   tok"] {
            assert_eq!(bearer_token(value), Some("tok"), "{value}");
        }
        for value in ["Basic tok", "Bearer", "Bearer ", "Bearertok", "tok"] {
            assert_eq!(bearer_token(value), None, "{value}");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        for bad in [
            "",
            "0",
            "0s",
            "s",
            "1x",
            "-1s",
            "1.5s",
            "18446744073709551615",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    async fn call(app: &Router, method: &str, path: &str) -> (StatusCode, HeaderMap, Value) {
        let request = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let response = service.call(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {bytes:?}"));
        (parts.status, parts.headers, value)
    }

    async fn boom() -> &'static str {
        panic!("handler bug")
    }

    /// Issue #14: a panicking handler dropped the connection; now it answers 500
    /// JSON, is logged, and the router keeps serving.
    #[tokio::test]
    async fn a_panicking_handler_answers_500_json_and_serving_goes_on() {
        let app = harden(
            Router::new()
                .route("/boom", get(boom))
                .route("/ok", get(|| async { "fine" })),
        );
        for _ in 0..2 {
            let (status, headers, body) = call(&app, "GET", "/boom").await;
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(headers[header::CONTENT_TYPE], "application/json");
            assert_eq!(body["error"]["kind"], "internal", "{body}");
            assert!(!body.to_string().contains("handler bug"), "{body}");
        }
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let ok = service
            .call(axum::http::Request::get("/ok").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
    }

    /// Issue #14: 405 had an empty body; every error status carries JSON.
    #[tokio::test]
    async fn axum_rejections_get_json_bodies() {
        let app = harden(
            Router::new()
                .route("/only-post", post(|| async { "posted" }))
                .route(
                    "/text",
                    get(|| async { (StatusCode::BAD_REQUEST, "plain text refusal") }),
                ),
        );
        let (status, headers, body) = call(&app, "GET", "/only-post").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers[header::ALLOW], "POST");
        assert_eq!(
            body,
            json!({"error": {"kind": "method_not_allowed", "message": "Method Not Allowed"}})
        );
        let (status, _, body) = call(&app, "GET", "/text").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            body,
            json!({"error": {"kind": "bad_request", "message": "plain text refusal"}})
        );
    }
}
