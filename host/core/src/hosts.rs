//! `allowed_hosts` patterns: which hosts a provider's HTTP requests may reach.
//! Here, apart from the sandbox that enforces them, so the configuration can be
//! validated without a WebAssembly engine.

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
