//! Egress control: every `wasi:http` request a plugin makes passes through
//! [`EgressHooks::send_request`], which checks the provider's `allowed_hosts` and
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

use super::limits::CallHits;
use crate::error::LimitKind;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

/// One `allowed_hosts` entry: `host`, `host:port`, `*.domain`, `*.domain:port`,
/// `host:*`. A host without a port allows the scheme's default port only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    host: HostMatch,
    port: PortMatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    Exact(String),
    /// `*.suffix`: any subdomain of suffix (not suffix itself).
    Subdomain(String),
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PortMatch {
    Default,
    Exact(u16),
    Any,
}

impl HostPattern {
    /// Parse an `allowed_hosts` entry.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty host".into());
        }
        if s.contains("://") || s.contains('/') {
            return Err("give host[:port], not a URL".into());
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, _)) if !h.ends_with(']') && h.contains(':') => (s, None), // bare IPv6
            Some((h, "*")) => (h, Some(PortMatch::Any)),
            Some((h, p)) => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| format!("invalid port `{p}`"))?;
                (h, Some(PortMatch::Exact(port)))
            }
            None => (s, None),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let valid = |h: &str| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':'))
        };
        let host = if host == "*" {
            HostMatch::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            if !valid(suffix) {
                return Err(format!("invalid domain `{suffix}`"));
            }
            HostMatch::Subdomain(suffix.to_string())
        } else if valid(&host) {
            HostMatch::Exact(host)
        } else {
            return Err(format!("invalid host `{host}`"));
        };
        Ok(HostPattern {
            host,
            port: port.unwrap_or(PortMatch::Default),
        })
    }

    /// Whether a request to `host`:`port` (`port` already defaulted from the scheme,
    /// `default_port` the scheme's default) is allowed by this pattern.
    pub fn allows(&self, host: &str, port: u16, default_port: u16) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let host = host.trim_end_matches('.');
        let host_ok = match &self.host {
            HostMatch::Exact(h) => h == host,
            HostMatch::Subdomain(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
            HostMatch::Any => true,
        };
        let port_ok = match self.port {
            PortMatch::Default => port == default_port,
            PortMatch::Exact(p) => p == port,
            PortMatch::Any => true,
        };
        host_ok && port_ok
    }
}

/// Whether `host` (as in a URI, IPv6 in brackets) is a loopback address or name.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// How a request's target is logged: `scheme://host[:port]/path` — never the
/// userinfo (`user:password@`) or the query, which can carry secrets.
fn log_target(uri: &http::Uri) -> String {
    format!(
        "{}://{}{}{}",
        uri.scheme_str().unwrap_or("?"),
        uri.host().unwrap_or("?"),
        uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default(),
        uri.path()
    )
}

/// The provider's egress policy, shared by all of its calls.
#[derive(Debug)]
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
}

impl EgressPolicy {
    /// `Err(why)` if the request may not leave.
    fn check(&self, uri: &http::Uri) -> Result<(), &'static str> {
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
        if self
            .allowed
            .iter()
            .any(|p| p.allows(host, port, default_port))
        {
            Ok(())
        } else {
            Err("host not in allowed_hosts")
        }
    }
}

/// The `wasi:http` hooks of one call's Store.
pub(crate) struct EgressHooks {
    pub(crate) policy: Arc<EgressPolicy>,
    pub(crate) hits: Arc<CallHits>,
}

impl WasiHttpHooks for EgressHooks {
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
        let policy = &self.policy;
        let uri = request.uri().clone();
        let target = log_target(&uri);
        if let Err(why) = policy.check(&uri) {
            policy.denied.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(provider = %policy.provider, %target, "egress denied: {why}");
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        policy.sent.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(provider = %policy.provider, method = %request.method(), %target, "egress");
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
            let (response, io) =
                wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            let too_large = move |size: Option<u64>| {
                hits.hit(
                    LimitKind::ResponseBody,
                    format!(
                        "response body from {target} larger than {max} bytes{}",
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
            let response = response.map(|body| {
                Limited::new(body, limit)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(pattern: &str, host: &str, port: u16, default: u16) -> bool {
        HostPattern::parse(pattern)
            .unwrap()
            .allows(host, port, default)
    }

    #[test]
    fn patterns() {
        assert!(allows("127.0.0.1:9400", "127.0.0.1", 9400, 80));
        assert!(!allows("127.0.0.1:9400", "127.0.0.1", 9401, 80));
        assert!(allows("idp.example.com", "IDP.example.com", 443, 443));
        assert!(!allows("idp.example.com", "idp.example.com", 8443, 443));
        assert!(allows("*.example.com:443", "a.b.example.com", 443, 443));
        assert!(!allows("*.example.com:443", "example.com", 443, 443));
        assert!(!allows("*.example.com:443", "evilexample.com", 443, 443));
        assert!(allows("localhost:*", "localhost", 1234, 80));
        assert!(allows("[::1]:8080", "[::1]", 8080, 80));
        assert!(HostPattern::parse("http://x").is_err());
        assert!(HostPattern::parse("a b").is_err());
        assert!(HostPattern::parse("x:99999").is_err());
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
        }
    }

    #[test]
    fn logged_targets_drop_userinfo_and_query() {
        let uri: http::Uri = "https://svc:hunter2-pw@idp.example.com:8443/token?secret=s3cr3t"
            .parse()
            .unwrap();
        assert_eq!(log_target(&uri), "https://idp.example.com:8443/token");
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
