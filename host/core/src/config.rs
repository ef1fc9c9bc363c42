//! `reauth.toml`: the deployment's providers and the host's runtime settings.
//!
//! Every provider, whatever it is, has the same shape (`[providers.<name>]`), so an
//! operator learns one concept. Unknown keys are errors, and every error names the
//! file, the line, the provider and the key, because a typo in an auth config
//! should fail loudly at `reauth check`, not silently at 3 a.m.
//!
//! Durations: a key's name says its unit (`_ms`, `_secs`); the value is a number in
//! that unit or a string with units (`"2s"`, `"5m"`, `"1h30m"`) for every such key.
//!
//! ```toml
//! [runtime]
//! state_dir = ".reauth/state"   # where providers' `state` is persisted
//! cache_dir = ".reauth/cache"   # precompiled plugin artifacts
//!
//! [providers.orders-db]
//! plugin = "plugins/oauth2_client_credentials.wasm"   # relative to this file
//! sha256 = "…"                                        # optional pin
//! allowed_hosts = ["127.0.0.1:9400"]
//!
//! [providers.orders-db.config]
//! token_url = "http://127.0.0.1:9400/token"
//! client_id = "orders"
//! client_secret = { env = "ORDERS_CLIENT_SECRET" }
//!
//! [providers.orders-db.cache]
//! default_ttl_secs = 300
//!
//! [providers.orders-db.limits]
//! timeout_ms = 2000
//! memory_mib = 64
//! ```

use crate::secret::Secret;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// An invalid configuration. The message names the file, the line where known, the
/// provider and the key.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}{}: {message}", .file.as_ref().map(|f| f.display().to_string()).unwrap_or_else(|| "<config>".into()), .line.map(|l| format!(":{l}")).unwrap_or_default())]
#[allow(
    clippy::exhaustive_structs,
    reason = "where (file, line) and what: an error's complete location and message"
)]
pub struct ConfigError {
    /// The config file, if the config came from one.
    pub file: Option<PathBuf>,
    /// 1-based line of the offending key, where known.
    pub line: Option<usize>,
    /// What is wrong, starting with the dotted key path (`providers.x.limits.timeout_ms`).
    pub message: String,
}

impl ConfigError {
    /// An error about `key` in `file`.
    pub fn at(file: Option<&Path>, key: impl fmt::Display, message: impl fmt::Display) -> Self {
        ConfigError {
            file: file.map(Path::to_path_buf),
            line: None,
            message: format!("{key}: {message}"),
        }
    }
}

/// The config's one rule for durations: a key's name says its unit (`_ms` or
/// `_secs`); a number is in that unit, and a string with units is accepted for
/// every such key (`"250ms"`, `"5s"`, `"2m"`, `"1h30m"`, see
/// [`crate::clock::parse_duration`]). A string that is not a whole number of the
/// key's unit is an error, never rounded.
mod human {
    use serde::{Deserialize, Deserializer, de::Error as _};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Number(i64),
        Text(String),
    }

    fn read<'de, D: Deserializer<'de>>(d: D, unit_ms: u64, unit: &str) -> Result<u64, D::Error> {
        match Written::deserialize(d).map_err(|_| {
            D::Error::custom(format!(
                "expected a number of {unit} or a duration such as \"5s\""
            ))
        })? {
            Written::Number(n) => u64::try_from(n)
                .map_err(|_| D::Error::custom(format!("{n} {unit}: must not be negative"))),
            Written::Text(text) => {
                let ms = crate::clock::parse_duration(&text).map_err(D::Error::custom)?;
                let ms = u64::try_from(ms.as_millis())
                    .map_err(|_| D::Error::custom(format!("`{text}` is too long")))?;
                if ms % unit_ms != 0 {
                    return Err(D::Error::custom(format!(
                        "`{text}` is not a whole number of {unit} (this key is in {unit})"
                    )));
                }
                Ok(ms / unit_ms)
            }
        }
    }

    pub(super) fn ms<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        read(d, 1, "milliseconds")
    }

    pub(super) fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        read(d, 1000, "seconds")
    }

    pub(super) fn opt_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        secs(d).map(Some)
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HostConfig {
    /// Host-wide settings.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Providers by name.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    /// `[fleet]`: share tokens and provider state with the other replicas of a
    /// service through Redis or PostgreSQL. Unset: this host (and the processes
    /// sharing its directories) works alone.
    pub fleet: Option<FleetConfig>,
    /// The directory relative paths are resolved against (the config file's).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file this was read from.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[runtime]`: host-wide settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RuntimeConfig {
    /// Directory where each provider's `state` is persisted (one JSON file per
    /// provider). Unset: state lives in memory and is lost on restart.
    pub state_dir: Option<PathBuf>,
    /// Directory for precompiled plugin artifacts. Unset: plugins are compiled at
    /// every start.
    pub cache_dir: Option<PathBuf>,
    /// Largest linear memory any plugin may grow to, in MiB; per-provider
    /// `limits.memory_mib` must not exceed it. Default 512.
    #[serde(default = "defaults::max_memory_mib")]
    pub max_memory_mib: u64,
    /// Most cache keys kept; the least recently used idle keys are evicted beyond
    /// it. Default 10000.
    #[serde(default = "defaults::max_cache_entries")]
    pub max_cache_entries: usize,
    /// Component instances the engine's pool holds at once, for all providers
    /// together. Each provider reserves `limits.max_concurrent_calls` of them
    /// (plus `instances.max_idle` with `instances.reuse`), so no provider can take
    /// instances another one needs; a provider whose reservation does not fit
    /// fails to load, naming this key. 16–2048, default 256 (32 providers at the
    /// default quota). The pool reserves address space for 4 memories of 4 GiB per
    /// instance: 4 TiB at the default, of the 128 TiB a process can address, so
    /// many hosts fit in one process; raise it for more providers.
    #[serde(default = "defaults::max_instances")]
    pub max_instances: u32,
    /// How much of each linear memory a finished call leaves resident, in KiB:
    /// when a call's fresh instance goes away, this much of its memory is reset
    /// to its initial contents in place (`memset`) and the rest is handed back
    /// to the kernel (`madvise`), whose pages the next instance faults in again.
    /// Either way the next instance sees pristine memory. Larger is faster for
    /// providers with big heaps (a JavaScript provider's fresh instance: 869 µs
    /// at 0, 373 µs at 16384 on the machine of BENCHMARKS.md, polyglot section),
    /// applies to every provider, and keeps up to that much resident per memory
    /// slot used: at most 4 × `max_instances` slots (64 GiB for 65536 at the
    /// default 256, if every slot were used). 0–65536; unset: 0 (or what an
    /// embedder set in `RuntimeOptions::keep_resident_bytes`).
    pub keep_resident_kib: Option<u64>,
    /// `[runtime.shared_cache]`: the token cache shared by the reauth processes of
    /// one user on this machine (L2).
    #[serde(default)]
    pub shared_cache: SharedCacheConfig,
    /// The key ring that seals provider state and the shared cache at rest: a
    /// file of `v1 <key id> <64 hex digits>` lines (the first seals, all open).
    /// Default: beside the state directory, `<state_dir>.keys/key` (else beside
    /// `shared_cache.dir`, else beside `cache_dir`), created 0600 with a random key
    /// on first use.
    pub key_file: Option<PathBuf>,
    /// The key ring's text itself, instead of `key_file`: usually
    /// `{ env = "REAUTH_KEY" }` or `{ file = "…" }`.
    pub key: Option<ConfigValue>,
}

/// `[runtime.shared_cache]`: fresh credentials shared, encrypted on disk, by every
/// reauth process of one user on one machine (the sidecar, `reauth get`, each
/// adapter run, embedding services), so that only one of them calls the identity
/// provider per token lifetime. On by default whenever a directory is known:
/// `dir`, else `<state_dir>/shared-cache`, else `<cache_dir>/shared-cache`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SharedCacheConfig {
    /// Use it. Default true.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Its directory (created 0700). Entries are sealed with `runtime.key_file`.
    pub dir: Option<PathBuf>,
}

/// Which engine a fleet shares its tokens and state through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum FleetBackendKind {
    /// Redis 7 (`redis://[user:password@]host:port[/db]`).
    Redis,
    /// A Redis 7 Cluster: `url` lists seed nodes, comma-separated
    /// (`redis://host1:7000,redis://host2:7001`).
    #[serde(rename = "redis-cluster")]
    RedisCluster,
    /// PostgreSQL 15 (`postgres://user:password@host:port/dbname`).
    Postgres,
}

// FleetBackendKind: its name in the configuration.
names!(FleetBackendKind {
    Redis => "redis",
    RedisCluster => "redis-cluster",
    Postgres => "postgres",
});

/// `[fleet]`: the replicas of one service (every host configured with the same
/// `name`, `backend` and `url`) share fresh credentials and provider state, so
/// that the whole fleet calls the identity provider once per token lifetime and
/// never spends one refresh token twice. See the README, "Running a fleet".
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct FleetConfig {
    /// The fleet's name: it prefixes every key (Redis) or row (PostgreSQL), so
    /// several fleets can share one server. 1–64 of `A-Z a-z 0-9 - _`.
    pub name: String,
    /// `redis`, `redis-cluster` or `postgres`.
    pub backend: FleetBackendKind,
    /// Where the backend is, usually a reference: `{ env = "REAUTH_FLEET_URL" }`
    /// or `{ file = "…" }` (the URL carries the password).
    pub url: ConfigValue,
    /// The fleet's key ring (`v1 <key id> <64 hex digits>` lines; the first
    /// seals, all open), the same on every replica: `{ env = … }` or
    /// `{ file = … }`. Nothing is stored in the backend in clear.
    pub key: ConfigValue,
    /// How long a replica's lease on a key (or on a provider's state) lasts
    /// without renewal; the holder renews it every third of it while its provider
    /// runs. A replica that dies holding one blocks that key for at most this
    /// long. A provider with shared state must have `limits.timeout_ms` at most
    /// 80 % of it. 1000–600000, default 10000.
    #[serde(default = "defaults::fleet_lease_ms", deserialize_with = "human::ms")]
    pub lease_ms: u64,
    /// How long a replica waits for another one's fetch of the same key before it
    /// gives up waiting. 100–600000, default 15000.
    #[serde(default = "defaults::fleet_wait_ms", deserialize_with = "human::ms")]
    pub wait_ms: u64,
    /// How long a call waits for the backend before treating it as down.
    /// 50–60000, default 2000.
    #[serde(default = "defaults::fleet_timeout_ms", deserialize_with = "human::ms")]
    pub timeout_ms: u64,
}

impl FleetConfig {
    /// A fleet named `name` on `backend` at `url`, sealing with the key ring `key`;
    /// defaults for the timings.
    pub fn new(
        name: impl Into<String>,
        backend: FleetBackendKind,
        url: ConfigValue,
        key: ConfigValue,
    ) -> Self {
        FleetConfig {
            name: name.into(),
            backend,
            url,
            key,
            lease_ms: defaults::fleet_lease_ms(),
            wait_ms: defaults::fleet_wait_ms(),
            timeout_ms: defaults::fleet_timeout_ms(),
        }
    }
}

impl CandidateConfig {
    /// A candidate running the component at `plugin` for `share` of the keys
    /// (0 < share ≤ 1); defaults for the rollback rules.
    pub fn new(plugin: impl Into<PathBuf>, share: f64) -> Self {
        CandidateConfig {
            plugin: plugin.into(),
            sha256: None,
            share,
            config: BTreeMap::new(),
            window_secs: defaults::rollout_window_secs(),
            max_error_rate: defaults::rollout_max_error_rate(),
            min_fetches: defaults::rollout_min_fetches(),
            max_faults: defaults::rollout_max_faults(),
        }
    }
}

impl Default for SharedCacheConfig {
    fn default() -> Self {
        SharedCacheConfig {
            enabled: true,
            dir: None,
        }
    }
}

impl HostConfig {
    /// Where the key ring is read from: `runtime.key_file`, else beside the state
    /// directory, else beside `shared_cache.dir`, else beside `cache_dir` (resolved
    /// against the config file's directory). `None` when nothing is kept at rest.
    pub fn key_file(&self) -> Option<PathBuf> {
        if let Some(file) = &self.runtime.key_file {
            return Some(self.resolve(file));
        }
        // Nothing is kept at rest without state or a shared cache.
        let r = &self.runtime;
        if r.state_dir.is_none() && self.shared_cache_dir().is_none() {
            return None;
        }
        // Beside the directory that holds the data, never inside it: a copy of
        // that directory alone does not carry the key.
        let dir = r
            .state_dir
            .as_ref()
            .or(r.shared_cache.dir.as_ref())
            .or(r.cache_dir.as_ref())?;
        Some(default_key_file(&self.resolve(dir)))
    }

    /// The shared cache's directory, if it is on and one is known (resolved
    /// against the config file's directory).
    pub fn shared_cache_dir(&self) -> Option<PathBuf> {
        let c = &self.runtime.shared_cache;
        if !c.enabled {
            return None;
        }
        let dir = c.dir.clone().or_else(|| {
            self.runtime
                .state_dir
                .as_ref()
                .or(self.runtime.cache_dir.as_ref())
                .map(|d| d.join("shared-cache"))
        })?;
        Some(self.resolve(&dir))
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            state_dir: None,
            cache_dir: None,
            max_memory_mib: defaults::max_memory_mib(),
            max_cache_entries: defaults::max_cache_entries(),
            max_instances: defaults::max_instances(),
            keep_resident_kib: None,
            shared_cache: SharedCacheConfig::default(),
            key_file: None,
            key: None,
        }
    }
}

/// `[providers.<name>]`: one provider.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ProviderConfig {
    /// Path to the provider's WebAssembly component (relative to the config file).
    pub plugin: PathBuf,
    /// Optional hex SHA-256 of the component; checked at every load.
    pub sha256: Option<String>,
    /// Hosts the plugin may reach over HTTP: `host`, `host:port`, `*.domain`,
    /// `*.domain:port`, `host:*`. Empty: no egress at all.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Allow plain `http://` to non-loopback hosts. Default false: egress to any
    /// host but 127.0.0.1/::1/localhost must use https.
    #[serde(default)]
    pub allow_http: bool,
    /// Handed to the plugin through `wasi:config`.
    #[serde(default)]
    pub config: BTreeMap<String, ConfigValue>,
    /// Config keys whose values are secret beyond those the host recognises by
    /// itself (see [`is_secret_key`]): their values are redacted from everything
    /// the plugin writes or reports.
    #[serde(default)]
    pub secret_keys: Vec<String>,
    /// Token cache settings.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Re-authentication policy.
    #[serde(default)]
    pub retry: RetryConfig,
    /// The budget of fetches (calls to `get-credentials`) that reach the plugin.
    #[serde(default)]
    pub rate: RateConfig,
    /// Sandbox limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Cool-down of a provider whose calls keep faulting.
    #[serde(default)]
    pub circuit_breaker: BreakerConfig,
    /// Instance reuse (off by default: a fresh instance per call).
    #[serde(default)]
    pub instances: InstancesConfig,
    /// With `[fleet]`: keep this provider's `state` in the fleet, read and
    /// written under a fleet-wide lease (default true: what a rotating refresh
    /// token needs, and it fails closed while the backend is down). `false`: each
    /// replica keeps its own (`state_dir` or memory), for providers whose state
    /// is only a cache (the OAuth2 client-credentials plugin's discovery
    /// document): they keep fetching per replica while the backend is down.
    #[serde(default = "defaults::yes")]
    pub shared_state: bool,
    /// A candidate version rolled out to a share of the keys, rolled back
    /// automatically when it fails (`[providers.<name>.candidate]`).
    #[serde(default)]
    pub candidate: Option<CandidateConfig>,
}

/// `[providers.<name>.candidate]`: a new version of the provider (another plugin,
/// and config overrides) that takes `share` of the keys — by key, so one key
/// sticks to one version — while the stable version serves the rest. A candidate
/// fetch that fails is retried on the stable version at once (callers do not see
/// it); when the candidate's failures in the last `window_secs` exceed
/// `max_error_rate` (after `min_fetches`) or reach `max_faults` traps, timeouts or
/// limit hits, it is rolled back: every key goes to the stable version until a
/// reload. Promote it by moving its plugin (and config) into the provider's own
/// keys and reloading.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CandidateConfig {
    /// The candidate's component (relative to the config file).
    pub plugin: PathBuf,
    /// Optional hex SHA-256 of the candidate's component.
    pub sha256: Option<String>,
    /// Fraction of the keys it takes (0 < share ≤ 1).
    pub share: f64,
    /// Config values that differ from `[providers.<name>.config]` (merged over it).
    #[serde(default)]
    pub config: BTreeMap<String, ConfigValue>,
    /// The window outcomes are judged over. Default 60 s (1–3600).
    #[serde(
        default = "defaults::rollout_window_secs",
        deserialize_with = "human::secs"
    )]
    pub window_secs: u64,
    /// Roll back when more than this fraction of its fetches in the window
    /// failed (0–1). Default 0.2.
    #[serde(default = "defaults::rollout_max_error_rate")]
    pub max_error_rate: f64,
    /// … once it made at least this many fetches in the window. Default 10.
    #[serde(default = "defaults::rollout_min_fetches")]
    pub min_fetches: u32,
    /// Roll back at this many faults (traps, timeouts, limit hits) in the
    /// window, whatever the rate. Default 3.
    #[serde(default = "defaults::rollout_max_faults")]
    pub max_faults: u32,
}

impl ProviderConfig {
    /// A provider running the component at `plugin`, with defaults everywhere else.
    pub fn new(plugin: impl Into<PathBuf>) -> Self {
        ProviderConfig {
            plugin: plugin.into(),
            sha256: None,
            allowed_hosts: Vec::new(),
            allow_http: false,
            config: BTreeMap::new(),
            secret_keys: Vec::new(),
            cache: CacheConfig::default(),
            retry: RetryConfig::default(),
            rate: RateConfig::default(),
            limits: LimitsConfig::default(),
            circuit_breaker: BreakerConfig::default(),
            instances: InstancesConfig::default(),
            shared_state: true,
            candidate: None,
        }
    }

    /// Allow egress to `host` (same syntax as `allowed_hosts`).
    pub fn allow_host(mut self, host: impl Into<String>) -> Self {
        self.allowed_hosts.push(host.into());
        self
    }

    /// Set a plain config value.
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config
            .insert(key.into(), ConfigValue::Value(Secret::new(value.into())));
        self
    }

    /// Set a config value read from an environment variable at load.
    pub fn config_env(mut self, key: impl Into<String>, var: impl Into<String>) -> Self {
        self.config
            .insert(key.into(), ConfigValue::Env { env: var.into() });
        self
    }
}

/// Whether the value of config key `key` is a secret by its name. The key is cut
/// into words (at `_`, `-`, `.` and lower→upper case changes); it is secret when
/// one word is `secret`, `password`, `passwd`, `pwd`, `passphrase`, `token`,
/// `key`, `apikey`, `credential(s)`, `assertion` or `private`, unless its last
/// word says it names something about the secret rather than the secret itself
/// (`url`, `uri`, `endpoint`, `method`, `alg`, `algorithm`, `kid`, `id`,
/// `audience`, `type`, `name`, `header`, `path`, `file`, `env`): `client_secret`,
/// `refresh_token`, `api_key` and `privateKey` are secret; `token_url`,
/// `auth_method`, `key_id` and `private_key_alg` are not.
///
/// The redaction rule: a value is redacted from logs, errors and responses when
/// it comes from an `{ env }` or `{ file }` reference, when its key is secret by
/// this rule, or when the provider lists its key in `secret_keys`. Plain values of
/// other keys (URLs, client ids, modes) are not, so messages stay readable.
/// Provider `state` values and returned credentials are always redacted.
pub fn is_secret_key(key: &str) -> bool {
    const SECRET: [&str; 13] = [
        "secret",
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "token",
        "key",
        "apikey",
        "credential",
        "credentials",
        "assertion",
        "private",
        "secrets",
    ];
    const ABOUT: [&str; 15] = [
        "url",
        "uri",
        "endpoint",
        "method",
        "alg",
        "algorithm",
        "kid",
        "id",
        "audience",
        "type",
        "name",
        "header",
        "path",
        "file",
        "env",
    ];
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut previous_lower = false;
    for c in key.chars() {
        if matches!(c, '_' | '-' | '.' | ' ') {
            words.push(std::mem::take(&mut word));
            previous_lower = false;
            continue;
        }
        if c.is_ascii_uppercase() && previous_lower {
            words.push(std::mem::take(&mut word));
        }
        previous_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        word.push(c.to_ascii_lowercase());
    }
    words.push(word);
    words.retain(|w| !w.is_empty());
    let about = words.last().is_some_and(|w| ABOUT.contains(&w.as_str()));
    !about && words.iter().any(|w| SECRET.contains(&w.as_str()))
}

/// A config value: inline, or a reference resolved by the host (at load time for
/// `{ env }` and `{ file }`, at every fetch for `{ credential }`). Inline values
/// are treated as secrets too (they often are), so `Debug` never prints them.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub enum ConfigValue {
    /// An inline value (strings, numbers and booleans are all handed over as text).
    Value(Secret),
    /// `{ env = "NAME" }`: the value of an environment variable.
    Env {
        /// Variable name.
        env: String,
    },
    /// `{ file = "path" }`: a file's contents, trailing newline trimmed (relative to
    /// the config file).
    File {
        /// The file.
        file: PathBuf,
    },
    /// `{ credential = "provider" }`: another provider's current credential (a
    /// provider config value only), fetched through the host's cache before every
    /// fetch of this provider; see [`CredentialRef`].
    Credential(CredentialRef),
}

/// `{ credential = "oidc", field = "token", audience = "…", scopes = […],
/// pass_subject = false }`: a provider's config value taken from another
/// provider's credential. The host resolves it before each fetch, through its
/// cache (so the other provider refreshes and re-authenticates as usual), and
/// when the provider answers `denied` it reports the credential it was given as
/// rejected to the other provider and tries once more with a fresh one.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CredentialRef {
    /// The provider whose credential is used.
    pub provider: String,
    /// Which part of the credential.
    pub field: CredentialField,
    /// The audience asked of that provider.
    pub audience: Option<String>,
    /// The scopes asked of that provider.
    pub scopes: Vec<String>,
    /// Ask that provider for the same subject as this provider's request (per-user
    /// chains); by default its own identity.
    pub pass_subject: bool,
}

impl CredentialRef {
    /// A reference to `provider`'s credential (its token or password).
    pub fn new(provider: impl Into<String>) -> Self {
        CredentialRef {
            provider: provider.into(),
            field: CredentialField::Token,
            audience: None,
            scopes: Vec::new(),
            pass_subject: false,
        }
    }

    /// Take `field` of the credential.
    pub fn field(mut self, field: CredentialField) -> Self {
        self.field = field;
        self
    }

    /// Ask for `audience`.
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audience = Some(audience.into());
        self
    }
}

/// Which part of a referenced credential becomes the config value.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CredentialField {
    /// `token` (the default): a bearer token, or the password of basic
    /// credentials.
    Token,
    /// `username` of basic credentials.
    Username,
    /// `password` of basic credentials.
    Password,
    /// `header.<name>`: one header of header credentials (name case-insensitive).
    Header(String),
}

impl CredentialField {
    /// Parse `token`, `username`, `password` or `header.<name>`.
    pub fn parse(s: &str) -> Option<CredentialField> {
        match s {
            "token" => Some(CredentialField::Token),
            "username" => Some(CredentialField::Username),
            "password" => Some(CredentialField::Password),
            _ => s
                .strip_prefix("header.")
                .filter(|h| {
                    !h.is_empty() && h.len() <= 256 && h.bytes().all(|b| b.is_ascii_graphic())
                })
                .map(|h| CredentialField::Header(h.to_ascii_lowercase())),
        }
    }
}

impl fmt::Display for CredentialField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialField::Token => f.write_str("token"),
            CredentialField::Username => f.write_str("username"),
            CredentialField::Password => f.write_str("password"),
            CredentialField::Header(h) => write!(f, "header.{h}"),
        }
    }
}

impl fmt::Debug for ConfigValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigValue::Value(_) => f.write_str("[redacted]"),
            ConfigValue::Env { env } => write!(f, "{{ env = {env:?} }}"),
            ConfigValue::File { file } => write!(f, "{{ file = {file:?} }}"),
            ConfigValue::Credential(r) => {
                write!(
                    f,
                    "{{ credential = {:?}, field = \"{}\" }}",
                    r.provider, r.field
                )
            }
        }
    }
}

/// A `{ credential = … }` table: its keys checked one by one, errors naming the
/// key.
fn credential_ref(t: &toml::map::Map<String, toml::Value>) -> Result<CredentialRef, String> {
    let mut r = match t.get("credential") {
        Some(toml::Value::String(p)) => CredentialRef::new(p.clone()),
        _ => return Err("`credential` must be a provider name".into()),
    };
    for (k, v) in t {
        match (k.as_str(), v) {
            ("credential", _) => {}
            ("field", toml::Value::String(f)) => {
                r.field = CredentialField::parse(f).ok_or_else(|| {
                    format!("`field = {f:?}`: expected \"token\", \"username\", \"password\" or \"header.<name>\"")
                })?;
            }
            ("audience", toml::Value::String(a)) => r.audience = Some(a.clone()),
            ("scopes", toml::Value::Array(list)) => {
                r.scopes = list
                    .iter()
                    .map(|s| s.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or("`scopes` must be a list of strings")?;
            }
            ("pass_subject", toml::Value::Boolean(b)) => r.pass_subject = *b,
            ("field" | "audience", _) => return Err(format!("`{k}` must be a string")),
            ("scopes", _) => return Err("`scopes` must be a list of strings".into()),
            ("pass_subject", _) => return Err("`pass_subject` must be true or false".into()),
            (other, _) => {
                return Err(format!(
                    "unknown key `{other}` in a credential reference (it takes credential, field, audience, scopes, pass_subject)"
                ));
            }
        }
    }
    Ok(r)
}

impl<'de> Deserialize<'de> for ConfigValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let expected = "a string, number, boolean, { env = \"NAME\" }, { file = \"path\" } or { credential = \"provider\" }";
        match toml::Value::deserialize(d)? {
            toml::Value::String(s) => Ok(ConfigValue::Value(Secret::new(s))),
            toml::Value::Integer(i) => Ok(ConfigValue::Value(Secret::new(i.to_string()))),
            toml::Value::Float(x) => Ok(ConfigValue::Value(Secret::new(x.to_string()))),
            toml::Value::Boolean(b) => Ok(ConfigValue::Value(Secret::new(b.to_string()))),
            toml::Value::Table(t) if t.contains_key("credential") => credential_ref(&t)
                .map(ConfigValue::Credential)
                .map_err(D::Error::custom),
            toml::Value::Table(t) if t.len() == 1 => match t.iter().next() {
                Some((k, toml::Value::String(v))) if k == "env" => {
                    Ok(ConfigValue::Env { env: v.clone() })
                }
                Some((k, toml::Value::String(v))) if k == "file" => Ok(ConfigValue::File {
                    file: PathBuf::from(v),
                }),
                Some((k, _)) => Err(D::Error::custom(format!(
                    "unsupported reference `{k}`: expected {expected}"
                ))),
                None => Err(D::Error::custom(format!("expected {expected}"))),
            },
            _ => Err(D::Error::custom(format!("expected {expected}"))),
        }
    }
}

/// `[providers.<name>.cache]`: how long credentials are kept and when they are
/// refreshed (Kafka's OAUTHBEARER refresh knobs, botocore's two tiers).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CacheConfig {
    /// Lifetime assumed for credentials that carry no expiry (no `expires-at`, no
    /// JWT `exp`). Default 3600 s.
    #[serde(
        default = "defaults::default_ttl_secs",
        deserialize_with = "human::secs"
    )]
    pub default_ttl_secs: u64,
    /// Upper bound on any credential's cached lifetime. Unset: no cap.
    #[serde(default, deserialize_with = "human::opt_secs")]
    pub max_lifetime_secs: Option<u64>,
    /// Stop using a credential this long before its stated expiry (clock skew
    /// between us, the IdP and the server); at most a tenth of its lifetime.
    /// Default 30 s.
    #[serde(default = "defaults::skew_secs", deserialize_with = "human::secs")]
    pub skew_secs: u64,
    /// Refresh ahead once this fraction of the lifetime has passed (0.5–1.0).
    /// Default 0.8.
    #[serde(default = "defaults::window_factor")]
    pub window_factor: f64,
    /// Random extra fraction added per refresh, spreading refreshes of many keys
    /// (0–0.25). Default 0.05.
    #[serde(default = "defaults::window_jitter")]
    pub window_jitter: f64,
    /// Never refresh ahead sooner than this after issue. Default 60 s.
    #[serde(
        default = "defaults::min_period_secs",
        deserialize_with = "human::secs"
    )]
    pub min_period_secs: u64,
    /// Never refresh ahead later than this before expiry. Default 300 s.
    #[serde(default = "defaults::buffer_secs", deserialize_with = "human::secs")]
    pub buffer_secs: u64,
    /// First backoff after a failed fetch. Default 100 ms.
    #[serde(
        default = "defaults::backoff_initial_ms",
        deserialize_with = "human::ms"
    )]
    pub backoff_initial_ms: u64,
    /// Largest backoff; also the pause after `denied`/`misconfigured`. Default 10 s.
    #[serde(default = "defaults::backoff_max_ms", deserialize_with = "human::ms")]
    pub backoff_max_ms: u64,
    /// Minimum time between two plugin calls for the same key. Default 250 ms.
    #[serde(default = "defaults::min_interval_ms", deserialize_with = "human::ms")]
    pub min_interval_ms: u64,
    /// While a key has no credential left to serve (its callers get the error),
    /// its failed fetches are retried about this often (90–100 % of it, jittered)
    /// instead of backing off further, so callers recover within about this much
    /// of the identity provider's return; attempts stay at most about one per
    /// interval per key. A `Retry-After` the provider passes on still wins; a
    /// key that still serves a valid credential backs off to `backoff_max_ms`.
    /// Default 1000; 0: always back off to `backoff_max_ms`.
    #[serde(default = "defaults::outage_retry_ms", deserialize_with = "human::ms")]
    pub outage_retry_ms: u64,
    /// Accept a credential whose `principal` differs from the one this key's
    /// earlier credentials stood for. Default false: the contract says a provider
    /// never switches identity, so such a credential is refused with
    /// [`crate::Error::Contract`].
    #[serde(default)]
    pub allow_principal_change: bool,
    /// At most one forced refresh (a security error dropping the cached
    /// credential) per key within this interval; later reports in the interval
    /// are ignored, so a client reporting 401 in a loop cannot flood the IdP.
    /// Default 5000 (0 disables the limit).
    #[serde(
        default = "defaults::min_reauth_interval_ms",
        deserialize_with = "human::ms"
    )]
    pub min_reauth_interval_ms: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            default_ttl_secs: defaults::default_ttl_secs(),
            max_lifetime_secs: None,
            skew_secs: defaults::skew_secs(),
            window_factor: defaults::window_factor(),
            window_jitter: defaults::window_jitter(),
            min_period_secs: defaults::min_period_secs(),
            buffer_secs: defaults::buffer_secs(),
            backoff_initial_ms: defaults::backoff_initial_ms(),
            backoff_max_ms: defaults::backoff_max_ms(),
            min_interval_ms: defaults::min_interval_ms(),
            outage_retry_ms: defaults::outage_retry_ms(),
            allow_principal_change: false,
            min_reauth_interval_ms: defaults::min_reauth_interval_ms(),
        }
    }
}

/// `[providers.<name>.retry]`: what `Host::with_credentials` may do after a server
/// rejects a credential.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RetryConfig {
    /// Re-authentications (refresh-and-retry) per operation. Default 1: a fresh
    /// credential that is rejected again will be rejected a third time too.
    #[serde(default = "defaults::max_reauth")]
    pub max_reauth: u32,
    /// `retry-after` waits per operation. Default 3.
    #[serde(default = "defaults::max_waits")]
    pub max_waits: u32,
    /// Longest single `retry-after` wait honoured. Default 5000 ms.
    #[serde(
        default = "defaults::max_retry_after_ms",
        deserialize_with = "human::ms"
    )]
    pub max_retry_after_ms: u64,
    /// Total time one operation may spend in retries. Default 30000 ms.
    #[serde(default = "defaults::budget_ms", deserialize_with = "human::ms")]
    pub budget_ms: u64,
    /// The retry budget shared by all operations of the provider (tower's
    /// `TpsBudget`): re-runs (refresh-and-retry, retry-after) may add at most this
    /// fraction of the operations of the last 10 s … Default 0.2 (0–10).
    #[serde(default = "defaults::retry_ratio")]
    pub retry_ratio: f64,
    /// … plus this many re-runs per second whatever the traffic. Default 10.
    #[serde(default = "defaults::min_retries_per_sec")]
    pub min_retries_per_sec: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_reauth: defaults::max_reauth(),
            max_waits: defaults::max_waits(),
            max_retry_after_ms: defaults::max_retry_after_ms(),
            budget_ms: defaults::budget_ms(),
            retry_ratio: defaults::retry_ratio(),
            min_retries_per_sec: defaults::min_retries_per_sec(),
        }
    }
}

/// `[providers.<name>.rate]`: a token bucket on the provider's fetches (calls to
/// `get-credentials`, whatever asked: a miss, a refresh ahead, a re-authentication),
/// so that no bug, misconfiguration or storm of distinct subjects floods the
/// identity provider. A fetch over budget waits for its turn, at most `wait_ms`,
/// then fails with [`crate::Error::Throttled`] (not a fault; nothing is recorded
/// against the key).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RateConfig {
    /// Sustained fetches per second (0 to 1,000,000; 0 turns the budget off).
    /// Default 100.
    #[serde(default = "defaults::fetches_per_second")]
    pub fetches_per_second: f64,
    /// Fetches allowed at once after a quiet period (1 to 1,000,000). Default 200.
    #[serde(default = "defaults::fetch_burst")]
    pub burst: u32,
    /// Longest a fetch waits for its turn (0 to 600000 ms). Default 5000.
    #[serde(default = "defaults::fetch_wait_ms", deserialize_with = "human::ms")]
    pub wait_ms: u64,
}

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig {
            fetches_per_second: defaults::fetches_per_second(),
            burst: defaults::fetch_burst(),
            wait_ms: defaults::fetch_wait_ms(),
        }
    }
}

impl RateConfig {
    /// No budget: every fetch goes through at once.
    pub fn unlimited() -> Self {
        RateConfig {
            fetches_per_second: 0.0,
            ..RateConfig::default()
        }
    }
}

/// `[providers.<name>.limits]`: the sandbox around each call. Hitting any of them
/// fails the call with [`crate::Error::Limit`] (or [`crate::Error::Timeout`]) naming
/// the provider and the limit; the call's instance is discarded.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct LimitsConfig {
    /// Wall-clock limit for one plugin call (including its HTTP requests). Default 5000.
    #[serde(default = "defaults::timeout_ms", deserialize_with = "human::ms")]
    pub timeout_ms: u64,
    /// Linear memory cap per call, in MiB. Default 64.
    #[serde(default = "defaults::memory_mib")]
    pub memory_mib: u64,
    /// WebAssembly fuel (roughly: instructions) per call. Unset: unmetered (the
    /// timeout still applies).
    pub fuel: Option<u64>,
    /// Largest credential a call may return (secret, principal, headers and
    /// attributes together), in bytes. Default 65536.
    #[serde(default = "defaults::max_credential_bytes")]
    pub max_credential_bytes: u64,
    /// Largest HTTP response body a plugin may read per request, in bytes.
    /// Default 1048576.
    #[serde(default = "defaults::max_response_bytes")]
    pub max_response_bytes: u64,
    /// Captured stdout and stderr per call and stream, in bytes; a plugin that
    /// writes more fails. Default 262144.
    #[serde(default = "defaults::max_output_bytes")]
    pub max_output_bytes: u64,
    /// Connect timeout of the plugin's HTTP requests. Default 2000 (never more than
    /// `timeout_ms`).
    #[serde(
        default = "defaults::connect_timeout_ms",
        deserialize_with = "human::ms"
    )]
    pub connect_timeout_ms: u64,
    /// Time to the first response byte of the plugin's HTTP requests, and between
    /// two body chunks. Default 5000 (never more than `timeout_ms`).
    #[serde(
        default = "defaults::first_byte_timeout_ms",
        deserialize_with = "human::ms"
    )]
    pub first_byte_timeout_ms: u64,
    /// Calls of this provider that may run at once (its bulkhead: it reserves
    /// that many of `runtime.max_instances`). Default 8.
    #[serde(default = "defaults::max_concurrent_calls")]
    pub max_concurrent_calls: u32,
    /// How long a call waits for one of `max_concurrent_calls` before failing with
    /// [`crate::Error::Busy`]. Default 5000.
    #[serde(default = "defaults::queue_timeout_ms", deserialize_with = "human::ms")]
    pub queue_timeout_ms: u64,
    /// HTTP requests one call may have in flight at once; one more fails the call
    /// with [`crate::Error::Limit`]. Default 8.
    #[serde(default = "defaults::max_requests_in_flight")]
    pub max_requests_in_flight: u32,
    /// HTTP requests all calls of this provider may have in flight at once; more
    /// wait for a place (within the call's timeout). Default 32.
    #[serde(default = "defaults::max_provider_requests_in_flight")]
    pub max_provider_requests_in_flight: u32,
    /// Host-side objects (HTTP fields, requests, responses, streams, pollables…)
    /// one call may hold at once; one more fails the call with
    /// [`crate::Error::Limit`]. Each HTTP `fields` object is also capped at 64 KiB
    /// and each `get-random-bytes` call at 64 KiB, so what the host allocates
    /// for a call stays bounded. Default 1024.
    #[serde(default = "defaults::max_host_resources")]
    pub max_host_resources: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            timeout_ms: defaults::timeout_ms(),
            memory_mib: defaults::memory_mib(),
            fuel: None,
            max_credential_bytes: defaults::max_credential_bytes(),
            max_response_bytes: defaults::max_response_bytes(),
            max_output_bytes: defaults::max_output_bytes(),
            connect_timeout_ms: defaults::connect_timeout_ms(),
            first_byte_timeout_ms: defaults::first_byte_timeout_ms(),
            max_concurrent_calls: defaults::max_concurrent_calls(),
            queue_timeout_ms: defaults::queue_timeout_ms(),
            max_requests_in_flight: defaults::max_requests_in_flight(),
            max_provider_requests_in_flight: defaults::max_provider_requests_in_flight(),
            max_host_resources: defaults::max_host_resources(),
        }
    }
}

/// `[providers.<name>.circuit_breaker]`: after `faults` consecutive plugin faults
/// (traps, timeouts, limit hits — not `provider-error`s, which the cache's backoff
/// handles) the provider is cooled down: calls fail fast with
/// [`crate::Error::CoolingDown`] for `cooldown_ms`, doubling per further fault up
/// to `max_cooldown_ms`. After the cool-down one trial call is let through; a
/// success closes the breaker.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Consecutive faults that open the breaker. Default 3.
    #[serde(default = "defaults::breaker_faults")]
    pub faults: u32,
    /// First cool-down. Default 1000 ms.
    #[serde(
        default = "defaults::breaker_cooldown_ms",
        deserialize_with = "human::ms"
    )]
    pub cooldown_ms: u64,
    /// Longest cool-down. Default 60000 ms.
    #[serde(
        default = "defaults::breaker_max_cooldown_ms",
        deserialize_with = "human::ms"
    )]
    pub max_cooldown_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            faults: defaults::breaker_faults(),
            cooldown_ms: defaults::breaker_cooldown_ms(),
            max_cooldown_ms: defaults::breaker_max_cooldown_ms(),
        }
    }
}

/// `[providers.<name>.instances]`: opt-in reuse of a provider's instances.
///
/// By default every call gets a fresh instance: nothing one call leaves in linear
/// memory is visible to the next. That costs ~10 µs for a Rust provider but
/// ~0.5–1 ms for a Python or JavaScript one (their runtimes initialise per
/// instance). With `reuse = true` an instance that finished a call cleanly is kept
/// and serves later calls **for the same subject only** (never across subjects),
/// until it has served `max_calls` calls; any trap, timeout or limit hit discards
/// it. What a provider keeps in globals then survives between those calls.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct InstancesConfig {
    /// Keep instances between calls. Default false.
    #[serde(default)]
    pub reuse: bool,
    /// Calls an instance serves before it is recycled. Default 100.
    #[serde(default = "defaults::instance_max_calls")]
    pub max_calls: u32,
    /// Idle instances kept per provider, across subjects (the least recently used
    /// goes first). Default 4.
    #[serde(default = "defaults::instance_max_idle")]
    pub max_idle: u32,
}

impl Default for InstancesConfig {
    fn default() -> Self {
        InstancesConfig {
            reuse: false,
            max_calls: defaults::instance_max_calls(),
            max_idle: defaults::instance_max_idle(),
        }
    }
}

/// Every default in one place.
pub mod defaults {
    /// `runtime.max_memory_mib`.
    pub fn max_memory_mib() -> u64 {
        512
    }
    /// `fleet.lease_ms`.
    pub fn fleet_lease_ms() -> u64 {
        10_000
    }
    /// `fleet.wait_ms`.
    pub fn fleet_wait_ms() -> u64 {
        15_000
    }
    /// `fleet.timeout_ms`.
    pub fn fleet_timeout_ms() -> u64 {
        2000
    }
    /// `cache.default_ttl_secs`.
    pub fn default_ttl_secs() -> u64 {
        3600
    }
    /// `cache.skew_secs`.
    pub fn skew_secs() -> u64 {
        30
    }
    /// `cache.window_factor`.
    pub fn window_factor() -> f64 {
        0.8
    }
    /// `cache.window_jitter`.
    pub fn window_jitter() -> f64 {
        0.05
    }
    /// `cache.min_period_secs`.
    pub fn min_period_secs() -> u64 {
        60
    }
    /// `cache.buffer_secs`.
    pub fn buffer_secs() -> u64 {
        300
    }
    /// `cache.backoff_initial_ms`.
    pub fn backoff_initial_ms() -> u64 {
        100
    }
    /// `cache.backoff_max_ms`.
    pub fn backoff_max_ms() -> u64 {
        10_000
    }
    /// `cache.min_interval_ms`.
    pub fn min_interval_ms() -> u64 {
        250
    }
    /// `retry.max_reauth`.
    pub fn max_reauth() -> u32 {
        1
    }
    /// `retry.max_waits`.
    pub fn max_waits() -> u32 {
        3
    }
    /// `retry.max_retry_after_ms`.
    pub fn max_retry_after_ms() -> u64 {
        5000
    }
    /// `retry.budget_ms`.
    pub fn budget_ms() -> u64 {
        30_000
    }
    /// `retry.retry_ratio`.
    pub fn retry_ratio() -> f64 {
        0.2
    }
    /// `retry.min_retries_per_sec`.
    pub fn min_retries_per_sec() -> u32 {
        10
    }
    /// `candidate.window_secs`.
    pub fn rollout_window_secs() -> u64 {
        60
    }
    /// `candidate.max_error_rate`.
    pub fn rollout_max_error_rate() -> f64 {
        0.2
    }
    /// `candidate.min_fetches`.
    pub fn rollout_min_fetches() -> u32 {
        10
    }
    /// `candidate.max_faults`.
    pub fn rollout_max_faults() -> u32 {
        3
    }
    /// `rate.fetches_per_second`.
    pub fn fetches_per_second() -> f64 {
        100.0
    }
    /// `rate.burst`.
    pub fn fetch_burst() -> u32 {
        200
    }
    /// `rate.wait_ms`.
    pub fn fetch_wait_ms() -> u64 {
        5000
    }
    /// `runtime.max_cache_entries`.
    pub fn max_cache_entries() -> usize {
        10_000
    }
    /// `limits.timeout_ms`.
    pub fn timeout_ms() -> u64 {
        5000
    }
    /// `limits.memory_mib`.
    pub fn memory_mib() -> u64 {
        64
    }
    /// `limits.max_credential_bytes`.
    pub fn max_credential_bytes() -> u64 {
        64 << 10
    }
    /// `limits.max_response_bytes`.
    pub fn max_response_bytes() -> u64 {
        1 << 20
    }
    /// `limits.max_output_bytes`.
    pub fn max_output_bytes() -> u64 {
        256 << 10
    }
    /// `limits.connect_timeout_ms`.
    pub fn connect_timeout_ms() -> u64 {
        2000
    }
    /// `limits.first_byte_timeout_ms`.
    pub fn first_byte_timeout_ms() -> u64 {
        5000
    }
    /// `circuit_breaker.faults`.
    pub fn breaker_faults() -> u32 {
        3
    }
    /// `circuit_breaker.cooldown_ms`.
    pub fn breaker_cooldown_ms() -> u64 {
        1000
    }
    /// `circuit_breaker.max_cooldown_ms`.
    pub fn breaker_max_cooldown_ms() -> u64 {
        60_000
    }
    /// `instances.max_calls`.
    pub fn instance_max_calls() -> u32 {
        100
    }
    /// `instances.max_idle`.
    pub fn instance_max_idle() -> u32 {
        4
    }
    /// `cache.outage_retry_ms`.
    pub fn outage_retry_ms() -> u64 {
        1000
    }

    /// `cache.min_reauth_interval_ms`.
    pub fn min_reauth_interval_ms() -> u64 {
        5000
    }
    /// A switch that is on by default.
    pub fn yes() -> bool {
        true
    }
    /// `runtime.max_instances`.
    pub fn max_instances() -> u32 {
        256
    }
    /// `limits.max_concurrent_calls`.
    pub fn max_concurrent_calls() -> u32 {
        8
    }
    /// `limits.queue_timeout_ms`.
    pub fn queue_timeout_ms() -> u64 {
        5000
    }
    /// `limits.max_requests_in_flight`.
    pub fn max_requests_in_flight() -> u32 {
        8
    }
    /// `limits.max_provider_requests_in_flight`.
    pub fn max_provider_requests_in_flight() -> u32 {
        32
    }
    /// `limits.max_host_resources`.
    pub fn max_host_resources() -> u32 {
        1024
    }
}

/// The 1-based line where the key at `path` (e.g. `["providers", "acme",
/// "config", "token_url"]`) is written in the TOML `text`, if it is (dotted keys,
/// `[table]` headers and inline tables alike).
pub fn line_of_key(text: &str, path: &[&str]) -> Option<usize> {
    key_lines(text)(path)
}

/// [`line_of_key`] for many keys of one text: the text is parsed once.
pub fn key_lines(text: &str) -> impl Fn(&[&str]) -> Option<usize> + '_ {
    let root = toml::de::DeTable::parse(text).ok();
    move |path| line_in(text, root.as_ref()?.get_ref(), path)
}

fn line_in(text: &str, root: &toml::de::DeTable<'_>, path: &[&str]) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let mut table: &DeTable<'_> = root;
    let (last, parents) = path.split_last()?;
    for part in parents {
        let (_, value) = table.iter().find(|(k, _)| k.get_ref() == part)?;
        match value.get_ref() {
            DeValue::Table(t) => table = t,
            _ => return None,
        }
    }
    let (key, _) = table.iter().find(|(k, _)| k.get_ref() == last)?;
    let start = key.span().start.min(text.len());
    Some(
        text.as_bytes()[..start]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1,
    )
}

impl HostConfig {
    /// Read and validate `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_path_buf()),
            line: None,
            message: format!("cannot read config file: {e}"),
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::from_toml(&text, Some(path), base)
    }

    /// Parse and validate TOML text; relative paths resolve against `base_dir`.
    pub fn from_toml(
        text: &str,
        file: Option<&Path>,
        base_dir: PathBuf,
    ) -> Result<Self, ConfigError> {
        let parse_error = |e: toml::de::Error, path: Option<String>| {
            let line = e.span().map(|span| {
                text.as_bytes()[..span.start.min(text.len())]
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count()
                    + 1
            });
            let message = e.message().trim().to_string();
            ConfigError {
                file: file.map(Path::to_path_buf),
                line,
                message: match path.filter(|p| !p.is_empty() && p != ".") {
                    Some(p) => format!("{p}: {message}"),
                    None => message,
                },
            }
        };
        let de = toml::Deserializer::parse(text).map_err(|e| parse_error(e, None))?;
        let mut config: HostConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            parse_error(e.into_inner(), Some(path))
        })?;
        config.base_dir = base_dir;
        config.source = file.map(Path::to_path_buf);
        config.validate()?;
        Ok(config)
    }

    /// Check what serde cannot: ranges, formats and names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_runtime()?;
        self.validate_fleet()?;
        for name in self.providers.keys() {
            self.validate_provider(name)?;
        }
        Ok(())
    }

    /// Check the `[runtime]` section only.
    pub fn validate_runtime(&self) -> Result<(), ConfigError> {
        let file = self.source.as_deref();
        if self.runtime.max_cache_entries == 0 {
            return Err(ConfigError::at(
                file,
                "runtime.max_cache_entries",
                "must be at least 1",
            ));
        }
        // The pool reserves address space for 4 memories per instance, each
        // slot as large as wasmtime's memory reservation (4 GiB): 2048 instances
        // is 32 TiB of the 128 TiB a process can address.
        if !(16..=2048).contains(&self.runtime.max_instances) {
            return Err(ConfigError::at(
                file,
                "runtime.max_instances",
                "must be between 16 and 2048",
            ));
        }
        if self
            .runtime
            .keep_resident_kib
            .is_some_and(|kib| kib > 65_536)
        {
            return Err(ConfigError::at(
                file,
                "runtime.keep_resident_kib",
                "must be at most 65536 (64 MiB)",
            ));
        }
        if !(1..=65_536).contains(&self.runtime.max_memory_mib) {
            return Err(ConfigError::at(
                file,
                "runtime.max_memory_mib",
                "must be between 1 and 65536",
            ));
        }
        Ok(())
    }

    /// Check the `[fleet]` section, if there is one.
    pub fn validate_fleet(&self) -> Result<(), ConfigError> {
        let Some(fleet) = &self.fleet else {
            return Ok(());
        };
        let file = self.source.as_deref();
        if !valid_provider_name(&fleet.name) {
            return Err(ConfigError::at(
                file,
                "fleet.name",
                "must be 1-64 characters of A-Z a-z 0-9 - _",
            ));
        }
        let ranges = [
            ("fleet.lease_ms", fleet.lease_ms, 1000, 600_000),
            ("fleet.wait_ms", fleet.wait_ms, 100, 600_000),
            ("fleet.timeout_ms", fleet.timeout_ms, 50, 60_000),
        ];
        for (key, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                return Err(ConfigError::at(
                    file,
                    key,
                    format!("must be between {min} and {max}"),
                ));
            }
        }
        for (name, p) in &self.providers {
            check_state_lease(file, name, p, fleet.lease_ms)?;
        }
        if fleet.timeout_ms.saturating_mul(2) > fleet.lease_ms {
            return Err(ConfigError::at(
                file,
                "fleet.timeout_ms",
                format!(
                    "must be at most half of fleet.lease_ms ({} ms): a renewal that takes longer would let the lease lapse",
                    fleet.lease_ms
                ),
            ));
        }
        Ok(())
    }

    /// Resolve `value` (inline, `{ env }` or `{ file }`) for the config key `key`.
    pub fn resolve_value(&self, key: &str, value: &ConfigValue) -> Result<Secret, ConfigError> {
        resolve_value(self.source.as_deref(), &self.base_dir, key, value)
    }

    /// Check one provider's section (the name must be configured), including
    /// where its `{ credential = … }` values lead.
    pub fn validate_provider(&self, name: &str) -> Result<(), ConfigError> {
        match self.providers.get(name) {
            Some(p) => {
                validate_provider(self.source.as_deref(), name, p, &self.runtime)?;
                self.validate_credential_refs(name, p)
            }
            None => Err(ConfigError::at(
                self.source.as_deref(),
                format!("providers.{name}"),
                "no such provider",
            )),
        }
    }

    /// `{ credential = "x" }` values name a configured provider other than this
    /// one, and following them never leads back here (at most
    /// [`MAX_CREDENTIAL_CHAIN`] providers deep).
    fn validate_credential_refs(&self, name: &str, p: &ProviderConfig) -> Result<(), ConfigError> {
        let file = self.source.as_deref();
        if credential_refs(&p.config).count() > MAX_CREDENTIAL_REFS {
            return Err(ConfigError::at(
                file,
                format!("providers.{name}.config"),
                format!(
                    "at most {MAX_CREDENTIAL_REFS} values can take another provider's credential"
                ),
            ));
        }
        for (key, r) in credential_refs(&p.config) {
            let at = format!("providers.{name}.config.{key}");
            if r.provider == name {
                return Err(ConfigError::at(
                    file,
                    at,
                    "a provider cannot take its own credential",
                ));
            }
            if !self.providers.contains_key(&r.provider) {
                return Err(ConfigError::at(
                    file,
                    at,
                    format!("`credential = {:?}`: no such provider", r.provider),
                ));
            }
            // Walk the chain breadth-first: a cycle or a chain too deep is refused.
            let mut frontier = vec![(r.provider.clone(), vec![name.to_string()])];
            while let Some((next, mut path)) = frontier.pop() {
                path.push(next.clone());
                if next == name {
                    return Err(ConfigError::at(
                        file,
                        at,
                        format!("credential references form a cycle: {}", path.join(" → ")),
                    ));
                }
                if path.len() > MAX_CREDENTIAL_CHAIN {
                    return Err(ConfigError::at(
                        file,
                        at,
                        format!(
                            "credential references chain more than {MAX_CREDENTIAL_CHAIN} providers: {}",
                            path.join(" → ")
                        ),
                    ));
                }
                if let Some(q) = self.providers.get(&next) {
                    // (At most MAX_CREDENTIAL_REFS each, checked when that
                    // provider is validated; `take` keeps this walk bounded
                    // before then.)
                    for (_, r) in credential_refs(&q.config).take(MAX_CREDENTIAL_REFS) {
                        frontier.push((r.provider.clone(), path.clone()));
                    }
                }
            }
        }
        Ok(())
    }

    /// Resolve `path` against the config file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }
}

/// In a fleet, a call holding a provider's shared state must end before its
/// lease could lapse: the provider's `limits.timeout_ms` is at most 80 % of
/// `lease_ms` (a holder stopped past its lease can then never still be calling
/// the identity provider with a refresh token another replica took over).
#[doc(hidden)]
pub fn check_state_lease(
    file: Option<&Path>,
    name: &str,
    p: &ProviderConfig,
    lease_ms: u64,
) -> Result<(), ConfigError> {
    let limit = lease_ms / 5 * 4;
    if p.shared_state && p.limits.timeout_ms > limit {
        return Err(ConfigError::at(
            file,
            format!("providers.{name}.limits.timeout_ms"),
            format!(
                "{} ms is more than 80% of fleet.lease_ms ({lease_ms} ms): a call holding this provider's shared state must end before its lease could lapse; lower it to at most {limit}, raise fleet.lease_ms, or set providers.{name}.shared_state = false if its state is only a cache",
                p.limits.timeout_ms
            ),
        ));
    }
    Ok(())
}

/// Where the key ring for data kept in `dir` lives by default: beside it, in
/// `<dir>.keys/key`, so that a copy of `dir` alone (a backup, an archive, an
/// accidental commit) does not carry the key.
pub fn default_key_file(dir: &Path) -> PathBuf {
    let dir = dir.components().collect::<PathBuf>();
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "reauth".into());
    dir.with_file_name(format!("{name}.keys")).join("key")
}

/// Provider names appear in URLs, metrics and file names: keep them plain.
#[doc(hidden)]
pub fn valid_provider_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Upper bound of the cache's second-valued settings (no token lives longer).
const TEN_YEARS_SECS: u64 = 10 * 366 * 86_400;

#[doc(hidden)]
pub fn validate_provider(
    file: Option<&Path>,
    name: &str,
    p: &ProviderConfig,
    runtime: &RuntimeConfig,
) -> Result<(), ConfigError> {
    let key = |k: &str| format!("providers.{name}.{k}");
    if !valid_provider_name(name) {
        return Err(ConfigError::at(
            file,
            format!("providers.{name}"),
            "provider names use only letters, digits, `-` and `_` (at most 64)",
        ));
    }
    if let Some(sha) = &p.sha256
        && (sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(ConfigError::at(
            file,
            key("sha256"),
            "expected 64 hex digits",
        ));
    }
    for (i, host) in p.allowed_hosts.iter().enumerate() {
        if let Err(why) = crate::hosts::HostPattern::parse(host) {
            return Err(ConfigError::at(
                file,
                format!("{}[{i}]", key("allowed_hosts")),
                format!("`{host}`: {why}"),
            ));
        }
    }
    if p.limits.timeout_ms == 0 || p.limits.timeout_ms > 600_000 {
        return Err(ConfigError::at(
            file,
            key("limits.timeout_ms"),
            "must be between 1 and 600000",
        ));
    }
    if p.limits.memory_mib == 0 || p.limits.memory_mib > runtime.max_memory_mib {
        return Err(ConfigError::at(
            file,
            key("limits.memory_mib"),
            format!(
                "must be between 1 and runtime.max_memory_mib ({})",
                runtime.max_memory_mib
            ),
        ));
    }
    let l = &p.limits;
    for (k, v, range) in [
        ("limits.fuel", l.fuel.unwrap_or(1), 1..=u64::MAX),
        (
            "limits.max_credential_bytes",
            l.max_credential_bytes,
            64..=(64 << 20),
        ),
        (
            "limits.max_response_bytes",
            l.max_response_bytes,
            1..=(1 << 30),
        ),
        (
            "limits.max_output_bytes",
            l.max_output_bytes,
            1024..=(64 << 20),
        ),
        (
            "limits.connect_timeout_ms",
            l.connect_timeout_ms,
            1..=600_000,
        ),
        (
            "limits.first_byte_timeout_ms",
            l.first_byte_timeout_ms,
            1..=600_000,
        ),
        (
            "limits.max_concurrent_calls",
            u64::from(l.max_concurrent_calls),
            1..=4096,
        ),
        ("limits.queue_timeout_ms", l.queue_timeout_ms, 0..=600_000),
        (
            "limits.max_requests_in_flight",
            u64::from(l.max_requests_in_flight),
            1..=1024,
        ),
        (
            "limits.max_provider_requests_in_flight",
            u64::from(l.max_provider_requests_in_flight),
            1..=65_536,
        ),
        (
            "limits.max_host_resources",
            u64::from(l.max_host_resources),
            64..=1_000_000,
        ),
        (
            "cache.default_ttl_secs",
            p.cache.default_ttl_secs,
            1..=TEN_YEARS_SECS,
        ),
        (
            "cache.max_lifetime_secs",
            p.cache.max_lifetime_secs.unwrap_or(1),
            1..=TEN_YEARS_SECS,
        ),
        ("cache.skew_secs", p.cache.skew_secs, 0..=86_400),
        (
            "cache.min_period_secs",
            p.cache.min_period_secs,
            0..=TEN_YEARS_SECS,
        ),
        ("cache.buffer_secs", p.cache.buffer_secs, 0..=TEN_YEARS_SECS),
        (
            "cache.min_interval_ms",
            p.cache.min_interval_ms,
            0..=3_600_000,
        ),
        (
            "cache.min_reauth_interval_ms",
            p.cache.min_reauth_interval_ms,
            0..=3_600_000,
        ),
        (
            "cache.outage_retry_ms",
            p.cache.outage_retry_ms,
            0..=3_600_000,
        ),
        (
            "retry.max_retry_after_ms",
            p.retry.max_retry_after_ms,
            0..=3_600_000,
        ),
        ("retry.budget_ms", p.retry.budget_ms, 1..=86_400_000),
        (
            "circuit_breaker.faults",
            u64::from(p.circuit_breaker.faults),
            1..=1000,
        ),
        (
            "circuit_breaker.cooldown_ms",
            p.circuit_breaker.cooldown_ms,
            1..=86_400_000,
        ),
        (
            "instances.max_calls",
            u64::from(p.instances.max_calls),
            1..=1_000_000,
        ),
        (
            "instances.max_idle",
            u64::from(p.instances.max_idle),
            1..=64,
        ),
    ] {
        if !range.contains(&v) {
            return Err(ConfigError::at(
                file,
                key(k),
                format!("must be between {} and {}", range.start(), range.end()),
            ));
        }
    }
    if p.circuit_breaker.max_cooldown_ms < p.circuit_breaker.cooldown_ms {
        return Err(ConfigError::at(
            file,
            key("circuit_breaker.max_cooldown_ms"),
            "must be at least circuit_breaker.cooldown_ms",
        ));
    }
    if p.cache.default_ttl_secs == 0 {
        return Err(ConfigError::at(
            file,
            key("cache.default_ttl_secs"),
            "must be at least 1",
        ));
    }
    let c = &p.cache;
    if !(0.5..=1.0).contains(&c.window_factor) {
        return Err(ConfigError::at(
            file,
            key("cache.window_factor"),
            "must be between 0.5 and 1.0",
        ));
    }
    if !(0.0..=0.25).contains(&c.window_jitter) {
        return Err(ConfigError::at(
            file,
            key("cache.window_jitter"),
            "must be between 0 and 0.25",
        ));
    }
    if c.window_factor + c.window_jitter > 1.0 {
        return Err(ConfigError::at(
            file,
            key("cache.window_jitter"),
            "window_factor + window_jitter must not exceed 1.0",
        ));
    }
    if c.backoff_initial_ms == 0 || c.backoff_initial_ms > c.backoff_max_ms {
        return Err(ConfigError::at(
            file,
            key("cache.backoff_initial_ms"),
            "must be at least 1 and at most cache.backoff_max_ms",
        ));
    }
    if c.backoff_max_ms > 3_600_000 {
        return Err(ConfigError::at(
            file,
            key("cache.backoff_max_ms"),
            "must be at most 3600000",
        ));
    }
    if p.retry.max_reauth > 5 {
        return Err(ConfigError::at(
            file,
            key("retry.max_reauth"),
            "must be at most 5 (each re-authentication is an IdP call)",
        ));
    }
    if !(p.retry.retry_ratio.is_finite() && (0.0..=10.0).contains(&p.retry.retry_ratio)) {
        return Err(ConfigError::at(
            file,
            key("retry.retry_ratio"),
            "must be between 0 and 10",
        ));
    }
    if p.retry.min_retries_per_sec > 1_000_000 {
        return Err(ConfigError::at(
            file,
            key("retry.min_retries_per_sec"),
            "must be at most 1000000",
        ));
    }
    let rate = p.rate.fetches_per_second;
    if !(rate.is_finite() && (rate == 0.0 || (0.001..=1_000_000.0).contains(&rate))) {
        return Err(ConfigError::at(
            file,
            key("rate.fetches_per_second"),
            "must be 0 (no budget) or between 0.001 and 1000000",
        ));
    }
    if !(1..=1_000_000).contains(&p.rate.burst) {
        return Err(ConfigError::at(
            file,
            key("rate.burst"),
            "must be between 1 and 1000000",
        ));
    }
    if p.rate.wait_ms > 600_000 {
        return Err(ConfigError::at(
            file,
            key("rate.wait_ms"),
            "must be at most 600000",
        ));
    }
    if let Some(c) = &p.candidate {
        if !(c.share.is_finite() && c.share > 0.0 && c.share <= 1.0) {
            return Err(ConfigError::at(
                file,
                key("candidate.share"),
                "must be more than 0 and at most 1",
            ));
        }
        if !(1..=3600).contains(&c.window_secs) {
            return Err(ConfigError::at(
                file,
                key("candidate.window_secs"),
                "must be between 1 and 3600",
            ));
        }
        if !(c.max_error_rate.is_finite() && (0.0..=1.0).contains(&c.max_error_rate)) {
            return Err(ConfigError::at(
                file,
                key("candidate.max_error_rate"),
                "must be between 0 and 1",
            ));
        }
        if !(1..=1_000_000).contains(&c.min_fetches) || !(1..=1_000_000).contains(&c.max_faults) {
            return Err(ConfigError::at(
                file,
                key("candidate"),
                "min_fetches and max_faults must be between 1 and 1000000",
            ));
        }
        if let Some(sha) = &c.sha256
            && (sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(ConfigError::at(
                file,
                key("candidate.sha256"),
                "expected 64 hex digits",
            ));
        }
        if c.config
            .values()
            .any(|v| matches!(v, ConfigValue::Credential(_)))
            || c.config
                .keys()
                .any(|k| matches!(p.config.get(k), Some(ConfigValue::Credential(_))))
        {
            return Err(ConfigError::at(
                file,
                key("candidate.config"),
                "a candidate's config can neither add nor override `{ credential = … }` values (it takes the provider's)",
            ));
        }
    }
    if p.retry.budget_ms == 0 {
        return Err(ConfigError::at(
            file,
            key("retry.budget_ms"),
            "must be at least 1",
        ));
    }
    if p.cache.max_lifetime_secs == Some(0) {
        return Err(ConfigError::at(
            file,
            key("cache.max_lifetime_secs"),
            "must be at least 1",
        ));
    }
    Ok(())
}

/// How many providers a chain of `{ credential = … }` references may span
/// (`a` takes `b`'s credential, which takes `c`'s, …).
pub const MAX_CREDENTIAL_CHAIN: usize = 4;

/// How many of one provider's config values may take another provider's
/// credential.
pub const MAX_CREDENTIAL_REFS: usize = 8;

/// The `{ credential = … }` values of a provider's config, by key.
pub fn credential_refs(
    values: &BTreeMap<String, ConfigValue>,
) -> impl Iterator<Item = (&str, &CredentialRef)> {
    values.iter().filter_map(|(k, v)| match v {
        ConfigValue::Credential(r) => Some((k.as_str(), r)),
        _ => None,
    })
}

/// Resolve a provider's config values (`{ env }`, `{ file }`) into plain secrets.
/// `{ credential }` values are left out: the host resolves them at every fetch.
/// Errors name the provider and the key, never the value.
#[doc(hidden)]
pub fn resolve_values(
    file: Option<&Path>,
    base_dir: &Path,
    provider: &str,
    values: &BTreeMap<String, ConfigValue>,
) -> Result<Vec<(String, Secret)>, ConfigError> {
    values
        .iter()
        .filter(|(_, v)| !matches!(v, ConfigValue::Credential(_)))
        .map(|(k, v)| {
            let key = format!("providers.{provider}.config.{k}");
            Ok((k.clone(), resolve_value(file, base_dir, &key, v)?))
        })
        .collect()
}

/// Resolve one value (inline, `{ env }`, or `{ file }` relative to `base_dir`,
/// trailing newline trimmed); errors name `key` and the variable or file.
pub fn resolve_value(
    file: Option<&Path>,
    base_dir: &Path,
    key: &str,
    value: &ConfigValue,
) -> Result<Secret, ConfigError> {
    Ok(match value {
        ConfigValue::Value(s) => s.clone(),
        ConfigValue::Env { env } => Secret::new(std::env::var(env).map_err(|_| {
            ConfigError::at(
                file,
                key,
                format!("environment variable `{env}` is not set"),
            )
        })?),
        ConfigValue::Credential(r) => {
            return Err(ConfigError::at(
                file,
                key,
                format!(
                    "`credential = {:?}`: only a provider's config values can take another provider's credential",
                    r.provider
                ),
            ));
        }
        ConfigValue::File { file: path } => {
            let path = if path.is_absolute() {
                path.clone()
            } else {
                base_dir.join(path)
            };
            let text = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::at(file, key, format!("cannot read {}: {e}", path.display()))
            })?;
            Secret::new(text.trim_end_matches(['\n', '\r']).to_string())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<HostConfig, ConfigError> {
        HostConfig::from_toml(text, Some(Path::new("reauth.toml")), PathBuf::from("."))
    }

    /// The constructors an embedder uses (the config structs are
    /// non-exhaustive) give what the same minimal TOML gives.
    #[test]
    fn constructors_match_the_parsed_defaults() {
        let parsed = parse(
            "[fleet]\nname = \"payments\"\nbackend = \"redis\"\nurl = { env = \"U\" }\nkey = { env = \"K\" }\n\
             [providers.a]\nplugin = \"a.wasm\"\n[providers.a.candidate]\nplugin = \"b.wasm\"\nshare = 0.25\n",
        )
        .unwrap();
        let env = |e: &str| ConfigValue::Env { env: e.into() };
        assert_eq!(
            parsed.fleet.as_ref().unwrap(),
            &FleetConfig::new("payments", FleetBackendKind::Redis, env("U"), env("K"))
        );
        let a = &parsed.providers["a"];
        assert_eq!(
            a.candidate.as_ref().unwrap(),
            &CandidateConfig::new("b.wasm", 0.25)
        );
        let mut built = ProviderConfig::new("a.wasm");
        built.candidate = Some(CandidateConfig::new("b.wasm", 0.25));
        assert_eq!(a, &built);
    }

    #[test]
    fn runtime_keep_resident_is_bounded_and_named() {
        let ok = parse("[runtime]\nkeep_resident_kib = 65536\n").unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.runtime.keep_resident_kib, Some(65_536));
        assert_eq!(parse("").unwrap().runtime.keep_resident_kib, None);
        for value in ["65537", "18446744073709551615"] {
            let e = parse(&format!("[runtime]\nkeep_resident_kib = {value}\n"))
                .and_then(|c| c.validate())
                .unwrap_err();
            assert!(
                e.to_string().contains("runtime.keep_resident_kib"),
                "{value}: {e}"
            );
        }
        let e = parse("[runtime]\nkeep_resident_kib = -1\n").unwrap_err();
        assert!(e.to_string().contains("keep_resident_kib"), "{e}");
    }

    #[test]
    fn fleet_section_is_validated_with_named_keys() {
        let base = "[fleet]\nname = \"payments\"\nbackend = \"redis\"\nurl = { env = \"U\" }\nkey = { env = \"K\" }\n";
        let ok = parse(base).unwrap();
        ok.validate().unwrap();
        let f = ok.fleet.as_ref().unwrap();
        assert_eq!(
            (f.lease_ms, f.wait_ms, f.timeout_ms),
            (10_000, 15_000, 2000)
        );
        assert_eq!(f.backend, FleetBackendKind::Redis);
        for (extra, key) in [
            ("lease_ms = 10\n", "fleet.lease_ms"),
            ("wait_ms = 0\n", "fleet.wait_ms"),
            ("timeout_ms = 18446744073709551615\n", "fleet.timeout_ms"),
            ("lease_ms = 2000\ntimeout_ms = 1500\n", "fleet.timeout_ms"),
        ] {
            let e = parse(&format!("{base}{extra}"))
                .and_then(|c| c.validate())
                .unwrap_err();
            assert!(e.to_string().contains(key), "{extra}: {e}");
        }
        let e = parse(&base.replace("payments", "no spaces"))
            .and_then(|c| c.validate())
            .unwrap_err();
        assert!(e.to_string().contains("fleet.name"), "{e}");
        let e = parse(&base.replace("redis", "etcd")).unwrap_err();
        assert!(
            e.to_string().contains("etcd") || e.to_string().contains("backend"),
            "{e}"
        );
        let e = parse(&format!("{base}bogus = 1\n")).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        // Inline values are secrets: Debug never shows them.
        let inline =
            parse(&base.replace("{ env = \"U\" }", "\"redis://u:hunter2-pw@h:6379\"")).unwrap();
        assert!(!format!("{inline:?}").contains("hunter2"));
        // A missing variable names the key and the variable.
        let e = inline
            .resolve_value("fleet.key", &inline.fleet.as_ref().unwrap().key)
            .unwrap_err();
        assert!(
            e.to_string().contains("fleet.key") && e.to_string().contains("`K`"),
            "{e}"
        );
    }

    #[test]
    fn minimal_provider_gets_defaults() {
        let c = parse("[providers.a]\nplugin = \"a.wasm\"\n").unwrap();
        let a = &c.providers["a"];
        assert_eq!(a.limits.timeout_ms, 5000);
        assert_eq!(a.cache.skew_secs, 30);
        assert!(a.allowed_hosts.is_empty());
    }

    #[test]
    fn unknown_key_names_file_line_provider_and_key_snapshot() {
        let e = parse("[providers.a]\nplugin = \"a.wasm\"\n\n[providers.a.limits]\ntimeout_ms = 10\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "reauth.toml:6: providers.a.limits.bogus: unknown field `bogus`, expected one of `timeout_ms`, `memory_mib`, `fuel`, `max_credential_bytes`, `max_response_bytes`, `max_output_bytes`, `connect_timeout_ms`, `first_byte_timeout_ms`, `max_concurrent_calls`, `queue_timeout_ms`, `max_requests_in_flight`, `max_provider_requests_in_flight`, `max_host_resources`"
        );
    }

    #[test]
    fn unknown_top_level_key() {
        let e = parse("[provider.a]\nplugin = \"a.wasm\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "reauth.toml:1: provider: unknown field `provider`, expected one of `runtime`, `providers`, `fleet`"
        );
    }

    #[test]
    fn credential_references() {
        let two = |aws: &str| {
            format!(
                "[providers.oidc]\nplugin = \"o.wasm\"\n[providers.aws]\nplugin = \"a.wasm\"\n[providers.aws.config]\n{aws}\n"
            )
        };
        let c = parse(&two(
            r#"token = { credential = "oidc", field = "header.X-Id", audience = "sts", scopes = ["a", "b"], pass_subject = true }"#,
        ))
        .unwrap();
        let refs: Vec<_> = credential_refs(&c.providers["aws"].config).collect();
        assert_eq!(refs.len(), 1);
        let (key, r) = refs[0];
        assert_eq!(key, "token");
        assert_eq!(r.provider, "oidc");
        assert_eq!(r.field, CredentialField::Header("x-id".into()));
        assert_eq!(r.audience.as_deref(), Some("sts"));
        assert_eq!(r.scopes, ["a", "b"]);
        assert!(r.pass_subject);
        assert_eq!(
            format!("{:?}", c.providers["aws"].config["token"]),
            r#"{ credential = "oidc", field = "header.x-id" }"#
        );
        // Left out of the values resolved at load.
        let values =
            resolve_values(None, Path::new("."), "aws", &c.providers["aws"].config).unwrap();
        assert!(values.is_empty());
        for (aws, expected) in [
            (
                r#"token = { credential = "nope" }"#,
                "reauth.toml: providers.aws.config.token: `credential = \"nope\"`: no such provider",
            ),
            (
                r#"token = { credential = "aws" }"#,
                "reauth.toml: providers.aws.config.token: a provider cannot take its own credential",
            ),
            (
                r#"token = { credential = "oidc", field = "secret" }"#,
                "`field = \"secret\"`: expected \"token\", \"username\", \"password\" or \"header.<name>\"",
            ),
            (
                r#"token = { credential = "oidc", audiance = "x" }"#,
                "unknown key `audiance` in a credential reference",
            ),
            (
                r#"token = { credential = 5 }"#,
                "`credential` must be a provider name",
            ),
            (
                r#"token = { credential = "oidc", scopes = [1] }"#,
                "`scopes` must be a list of strings",
            ),
        ] {
            let e = parse(&two(aws)).unwrap_err().to_string();
            assert!(e.contains(expected), "{aws}: {e}");
        }
        // Cycles and chains too long are refused, naming the key and the chain.
        let e = parse(
            "[providers.a]\nplugin = \"a.wasm\"\nconfig = { t = { credential = \"b\" } }\n[providers.b]\nplugin = \"b.wasm\"\nconfig = { t = { credential = \"a\" } }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("providers.a.config.t: credential references form a cycle: a → b → a"),
            "{e}"
        );
        let chain: String = (0..6)
            .map(|i| {
                format!(
                    "[providers.p{i}]\nplugin = \"p.wasm\"\nconfig = {{ t = {{ credential = \"p{}\" }} }}\n",
                    i + 1
                )
            })
            .collect::<String>()
            + "[providers.p6]\nplugin = \"p.wasm\"\n";
        let e = parse(&chain).unwrap_err().to_string();
        assert!(e.contains("chain more than 4 providers"), "{e}");
        // A fleet's settings cannot take a credential.
        let e = resolve_value(
            None,
            Path::new("."),
            "fleet.url",
            &ConfigValue::Credential(CredentialRef::new("oidc")),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("only a provider's config values"), "{e}");
    }

    #[test]
    fn bad_toml_names_line() {
        let e = parse("[providers.a]\nplugin = \n").unwrap_err().to_string();
        assert!(e.starts_with("reauth.toml:2: "), "{e}");
    }

    #[test]
    fn missing_plugin_key() {
        let e = parse("[providers.a]\nallowed_hosts = []\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "reauth.toml:1: providers.a: missing field `plugin`");
    }

    #[test]
    fn wrong_type_names_key() {
        let e =
            parse("[providers.a]\nplugin = \"a.wasm\"\n[providers.a.limits]\ntimeout_ms = true\n")
                .unwrap_err()
                .to_string();
        assert_eq!(
            e,
            "reauth.toml:4: providers.a.limits.timeout_ms: expected a number of milliseconds or a duration such as \"5s\""
        );
    }

    /// One rule for durations: the key names its unit, a number is in it, and a
    /// string with units is accepted for every duration key.
    #[test]
    fn duration_keys_take_numbers_in_their_unit_or_human_durations() {
        let c = parse(
            "[providers.a]\nplugin = \"a.wasm\"\n[providers.a.limits]\ntimeout_ms = \"2s\"\n\
             [providers.a.cache]\ndefault_ttl_secs = \"5m\"\nmax_lifetime_secs = \"1h\"\n\
             backoff_max_ms = \"1m30s\"\nskew_secs = 7\n",
        )
        .unwrap();
        let p = &c.providers["a"];
        assert_eq!(p.limits.timeout_ms, 2_000);
        assert_eq!(p.cache.default_ttl_secs, 300);
        assert_eq!(p.cache.max_lifetime_secs, Some(3_600));
        assert_eq!(p.cache.backoff_max_ms, 90_000);
        assert_eq!(p.cache.skew_secs, 7);
        let err = |section: &str, line: &str| {
            parse(&format!(
                "[providers.a]\nplugin = \"a.wasm\"\n[providers.a.{section}]\n{line}\n"
            ))
            .unwrap_err()
            .to_string()
        };
        assert_eq!(
            err("cache", "default_ttl_secs = \"1500ms\""),
            "reauth.toml:4: providers.a.cache.default_ttl_secs: `1500ms` is not a whole number of seconds (this key is in seconds)"
        );
        assert_eq!(
            err("limits", "timeout_ms = \"soon\""),
            "reauth.toml:4: providers.a.limits.timeout_ms: `soon` is not a duration (e.g. 500ms, 10s, 2m, 1h30m)"
        );
        assert_eq!(
            err("limits", "timeout_ms = -1"),
            "reauth.toml:4: providers.a.limits.timeout_ms: -1 milliseconds: must not be negative"
        );
        assert!(
            err("limits", "timeout_ms = \"99999999999999999d\"").contains("is too long"),
            "no overflow"
        );
        // Out of range after conversion: the range check names the key.
        let e = err("limits", "timeout_ms = \"2h\"");
        assert!(e.contains("providers.a.limits.timeout_ms"), "{e}");
    }

    #[test]
    fn range_errors_name_key() {
        let e = parse("[providers.a]\nplugin = \"a.wasm\"\nlimits = { timeout_ms = 0 }\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "reauth.toml: providers.a.limits.timeout_ms: must be between 1 and 600000"
        );
        let e = parse("[providers.a]\nplugin = \"a.wasm\"\nallowed_hosts = [\"ok:1\", \"a b\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("reauth.toml: providers.a.allowed_hosts[1]: `a b`: "),
            "{e}"
        );
        for (toml, expected) in [
            (
                "limits = { fuel = 0 }",
                "providers.a.limits.fuel: must be between 1 and 18446744073709551615",
            ),
            (
                "limits = { max_output_bytes = 10 }",
                "providers.a.limits.max_output_bytes: must be between 1024 and 67108864",
            ),
            (
                "circuit_breaker = { faults = 0 }",
                "providers.a.circuit_breaker.faults: must be between 1 and 1000",
            ),
            (
                "circuit_breaker = { cooldown_ms = 5000, max_cooldown_ms = 10 }",
                "providers.a.circuit_breaker.max_cooldown_ms: must be at least circuit_breaker.cooldown_ms",
            ),
            (
                "instances = { reuse = true, max_calls = 0 }",
                "providers.a.instances.max_calls: must be between 1 and 1000000",
            ),
            (
                "instances = { max_idle = 65 }",
                "providers.a.instances.max_idle: must be between 1 and 64",
            ),
        ] {
            let e = parse(&format!("[providers.a]\nplugin = \"a.wasm\"\n{toml}\n"))
                .unwrap_err()
                .to_string();
            assert_eq!(e, format!("reauth.toml: {expected}"));
        }
        let ok = parse(
            "[providers.a]\nplugin = \"a.wasm\"\nallow_http = true\nlimits = { fuel = 1000000, max_response_bytes = 4096 }\ncircuit_breaker = { faults = 5 }\ninstances = { reuse = true }\n",
        )
        .unwrap();
        let a = &ok.providers["a"];
        assert!(a.instances.reuse);
        assert_eq!(a.instances.max_calls, 100);
        assert_eq!(a.instances.max_idle, 4);
        assert!(a.allow_http);
        assert_eq!(a.limits.fuel, Some(1_000_000));
        assert_eq!(a.limits.max_response_bytes, 4096);
        assert_eq!(a.circuit_breaker.faults, 5);
        assert_eq!(a.circuit_breaker.cooldown_ms, 1000);
    }

    #[test]
    fn config_values_and_references() {
        let c = parse(
            "[providers.a]\nplugin = \"a.wasm\"\n[providers.a.config]\nplain = \"p\"\nnum = 5\nsecret = { env = \"REAUTH_TEST_UNSET_VAR\" }\n",
        )
        .unwrap();
        let cfg = &c.providers["a"].config;
        assert_eq!(cfg["num"], ConfigValue::Value(Secret::new("5")));
        let e = resolve_values(c.source.as_deref(), &c.base_dir, "a", cfg)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "reauth.toml: providers.a.config.secret: environment variable `REAUTH_TEST_UNSET_VAR` is not set"
        );
        let e = parse("[providers.a]\nplugin = \"a.wasm\"\nconfig = { x = { vault = \"y\" } }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("providers.a.config.x: unsupported reference `vault`"),
            "{e}"
        );
    }

    /// Regression (hardening review, item 8): every value of 6+ characters was
    /// redacted, so `misconfigured: auth_method `[redacted]` needs …` said nothing.
    #[test]
    fn secret_keys_by_name() {
        for key in [
            "client_secret",
            "password",
            "refresh_token",
            "token",
            "api_key",
            "apiKey",
            "privateKey",
            "private_key",
            "client_assertion",
            "x-api-key",
            "db.password",
            "secret",
        ] {
            assert!(is_secret_key(key), "{key} is a secret");
        }
        for key in [
            "auth_method",
            "token_url",
            "tokenEndpoint",
            "client_id",
            "key_id",
            "private_key_alg",
            "private_key_kid",
            "assertion_audience",
            "authority",
            "scope",
            "mode",
            "username",
            "url",
            "monkey",
        ] {
            assert!(!is_secret_key(key), "{key} is not a secret");
        }
    }

    #[test]
    fn debug_of_config_shows_no_inline_secret() {
        let c = parse(
            "[providers.a]\nplugin = \"a.wasm\"\n[providers.a.config]\nclient_secret = \"s3cr3t-VALUE\"\n",
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr3t-VALUE"), "{shown}");
        assert!(shown.contains("client_secret"));
    }
}
