//! `reauth test`: the conformance kit. It runs one provider — any language, as the
//! component the host would load — through scenarios against a **scripted fake
//! token endpoint** on loopback, under a **virtual clock** (the host's wall clock,
//! which the guest reads through `wasi:clocks`), and reports pass / fail / skip per
//! scenario.
//!
//! What the kit needs to know about a provider is declared in its manifest,
//! `conformance.toml` (see [`Manifest`]): which endpoint it talks to, its config
//! with `${endpoint}` / `${secret}` placeholders, what to expect of expiry and
//! principal, and which scenarios do not apply (each with the reason).
//!
//! The scenarios ([`SCENARIOS`]):
//! - `first-fetch`: `get-credentials(initial)` returns a credential;
//! - `expiry`: `expires-at` (or a bearer JWT's `exp`) is present and sane — in the
//!   future of the virtual clock, and matching the lifetime the endpoint granted;
//! - `refresh-ahead`: late in the lifetime, `get-credentials(refresh-ahead)` fetches
//!   anew (a new credential with a later expiry), not a replay;
//! - `token-expired`: `handle-security-error(token-expired)` ⇒ `refresh-and-retry`,
//!   and the next fetch returns a new credential;
//! - `forbidden`: `handle-security-error(forbidden)` ⇒ `fail`;
//! - `idp-5xx`: the endpoint answers 503 ⇒ `unavailable` (never `denied`, which
//!   would stop the host from retrying);
//! - `bad-secret`: the endpoint refuses the client's secret ⇒ `denied`;
//! - `egress`: pointed at a host outside `allowed_hosts` the provider gets no
//!   credential and the host never reaches it; across the whole run the provider
//!   never tried a host it was not given;
//! - `rate-limited`: the endpoint answers 429 with `Retry-After: 7` ⇒
//!   `unavailable` carrying those 7 s (contract 0.2; a 0.1.0 provider cannot);
//! - `challenges`: each `[[challenges]]` of the manifest (a server's status,
//!   `WWW-Authenticate` of any scheme, `Retry-After`) classified as the host does
//!   ⇒ the decision the manifest expects (OAuth2 endpoints: an expired Bearer token
//!   ⇒ refresh-and-retry, `insufficient_scope` ⇒ fail, when none are given);
//! - `audience`: a requested audience reaches the endpoint, or the provider refuses
//!   it (`misconfigured`); never a credential for another audience;
//! - `config-schema`: what `describe` declares fits the manifest's config (the host
//!   would refuse a config with an undeclared key, a missing required one or a
//!   value of the wrong type);
//! - `principal-stable`: the principal is the same across the initial fetch and
//!   every refresh;
//! - `deterministic`: two fresh instances at the same virtual time, against the same
//!   endpoint script, return the same credential, expiry and principal.

use crate::clock::ManualClock;
use crate::config::{BreakerConfig, InstancesConfig, LimitsConfig};
use crate::error::Error;
use crate::runtime::egress::HostPattern;
use crate::runtime::{ProviderRuntime, ProviderSpec, Runtime, RuntimeOptions};
use crate::secret::Secret;
use crate::types::{
    Credentials, Decision, ProviderError, Reason, Request, SecurityError, SecurityErrorKind,
};
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Every scenario, in the order they run.
pub const SCENARIOS: &[&str] = &[
    "first-fetch",
    "expiry",
    "refresh-ahead",
    "token-expired",
    "forbidden",
    "idp-5xx",
    "bad-secret",
    "egress",
    "rate-limited",
    "challenges",
    "audience",
    "config-schema",
    "principal-stable",
    "deterministic",
];

/// The `Retry-After` the `rate-limited` scenario's endpoint sends.
pub const RATE_LIMIT_RETRY_AFTER: Duration = Duration::from_secs(7);
/// The audience the `audience` scenario asks for (unless `[request]` names one).
pub const AUDIENCE: &str = "conformance-audience-5d1";

/// The client secret the fake endpoint accepts (`${secret}` in the manifest).
pub const SECRET: &str = "conformance-secret-8c1f";
/// The secret the `bad-secret` scenario gives instead.
pub const WRONG_SECRET: &str = "wrong-secret-77d0";
/// The virtual clock's start: 2031-01-01T00:00:00Z, far from any real "now", so a
/// provider that took time from anywhere but the host would stand out.
pub const T0_UNIX: u64 = 1_924_992_000;

/// What the fake endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndpointKind {
    /// An OAuth2 token endpoint (`POST`, any path; client credentials, refresh
    /// tokens with rotation) with OpenID Connect discovery at
    /// `/.well-known/openid-configuration`.
    Oauth2,
    /// A secrets store answering `GET` with a username and password in
    /// `secret_format`.
    Secret,
    /// The provider talks to nothing (e.g. `static`).
    None,
    /// Anything else (a company STS that is not OAuth2): an authorised request
    /// (one that carries `${secret}` anywhere) gets `[response]`.
    Custom,
}

/// `[response]`: what a `custom` endpoint answers an authorised request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseSpec {
    /// HTTP status. Default 200.
    #[serde(default = "default_status")]
    pub status: u16,
    /// Response headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The body; `${token}` becomes a new token per request, `${expires_in}` the
    /// manifest's `expires_in`, `${expires_at}` the virtual now plus `expires_in`
    /// (RFC 3339, UTC), `${n}` the request's number.
    #[serde(default)]
    pub body: String,
    /// The request must carry a JSON body with `Content-Length` (else 400).
    #[serde(default)]
    pub require_json: bool,
}

fn default_status() -> u16 {
    200
}

/// One `[[challenges]]` entry: how a server rejects the credential, and what the
/// provider must decide.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeCase {
    /// A name for the report.
    pub name: String,
    /// The server's HTTP status. Default 401.
    #[serde(default = "default_challenge_status")]
    pub status: u16,
    /// Its `WWW-Authenticate` value, any scheme.
    pub www_authenticate: Option<String>,
    /// Its `Retry-After` value.
    pub retry_after: Option<String>,
    /// The decision required: `refresh-and-retry`, `fail` or `retry-after`.
    pub expect: ExpectedDecision,
}

fn default_challenge_status() -> u16 {
    401
}

/// A decision a `[[challenges]]` entry requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExpectedDecision {
    /// Drop the credential, fetch anew, retry.
    RefreshAndRetry,
    /// Give up.
    Fail,
    /// Wait, then retry with the same credential.
    RetryAfter,
}

/// The JSON shape of the `secret` endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecretFormat {
    /// `{"username", "password"}`.
    Json,
    /// Vault KV v2: `{"data": {"data": {"username", "password"}}}`.
    VaultKv2,
    /// Vault database static role: `{"data": {"username", "password", "ttl"}}`.
    VaultStaticCreds,
}

/// Whether something must be there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Expectation {
    /// Must be present.
    Required,
    /// May be present; checked when it is.
    Optional,
    /// Must be absent.
    None,
}

/// `[expect]`: what the provider's credentials look like.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// `expires-at` (or a bearer JWT's `exp`). Default: `required` when the
    /// endpoint grants a lifetime (`oauth2`, `vault-static-creds`), else `optional`.
    pub expiry: Option<Expectation>,
    /// `principal`. Default `optional` (it must be stable either way).
    pub principal: Option<Expectation>,
}

/// A provider's `conformance.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The component, relative to the manifest (`--plugin` overrides it).
    pub plugin: Option<PathBuf>,
    /// What the fake endpoint speaks. Default `none`.
    #[serde(default = "default_endpoint")]
    pub endpoint: EndpointKind,
    /// For `endpoint = "secret"`. Default `json`.
    #[serde(default = "default_secret_format")]
    pub secret_format: SecretFormat,
    /// Lifetime the endpoint grants, in seconds (`expires_in`, Vault's `ttl`).
    /// Default 3600.
    #[serde(default = "default_expires_in")]
    pub expires_in: u64,
    /// The provider's config; `${endpoint}` becomes the fake endpoint's base URL
    /// (`http://127.0.0.1:PORT`), `${secret}` the secret it accepts.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Expectations.
    #[serde(default)]
    pub expect: Expect,
    /// Scenarios that do not apply, each with the reason.
    #[serde(default)]
    pub skip: BTreeMap<String, String>,
    /// Sandbox limits for the runs (defaults as in `reauth.toml`, checked the same
    /// way).
    #[serde(default)]
    pub limits: LimitsConfig,
    /// What every fetch asks for (default: the provider's own identity, no scopes,
    /// no audience).
    #[serde(default)]
    pub request: RequestSpec,
    /// For `endpoint = "custom"`: what it answers.
    pub response: Option<ResponseSpec>,
    /// How servers reject the provider's credentials, for the `challenges`
    /// scenario.
    #[serde(default)]
    pub challenges: Vec<ChallengeCase>,
}

/// `[request]`: the subject, scopes and audience of every call the kit makes.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    /// Per-user identity, for providers that issue per-subject credentials.
    pub subject: Option<String>,
    /// Scopes.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Audience / resource.
    pub audience: Option<String>,
}

impl RequestSpec {
    fn request(&self, reason: Reason) -> Request {
        Request {
            subject: self.subject.clone(),
            scopes: self.scopes.clone(),
            audience: self.audience.clone(),
            reason,
        }
    }
}

fn default_endpoint() -> EndpointKind {
    EndpointKind::None
}
fn default_secret_format() -> SecretFormat {
    SecretFormat::Json
}
fn default_expires_in() -> u64 {
    3600
}

impl Default for Manifest {
    fn default() -> Self {
        Manifest {
            plugin: None,
            endpoint: EndpointKind::None,
            secret_format: SecretFormat::Json,
            expires_in: default_expires_in(),
            config: BTreeMap::new(),
            expect: Expect::default(),
            skip: BTreeMap::new(),
            limits: LimitsConfig::default(),
            request: RequestSpec::default(),
            response: None,
            challenges: Vec::new(),
        }
    }
}

/// Why a manifest or target could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ManifestError {
    /// The file (or target) at fault.
    pub path: PathBuf,
    /// What is wrong, naming the key.
    pub message: String,
}

impl Manifest {
    /// Parse `text` (read from `path`, which only names it in errors).
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ManifestError> {
        let err = |message: String| ManifestError {
            path: path.to_path_buf(),
            message,
        };
        let manifest: Manifest =
            toml::from_str(text).map_err(|e| err(e.to_string().trim_end().to_string()))?;
        for name in manifest.skip.keys() {
            if !SCENARIOS.contains(&name.as_str()) {
                return Err(err(format!(
                    "skip.{name}: no such scenario (scenarios: {})",
                    SCENARIOS.join(", ")
                )));
            }
        }
        if !(1..=10 * 365 * 86_400).contains(&manifest.expires_in) {
            return Err(err(
                "expires_in: must be between 1 second and 10 years".into()
            ));
        }
        match (manifest.endpoint, &manifest.response) {
            (EndpointKind::Custom, None) => {
                return Err(err(
                    "response: `endpoint = \"custom\"` needs a [response] table".into(),
                ));
            }
            (EndpointKind::Custom, Some(r)) if !(100..=599).contains(&r.status) => {
                return Err(err("response.status: must be between 100 and 599".into()));
            }
            (EndpointKind::Custom, Some(r)) => {
                for (name, value) in &r.headers {
                    if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                        || http::HeaderValue::from_str(value).is_err()
                    {
                        return Err(err(format!("response.headers.{name}: not a valid header")));
                    }
                }
            }
            (_, Some(_)) => {
                return Err(err("response: only for `endpoint = \"custom\"`".into()));
            }
            _ => {}
        }
        for (i, c) in manifest.challenges.iter().enumerate() {
            if !(100..=599).contains(&c.status) {
                return Err(err(format!(
                    "challenges[{i}].status: must be between 100 and 599"
                )));
            }
        }
        // The limits are checked exactly as in reauth.toml.
        let mut probe = crate::config::ProviderConfig::new("probe.wasm");
        probe.limits = manifest.limits.clone();
        crate::config::validate_provider(
            None,
            "probe",
            &probe,
            &crate::config::RuntimeConfig::default(),
        )
        .map_err(|e| err(e.message.replacen("providers.probe.", "", 1)))?;
        Ok(manifest)
    }

    /// Whether the endpoint grants a lifetime the provider should pass on.
    fn endpoint_lifetime(&self) -> bool {
        match self.endpoint {
            EndpointKind::Oauth2 => true,
            EndpointKind::Secret => self.secret_format == SecretFormat::VaultStaticCreds,
            EndpointKind::None => false,
            EndpointKind::Custom => self.response.as_ref().is_some_and(|r| {
                r.body.contains("${expires_in}") || r.body.contains("${expires_at}")
            }),
        }
    }

    fn expiry(&self) -> Expectation {
        self.expect.expiry.unwrap_or(if self.endpoint_lifetime() {
            Expectation::Required
        } else {
            Expectation::Optional
        })
    }
}

/// Resolve `reauth test`'s target: a directory holding `conformance.toml`, a
/// manifest file, or a component (run with an empty manifest: no endpoint). Returns
/// the manifest and the component's path (`plugin` overrides the manifest's).
pub fn resolve_target(
    target: &Path,
    plugin: Option<&Path>,
) -> Result<(Manifest, PathBuf, PathBuf), ManifestError> {
    let err = |path: &Path, message: String| ManifestError {
        path: path.to_path_buf(),
        message,
    };
    let manifest_path = if target.is_dir() {
        target.join("conformance.toml")
    } else {
        target.to_path_buf()
    };
    let is_wasm = manifest_path.extension().is_some_and(|e| e == "wasm");
    let manifest = if is_wasm {
        Manifest::default()
    } else {
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| err(&manifest_path, format!("cannot read the manifest: {e}")))?;
        Manifest::from_toml(&text, &manifest_path)?
    };
    let base = manifest_path.parent().unwrap_or(Path::new("."));
    let component = match (plugin, is_wasm, &manifest.plugin) {
        (Some(p), _, _) => p.to_path_buf(),
        (None, true, _) => manifest_path.clone(),
        (None, false, Some(p)) => base.join(p),
        (None, false, None) => {
            return Err(err(
                &manifest_path,
                "plugin: no component named (set `plugin` or pass --plugin)".into(),
            ));
        }
    };
    if !component.is_file() {
        return Err(err(
            &component,
            "component not found (build the provider first)".into(),
        ));
    }
    Ok((manifest, manifest_path, component))
}

/// One scenario's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Behaved as required.
    Pass(String),
    /// Did not; says what it did instead.
    Fail(String),
    /// Does not apply; says why.
    Skip(String),
}

/// One row of the report.
#[derive(Debug, Clone)]
pub struct ScenarioResult {
    /// Scenario name (one of [`SCENARIOS`]).
    pub name: &'static str,
    /// What happened.
    pub outcome: Outcome,
    /// How long it took (real time).
    pub elapsed: Duration,
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct Report {
    /// The component tested.
    pub component: PathBuf,
    /// Its SHA-256.
    pub sha256: String,
    /// One row per scenario.
    pub results: Vec<ScenarioResult>,
}

impl Report {
    /// Scenarios that failed.
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Fail(_)))
    }

    /// Scenarios that passed.
    pub fn passed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Pass(_)))
    }

    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.results.iter().filter(|r| f(&r.outcome)).count()
    }

    /// The result of `name`.
    pub fn outcome(&self, name: &str) -> Option<&Outcome> {
        self.results
            .iter()
            .find(|r| r.name == name)
            .map(|r| &r.outcome)
    }

    /// The report as one JSON document (`reauth test --format json`).
    pub fn to_json(&self) -> serde_json::Value {
        let scenarios: Vec<serde_json::Value> = self
            .results
            .iter()
            .map(|r| {
                let (result, detail) = match &r.outcome {
                    Outcome::Pass(d) => ("pass", d),
                    Outcome::Fail(d) => ("fail", d),
                    Outcome::Skip(d) => ("skip", d),
                };
                serde_json::json!({
                    "name": r.name,
                    "result": result,
                    "ms": u64::try_from(r.elapsed.as_millis()).unwrap_or(u64::MAX),
                    "detail": detail,
                })
            })
            .collect();
        serde_json::json!({
            "component": self.component.display().to_string(),
            "sha256": self.sha256,
            "passed": self.passed(),
            "failed": self.failed(),
            "skipped": self.results.len() - self.passed() - self.failed(),
            "scenarios": scenarios,
        })
    }

    /// The pass/fail table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<18} {:<6} {:>7}  detail",
            "scenario", "result", "ms"
        );
        for r in &self.results {
            let (word, detail) = match &r.outcome {
                Outcome::Pass(d) => ("pass", d),
                Outcome::Fail(d) => ("FAIL", d),
                Outcome::Skip(d) => ("skip", d),
            };
            let _ = writeln!(
                out,
                "{:<18} {:<6} {:>7}  {}",
                r.name,
                word,
                r.elapsed.as_millis(),
                detail
            );
        }
        let _ = writeln!(
            out,
            "{} scenarios: {} passed, {} failed, {} skipped",
            self.results.len(),
            self.passed(),
            self.failed(),
            self.results.len() - self.passed() - self.failed()
        );
        out
    }
}

/// Run the scenarios (all, or those named in `only`) against `component`,
/// compiling it into a private temporary directory.
pub async fn run(
    manifest: &Manifest,
    component: &Path,
    only: &[String],
) -> Result<Report, Box<dyn std::error::Error + Send + Sync>> {
    run_with_cache(manifest, component, only, None).await
}

/// [`run`], keeping the compiled component in `artifacts` (a directory of
/// precompiled plugins such as `runtime.cache_dir`) so that the next run loads it
/// instead of compiling it again; `None`: a private temporary directory.
pub async fn run_with_cache(
    manifest: &Manifest,
    component: &Path,
    only: &[String],
    artifacts: Option<&Path>,
) -> Result<Report, Box<dyn std::error::Error + Send + Sync>> {
    for name in only {
        if !SCENARIOS.contains(&name.as_str()) {
            return Err(format!(
                "--scenario {name}: no such scenario (scenarios: {})",
                SCENARIOS.join(", ")
            )
            .into());
        }
    }
    let cache = tempfile::tempdir()?;
    let clock = ManualClock::new(t0());
    let runtime = Runtime::new(
        RuntimeOptions {
            cache_dir: Some(artifacts.unwrap_or(cache.path()).to_path_buf()),
            ..RuntimeOptions::default()
        },
        Arc::new(clock.clone()),
    )?;
    let endpoint = FakeEndpoint::start(manifest, &clock).await?;
    let decoy = FakeEndpoint::start(manifest, &clock).await?;
    let kit = Kit {
        manifest,
        component,
        runtime,
        clock,
        endpoint,
        decoy,
        denied_egress: Mutex::new(0),
    };
    // Compile once (into the kit's private cache), so every scenario's fresh
    // provider loads in milliseconds, and fail early on a component that cannot load.
    let first = kit.load(SECRET, &kit.endpoint)?;
    let sha256 = first.sha256().to_string();
    drop(first);
    let mut results = Vec::new();
    for &name in SCENARIOS {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        let started = Instant::now();
        let outcome = match manifest.skip.get(name) {
            Some(why) => Outcome::Skip(format!("manifest: {why}")),
            None => kit.scenario(name).await,
        };
        results.push(ScenarioResult {
            name,
            outcome,
            elapsed: started.elapsed(),
        });
    }
    kit.endpoint.stop();
    kit.decoy.stop();
    Ok(Report {
        component: component.to_path_buf(),
        sha256,
        results,
    })
}

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(T0_UNIX)
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

struct Kit<'a> {
    manifest: &'a Manifest,
    component: &'a Path,
    runtime: Runtime,
    clock: ManualClock,
    endpoint: FakeEndpoint,
    decoy: FakeEndpoint,
    /// Egress refusals of every provider instance so far (except the `egress`
    /// scenario's deliberate one).
    denied_egress: Mutex<u64>,
}

type Fetched = Result<Credentials, Error>;

impl Kit<'_> {
    /// A fresh provider (fresh in-memory state) whose config points at `endpoint`
    /// with `secret`; only the real endpoint is in its `allowed_hosts`.
    fn load(&self, secret: &str, endpoint: &FakeEndpoint) -> Result<ProviderRuntime, Error> {
        let base = endpoint.base();
        let config: Vec<(String, Secret)> = self
            .manifest
            .config
            .iter()
            .map(|(k, v)| {
                let v = v.replace("${endpoint}", &base).replace("${secret}", secret);
                (k.clone(), Secret::new(v))
            })
            .collect();
        let allowed = match self.manifest.endpoint {
            EndpointKind::None => Vec::new(),
            _ => vec![
                HostPattern::parse(&self.endpoint.addr.to_string())
                    .expect("a socket address is a host pattern"),
            ],
        };
        // Keys whose value carries the kit's secret, or whose name says secret.
        let secret_keys = self
            .manifest
            .config
            .iter()
            .filter(|(k, v)| v.contains("${secret}") || crate::config::is_secret_key(k))
            .map(|(k, _)| k.clone())
            .collect();
        ProviderRuntime::load(
            &self.runtime,
            ProviderSpec {
                name: "under-test".into(),
                plugin: self.component.to_path_buf(),
                sha256: None,
                allowed_hosts: allowed,
                allow_http: false,
                config,
                limits: self.manifest.limits.clone(),
                breaker: {
                    let mut c = BreakerConfig::default();
                    c.faults = 1000;
                    c
                },
                instances: InstancesConfig::default(),
                state_file: None,
                shared_state: false,
                secret_keys,
                credential_keys: Vec::new(),
                rate: reauth::RateConfig::unlimited(),
            },
        )
    }

    /// Reset the endpoint and the clock, and load a fresh provider.
    fn fresh(&self) -> Result<ProviderRuntime, Outcome> {
        self.endpoint.reset();
        self.decoy.reset();
        self.clock.set(t0());
        self.load(SECRET, &self.endpoint)
            .map_err(|e| Outcome::Fail(format!("could not load: {e}")))
    }

    fn done(&self, provider: ProviderRuntime) {
        *self.denied_egress.lock().unwrap_or_else(|e| e.into_inner()) += provider.egress_counts().1;
    }

    async fn fetch(&self, provider: &ProviderRuntime, reason: Reason) -> Fetched {
        let request = self.manifest.request.request(reason);
        provider.get_credentials(&self.runtime, &request).await
    }

    async fn decide(
        &self,
        provider: &ProviderRuntime,
        credentials: &Credentials,
        kind: SecurityErrorKind,
        status: u16,
    ) -> Result<Decision, Error> {
        let mut error = SecurityError::new(kind).status(status);
        if kind == SecurityErrorKind::TokenExpired {
            error = error
                .code("invalid_token")
                .message("the access token expired");
        }
        let request = self.manifest.request.request(Reason::Initial);
        provider
            .handle_security_error(&self.runtime, &request, credentials, &error)
            .await
    }

    fn has_endpoint(&self) -> bool {
        self.manifest.endpoint != EndpointKind::None
    }

    /// Seconds from the virtual now to the credential's effective expiry.
    fn expiry_in(&self, c: &Credentials) -> Option<i64> {
        effective_expiry(c).map(|t| unix(t) - unix(self.clock_now()))
    }

    fn clock_now(&self) -> SystemTime {
        crate::clock::Clock::now(&self.clock)
    }

    async fn scenario(&self, name: &str) -> Outcome {
        let result = match name {
            "first-fetch" => self.first_fetch().await,
            "expiry" => self.expiry().await,
            "refresh-ahead" => self.refresh_ahead().await,
            "token-expired" => self.token_expired().await,
            "forbidden" => self.forbidden().await,
            "idp-5xx" => self.idp_5xx().await,
            "bad-secret" => self.bad_secret().await,
            "egress" => self.egress().await,
            "rate-limited" => self.rate_limited().await,
            "challenges" => self.challenges().await,
            "audience" => self.audience().await,
            "config-schema" => self.config_schema().await,
            "principal-stable" => self.principal_stable().await,
            "deterministic" => self.deterministic().await,
            other => Err(Outcome::Fail(format!("unknown scenario {other}"))),
        };
        result.unwrap_or_else(|o| o)
    }

    /// Fetch in a fresh provider; a failure is the scenario's failure.
    async fn first(&self) -> Result<(ProviderRuntime, Credentials), Outcome> {
        let provider = self.fresh()?;
        match self.fetch(&provider, Reason::Initial).await {
            Ok(c) => Ok((provider, c)),
            Err(e) => {
                self.done(provider);
                Err(Outcome::Fail(format!("the first fetch failed: {e}")))
            }
        }
    }

    async fn first_fetch(&self) -> Result<Outcome, Outcome> {
        let (provider, c) = self.first().await?;
        self.done(provider);
        let requests = self.endpoint.requests();
        if self.has_endpoint() && requests == 0 {
            return Ok(Outcome::Fail(
                "returned a credential without asking the endpoint".into(),
            ));
        }
        Ok(Outcome::Pass(format!(
            "{} credential{}, {} endpoint request(s)",
            c.credential.kind(),
            c.principal
                .as_deref()
                .map(|p| format!(" for `{p}`"))
                .unwrap_or_default(),
            requests
        )))
    }

    async fn expiry(&self) -> Result<Outcome, Outcome> {
        let (provider, c) = self.first().await?;
        self.done(provider);
        let lifetime = self.manifest.expires_in as i64;
        let expectation = self.manifest.expiry();
        let Some(expires_in) = self.expiry_in(&c) else {
            return Ok(match expectation {
                Expectation::Required => Outcome::Fail(format!(
                    "no expires-at (and no JWT exp), though the endpoint granted {lifetime} s: \
                     the host would cache it for its default TTL and send it after it expired"
                )),
                _ => Outcome::Pass("no expiry, as declared".into()),
            });
        };
        if expectation == Expectation::None {
            return Ok(Outcome::Fail(format!(
                "expires in {expires_in} s, but the manifest declares no expiry"
            )));
        }
        if expires_in <= 0 {
            return Ok(Outcome::Fail(format!(
                "already expired on arrival ({expires_in} s from the virtual now): \
                 is the expiry computed from the host's clock?"
            )));
        }
        if self.manifest.endpoint_lifetime() && (expires_in - lifetime).abs() > 60 {
            return Ok(Outcome::Fail(format!(
                "expires in {expires_in} s, but the endpoint granted {lifetime} s"
            )));
        }
        if expires_in > 30 * 86_400 {
            return Ok(Outcome::Fail(format!(
                "expires in {expires_in} s: more than 30 days is not a sane lifetime"
            )));
        }
        Ok(Outcome::Pass(format!(
            "expires in {expires_in} s (virtual clock)"
        )))
    }

    async fn refresh_ahead(&self) -> Result<Outcome, Outcome> {
        if !self.has_endpoint() {
            return Ok(Outcome::Skip("no endpoint: nothing to refresh from".into()));
        }
        let (provider, c1) = self.first().await?;
        let Some(expires_in) = self.expiry_in(&c1) else {
            self.done(provider);
            return Ok(Outcome::Skip(
                "the credential has no expiry, so the host never refreshes it ahead".into(),
            ));
        };
        // 85 % into the lifetime: inside the host's refresh window.
        let late = Duration::from_secs((expires_in.max(1) as u64 * 85) / 100);
        self.clock.set(t0() + late);
        self.endpoint.rotate();
        let before = self.endpoint.requests();
        let c2 = self.fetch(&provider, Reason::RefreshAhead).await;
        self.done(provider);
        let c2 = match c2 {
            Ok(c) => c,
            Err(e) => return Ok(Outcome::Fail(format!("the refresh failed: {e}"))),
        };
        if self.endpoint.requests() == before {
            return Ok(Outcome::Fail(
                "refresh-ahead did not ask the endpoint (replayed a remembered credential?)".into(),
            ));
        }
        if same_secret(&c1, &c2) {
            return Ok(Outcome::Fail(
                "refresh-ahead returned the old credential".into(),
            ));
        }
        match (effective_expiry(&c1), effective_expiry(&c2)) {
            (Some(a), Some(b)) if b > a => Ok(Outcome::Pass(format!(
                "new credential at {} s, expiry +{} s",
                late.as_secs(),
                unix(b) - unix(a)
            ))),
            _ => Ok(Outcome::Fail(
                "the refreshed credential does not expire later than the old one".into(),
            )),
        }
    }

    async fn token_expired(&self) -> Result<Outcome, Outcome> {
        let (provider, c1) = self.first().await?;
        let decision = self
            .decide(&provider, &c1, SecurityErrorKind::TokenExpired, 401)
            .await;
        match decision {
            Ok(Decision::RefreshAndRetry) => {}
            other => {
                self.done(provider);
                return Ok(Outcome::Fail(format!(
                    "token-expired (HTTP 401 invalid_token) ⇒ {}, expected refresh-and-retry",
                    describe_decision(&other)
                )));
            }
        }
        if !self.has_endpoint() {
            self.done(provider);
            return Ok(Outcome::Pass("⇒ refresh-and-retry".into()));
        }
        self.endpoint.rotate();
        let c2 = self.fetch(&provider, Reason::AfterSecurityError).await;
        self.done(provider);
        Ok(match c2 {
            Ok(c2) if !same_secret(&c1, &c2) => Outcome::Pass(
                "⇒ refresh-and-retry; the next fetch returned a new credential".into(),
            ),
            Ok(_) => Outcome::Fail(
                "⇒ refresh-and-retry, but the next fetch returned the rejected credential".into(),
            ),
            Err(e) => Outcome::Fail(format!(
                "⇒ refresh-and-retry, but the next fetch failed: {e}"
            )),
        })
    }

    async fn forbidden(&self) -> Result<Outcome, Outcome> {
        let (provider, c) = self.first().await?;
        let decision = self
            .decide(&provider, &c, SecurityErrorKind::Forbidden, 403)
            .await;
        self.done(provider);
        Ok(match decision {
            Ok(Decision::Fail) => Outcome::Pass("⇒ fail".into()),
            other => Outcome::Fail(format!(
                "forbidden (HTTP 403) ⇒ {}, expected fail: a new credential will not grant a \
                 missing permission",
                describe_decision(&other)
            )),
        })
    }

    async fn idp_5xx(&self) -> Result<Outcome, Outcome> {
        if !self.has_endpoint() {
            return Ok(Outcome::Skip("no endpoint".into()));
        }
        let provider = self.fresh()?;
        self.endpoint.set_mode(Mode::ServerError);
        let result = self.fetch(&provider, Reason::Initial).await;
        self.endpoint.set_mode(Mode::Ok);
        self.done(provider);
        if self.endpoint.requests() == 0 {
            return Ok(Outcome::Fail("never asked the endpoint".into()));
        }
        Ok(match result {
            Err(Error::Provider {
                error: ProviderError::Unavailable { message: m, .. },
                ..
            }) => Outcome::Pass(format!("HTTP 503 ⇒ unavailable ({m})")),
            other => Outcome::Fail(format!(
                "HTTP 503 ⇒ {}, expected unavailable (the host backs off and retries only \
                 unavailable)",
                describe_fetch(&other)
            )),
        })
    }

    async fn bad_secret(&self) -> Result<Outcome, Outcome> {
        if !self.has_endpoint() {
            return Ok(Outcome::Skip("no endpoint".into()));
        }
        if !self
            .manifest
            .config
            .values()
            .any(|v| v.contains("${secret}"))
        {
            return Ok(Outcome::Skip(
                "the manifest's config has no ${secret} to get wrong".into(),
            ));
        }
        self.endpoint.reset();
        self.clock.set(t0());
        let provider = self
            .load(WRONG_SECRET, &self.endpoint)
            .map_err(|e| Outcome::Fail(format!("could not load: {e}")))?;
        let result = self.fetch(&provider, Reason::Initial).await;
        self.done(provider);
        Ok(match result {
            Err(Error::Provider {
                error: ProviderError::Denied(m),
                ..
            }) => Outcome::Pass(format!("refused secret ⇒ denied ({m})")),
            other => Outcome::Fail(format!(
                "refused secret ⇒ {}, expected denied",
                describe_fetch(&other)
            )),
        })
    }

    async fn rate_limited(&self) -> Result<Outcome, Outcome> {
        if !self.has_endpoint() {
            return Ok(Outcome::Skip("no endpoint to throttle".into()));
        }
        let provider = self.fresh()?;
        let contract = provider.contract();
        self.endpoint.set_mode(Mode::RateLimited);
        let result = self.fetch(&provider, Reason::Initial).await;
        self.done(provider);
        let want = RATE_LIMIT_RETRY_AFTER;
        Ok(match result {
            Ok(_) => {
                Outcome::Fail("returned a credential although the endpoint answered 429".into())
            }
            Err(Error::Provider {
                error:
                    ProviderError::Unavailable {
                        retry_after: Some(after),
                        ..
                    },
                ..
            }) if after == want => Outcome::Pass(format!(
                "HTTP 429 + Retry-After: {} ⇒ unavailable, retry after {} ms",
                want.as_secs(),
                after.as_millis()
            )),
            Err(Error::Provider {
                error:
                    ProviderError::Unavailable {
                        retry_after: Some(after),
                        ..
                    },
                ..
            }) => Outcome::Fail(format!(
                "passed on a retry-after of {} ms; the endpoint said {} s",
                after.as_millis(),
                want.as_secs()
            )),
            Err(Error::Provider {
                error: ProviderError::Unavailable { .. },
                ..
            }) if contract == "0.1.0" => Outcome::Pass(
                "HTTP 429 ⇒ unavailable (a 0.1.0 provider cannot pass the Retry-After on)".into(),
            ),
            Err(Error::Provider {
                error: ProviderError::Unavailable { message, .. },
                ..
            }) => Outcome::Fail(format!(
                "HTTP 429 ⇒ unavailable ({message}) without the endpoint's Retry-After ({} s): \
                 the host would retry on its own schedule, before the IdP allows",
                want.as_secs()
            )),
            Err(Error::Provider { error, .. }) => {
                Outcome::Fail(format!("HTTP 429 ⇒ {error}, expected unavailable"))
            }
            Err(e) => Outcome::Fail(format!("the provider faulted (a fault never passes): {e}")),
        })
    }

    /// The manifest's `[[challenges]]`, or the usual Bearer ones for OAuth2.
    fn challenge_cases(&self) -> Vec<ChallengeCase> {
        if !self.manifest.challenges.is_empty() {
            return self.manifest.challenges.clone();
        }
        if self.manifest.endpoint != EndpointKind::Oauth2 {
            return Vec::new();
        }
        let case = |name: &str, status: u16, www: &str, expect| ChallengeCase {
            name: name.into(),
            status,
            www_authenticate: Some(www.into()),
            retry_after: None,
            expect,
        };
        vec![
            case(
                "bearer-expired",
                401,
                r#"Bearer realm="api", error="invalid_token", error_description="The access token expired""#,
                ExpectedDecision::RefreshAndRetry,
            ),
            case(
                "insufficient-scope",
                403,
                r#"Bearer realm="api", error="insufficient_scope", scope="admin""#,
                ExpectedDecision::Fail,
            ),
        ]
    }

    async fn challenges(&self) -> Result<Outcome, Outcome> {
        let cases = self.challenge_cases();
        if cases.is_empty() {
            return Ok(Outcome::Skip(
                "no [[challenges]] in the manifest (how do its servers reject a credential?)"
                    .into(),
            ));
        }
        let (provider, credentials) = self.first().await?;
        let mut seen = Vec::new();
        for case in &cases {
            let now = self.clock_now();
            let Some(mut error) =
                crate::classify::from_http(case.status, case.www_authenticate.as_deref(), None)
            else {
                self.done(provider);
                return Ok(Outcome::Fail(format!(
                    "challenge `{}`: HTTP {} is not an authentication failure",
                    case.name, case.status
                )));
            };
            error.retry_after = case
                .retry_after
                .as_deref()
                .and_then(|v| crate::classify::parse_retry_after(v, now));
            let request = self.manifest.request.request(Reason::Initial);
            let decision = provider
                .handle_security_error(&self.runtime, &request, &credentials, &error)
                .await;
            let got = match &decision {
                Ok(Decision::RefreshAndRetry) => ExpectedDecision::RefreshAndRetry,
                Ok(Decision::Fail) => ExpectedDecision::Fail,
                Ok(Decision::RetryAfter(_)) => ExpectedDecision::RetryAfter,
                Ok(other) => {
                    self.done(provider);
                    return Ok(Outcome::Fail(format!(
                        "challenge `{}`: a decision this kit does not know: {other:?}",
                        case.name
                    )));
                }
                Err(e) => {
                    self.done(provider);
                    return Ok(Outcome::Fail(format!(
                        "challenge `{}`: the provider faulted (a fault never passes): {e}",
                        case.name
                    )));
                }
            };
            if got != case.expect {
                self.done(provider);
                return Ok(Outcome::Fail(format!(
                    "challenge `{}` ({} {}) ⇒ {:?}, expected {:?}",
                    case.name,
                    case.status,
                    case.www_authenticate
                        .as_deref()
                        .unwrap_or("no WWW-Authenticate"),
                    decision.ok(),
                    case.expect
                )));
            }
            seen.push(format!("{} ⇒ {:?}", case.name, got));
        }
        self.done(provider);
        Ok(Outcome::Pass(seen.join(", ")))
    }

    async fn audience(&self) -> Result<Outcome, Outcome> {
        match self.manifest.endpoint {
            EndpointKind::None | EndpointKind::Secret => {
                return Ok(Outcome::Skip(
                    "its endpoint issues no audience-bound credentials".into(),
                ));
            }
            _ => {}
        }
        let provider = self.fresh()?;
        let audience = self
            .manifest
            .request
            .audience
            .clone()
            .unwrap_or_else(|| AUDIENCE.to_string());
        let request = Request {
            audience: Some(audience.clone()),
            ..self.manifest.request.request(Reason::Initial)
        };
        let result = provider.get_credentials(&self.runtime, &request).await;
        self.done(provider);
        let saw = self
            .endpoint
            .script()
            .seen
            .iter()
            .any(|t| t.contains(&audience));
        Ok(match result {
            Ok(_) if saw => Outcome::Pass(format!("audience `{audience}` reached the endpoint")),
            Ok(_) => Outcome::Fail(format!(
                "asked for audience `{audience}`, returned a credential without passing it on \
                 (a credential for another audience)"
            )),
            Err(Error::Provider {
                error: ProviderError::Misconfigured(m),
                ..
            }) => {
                // A refusal counts only from a provider that fetches without one.
                let (control, _) = self.first().await.map_err(|_| {
                    Outcome::Fail(format!(
                        "refused the audience ({m}), and cannot fetch without one either"
                    ))
                })?;
                self.done(control);
                Outcome::Pass(format!("refuses a requested audience ({m})"))
            }
            Err(e) => Outcome::Fail(format!("asked for audience `{audience}`: {e}")),
        })
    }

    async fn config_schema(&self) -> Result<Outcome, Outcome> {
        let provider = self.fresh()?;
        let described = provider.describe(&self.runtime).await;
        let outcome = match described {
            Err(e) => Outcome::Fail(format!("describe failed: {e}")),
            Ok(d) => match &d.descriptor.config {
                None => Outcome::Pass(format!(
                    "no schema declared (contract {}): the host checks nothing and redacts by \
                     key name",
                    d.descriptor.contract
                )),
                Some(_) if !d.violations.is_empty() => Outcome::Fail(format!(
                    "the host would refuse the manifest's config: {}",
                    d.violations
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                )),
                Some(keys) => Outcome::Pass(format!(
                    "{} {}: {} keys declared ({} required, {} secret); the config fits",
                    d.descriptor.name,
                    d.descriptor.version,
                    keys.len(),
                    keys.iter().filter(|k| k.required).count(),
                    keys.iter().filter(|k| k.secret).count()
                )),
            },
        };
        self.done(provider);
        Ok(outcome)
    }

    async fn egress(&self) -> Result<Outcome, Outcome> {
        let earlier = *self.denied_egress.lock().unwrap_or_else(|e| e.into_inner());
        if earlier > 0 {
            return Ok(Outcome::Fail(format!(
                "the provider tried {earlier} request(s) to hosts outside allowed_hosts \
                 during the other scenarios"
            )));
        }
        if !self.has_endpoint() {
            return Ok(Outcome::Pass(
                "no request outside allowed_hosts (no endpoint to redirect)".into(),
            ));
        }
        self.endpoint.reset();
        self.decoy.reset();
        self.clock.set(t0());
        let provider = self
            .load(SECRET, &self.decoy)
            .map_err(|e| Outcome::Fail(format!("could not load: {e}")))?;
        let result = self.fetch(&provider, Reason::Initial).await;
        let (_, refused) = provider.egress_counts();
        drop(provider);
        if self.decoy.requests() > 0 {
            return Ok(Outcome::Fail(
                "a host outside allowed_hosts was reached".into(),
            ));
        }
        Ok(match result {
            Ok(_) => {
                Outcome::Fail("returned a credential although its endpoint was out of reach".into())
            }
            Err(Error::Provider {
                error: ProviderError::Denied(m),
                ..
            }) => Outcome::Fail(format!(
                "a refused connection ⇒ denied ({m}); a network failure is unavailable"
            )),
            // A trap, a timeout or a limit is a fault: it never passes (the
            // JavaScript runtime once trapped on a refused POST).
            Err(
                e @ (Error::Plugin { .. }
                | Error::Timeout { .. }
                | Error::Limit { .. }
                | Error::CoolingDown { .. }),
            ) => Outcome::Fail(format!(
                "the provider faulted instead of answering `unavailable` (a fault never passes): {e}"
            )),
            Err(
                e @ Error::Provider {
                    error: ProviderError::Unavailable { .. },
                    ..
                },
            ) if refused > 0 => Outcome::Pass(format!(
                "{refused} request(s) outside allowed_hosts refused ⇒ {}",
                short(&e)
            )),
            Err(Error::Provider { error, .. }) if refused > 0 => Outcome::Fail(format!(
                "a refused connection ⇒ {error}; a network failure is `unavailable`"
            )),
            Err(e) => Outcome::Fail(format!(
                "pointed at a host outside allowed_hosts it made no request but failed: {e}"
            )),
        })
    }

    async fn principal_stable(&self) -> Result<Outcome, Outcome> {
        let (provider, c1) = self.first().await?;
        let mut seen = vec![c1.principal.clone()];
        let mut steps = vec![(Reason::RefreshAhead, 0.85), (Reason::Expired, 1.01)];
        if !self.has_endpoint() {
            steps = vec![(Reason::Expired, 0.0), (Reason::Expired, 0.0)];
        }
        let lifetime = self
            .expiry_in(&c1)
            .unwrap_or(self.manifest.expires_in as i64) as f64;
        for (reason, at) in steps {
            self.clock
                .set(t0() + Duration::from_secs_f64((lifetime * at).max(0.0)));
            self.endpoint.rotate();
            match self.fetch(&provider, reason).await {
                Ok(c) => seen.push(c.principal),
                Err(e) => {
                    self.done(provider);
                    return Ok(Outcome::Fail(format!("a refresh failed: {e}")));
                }
            }
        }
        self.done(provider);
        let first = &seen[0];
        if let Some(other) = seen.iter().find(|p| *p != first) {
            return Ok(Outcome::Fail(format!(
                "principal changed from {first:?} to {other:?} across refreshes"
            )));
        }
        match (first, self.manifest.expect.principal) {
            (None, Some(Expectation::Required)) => Ok(Outcome::Fail(
                "no principal, but the manifest requires one".into(),
            )),
            (Some(p), Some(Expectation::None)) => Ok(Outcome::Fail(format!(
                "principal `{p}`, but the manifest declares none"
            ))),
            (Some(p), _) => Ok(Outcome::Pass(format!(
                "`{p}` in all {} fetches",
                seen.len()
            ))),
            (None, _) => Ok(Outcome::Pass(format!(
                "no principal in all {} fetches",
                seen.len()
            ))),
        }
    }

    async fn deterministic(&self) -> Result<Outcome, Outcome> {
        let (p1, c1) = self.first().await?;
        self.done(p1);
        let (p2, c2) = self.first().await?;
        self.done(p2);
        if c1 == c2 {
            return Ok(Outcome::Pass(
                "same credential, expiry and principal from two fresh instances".into(),
            ));
        }
        let what = if !same_secret(&c1, &c2) {
            "credential"
        } else if c1.expires_at != c2.expires_at {
            "expiry"
        } else {
            "principal"
        };
        Ok(Outcome::Fail(format!(
            "two fresh instances at the same virtual time got a different {what} from the same \
             endpoint script"
        )))
    }
}

/// `expires-at`, else a bearer JWT's `exp` (what the host's cache uses).
fn effective_expiry(c: &Credentials) -> Option<SystemTime> {
    c.expires_at
        .or_else(|| crate::cache::jwt_exp(&c.credential))
}

fn same_secret(a: &Credentials, b: &Credentials) -> bool {
    a.credential == b.credential
}

fn describe_decision(d: &Result<Decision, Error>) -> String {
    match d {
        Ok(Decision::RefreshAndRetry) => "refresh-and-retry".into(),
        Ok(Decision::RetryAfter(ms)) => format!("retry-after({} ms)", ms.as_millis()),
        Ok(Decision::Fail) => "fail".into(),
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("an error ({e})"),
    }
}

fn describe_fetch(r: &Fetched) -> String {
    match r {
        Ok(c) => format!("a {} credential", c.credential.kind()),
        Err(e) => short(e),
    }
}

fn short(e: &Error) -> String {
    match e {
        Error::Provider { error, .. } => match error {
            ProviderError::Unavailable { message: m, .. } => format!("unavailable ({m})"),
            ProviderError::Denied(m) => format!("denied ({m})"),
            ProviderError::Misconfigured(m) => format!("misconfigured ({m})"),
            _ => e.to_string(),
        },
        other => other.to_string(),
    }
}

/// What the fake endpoint does with the next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Serve tokens / secrets to an authorised client.
    Ok,
    /// Answer every request 503.
    ServerError,
    /// Answer every request 429 with `Retry-After` ([`RATE_LIMIT_RETRY_AFTER`]).
    RateLimited,
}

#[derive(Debug)]
struct Script {
    mode: Mode,
    requests: u64,
    issued: u64,
    rotation: u64,
    refresh_tokens: HashSet<String>,
    /// What the requests carried (URI and body, up to 16 KiB each), for the
    /// `audience` scenario.
    seen: Vec<String>,
}

impl Script {
    fn new() -> Self {
        Script {
            mode: Mode::Ok,
            requests: 0,
            issued: 0,
            rotation: 0,
            refresh_tokens: HashSet::new(),
            seen: Vec::new(),
        }
    }
}

/// The scripted fake token endpoint / secrets store on 127.0.0.1.
struct FakeEndpoint {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    shutdown: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

struct EndpointState {
    kind: EndpointKind,
    format: SecretFormat,
    expires_in: u64,
    base: String,
    script: Arc<Mutex<Script>>,
    response: Option<ResponseSpec>,
    /// The kit's virtual clock (`${expires_at}`).
    clock: ManualClock,
}

impl FakeEndpoint {
    async fn start(manifest: &Manifest, clock: &ManualClock) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let script = Arc::new(Mutex::new(Script::new()));
        let state = Arc::new(EndpointState {
            kind: manifest.endpoint,
            format: manifest.secret_format,
            expires_in: manifest.expires_in,
            base: format!("http://{addr}"),
            script: script.clone(),
            response: manifest.response.clone(),
            clock: clock.clone(),
        });
        let app = axum::Router::new().fallback(serve).with_state(state);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(FakeEndpoint {
            addr,
            script,
            shutdown: Mutex::new(Some(tx)),
        })
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.script.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reset(&self) {
        *self.script() = Script::new();
    }

    fn rotate(&self) {
        self.script().rotation += 1;
    }

    fn set_mode(&self, mode: Mode) {
        self.script().mode = mode;
    }

    fn requests(&self) -> u64 {
        self.script().requests
    }

    fn stop(&self) {
        if let Some(tx) = self
            .shutdown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = tx.send(());
        }
    }
}

async fn serve(
    axum::extract::State(state): axum::extract::State<Arc<EndpointState>>,
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
    body: bytes::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let json = |status: u16, value: serde_json::Value| {
        (
            http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR),
            axum::Json(value),
        )
            .into_response()
    };
    let mut script = state.script.lock().unwrap_or_else(|e| e.into_inner());
    script.requests += 1;
    if script.seen.len() < 64 {
        let text = format!("{uri} {}", String::from_utf8_lossy(&body));
        script.seen.push(text.chars().take(16 * 1024).collect());
    }
    if script.mode == Mode::RateLimited {
        return (
            http::StatusCode::TOO_MANY_REQUESTS,
            [(
                http::header::RETRY_AFTER,
                RATE_LIMIT_RETRY_AFTER.as_secs().to_string(),
            )],
            axum::Json(serde_json::json!({"error": "rate_limited"})),
        )
            .into_response();
    }
    if script.mode == Mode::ServerError {
        return (
            http::StatusCode::SERVICE_UNAVAILABLE,
            "upstream unavailable (scripted)",
        )
            .into_response();
    }
    if state.kind == EndpointKind::Oauth2
        && method == http::Method::GET
        && uri.path() == "/.well-known/openid-configuration"
    {
        return json(
            200,
            serde_json::json!({
                "issuer": state.base,
                "token_endpoint": format!("{}/token", state.base),
                "jwks_uri": format!("{}/jwks", state.base),
                "grant_types_supported": ["client_credentials", "refresh_token"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            }),
        );
    }
    if !authorised(&script, &headers, &body) {
        return match state.kind {
            EndpointKind::Oauth2 => json(
                401,
                serde_json::json!({"error": "invalid_client", "error_description": "client authentication failed"}),
            ),
            _ => json(403, serde_json::json!({"errors": ["permission denied"]})),
        };
    }
    match state.kind {
        EndpointKind::Custom => {
            let Some(spec) = &state.response else {
                return json(500, serde_json::json!({"error": "no [response]"}));
            };
            if spec.require_json {
                let is_json = headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("json"));
                let has_length = headers.contains_key(http::header::CONTENT_LENGTH);
                if !is_json
                    || !has_length
                    || serde_json::from_slice::<serde_json::Value>(&body).is_err()
                {
                    return json(
                        400,
                        serde_json::json!({"error": "a JSON body with Content-Type and Content-Length is required"}),
                    );
                }
            }
            script.issued += 1;
            let n = script.issued;
            let text = spec
                .body
                .replace("${token}", &format!("conformance-session-{n}"))
                .replace("${expires_in}", &state.expires_in.to_string())
                .replace(
                    "${expires_at}",
                    &crate::clock::rfc3339(
                        crate::clock::Clock::now(&state.clock)
                            + Duration::from_secs(state.expires_in),
                    ),
                )
                .replace("${n}", &n.to_string());
            let mut response = (
                http::StatusCode::from_u16(spec.status)
                    .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR),
                text,
            )
                .into_response();
            for (k, v) in &spec.headers {
                if let (Ok(k), Ok(v)) = (
                    http::HeaderName::from_bytes(k.as_bytes()),
                    http::HeaderValue::from_str(v),
                ) {
                    response.headers_mut().insert(k, v);
                }
            }
            response
        }
        EndpointKind::Oauth2 => {
            script.issued += 1;
            let n = script.issued;
            let refresh = format!("conformance-refresh-{n}");
            script.refresh_tokens.insert(refresh.clone());
            let id_token = unsigned_jwt(&serde_json::json!({
                "iss": state.base,
                "sub": "conformance-subject",
                "aud": "conformance-client",
                "iat": T0_UNIX,
                "exp": T0_UNIX + 10 * 365 * 86_400,
            }));
            json(
                200,
                serde_json::json!({
                    "access_token": format!("conformance-access-{n}"),
                    "token_type": "Bearer",
                    "expires_in": state.expires_in,
                    "refresh_token": refresh,
                    "id_token": id_token,
                }),
            )
        }
        _ => {
            let username = "conformance-user";
            let password = format!("conformance-password-{}", script.rotation);
            let value = match state.format {
                SecretFormat::Json => {
                    serde_json::json!({"username": username, "password": password})
                }
                SecretFormat::VaultKv2 => serde_json::json!({
                    "data": {"data": {"username": username, "password": password},
                             "metadata": {"version": script.rotation + 1}}
                }),
                SecretFormat::VaultStaticCreds => serde_json::json!({
                    "data": {"username": username, "password": password,
                             "ttl": state.expires_in, "last_vault_rotation": "2031-01-01T00:00:00Z"}
                }),
            };
            json(200, value)
        }
    }
}

/// Whether the request carries the accepted secret (anywhere: a form field, a
/// header, HTTP Basic) or a refresh token the endpoint issued.
fn authorised(script: &Script, headers: &http::HeaderMap, body: &[u8]) -> bool {
    use base64::Engine as _;
    let mut texts: Vec<String> = vec![String::from_utf8_lossy(body).into_owned()];
    for value in headers.values() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        if let Some(b64) = value.strip_prefix("Basic ")
            && let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim())
        {
            texts.push(String::from_utf8_lossy(&raw).into_owned());
        }
        texts.push(value);
    }
    texts
        .iter()
        .any(|t| t.contains(SECRET) || script.refresh_tokens.iter().any(|r| t.contains(r.as_str())))
}

fn unsigned_jwt(claims: &serde_json::Value) -> String {
    use base64::Engine as _;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    format!(
        "{}.{}.{}",
        b64(&serde_json::json!({"alg": "none", "typ": "JWT"})),
        b64(claims),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b"unsigned")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_errors_name_the_key() {
        let p = Path::new("conformance.toml");
        let e = Manifest::from_toml("endpoint = \"ftp\"\n", p).unwrap_err();
        assert!(e.to_string().contains("endpoint"), "{e}");
        let e = Manifest::from_toml("[skip]\nrefresh = \"x\"\n", p).unwrap_err();
        assert!(
            e.to_string().contains("skip.refresh: no such scenario"),
            "{e}"
        );
        let e = Manifest::from_toml("colour = 1\n", p).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = Manifest::from_toml("expires_in = 0\n", p).unwrap_err();
        assert!(e.to_string().contains("expires_in"), "{e}");
        // Short lifetimes are fine (a company STS issuing 30 s sessions).
        Manifest::from_toml("expires_in = 5\n", p).unwrap();
        let e = Manifest::from_toml("endpoint = \"custom\"\n", p).unwrap_err();
        assert!(e.to_string().contains("needs a [response] table"), "{e}");
        let e = Manifest::from_toml("[response]\nbody = \"x\"\n", p).unwrap_err();
        assert!(
            e.to_string().contains("only for `endpoint = \"custom\"`"),
            "{e}"
        );
        let e = Manifest::from_toml("endpoint = \"custom\"\n[response]\nstatus = 999\n", p)
            .unwrap_err();
        assert!(e.to_string().contains("response.status"), "{e}");
        let e = Manifest::from_toml(
            "endpoint = \"custom\"\n[response]\nheaders = { \"bad header\" = \"x\" }\n",
            p,
        )
        .unwrap_err();
        assert!(e.to_string().contains("response.headers.bad header"), "{e}");
        let e = Manifest::from_toml("[[challenges]]\nname = \"x\"\nexpect = \"maybe\"\n", p)
            .unwrap_err();
        assert!(e.to_string().contains("expect"), "{e}");
        let e = Manifest::from_toml("[limits]\ntimeout_ms = 0\n", p).unwrap_err();
        assert_eq!(
            e.to_string(),
            "conformance.toml: limits.timeout_ms: must be between 1 and 600000"
        );
        let e = Manifest::from_toml("[request]\nsubjects = [\"a\"]\n", p).unwrap_err();
        assert!(e.to_string().contains("subjects"), "{e}");
        let m = Manifest::from_toml("[request]\nsubject = \"alice\"\nscopes = [\"read\"]\n", p)
            .unwrap();
        let r = m.request.request(Reason::Expired);
        assert_eq!(r.subject.as_deref(), Some("alice"));
        assert_eq!(r.scopes, ["read"]);
        assert_eq!(r.reason, Reason::Expired);
    }

    #[test]
    fn expiry_expectation_follows_the_endpoint() {
        let p = Path::new("c.toml");
        let m = Manifest::from_toml("endpoint = \"oauth2\"\n", p).unwrap();
        assert_eq!(m.expiry(), Expectation::Required);
        let m = Manifest::from_toml("endpoint = \"secret\"\n", p).unwrap();
        assert_eq!(m.expiry(), Expectation::Optional);
        let m = Manifest::from_toml(
            "endpoint = \"secret\"\nsecret_format = \"vault-static-creds\"\n",
            p,
        )
        .unwrap();
        assert_eq!(m.expiry(), Expectation::Required);
    }

    #[test]
    fn the_secret_is_found_wherever_it_is_sent() {
        use base64::Engine as _;
        let script = Script::new();
        let mut headers = http::HeaderMap::new();
        assert!(!authorised(
            &script,
            &headers,
            b"grant_type=client_credentials"
        ));
        assert!(authorised(
            &script,
            &headers,
            format!("client_secret={SECRET}").as_bytes()
        ));
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("id:{SECRET}"));
        headers.insert("authorization", format!("Basic {basic}").parse().unwrap());
        assert!(authorised(&script, &headers, b""));
        let mut headers = http::HeaderMap::new();
        headers.insert("x-vault-token", WRONG_SECRET.parse().unwrap());
        assert!(!authorised(&script, &headers, b""));
    }
}
