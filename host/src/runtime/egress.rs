//! Egress control: every `wasi:http` request a plugin makes passes through
//! [`EgressHooks::send_request`], which checks the provider's `allowed_hosts` before
//! anything touches the network. Sockets are never granted (the WASI context has no
//! network capability), so this hook is the only way out.

use std::sync::Arc;
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

/// The provider's egress policy, shared by all of its calls.
#[derive(Debug)]
pub(crate) struct EgressPolicy {
    pub(crate) provider: Arc<str>,
    pub(crate) allowed: Vec<HostPattern>,
    /// Applied when the plugin sets no timeout of its own (or a longer one).
    pub(crate) max_timeout: Duration,
}

impl EgressPolicy {
    fn check(&self, uri: &http::Uri) -> bool {
        let Some(host) = uri.host() else {
            return false;
        };
        let default_port = if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
            443
        } else {
            80
        };
        let port = uri.port_u16().unwrap_or(default_port);
        self.allowed
            .iter()
            .any(|p| p.allows(host, port, default_port))
    }
}

/// The `wasi:http` hooks of one call's Store.
pub(crate) struct EgressHooks(pub(crate) Arc<EgressPolicy>);

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
        let policy = &self.0;
        let uri = request.uri().clone();
        // Log scheme://authority/path only: queries can carry secrets.
        let target = format!(
            "{}://{}{}",
            uri.scheme_str().unwrap_or("?"),
            uri.authority().map(|a| a.as_str()).unwrap_or("?"),
            uri.path()
        );
        if !policy.check(&uri) {
            tracing::warn!(provider = %policy.provider, %target, "egress denied: host not in allowed_hosts");
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        tracing::debug!(provider = %policy.provider, method = %request.method(), %target, "egress");
        let cap = policy.max_timeout;
        let clamp = |t: Option<Duration>| Some(t.map_or(cap, |t| t.min(cap)));
        let options = options.unwrap_or_default();
        let options = RequestOptions {
            connect_timeout: clamp(options.connect_timeout),
            first_byte_timeout: clamp(options.first_byte_timeout),
            between_bytes_timeout: clamp(options.between_bytes_timeout),
        };
        let _ = fut;
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, io) =
                wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
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
}
