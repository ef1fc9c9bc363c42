//! Egress control: every `wasi:http` request a plugin makes passes through
//! `EgressHooks::send_request`, which checks the provider's `allowed_hosts` and
//! the scheme before anything touches the network. Sockets are never granted (the
//! WASI context has no network capability), so this hook is the only way out.
//!
//! - `https` is required, except to loopback hosts (`127.0.0.0/8`, `::1`,
//!   `localhost`) or when the provider sets `allow_http`.
//! - Redirects are never followed by the host: a plugin that follows one issues a
//!   new request, which passes this check again, so a redirect can only lead to an
//!   allowed host.
//! - Connect and first-byte/between-bytes timeouts come from the provider's limits
//!   (a plugin may ask for shorter ones, never longer); the call's own timeout
//!   bounds the total.
//! - Response bodies are capped at `limits.max_response_bytes`: reading past it
//!   fails the read with `HTTP-response-body-size` and fails the call with
//!   [`crate::Error::Limit`].
//! - Requests in flight (sent, until their connection is done) are capped per call
//!   (`limits.max_requests_in_flight`: one more fails the call with
//!   [`crate::Error::Limit`]) and per provider
//!   (`limits.max_provider_requests_in_flight`: one more waits for a free place,
//!   within the call's timeout), so no plugin can hold the host's file
//!   descriptors.
//! - The URL is parsed once: userinfo (`user:pass@host`) is refused, and the
//!   request is rebuilt to go to exactly the `host:port` that was checked.
//! - Everything a plugin controls that reaches a log line or an error (host, path)
//!   passes the provider's redactor first.

use super::limiter::CallHits;
use crate::error::LimitKind;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

pub use reauth_core::hosts::{HostPattern, is_loopback};

/// How a request's target is logged: `scheme://host[:port]/path` — never the
/// userinfo (`user:password@`) or the query, which can carry secrets — with the
/// provider's known secrets redacted from what remains.
fn log_target(uri: &http::Uri, redact: &Redact) -> String {
    let target = format!(
        "{}://{}{}{}",
        uri.scheme_str().unwrap_or("?"),
        uri.host().unwrap_or("?"),
        uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default(),
        uri.path()
    );
    redact(&target)
}

/// Redacts a provider's known secrets from text a plugin controls.
pub(crate) type Redact = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// The provider's egress policy, shared by all of its calls.
pub(crate) struct EgressPolicy {
    pub(crate) provider: Arc<str>,
    pub(crate) allowed: Vec<HostPattern>,
    /// Plain http to non-loopback hosts.
    pub(crate) allow_http: bool,
    pub(crate) connect_timeout: Duration,
    pub(crate) first_byte_timeout: Duration,
    pub(crate) max_response_bytes: u64,
    /// Requests let through.
    pub(crate) sent: AtomicU64,
    /// Requests refused (host not allowed, plain http, bad URI).
    pub(crate) denied: AtomicU64,
    /// Requests sent that failed in transport (connect, TLS, timeout, reset).
    pub(crate) failed: AtomicU64,
    /// Response body bytes the plugin was given.
    pub(crate) response_bytes: Arc<AtomicU64>,
    /// Places for requests in flight, shared by all of the provider's calls.
    pub(crate) in_flight: Arc<Semaphore>,
    /// `limits.max_requests_in_flight`: requests in flight per call.
    pub(crate) max_per_call: usize,
    /// The provider's secrets, redacted from logged targets.
    pub(crate) redact: Redact,
    /// The last request that failed (transport error, 5xx or 429), redacted:
    /// named in the log line when the provider starts failing (discovery or
    /// token endpoint?).
    pub(crate) last_failure: std::sync::Mutex<Option<String>>,
}

impl EgressPolicy {
    /// The last failed request (`POST http://idp/token: HTTP 503`), if any.
    pub(crate) fn last_failure(&self) -> Option<String> {
        self.last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn record_failure(&self, what: String) {
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(what);
    }

    /// Forget the last failed request (the provider fetched again).
    pub(crate) fn clear_failure(&self) {
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl std::fmt::Debug for EgressPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressPolicy")
            .field("provider", &self.provider)
            .field("allowed", &self.allowed)
            .field("allow_http", &self.allow_http)
            .finish_non_exhaustive()
    }
}

impl EgressPolicy {
    /// `Err(why)` if the request may not leave.
    /// `Err(why)` if the request may not leave; else the URI it goes to, rebuilt
    /// from the parts that were checked (so the connection cannot reach anything
    /// else than what the allow-list let through).
    fn check(&self, uri: &http::Uri) -> Result<http::Uri, &'static str> {
        let Some(authority) = uri.authority() else {
            return Err("request has no host");
        };
        if authority.as_str().contains('@') {
            return Err(
                "userinfo (user:password@) in a URL is not allowed; send credentials in headers",
            );
        }
        let Some(host) = uri.host() else {
            return Err("request has no host");
        };
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("only http and https are allowed"),
        };
        if !https && !self.allow_http && !is_loopback(host) {
            return Err("plain http to a non-loopback host (use https, or set allow_http)");
        }
        let default_port = if https { 443 } else { 80 };
        let port = uri.port_u16().unwrap_or(default_port);
        if !self
            .allowed
            .iter()
            .any(|p| p.allows(host, port, default_port))
        {
            return Err("host not in allowed_hosts");
        }
        let mut parts = http::uri::Parts::default();
        parts.scheme = uri.scheme().cloned();
        parts.authority = Some(
            format!("{}:{port}", host.to_ascii_lowercase())
                .parse()
                .map_err(|_| "invalid host")?,
        );
        parts.path_and_query = uri.path_and_query().cloned();
        http::Uri::from_parts(parts).map_err(|_| "invalid URI")
    }
}

/// The `wasi:http` hooks of one call's Store.
pub(crate) struct EgressHooks {
    pub(crate) policy: Arc<EgressPolicy>,
    pub(crate) hits: Arc<CallHits>,
    /// Places for this call's requests in flight (`limits.max_requests_in_flight`).
    pub(crate) in_flight: Arc<Semaphore>,
    /// While the guest runs `describe`: every request is refused (it must not do
    /// I/O, and `reauth check` must have no side effects).
    pub(crate) describing: bool,
}

impl EgressHooks {
    /// The hooks of one call (or one kept instance) under `policy`.
    pub(crate) fn new(policy: Arc<EgressPolicy>, hits: Arc<CallHits>) -> Self {
        let in_flight = Arc::new(Semaphore::new(policy.max_per_call));
        EgressHooks {
            policy,
            hits,
            in_flight,
            describing: false,
        }
    }
}

/// Largest write to an outgoing request body the host buffers, and how many such
/// writes: a body written but never sent stays with its request, so this bounds
/// what each of the call's `limits.max_host_resources` objects can hold.
const OUTGOING_BODY_CHUNK: usize = 16 * 1024;

impl WasiHttpHooks for EgressHooks {
    fn p2_outgoing_body_buffer_chunks(&mut self) -> usize {
        1
    }

    fn p2_outgoing_body_chunk_size(&mut self) -> usize {
        OUTGOING_BODY_CHUNK
    }

    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<
            dyn Future<Output = wasmtime_wasi_http::Result<(), wasmtime_wasi_http::Error>> + Send,
        >,
    ) -> Box<
        dyn Future<
                Output = wasmtime_wasi_http::Result<(
                    http::Response<WasiBody>,
                    Box<
                        dyn Future<
                                Output = wasmtime_wasi_http::Result<(), wasmtime_wasi_http::Error>,
                            > + Send,
                    >,
                )>,
            > + Send,
    > {
        let policy = self.policy.clone();
        let mut request = request;
        if self.describing {
            policy.denied.fetch_add(1, Ordering::Relaxed);
            let target = log_target(request.uri(), &policy.redact);
            tracing::warn!(provider = %policy.provider, %target, "egress denied: `describe` must not do I/O");
            return Box::new(refuse_after_body(request));
        }
        let checked = match policy.check(request.uri()) {
            Ok(uri) => uri,
            Err(why) => {
                policy.denied.fetch_add(1, Ordering::Relaxed);
                let target = log_target(request.uri(), &policy.redact);
                tracing::warn!(provider = %policy.provider, %target, "egress denied: {why}");
                return Box::new(refuse_after_body(request));
            }
        };
        *request.uri_mut() = checked;
        let Ok(call_place) = self.in_flight.clone().try_acquire_owned() else {
            policy.denied.fetch_add(1, Ordering::Relaxed);
            let detail = format!(
                "more than {} HTTP requests in flight at once",
                policy.max_per_call
            );
            let target = log_target(request.uri(), &policy.redact);
            tracing::warn!(provider = %policy.provider, %target, "egress denied: {detail}");
            self.hits.hit(LimitKind::RequestsInFlight, detail);
            return Box::new(refuse_after_body(request));
        };
        policy.sent.fetch_add(1, Ordering::Relaxed);
        // The redacted target is built only when it is logged (redaction costs).
        if tracing::enabled!(tracing::Level::DEBUG) {
            let target = log_target(request.uri(), &policy.redact);
            tracing::debug!(provider = %policy.provider, method = %request.method(), %target, "egress");
        }
        let (uri, redact) = (request.uri().clone(), policy.redact.clone());
        let method = request.method().clone();
        let clamp = |t: Option<Duration>, cap: Duration| Some(t.map_or(cap, |t| t.min(cap)));
        let options = options.unwrap_or_default();
        let options = RequestOptions {
            connect_timeout: clamp(options.connect_timeout, policy.connect_timeout),
            first_byte_timeout: clamp(options.first_byte_timeout, policy.first_byte_timeout),
            between_bytes_timeout: clamp(options.between_bytes_timeout, policy.first_byte_timeout),
        };
        let _ = fut;
        let max = policy.max_response_bytes;
        let hits = self.hits.clone();
        Box::new(async move {
            use http_body_util::{BodyExt, LengthLimitError, Limited};
            use wasmtime_wasi_http::Error as HttpError;
            // The provider-wide cap: wait for a place (the call's timeout bounds it).
            let provider_place = policy
                .in_flight
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| HttpError::HttpRequestDenied)?;
            let failed = |what: String| {
                policy.record_failure(format!("{method} {}: {what}", log_target(&uri, &redact)))
            };
            let (response, io) =
                match wasmtime_wasi_http::default_send_request(request, Some(options)).await {
                    Ok(sent) => sent,
                    Err(e) => {
                        policy.failed.fetch_add(1, Ordering::Relaxed);
                        failed(format!("{e:?}"));
                        return Err(e);
                    }
                };
            let status = response.status();
            if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
                failed(format!("HTTP {}", status.as_u16()));
            }
            // Both places are held until the connection is done (or dropped with
            // the call's Store).
            let io = async move {
                let done = io.await;
                drop((call_place, provider_place));
                done
            };
            let too_large = move |size: Option<u64>| {
                hits.hit(
                    LimitKind::ResponseBody,
                    format!(
                        "response body from {} larger than {max} bytes{}",
                        log_target(&uri, &redact),
                        size.map(|s| format!(" (content-length {s})"))
                            .unwrap_or_default()
                    ),
                );
                HttpError::HttpResponseBodySize(Some(max))
            };
            let declared = response
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if let Some(size) = declared.filter(|s| *s > max) {
                return Err(too_large(Some(size)));
            }
            let limit = usize::try_from(max).unwrap_or(usize::MAX);
            let counted = policy.response_bytes.clone();
            let response = response.map(|body| {
                Limited::new(
                    body.map_frame(move |frame| {
                        if let Some(data) = frame.data_ref() {
                            counted.fetch_add(
                                u64::try_from(data.len()).unwrap_or(u64::MAX),
                                Ordering::Relaxed,
                            );
                        }
                        frame
                    }),
                    limit,
                )
                .map_err(move |e| match e.downcast::<HttpError>() {
                    Ok(inner) => *inner,
                    Err(e) if e.is::<LengthLimitError>() => too_large(None),
                    Err(e) => HttpError::InternalError(Some(e.to_string())),
                })
                .boxed_unsync()
            });
            Ok((response, Box::new(io) as Box<dyn Future<Output = _> + Send>))
        })
    }
}

/// Most request-body bytes read (and dropped) from a refused request.
const REFUSED_BODY_DRAIN: usize = 1 << 20;

/// Refuse `request` (`HttpRequestDenied` on its response), after reading what the
/// guest writes of its body (up to [`REFUSED_BODY_DRAIN`] bytes; the call's
/// deadline bounds the wait): a guest still streaming the body then sees the
/// refusal where it looks for it, on the response, instead of a broken body
/// stream — StarlingMonkey's `fetch` trapped on that ("event loop error, but no
/// exception is pending") instead of rejecting its promise.
async fn refuse_after_body<T>(
    request: http::Request<WasiBody>,
) -> wasmtime_wasi_http::Result<T, wasmtime_wasi_http::Error> {
    use http_body_util::BodyExt;
    let mut body = request.into_body();
    let mut read = 0usize;
    while read < REFUSED_BODY_DRAIN {
        match body.frame().await {
            Some(Ok(frame)) => {
                read = read.saturating_add(frame.data_ref().map_or(0, |d| d.len()));
            }
            Some(Err(_)) | None => break,
        }
    }
    Err(wasmtime_wasi_http::Error::HttpRequestDenied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_redaction() -> Redact {
        Arc::new(|s: &str| s.to_string())
    }

    fn policy(allow_http: bool) -> EgressPolicy {
        EgressPolicy {
            provider: Arc::from("p"),
            allowed: ["*:*"]
                .iter()
                .map(|p| HostPattern::parse(p).unwrap())
                .collect(),
            allow_http,
            connect_timeout: Duration::from_secs(1),
            first_byte_timeout: Duration::from_secs(1),
            max_response_bytes: 1,
            sent: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            response_bytes: Arc::default(),
            in_flight: Arc::new(Semaphore::new(4)),
            max_per_call: 2,
            last_failure: std::sync::Mutex::new(None),
            redact: no_redaction(),
        }
    }

    #[test]
    fn logged_targets_drop_userinfo_and_query() {
        let uri: http::Uri = "https://svc:hunter2-pw@idp.example.com:8443/token?secret=s3cr3t"
            .parse()
            .unwrap();
        assert_eq!(
            log_target(&uri, &no_redaction()),
            "https://idp.example.com:8443/token"
        );
    }

    /// Regression (item 7 of the hardening review): a config secret placed in
    /// the URL's host or path reached the `egress` log lines.
    #[test]
    fn logged_targets_redact_the_providers_secrets() {
        let uri: http::Uri = "https://s3cr3t-in-host.example.com/p/s3cr3t-in-path/x"
            .parse()
            .unwrap();
        let redact: Redact = Arc::new(|s: &str| {
            s.replace("s3cr3t-in-host", "[redacted]")
                .replace("s3cr3t-in-path", "[redacted]")
        });
        let logged = log_target(&uri, &redact);
        assert_eq!(logged, "https://[redacted].example.com/p/[redacted]/x");
    }

    /// Regression (item 13): `http://127.0.0.1:19611@localhost:19610/` passed the
    /// check for `localhost:19610` and the connection then went to the authority
    /// string with the userinfo in it. Userinfo is refused, and what is sent is
    /// rebuilt from the checked host and port.
    #[test]
    fn userinfo_is_refused_and_the_checked_authority_is_what_is_sent() {
        let mut p = policy(false);
        p.allowed = vec![HostPattern::parse("localhost:19610").unwrap()];
        let check = |uri: &str| p.check(&uri.parse().unwrap());
        assert!(
            check("http://127.0.0.1:19611@localhost:19610/")
                .unwrap_err()
                .contains("userinfo")
        );
        assert!(check("http://user@localhost:19610/").is_err());
        let sent = check("http://LOCALHOST:19610/token?a=b").unwrap();
        assert_eq!(sent.to_string(), "http://localhost:19610/token?a=b");
        let sent = check("http://localhost:19610").unwrap();
        assert_eq!(sent.authority().unwrap().as_str(), "localhost:19610");
    }

    #[test]
    fn https_required_unless_loopback_or_opted_in() {
        let check = |p: &EgressPolicy, uri: &str| p.check(&uri.parse().unwrap());
        let strict = policy(false);
        assert!(check(&strict, "https://idp.example.com/token").is_ok());
        assert!(check(&strict, "http://127.0.0.1:9400/token").is_ok());
        assert!(check(&strict, "http://127.8.9.1/token").is_ok());
        assert!(check(&strict, "http://localhost:8080/").is_ok());
        assert!(check(&strict, "http://[::1]:8080/").is_ok());
        assert_eq!(
            check(&strict, "http://idp.example.com/token"),
            Err("plain http to a non-loopback host (use https, or set allow_http)")
        );
        assert!(check(&strict, "http://10.0.0.1/").is_err());
        assert!(check(&strict, "ftp://127.0.0.1/").is_err());
        assert!(check(&policy(true), "http://idp.example.com/token").is_ok());
    }
}
