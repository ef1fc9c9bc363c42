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

use crate::BoxError;
use crate::host::Host;
use crate::secret::Secret;
use crate::types::{Decision, Request};
use crate::wire::{WireCredential, WireCredentials, WireRequest, WireSecurityError};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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

/// A client of the sidecar API (`Debug` shows the target, never the token).
#[derive(Debug)]
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
                        &crate::types::Credentials::try_from(credential.clone())?,
                        &error.into_security_error(host.now()),
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
        kind: reauth::SecurityErrorKind::Unauthorized,
        status: Some(401),
        code: Some(code.to_string()),
        message: Some(message.to_string()),
        www_authenticate: None,
        retry_after: None,
    }
}

fn token_of(c: &WireCredentials) -> Result<&str, BoxError> {
    match &c.credential {
        WireCredential::Bearer { token } => Ok(token),
        _ => Err("this adapter needs a bearer token, and the provider returned another kind of credential".into()),
    }
}

// ---------------------------------------------------------------------------
// The adapters' ledger: what a tool process was given, what was reported

/// Unix seconds now.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A process, identified so that a reused PID is a different process, and a
/// process that `exec`ed another program is a different caller.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ProcessId {
    /// The PID.
    pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    start: u64,
    /// `device:inode` of the program the process runs (`/proc/<pid>/exe`); it
    /// changes when the process `exec`s another program (the gcloud kubectl
    /// dispatcher `exec`s the real kubectl).
    exe: Option<String>,
}

impl ProcessId {
    /// The identity of process `pid`, if it runs.
    fn of(pid: u32) -> Option<ProcessId> {
        use std::os::unix::fs::MetadataExt as _;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Field 22 (starttime), counted after the parenthesised command name.
        let after = stat.rsplit_once(')')?.1;
        let start = after.split_whitespace().nth(19)?.parse().ok()?;
        let exe = std::fs::metadata(format!("/proc/{pid}/exe"))
            .ok()
            .map(|m| format!("{}:{}", m.dev(), m.ino()));
        Some(ProcessId { pid, start, exe })
    }

    /// The process that ran this adapter (kubectl, docker, a shell).
    fn parent() -> Option<ProcessId> {
        ProcessId::of(std::os::unix::process::parent_id())
    }

    /// Whether this process still runs (same PID, same start time).
    fn alive(&self) -> bool {
        ProcessId::of(self.pid).is_some_and(|p| p.start == self.start)
    }
}

/// What an adapter handed to one tool process.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Handed {
    /// `kubectl` (a token was handed out) or `docker-erase` (an erase was handled).
    tool: String,
    /// The tool process.
    process: ProcessId,
    /// Fingerprint of the credential ([`fingerprint`]).
    credential: String,
    /// The expiry handed with it (Unix seconds), if any.
    expires: Option<u64>,
    /// When (Unix seconds).
    at: u64,
}

/// A credential the adapters reported as rejected.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Reported {
    /// Fingerprint of the credential ([`fingerprint`]).
    credential: String,
    /// When (Unix seconds).
    at: u64,
}

/// The adapters' memory between runs: one small JSON file per user
/// (`$XDG_RUNTIME_DIR/reauth/adapters.json`, else `/tmp/reauth-<uid>/reauth/…`,
/// in a 0700 directory), rewritten under a file lock by each run that needs it.
/// It is bounded: entries of processes that ended are dropped at every write, and
/// at most [`Ledger::MAX_ENTRIES`] of each kind are kept. Credentials appear only
/// as fingerprints.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Ledger {
    #[serde(default)]
    handed: Vec<Handed>,
    #[serde(default)]
    reported: Vec<Reported>,
}

impl Ledger {
    const MAX_ENTRIES: usize = 64;
    /// How long a reported credential is remembered (longer than any token
    /// handed to a tool is used).
    const REPORTED_FOR: u64 = 24 * 3600;

    /// The ledger's directory, if it is private to this user.
    fn dir() -> Option<PathBuf> {
        use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
        let uid = rustix::process::geteuid().as_raw();
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join(format!("reauth-{uid}")));
        let dir = base.join("reauth");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .ok()?;
        // Under a shared /tmp, someone else may have created these first.
        for d in [&base, &dir] {
            let m = std::fs::symlink_metadata(d).ok()?;
            if !m.is_dir() || m.uid() != uid || (d == &dir && m.mode() & 0o077 != 0) {
                tracing::warn!(
                    dir = %d.display(),
                    "the adapters' state directory is not private to this user; not using it"
                );
                return None;
            }
        }
        // Versions before the ledger left one marker file per kubectl process here.
        let _ = std::fs::remove_dir_all(dir.join("kubectl"));
        Some(dir)
    }

    /// Run `f` on the ledger under its lock and write it back (pruned). `None` when
    /// the ledger is not available: callers then act as if nothing was recorded.
    fn update<R>(f: impl FnOnce(&mut Ledger) -> R) -> Option<R> {
        use std::io::{Read as _, Seek as _};
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = Ledger::dir()?.join("adapters.json");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .ok()?;
        file.lock().ok()?;
        let mut text = String::new();
        let mut ledger: Ledger = match file.read_to_string(&mut text) {
            // A torn or foreign file reads as empty: the adapters then report nothing.
            Ok(_) => serde_json::from_str(&text).unwrap_or_default(),
            Err(_) => Ledger::default(),
        };
        let result = f(&mut ledger);
        ledger.prune(unix_now(), |p| p.alive());
        let bytes = serde_json::to_vec(&ledger).ok()?;
        file.set_len(0).ok()?;
        file.rewind().ok()?;
        file.write_all(&bytes).ok()?;
        Some(result)
    }

    /// Drop entries of processes that ended and old reports; keep the newest
    /// [`Ledger::MAX_ENTRIES`] of each.
    fn prune(&mut self, now: u64, alive: impl Fn(&ProcessId) -> bool) {
        self.handed.retain(|h| alive(&h.process));
        self.reported
            .retain(|r| now.saturating_sub(r.at) < Ledger::REPORTED_FOR);
        let excess = self.handed.len().saturating_sub(Ledger::MAX_ENTRIES);
        self.handed.drain(..excess);
        let excess = self.reported.len().saturating_sub(Ledger::MAX_ENTRIES);
        self.reported.drain(..excess);
    }

    /// Whether `credential` was reported as rejected already.
    fn was_reported(&self, credential: &str) -> bool {
        self.reported.iter().any(|r| r.credential == credential)
    }

    /// Record a report of `credential`; false if it was reported already (so two
    /// processes racing to report the same credential report it once).
    fn report(&mut self, credential: &str, now: u64) -> bool {
        if self.was_reported(credential) {
            return false;
        }
        self.reported.push(Reported {
            credential: credential.to_string(),
            at: now,
        });
        true
    }

    /// The last entry `tool` recorded for `process`.
    fn last(&self, tool: &str, process: &ProcessId) -> Option<&Handed> {
        self.handed
            .iter()
            .rev()
            .find(|h| h.tool == tool && &h.process == process)
    }

    /// Record that `tool` handed `credential` to `process` (replacing its entry).
    fn record(
        &mut self,
        tool: &str,
        process: &ProcessId,
        credential: &str,
        expires: Option<u64>,
        now: u64,
    ) {
        self.handed
            .retain(|h| !(h.tool == tool && &h.process == process));
        self.handed.push(Handed {
            tool: tool.to_string(),
            process: process.clone(),
            credential: credential.to_string(),
            expires,
            at: now,
        });
    }

    /// Whether a kubectl run by `process` for `credential` may be client-go's
    /// re-run after a 401: the same process (same PID, start time and program)
    /// was handed this very credential, its `expirationTimestamp` has not been
    /// reached (else client-go re-runs for the expiry), and it was not reported yet.
    fn kubectl_rerun(&self, process: &ProcessId, credential: &str, now: u64) -> bool {
        self.last(KUBECTL, process)
            .is_some_and(|h| h.credential == credential && h.expires.is_none_or(|e| now < e))
            && !self.was_reported(credential)
    }
}

/// Fingerprint of a credential for the ledger (truncated SHA-256: it identifies,
/// it does not reveal).
fn fingerprint(secret: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(secret.as_bytes())[..16])
}

// ---------------------------------------------------------------------------
// kubectl exec credential plugin

const KUBECTL: &str = "kubectl";

/// How long the check against the API server may take.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// kubectl's exec credential plugin.
///
/// client-go runs the plugin when it has no token, when the token's
/// `expirationTimestamp` passed, and again after the API server answered 401 —
/// but nothing in the environment tells these runs apart, and a process can run
/// the plugin twice for other reasons (the gcloud kubectl dispatcher probes the
/// server, then `exec`s the real kubectl in the same process). So a second run is
/// only a *suspicion*; the adapter reports a rejection only when it is confirmed:
///
/// 1. client-go ran it (`KUBERNETES_EXEC_INFO` is set; a shell running the adapter
///    never triggers anything), and the same process (PID, start time and program)
///    was handed this very token, which has not reached its
///    `expirationTimestamp` (see `Ledger::kubectl_rerun`);
/// 2. the API server itself answers 401 to the token: the adapter sends one
///    `GET <server>/version` with it, to the server and CA that kubectl uses
///    (`provideClusterInfo: true` in the kubeconfig hands them over; without it,
///    no check and no report);
/// 3. the token was not reported before (at most one forced refresh per token,
///    whoever asks), and the host's compare-and-invalidate drops it only if it is
///    still the cached one.
pub async fn kubectl(
    backend: &Backend,
    provider: &str,
    out: &mut dyn Write,
) -> Result<(), BoxError> {
    let info: Option<Value> = match std::env::var("KUBERNETES_EXEC_INFO") {
        Ok(info) if !info.trim().is_empty() => Some(
            serde_json::from_str(&info)
                .map_err(|e| format!("KUBERNETES_EXEC_INFO is not JSON: {e}"))?,
        ),
        _ => None,
    };
    let api_version = info
        .as_ref()
        .and_then(|i| i["apiVersion"].as_str())
        .unwrap_or("client.authentication.k8s.io/v1")
        .to_string();
    if !matches!(
        api_version.as_str(),
        "client.authentication.k8s.io/v1" | "client.authentication.k8s.io/v1beta1"
    ) {
        return Err(format!("unsupported ExecCredential apiVersion `{api_version}`").into());
    }
    let request = WireRequest::default();
    let mut credentials = backend.get(provider, &request).await?;
    // Only a run by client-go can be a re-run after a 401.
    let caller = info.as_ref().and_then(|_| ProcessId::parent());
    if let (Some(info), Some(caller)) = (&info, &caller) {
        let token = token_of(&credentials)?.to_string();
        let current = fingerprint(&token);
        let suspect =
            Ledger::update(|l| l.kubectl_rerun(caller, &current, unix_now())).unwrap_or(false);
        if suspect {
            match probe(&info["spec"]["cluster"], &token).await {
                Probe::Rejected => {
                    if Ledger::update(|l| l.report(&current, unix_now())).unwrap_or(false) {
                        tracing::info!(
                            provider,
                            "kubectl re-ran the plugin and the API server rejects the token: reporting it"
                        );
                        let error = unauthorized(
                            "kubectl-retry",
                            "the API server answered 401 to the token kubectl holds",
                        );
                        if let Some(fresh) = backend
                            .rejected(provider, &request, &credentials, error)
                            .await?
                        {
                            credentials = fresh;
                        }
                    }
                }
                Probe::Accepted(status) => tracing::info!(
                    provider,
                    status,
                    "kubectl re-ran the plugin but the API server accepts the token: no rejection to report"
                ),
                Probe::Unknown(why) => tracing::info!(
                    provider,
                    "kubectl re-ran the plugin; not checked against the API server ({why}): no rejection reported"
                ),
            }
        }
        let expires = credentials.expires_at_unix;
        let handed = fingerprint(token_of(&credentials)?);
        Ledger::update(|l| l.record(KUBECTL, caller, &handed, expires, unix_now()));
    }
    let token = token_of(&credentials)?;
    let mut status = json!({ "token": token });
    // Whole seconds, rounded down (wire::WireCredentials), so kubectl never holds
    // the token past its real expiry.
    if let Some(at) = &credentials.expires_at {
        status["expirationTimestamp"] = json!(at);
    }
    let document = json!({"apiVersion": api_version, "kind": "ExecCredential", "status": status});
    writeln!(out, "{document}")?;
    Ok(())
}

/// What the API server says about a token.
#[derive(Debug, PartialEq)]
enum Probe {
    /// HTTP 401: the token is rejected.
    Rejected,
    /// Any other status (200, 403, 404…): the token authenticates.
    Accepted(u16),
    /// Not asked, or no answer.
    Unknown(String),
}

/// Ask the API server in `cluster` (`spec.cluster` of `KUBERNETES_EXEC_INFO`)
/// whether it accepts `token`: `GET <server>/version` over TLS verified with the
/// cluster's CA (else the system's roots). Never over plain HTTP, unverified TLS
/// or a proxy.
async fn probe(cluster: &Value, token: &str) -> Probe {
    if cluster.is_null() {
        return Probe::Unknown("no cluster info: set `provideClusterInfo: true`".into());
    }
    if cluster["insecure-skip-tls-verify"].as_bool() == Some(true) {
        return Probe::Unknown("the cluster skips TLS verification".into());
    }
    if cluster["proxy-url"].as_str().is_some_and(|p| !p.is_empty()) {
        return Probe::Unknown("the cluster is reached through a proxy".into());
    }
    match tokio::time::timeout(PROBE_TIMEOUT, probe_tls(cluster, token)).await {
        Ok(Ok(401)) => Probe::Rejected,
        Ok(Ok(status)) => Probe::Accepted(status),
        Ok(Err(e)) => Probe::Unknown(e.to_string()),
        Err(_) => Probe::Unknown(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
}

async fn probe_tls(cluster: &Value, token: &str) -> Result<u16, BoxError> {
    use base64::Engine as _;
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
    let server = cluster["server"].as_str().ok_or("no server URL")?;
    let uri: http::Uri = server
        .parse()
        .map_err(|_| "the server URL does not parse")?;
    if uri.scheme_str() != Some("https") {
        return Err("the server URL is not https".into());
    }
    let host = uri.host().ok_or("the server URL has no host")?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let name = cluster["tls-server-name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .unwrap_or(&host)
        .to_string();
    let pem = match cluster["certificate-authority-data"].as_str() {
        Some(b64) if !b64.is_empty() => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| "certificate-authority-data is not base64")?,
        _ => {
            let bundle = std::env::var_os("SSL_CERT_FILE")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
            std::fs::read(&bundle).map_err(|e| {
                format!("no CA data, and the system roots {}: {e}", bundle.display())
            })?
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err("no usable CA certificate".into());
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = ServerName::try_from(name).map_err(|_| "not a valid TLS server name")?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let tls = connector.connect(name, tcp).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    let conn = tokio::spawn(conn);
    let path = format!("{}/version", uri.path().trim_end_matches('/'));
    let request = http::Request::get(path)
        .header(
            http::header::HOST,
            uri.authority().map_or(host.as_str(), |a| a.as_str()),
        )
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, "reauth-kubectl-credential")
        .body(http_body_util::Empty::<Bytes>::new())?;
    let status = sender.send_request(request).await?.status().as_u16();
    conn.abort();
    Ok(status)
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

/// What docker-credential-helpers print on stdout (exit code 1) for a server they
/// hold nothing for; docker then goes on without credentials.
pub const DOCKER_NOT_FOUND: &str = "credentials not found in native keychain";

const DOCKER_ERASE: &str = "docker-erase";

/// How long an `erase` by one docker process covers its next ones (`docker
/// logout` calls `erase` once per form of the server name).
const DOCKER_ERASE_WINDOW: u64 = 60;

/// The registry a docker server URL names, reduced to what identifies it: the
/// host in lower case with its port as given, and the path without trailing
/// slashes or docker's `/v1` / `/v2` API suffix; the scheme (`https://` or
/// `http://`) is optional and ignored, as docker itself ignores it. Docker Hub's
/// names (`docker.io`, `index.docker.io`, `registry-1.docker.io`) are one registry.
/// `None` for anything else: another scheme, user info, a query, a fragment,
/// whitespace or an empty host never match.
pub fn docker_registry(server: &str) -> Option<String> {
    let server = server.trim();
    let rest = match server.split_once("://") {
        Some((scheme, rest))
            if scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("http") =>
        {
            rest
        }
        Some(_) => return None,
        None => server,
    };
    if rest.is_empty()
        || rest
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '@' | '?' | '#' | '\\'))
    {
        return None;
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let authority = authority.to_ascii_lowercase();
    let (host, port) = match authority.strip_prefix('[') {
        // An IPv6 literal: `[…]` then an optional port.
        Some(v6) => {
            let (inner, after) = v6.split_once(']')?;
            (
                inner,
                after.strip_prefix(':').or(after.is_empty().then_some(""))?,
            )
        }
        None => authority.split_once(':').unwrap_or((&authority, "")),
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'));
    let port_ok = port.bytes().all(|b| b.is_ascii_digit()) && !authority.ends_with(':');
    if !host_ok || !port_ok {
        return None;
    }
    let mut path = path.trim_end_matches('/');
    if matches!(path, "/v1" | "/v2") {
        path = "";
    }
    let authority = match authority.as_str() {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        _ => authority,
    };
    Some(format!("{authority}{path}"))
}

/// docker's credential helper protocol (`docker-credential-<name> get|store|erase|list`).
///
/// - `get` hands the credential out only for a server that is one of `registries`
///   (`--registry`, compared with [`docker_registry`]); for any other server it
///   answers [`DOCKER_NOT_FOUND`] with exit code 1, as a real helper does, so with
///   `credsStore` the credential never reaches another registry. A bearer token is
///   returned with Username `<token>` (docker's identity-token convention).
/// - `erase` (`docker logout`; docker never calls it after a 401) reports the
///   current credential as rejected, once: an erase for another server does
///   nothing, the further erases of the same docker process within a minute do
///   nothing, and a credential already reported is not reported again.
/// - `store` is acknowledged (reauth is the source of truth); `list` reports
///   `registries`.
pub async fn docker(
    backend: &Backend,
    provider: &str,
    operation: &str,
    registries: &[String],
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<ExitCode, BoxError> {
    let mut known = Vec::with_capacity(registries.len());
    for r in registries {
        known.push(docker_registry(r).ok_or_else(|| {
            format!(
                "--registry `{r}` is not a registry URL (host[:port][/path], optionally https://)"
            )
        })?);
    }
    let ours = |server: &str| docker_registry(server).is_some_and(|s| known.contains(&s));
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
            if !ours(server) {
                if known.is_empty() {
                    tracing::warn!(
                        provider,
                        "docker-credential: no --registry given, so no server gets the credential"
                    );
                } else {
                    tracing::info!(
                        provider,
                        "docker asked for a server that is not one of --registry: not found"
                    );
                }
                writeln!(out, "{DOCKER_NOT_FOUND}")?;
                return Ok(ExitCode::from(1));
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
            let server = stdin.trim();
            if !ours(server) {
                tracing::info!(
                    provider,
                    "docker erase for a server that is not one of --registry: nothing to do"
                );
                return Ok(ExitCode::SUCCESS);
            }
            let caller = ProcessId::parent();
            let now = unix_now();
            let repeated = caller.as_ref().is_some_and(|p| {
                Ledger::update(|l| {
                    l.last(DOCKER_ERASE, p)
                        .is_some_and(|h| now.saturating_sub(h.at) < DOCKER_ERASE_WINDOW)
                })
                .unwrap_or(false)
            });
            if repeated {
                tracing::info!(
                    provider,
                    "docker erase again from the same docker process: already done"
                );
                return Ok(ExitCode::SUCCESS);
            }
            let current = backend.get(provider, &request).await?;
            let (_, secret) = creds_of(&current)?;
            let print = fingerprint(&secret);
            let first = Ledger::update(|l| {
                if let Some(p) = &caller {
                    l.record(DOCKER_ERASE, p, &print, None, now);
                }
                l.report(&print, now)
            })
            // Without a ledger, compare-and-invalidate in the host is the bound.
            .unwrap_or(true);
            if first {
                let error = unauthorized("docker-erase", "docker erased the credential");
                backend
                    .rejected(provider, &request, &current, error)
                    .await?;
            } else {
                tracing::info!(
                    provider,
                    "docker erase for a credential already reported: nothing to do"
                );
            }
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
    Ok(ExitCode::SUCCESS)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn process(pid: u32, start: u64, exe: &str) -> ProcessId {
        ProcessId {
            pid,
            start,
            exe: Some(exe.to_string()),
        }
    }

    #[test]
    fn docker_registry_names_compare_strictly() {
        let same = |a: &str, b: &str| {
            let (a, b) = (docker_registry(a), docker_registry(b));
            a.is_some() && a == b
        };
        assert!(same("https://registry.example.com", "registry.example.com"));
        assert!(same(
            "registry.example.com/",
            "HTTPS://Registry.Example.com/v2/"
        ));
        assert!(same(
            "http://registry.example.com:5000",
            "registry.example.com:5000"
        ));
        assert!(same("https://index.docker.io/v1/", "docker.io"));
        assert!(same("registry-1.docker.io", "index.docker.io"));
        assert!(same("[::1]:5000", "https://[::1]:5000/"));
        // Another host, port or path is another registry.
        assert!(!same(
            "registry.example.com",
            "registry.example.com.evil.test"
        ));
        assert!(!same(
            "registry.example.com",
            "evil.test/registry.example.com"
        ));
        assert!(!same("registry.example.com", "registry.example.com:5000"));
        assert!(!same("registry.example.com/team", "registry.example.com"));
        assert!(!same("docker.io", "ghcr.io"));
        // Nothing odd matches anything.
        for bad in [
            "",
            "   ",
            "ftp://registry.example.com",
            "user@registry.example.com",
            "https://user:pw@registry.example.com",
            "registry.example.com?x=1",
            "registry.example.com#x",
            "registry.example.com:",
            "registry.example.com:abc",
            "https://",
            "/v2/",
            "reg istry.example.com",
            "a:1:2",
        ] {
            assert_eq!(docker_registry(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_kubectl_rerun_is_suspected_only_for_the_same_process_program_and_unexpired_token() {
        let mut l = Ledger::default();
        let kubectl = process(100, 5, "1:1");
        l.record(KUBECTL, &kubectl, "t1", Some(1_000), 900);
        assert!(l.kubectl_rerun(&kubectl, "t1", 950));
        // Expired per the timestamp kubectl holds: client-go re-runs for that.
        assert!(!l.kubectl_rerun(&kubectl, "t1", 1_000));
        // Another token, process, start time (PID reuse) or program (exec).
        assert!(!l.kubectl_rerun(&kubectl, "t2", 950));
        assert!(!l.kubectl_rerun(&process(101, 5, "1:1"), "t1", 950));
        assert!(!l.kubectl_rerun(&process(100, 6, "1:1"), "t1", 950));
        assert!(!l.kubectl_rerun(&process(100, 5, "1:2"), "t1", 950));
        // Once reported, never again, whoever asks.
        assert!(l.report("t1", 950));
        assert!(!l.report("t1", 951));
        assert!(!l.kubectl_rerun(&kubectl, "t1", 950));
    }

    #[test]
    fn the_ledger_stays_bounded_and_forgets_ended_processes() {
        let mut l = Ledger::default();
        for pid in 0..500 {
            l.record(KUBECTL, &process(pid, 1, "1:1"), "t", None, 10);
            l.report(&format!("t{pid}"), 10);
        }
        l.prune(20, |_| true);
        assert_eq!(l.handed.len(), Ledger::MAX_ENTRIES);
        assert_eq!(l.reported.len(), Ledger::MAX_ENTRIES);
        assert_eq!(l.handed.last().unwrap().process.pid, 499, "the newest kept");
        l.prune(20 + Ledger::REPORTED_FOR, |p| p.pid == 499);
        assert_eq!(l.handed.len(), 1);
        assert!(l.reported.is_empty());
        // Re-recording a process replaces its entry.
        l.record(KUBECTL, &process(499, 1, "1:1"), "u", None, 30);
        assert_eq!(l.handed.len(), 1);
        assert_eq!(
            l.last(KUBECTL, &process(499, 1, "1:1")).unwrap().credential,
            "u"
        );
    }

    #[test]
    fn fingerprints_do_not_contain_the_secret() {
        let f = fingerprint("s3cr3t-token");
        assert_eq!(f.len(), 32);
        assert!(!f.contains("s3cr3t"));
        assert_eq!(f, fingerprint("s3cr3t-token"));
    }
}
