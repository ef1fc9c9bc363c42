//! A small blocking HTTP client over `wasi:http/outgoing-handler`.
//!
//! Every request leaves through the host, which checks it against the provider's
//! `allowed_hosts` and applies its timeouts; a refused request comes back as
//! [`HttpError::Transport`] naming `HttpRequestDenied`.
//!
//! ```no_run
//! use reauth_sdk::http::Request;
//! # fn f() -> Result<(), reauth_sdk::http::HttpError> {
//! let response = Request::post("http://127.0.0.1:9400/token")
//!     .basic_auth("client", "secret")
//!     .form(&[("grant_type", "client_credentials")])
//!     .send()?;
//! if response.status == 200 {
//!     let body: serde_json::Value = response.json()?;
//! }
//! # Ok(()) }
//! ```

use crate::bindings::wasi::http::outgoing_handler;
use crate::bindings::wasi::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
};
use crate::bindings::wasi::io::streams::StreamError;
use base64::Engine as _;
use std::fmt;

/// Upper bound on a response body this helper reads (the host caps it too).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// Why a request produced no usable response.
#[derive(Debug, Clone, PartialEq)]
pub enum HttpError {
    /// The URL could not be parsed or uses an unsupported scheme.
    InvalidUrl(String),
    /// The host or the network refused or failed the request.
    Transport(String),
    /// The response body could not be decoded as expected.
    Decode(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::InvalidUrl(m) => write!(f, "invalid URL: {m}"),
            HttpError::Transport(m) => write!(f, "HTTP request failed: {m}"),
            HttpError::Decode(m) => write!(f, "could not decode response: {m}"),
        }
    }
}

impl std::error::Error for HttpError {}

/// An outgoing request, built fluently and sent with [`Request::send`].
#[derive(Clone)]
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout_ms: u64,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Headers and bodies carry secrets (client secrets, passwords): never print them.
        f.debug_struct("Request")
            .field("url", &self.url)
            .field("headers", &self.headers.len())
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Request {
    fn new(method: Method, url: impl Into<String>) -> Self {
        Request {
            method,
            url: url.into(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout_ms: 10_000,
        }
    }

    /// A `GET` request.
    pub fn get(url: impl Into<String>) -> Self {
        Self::new(Method::Get, url)
    }

    /// A `POST` request.
    pub fn post(url: impl Into<String>) -> Self {
        Self::new(Method::Post, url)
    }

    /// Add a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// `Authorization: Basic …` with both parts form-urlencoded first, as RFC 6749
    /// §2.3.1 requires for OAuth2 client authentication.
    pub fn basic_auth(self, username: &str, password: &str) -> Self {
        let raw = format!("{}:{}", form_encode(username), form_encode(password));
        let value = base64::engine::general_purpose::STANDARD.encode(raw);
        self.header("authorization", format!("Basic {value}"))
    }

    /// `Authorization: Bearer …`.
    pub fn bearer_auth(self, token: &str) -> Self {
        self.header("authorization", format!("Bearer {token}"))
    }

    /// An `application/x-www-form-urlencoded` body.
    pub fn form(mut self, fields: &[(&str, &str)]) -> Self {
        let body = fields
            .iter()
            .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        self.body = body.into_bytes();
        self.header("content-type", "application/x-www-form-urlencoded")
    }

    /// A JSON body.
    pub fn json(mut self, value: &serde_json::Value) -> Self {
        self.body = value.to_string().into_bytes();
        self.header("content-type", "application/json")
    }

    /// A raw body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Connect and first-byte timeout, in milliseconds (default 10 s).
    pub fn timeout_ms(mut self, ms: u64) -> Self {
        self.timeout_ms = ms;
        self
    }

    /// Send the request and read the whole response.
    pub fn send(self) -> Result<Response, HttpError> {
        let (scheme, authority, path) = split_url(&self.url)?;
        let mut entries: Vec<(String, Vec<u8>)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
            .collect();
        // A body goes out with its length, never chunked: strict servers (Python's
        // http.server, many appliances) refuse chunked request bodies.
        let has_length = entries
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
        if !self.body.is_empty() && !has_length {
            entries.push((
                "content-length".into(),
                self.body.len().to_string().into_bytes(),
            ));
        }
        let fields = Fields::from_list(&entries)
            .map_err(|e| HttpError::InvalidUrl(format!("bad header: {e:?}")))?;
        let request = OutgoingRequest::new(fields);
        let invalid = |what: &str| HttpError::InvalidUrl(format!("{what} rejected: {}", self.url));
        request
            .set_method(&self.method)
            .map_err(|()| invalid("method"))?;
        request
            .set_scheme(Some(&scheme))
            .map_err(|()| invalid("scheme"))?;
        request
            .set_authority(Some(authority))
            .map_err(|()| invalid("authority"))?;
        request
            .set_path_with_query(Some(&path))
            .map_err(|()| invalid("path"))?;

        let options = RequestOptions::new();
        let ns = self.timeout_ms.saturating_mul(1_000_000);
        let _ = options.set_connect_timeout(Some(ns));
        let _ = options.set_first_byte_timeout(Some(ns));
        let _ = options.set_between_bytes_timeout(Some(ns));

        let outgoing_body = request
            .body()
            .map_err(|()| HttpError::Transport("request body unavailable".into()))?;
        let pending = outgoing_handler::handle(request, Some(options)).map_err(transport)?;
        // If the host refuses the request (egress denied, connection failed) the body
        // stream closes early; the response future then carries the real reason.
        let mut body_error = None;
        {
            let stream = outgoing_body
                .write()
                .map_err(|()| HttpError::Transport("request body stream unavailable".into()))?;
            for chunk in self.body.chunks(4096) {
                if let Err(e) = stream.blocking_write_and_flush(chunk) {
                    body_error = Some(HttpError::Transport(format!("writing request body: {e:?}")));
                    break;
                }
            }
        }
        if body_error.is_none()
            && let Err(code) = OutgoingBody::finish(outgoing_body, None)
        {
            body_error = Some(transport(code));
        }

        pending.subscribe().block();
        let response = match (pending.get(), body_error) {
            (Some(Ok(Err(code))), _) => return Err(transport(code)),
            (_, Some(e)) => return Err(e),
            (Some(Ok(Ok(response))), None) => response,
            (Some(Err(())), None) => {
                return Err(HttpError::Transport("response already taken".into()));
            }
            (None, None) => return Err(HttpError::Transport("response not ready".into())),
        };

        let status = response.status();
        let headers = response
            .headers()
            .entries()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let incoming = response
            .consume()
            .map_err(|()| HttpError::Transport("response body unavailable".into()))?;
        let mut body = Vec::new();
        {
            let stream = incoming
                .stream()
                .map_err(|()| HttpError::Transport("response body stream unavailable".into()))?;
            loop {
                match stream.blocking_read(64 * 1024) {
                    Ok(bytes) => {
                        if body.len() + bytes.len() > MAX_BODY {
                            return Err(HttpError::Transport(format!(
                                "response body larger than {MAX_BODY} bytes"
                            )));
                        }
                        body.extend_from_slice(&bytes);
                    }
                    Err(StreamError::Closed) => break,
                    Err(StreamError::LastOperationFailed(e)) => {
                        return Err(HttpError::Transport(format!(
                            "reading response body: {}",
                            e.to_debug_string()
                        )));
                    }
                }
            }
        }
        let _ = IncomingBody::finish(incoming);
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

fn transport(code: ErrorCode) -> HttpError {
    HttpError::Transport(format!("{code:?}"))
}

/// A response with its whole body.
#[derive(Clone)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Response headers, names lower-case.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Bodies carry tokens: never print them.
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Response {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `Retry-After` header in milliseconds (delta-seconds; an HTTP date is
    /// taken relative to the host's clock), if the server sent a usable one.
    pub fn retry_after_ms(&self) -> Option<u64> {
        let value = self.header("retry-after")?.trim();
        if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
            return Some(
                value
                    .parse::<u64>()
                    .unwrap_or(u64::MAX)
                    .saturating_mul(1000),
            );
        }
        let at = httpdate::parse_http_date(value).ok()?;
        let secs = at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .ok()?;
        Some(
            secs.saturating_sub(crate::time::now().seconds)
                .saturating_mul(1000),
        )
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|e| HttpError::Decode(e.to_string()))
    }

    /// The body as (lossy) UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Split `scheme://authority/path?query`.
fn split_url(url: &str) -> Result<(Scheme, &str, String), HttpError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| HttpError::InvalidUrl(format!("`{url}` has no scheme")))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => {
            return Err(HttpError::InvalidUrl(format!(
                "unsupported scheme `{other}` in `{url}`"
            )));
        }
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    if authority.is_empty() {
        return Err(HttpError::InvalidUrl(format!("`{url}` has no host")));
    }
    Ok((scheme, authority, path))
}

/// `application/x-www-form-urlencoded` encoding of one name or value.
pub fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
