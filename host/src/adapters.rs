//! Helper protocols of the tools people already run, backed by reauth providers:
//!
//! - kubectl / client-go exec credential plugin (`ExecCredential`,
//!   `client.authentication.k8s.io/v1` and `v1beta1`);
//! - git credential helper (`get` / `store` / `erase`, `password_expiry_utc`);
//! - docker credential helper (`get` / `store` / `erase` / `list`);
//! - AWS `credential_process` (Version 1 JSON).
//!
//! Each runs against a [`Backend`]: its own [`Host`] in-process (from the config
//! file; persisted state and precompiled cache make that cheap), or a running
//! `reauth serve` reached over its Unix socket or loopback TCP, so that many
//! short-lived tool processes share one cache and one IdP session.

use crate::error::BoxError;
use crate::host::Host;
use crate::secret::Secret;
use crate::types::{Decision, Request, SecurityError};
use crate::wire::{WireCredential, WireCredentials, WireErrorKind, WireRequest, WireSecurityError};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// Where credentials come from.
pub enum Backend {
    /// A host in this process.
    Local(Host),
    /// A `reauth serve` daemon.
    Remote(Client),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Local(_) => f.write_str("Backend::Local"),
            Backend::Remote(c) => write!(f, "Backend::Remote({})", c.target),
        }
    }
}

/// A client of the sidecar API.
pub struct Client {
    target: String,
    token: Option<Secret>,
}

impl Client {
    /// `target` is `unix:/path/to/socket` (or a bare path) or `http://127.0.0.1:port`.
    pub fn new(target: &str, token: Option<Secret>) -> Client {
        Client {
            target: target.to_string(),
            token,
        }
    }

    async fn post(&self, path: &str, body: &Value) -> Result<(u16, Value), BoxError> {
        let body = Bytes::from(serde_json::to_vec(body)?);
        let mut request = http::Request::post(path)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::HOST, "reauth");
        if let Some(t) = &self.token {
            request = request.header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", t.expose()),
            );
        }
        let request = request.body(Full::new(body))?;
        let response = if let Some(addr) = self.target.strip_prefix("http://") {
            let addr = addr.trim_end_matches('/');
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connecting to reauth serve at {}: {e}", self.target))?;
            send(stream, request).await?
        } else {
            let path = self.target.strip_prefix("unix:").unwrap_or(&self.target);
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| format!("connecting to reauth serve at {path}: {e}"))?;
            send(stream, request).await?
        };
        Ok(response)
    }
}

async fn send<S>(stream: S, request: http::Request<Full<Bytes>>) -> Result<(u16, Value), BoxError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = http_body_util::Limited::new(response.into_body(), 1 << 20)
        .collect()
        .await?
        .to_bytes();
    conn.abort();
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Ok((status, value))
}

fn remote_error(status: u16, body: &Value) -> BoxError {
    let message = body["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("reauth serve answered HTTP {status}"));
    message.into()
}

impl Backend {
    /// A backend from the adapters' common options: `server` (a socket path or
    /// `http://…`) wins over `config`.
    pub fn open(
        config: &Path,
        server: Option<&str>,
        api_token_file: Option<&Path>,
    ) -> Result<Backend, BoxError> {
        match server {
            Some(target) => {
                let token = match api_token_file {
                    Some(f) => Some(Secret::new(
                        std::fs::read_to_string(f)
                            .map_err(|e| format!("reading the API token {}: {e}", f.display()))?
                            .trim()
                            .to_string(),
                    )),
                    None => None,
                };
                Ok(Backend::Remote(Client::new(target, token)))
            }
            None => Ok(Backend::Local(Host::from_config_file(config)?)),
        }
    }

    /// The credential for `request`.
    pub async fn get(
        &self,
        provider: &str,
        request: &WireRequest,
    ) -> Result<WireCredentials, BoxError> {
        match self {
            Backend::Local(host) => {
                let c = host
                    .get_credentials(provider, &Request::from(request.clone()))
                    .await?;
                Ok(WireCredentials::from(&c))
            }
            Backend::Remote(client) => {
                let path = format!("/v1/providers/{provider}/credentials");
                let (status, body) = client.post(&path, &serde_json::to_value(request)?).await?;
                if status != 200 {
                    return Err(remote_error(status, &body));
                }
                Ok(serde_json::from_value(body)?)
            }
        }
    }

    /// Report that a server rejected `credential`; the fresh credential if the
    /// provider decided refresh-and-retry, `None` otherwise.
    pub async fn rejected(
        &self,
        provider: &str,
        request: &WireRequest,
        credential: &WireCredentials,
        error: WireSecurityError,
    ) -> Result<Option<WireCredentials>, BoxError> {
        match self {
            Backend::Local(host) => {
                let req = Request::from(request.clone());
                let decision = host
                    .handle_security_error(
                        provider,
                        &req,
                        &credential.clone().into(),
                        &SecurityError::from(error),
                    )
                    .await?;
                if decision != Decision::RefreshAndRetry {
                    return Ok(None);
                }
                let req = Request {
                    reason: crate::types::Reason::AfterSecurityError,
                    ..req
                };
                let c = host.get_credentials(provider, &req).await?;
                Ok(Some(WireCredentials::from(&c)))
            }
            Backend::Remote(client) => {
                let path = format!("/v1/providers/{provider}/security-errors");
                let body = json!({"request": request, "credential": credential, "error": error});
                let (status, body) = client.post(&path, &body).await?;
                if status != 200 {
                    return Err(remote_error(status, &body));
                }
                match body.get("credentials") {
                    Some(c) => Ok(Some(serde_json::from_value(c.clone())?)),
                    None => Ok(None),
                }
            }
        }
    }
}

fn unauthorized(code: &str, message: &str) -> WireSecurityError {
    WireSecurityError {
        kind: WireErrorKind::Unauthorized,
        status: Some(401),
        code: Some(code.to_string()),
        message: Some(message.to_string()),
    }
}

fn token_of(c: &WireCredentials) -> Result<&str, BoxError> {
    match &c.credential {
        WireCredential::Bearer { token } => Ok(token),
        _ => Err("this adapter needs a bearer token, and the provider returned another kind of credential".into()),
    }
}

// ---------------------------------------------------------------------------
// kubectl exec credential plugin

/// The per-kubectl-process marker directory (`$XDG_RUNTIME_DIR/reauth/kubectl`,
/// else `/tmp/reauth-<uid>/kubectl`), private to the user.
fn marker_dir() -> PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let uid = std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("Uid:"))
                        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
                })
                .unwrap_or_else(|| "0".into());
            std::env::temp_dir().join(format!("reauth-{uid}"))
        });
    base.join("reauth").join("kubectl")
}

/// `<ppid>-<start time>` of the parent (kubectl): unique per process even when
/// PIDs are reused.
fn parent_identity() -> Option<String> {
    let ppid = std::os::unix::process::parent_id();
    let stat = std::fs::read_to_string(format!("/proc/{ppid}/stat")).ok()?;
    // Field 22 (starttime), counted after the parenthesised command name.
    let after = stat.rsplit_once(')')?.1;
    let start = after.split_whitespace().nth(19)?;
    Some(format!("{ppid}-{start}"))
}

fn fingerprint(token: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// kubectl's exec credential plugin. client-go runs it when it has no token, when
/// the token's `expirationTimestamp` passed, and again after the API server
/// answered 401. A second run by the same kubectl process that would get the token
/// this process already has is that 401: the token is reported as rejected and a
/// fresh one is returned.
pub async fn kubectl(
    backend: &Backend,
    provider: &str,
    out: &mut dyn Write,
) -> Result<(), BoxError> {
    let api_version = match std::env::var("KUBERNETES_EXEC_INFO") {
        Ok(info) if !info.trim().is_empty() => {
            let info: Value = serde_json::from_str(&info)
                .map_err(|e| format!("KUBERNETES_EXEC_INFO is not JSON: {e}"))?;
            info["apiVersion"]
                .as_str()
                .unwrap_or("client.authentication.k8s.io/v1")
                .to_string()
        }
        _ => "client.authentication.k8s.io/v1".to_string(),
    };
    if !matches!(
        api_version.as_str(),
        "client.authentication.k8s.io/v1" | "client.authentication.k8s.io/v1beta1"
    ) {
        return Err(format!("unsupported ExecCredential apiVersion `{api_version}`").into());
    }
    let request = WireRequest::default();
    let mut credentials = backend.get(provider, &request).await?;
    let marker = parent_identity().map(|id| marker_dir().join(id));
    let current = fingerprint(token_of(&credentials)?);
    if let Some(marker) = &marker
        && std::fs::read_to_string(marker).is_ok_and(|f| f == current)
    {
        tracing::info!(
            provider,
            "kubectl asked again for the token it has: the API server rejected it"
        );
        let error = unauthorized(
            "kubectl-retry",
            "kubectl re-ran the exec plugin after a 401",
        );
        if let Some(fresh) = backend
            .rejected(provider, &request, &credentials, error)
            .await?
        {
            credentials = fresh;
        }
    }
    let token = token_of(&credentials)?.to_string();
    if let Some(marker) = &marker {
        remember(marker, &fingerprint(&token));
    }
    let mut status = json!({ "token": token });
    if let Some(at) = &credentials.expires_at {
        status["expirationTimestamp"] = json!(at);
    }
    let document = json!({"apiVersion": api_version, "kind": "ExecCredential", "status": status});
    writeln!(out, "{document}")?;
    Ok(())
}

/// Write `content` to `marker` (0600, in a 0700 directory); best effort.
fn remember(marker: &Path, content: &str) {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    if let Some(dir) = marker.parent() {
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir);
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(marker)
    {
        let _ = f.write_all(content.as_bytes());
    }
}

// ---------------------------------------------------------------------------
// git credential helper

/// Read git's `key=value` lines until a blank line or EOF.
fn read_attributes(input: &mut dyn BufRead) -> Result<Vec<(String, String)>, BoxError> {
    let mut attributes = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if input.read_line(&mut line)? == 0 {
            break;
        }
        let l = line.trim_end_matches(['\n', '\r']);
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once('=') {
            attributes.push((k.to_string(), v.to_string()));
        }
    }
    Ok(attributes)
}

/// `(username, password)` of a credential; a bearer token is the password of
/// `bearer_username`.
fn user_and_secret(
    c: &WireCredentials,
    bearer_username: &str,
) -> Result<(String, String), BoxError> {
    match &c.credential {
        WireCredential::Basic { username, password } => Ok((username.clone(), password.clone())),
        WireCredential::Bearer { token } => Ok((bearer_username.to_string(), token.clone())),
        WireCredential::Headers { .. } => {
            Err("header credentials have no username/password form for this tool".into())
        }
    }
}

/// git's credential helper protocol: `get` prints `username`, `password` and
/// `password_expiry_utc`; `erase` (git got a 401 with them) reports the credential
/// as rejected if it is still the current one (compare-and-invalidate); `store` is
/// acknowledged (reauth is the source of truth).
pub async fn git(
    backend: &Backend,
    provider: &str,
    operation: &str,
    bearer_username: &str,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<(), BoxError> {
    let attributes = read_attributes(input)?;
    let request = WireRequest::default();
    match operation {
        "get" => {
            let c = backend.get(provider, &request).await?;
            let (username, password) = user_and_secret(&c, bearer_username)?;
            if username.contains('\n') || password.contains('\n') {
                return Err("credential contains a newline; git's protocol cannot carry it".into());
            }
            writeln!(out, "username={username}")?;
            writeln!(out, "password={password}")?;
            if let Some(at) = c.expires_at_unix {
                writeln!(out, "password_expiry_utc={at}")?;
            }
        }
        "erase" => {
            let given = attributes
                .iter()
                .find(|(k, _)| k == "password")
                .map(|(_, v)| v);
            let current = backend.get(provider, &request).await?;
            let (_, password) = user_and_secret(&current, bearer_username)?;
            if given == Some(&password) {
                let error = unauthorized("git-erase", "git reported the credential as rejected");
                backend
                    .rejected(provider, &request, &current, error)
                    .await?;
            } else {
                tracing::info!(
                    provider,
                    "git erase for a credential that is no longer current; nothing to do"
                );
            }
        }
        "store" => {}
        other => {
            return Err(
                format!("unknown git credential operation `{other}` (get, store, erase)").into(),
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// docker credential helper

/// docker's credential helper protocol (`docker-credential-<name> get|store|erase|list`).
/// A bearer token is returned with Username `<token>` (docker's identity-token
/// convention); `list` reports the registries given with `--registry`.
pub async fn docker(
    backend: &Backend,
    provider: &str,
    operation: &str,
    registries: &[String],
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<(), BoxError> {
    let mut stdin = String::new();
    if operation != "list" {
        input.read_to_string(&mut stdin)?;
    }
    let request = WireRequest::default();
    let creds_of = |c: &WireCredentials| -> Result<(String, String), BoxError> {
        match &c.credential {
            WireCredential::Bearer { token } => Ok(("<token>".to_string(), token.clone())),
            _ => user_and_secret(c, "<token>"),
        }
    };
    match operation {
        "get" => {
            let server = stdin.trim();
            if server.is_empty() {
                return Err("docker sent no server URL on stdin".into());
            }
            let c = backend.get(provider, &request).await?;
            let (username, secret) = creds_of(&c)?;
            writeln!(
                out,
                "{}",
                json!({"ServerURL": server, "Username": username, "Secret": secret})
            )?;
        }
        "erase" => {
            let current = backend.get(provider, &request).await?;
            let error = unauthorized("docker-erase", "docker erased the credential");
            backend
                .rejected(provider, &request, &current, error)
                .await?;
        }
        "store" => {
            let _: Value = serde_json::from_str(&stdin)
                .map_err(|e| format!("docker store: stdin is not JSON: {e}"))?;
        }
        "list" => {
            let c = backend.get(provider, &request).await?;
            let (username, _) = creds_of(&c)?;
            let list: serde_json::Map<String, Value> = registries
                .iter()
                .map(|r| (r.clone(), json!(username)))
                .collect();
            writeln!(out, "{}", Value::Object(list))?;
        }
        other => {
            return Err(format!(
                "unknown docker credential operation `{other}` (get, store, erase, list)"
            )
            .into());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// AWS credential_process

/// The AWS CLI/SDK `credential_process` output (Version 1). The provider returns
/// either basic credentials (username = access key id, password = secret access
/// key) or headers `aws-access-key-id`, `aws-secret-access-key` and optionally
/// `aws-session-token`.
pub async fn aws(backend: &Backend, provider: &str, out: &mut dyn Write) -> Result<(), BoxError> {
    let c = backend.get(provider, &WireRequest::default()).await?;
    let (key_id, secret, session) = match &c.credential {
        WireCredential::Basic { username, password } => (username.clone(), password.clone(), None),
        WireCredential::Headers { headers } => {
            let find = |name: &str| {
                headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.clone())
            };
            (
                find("aws-access-key-id").ok_or("headers credential lacks aws-access-key-id")?,
                find("aws-secret-access-key")
                    .ok_or("headers credential lacks aws-secret-access-key")?,
                find("aws-session-token"),
            )
        }
        WireCredential::Bearer { .. } => {
            return Err("AWS credential_process needs an access key pair (basic or aws-* headers), not a bearer token".into());
        }
    };
    let mut document = json!({"Version": 1, "AccessKeyId": key_id, "SecretAccessKey": secret});
    if let Some(s) = session {
        document["SessionToken"] = json!(s);
    }
    if let Some(at) = &c.expires_at {
        document["Expiration"] = json!(at);
    }
    writeln!(out, "{document}")?;
    Ok(())
}
