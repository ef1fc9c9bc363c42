//! Test support: paths to the guest components (`plugins/`, shipped providers and
//! fixtures, built from source by `tests/build.rs`), the real peers, helpers.
//!
//! Test tiers (see `tests/README.md`): unit tests live next to the code in `host/`;
//! everything here runs real components through the real host against real peers
//! on 127.0.0.1.

pub mod fleet;
pub mod peers;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Paths to the built components.
#[derive(Debug, Clone)]
pub struct Plugins {
    /// `plugins/static`.
    pub static_: PathBuf,
    /// `plugins/password-rotation`.
    pub password_rotation: PathBuf,
    /// `plugins/oidc-refresh-token`.
    pub oidc_refresh: PathBuf,
    /// `plugins/oauth2-client-credentials`.
    pub oauth2: PathBuf,
    /// `plugins/fixtures/testkit`.
    pub testkit: PathBuf,
    /// `plugins/fixtures/hostile`.
    pub hostile: PathBuf,
    /// `plugins/fixtures/other-world`.
    pub other_world: PathBuf,
    /// `plugins/fixtures/bench-logic` (the benchmarks' provider logic).
    pub bench_logic: PathBuf,
    /// `plugins/fixtures/flawed` (one deliberate flaw per `flaw` config value).
    pub flawed: PathBuf,
    /// `plugins/acme-sts` (the contract 0.2 example: a non-OAuth2 STS).
    pub acme_sts: PathBuf,
    /// `plugins/aws-sts` (AWS STS `AssumeRoleWithWebIdentity`).
    pub aws_sts: PathBuf,
    /// `plugins/fixtures/contract-0.1` (built against `reauth:provider@0.1.0`).
    pub contract_v01: PathBuf,
    /// `plugins/oauth2-client-credentials-py` (Python).
    pub oauth2_py: PathBuf,
    /// `plugins/password-rotation-js` (JavaScript).
    pub password_rotation_js: PathBuf,
    /// `plugins/fixtures/hostile-py` (Python).
    pub hostile_py: PathBuf,
    /// `plugins/fixtures/hostile-js` (JavaScript).
    pub hostile_js: PathBuf,
}

/// Paths the build script (`tests/build.rs`) wrote: where the guests are, and
/// why building them failed, if it did.
mod guests {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));
}

/// The guest components, built from source by `tests/build.rs` before the tests
/// compiled (the Rust guest workspace in `plugins/`, then the Python and
/// JavaScript providers). Panics naming the build's error, or the missing
/// component, if one is not there.
pub fn plugins() -> &'static Plugins {
    static PLUGINS: OnceLock<Plugins> = OnceLock::new();
    PLUGINS.get_or_init(|| {
        if let Some(error) = guests::BUILD_ERROR {
            panic!("the guest components were not built (tests/build.rs):\n{error}");
        }
        let path = |name: &str| {
            let p = Path::new(guests::GUESTS).join(format!("{name}.wasm"));
            assert!(p.exists(), "{} was not built", p.display());
            p
        };
        let component = |name: &str| {
            let p = Path::new(guests::COMPONENTS).join(format!("{name}.wasm"));
            assert!(p.exists(), "{} was not built", p.display());
            p
        };
        Plugins {
            static_: path("static"),
            password_rotation: path("password_rotation"),
            oidc_refresh: path("oidc_refresh_token"),
            oauth2: path("oauth2_client_credentials"),
            testkit: path("fixture_testkit"),
            hostile: path("fixture_hostile"),
            other_world: path("fixture_other_world"),
            bench_logic: path("fixture_bench_logic"),
            flawed: path("fixture_flawed"),
            acme_sts: path("acme_sts"),
            aws_sts: path("aws_sts"),
            contract_v01: path("fixture_contract_0_1"),
            oauth2_py: component("oauth2-client-credentials-py"),
            password_rotation_js: component("password-rotation-js"),
            hostile_py: component("hostile-py"),
            hostile_js: component("hostile-js"),
        }
    })
}

/// Build the workspace's binaries and return the path of `bin` (of `package`).
///
/// It builds exactly what `cargo test --workspace --all-targets` builds, with the
/// same feature set, so after that command it is a no-op; building `-p package`
/// alone would resolve features differently and rebuild wasmtime every time.
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--workspace", "--all-targets"])
            .current_dir(root())
            .status()
            .expect("running cargo");
        assert!(status.success(), "building the workspace failed");
    });
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let path = target.join("debug").join(bin);
    assert!(
        path.exists(),
        "{package}: binary {} was not built",
        path.display()
    );
    path
}

/// `provider`'s state as stored under `state_dir` (opened with the key ring
/// beside it, the way reauth does): what the tests check a rotation wrote.
pub fn read_state(
    state_dir: &Path,
    provider: &str,
) -> Option<std::collections::BTreeMap<String, String>> {
    use reauth::store::{FileStateStore, KeyRing, StateStore, default_key_file};
    if !state_dir.join(format!("{provider}.json")).exists() {
        return None;
    }
    let (dir, provider) = (state_dir.to_path_buf(), provider.to_string());
    // Its own thread and runtime: callers may be inside a runtime already.
    std::thread::spawn(move || {
        let keys = KeyRing::load_or_create(&default_key_file(&dir)).expect("the state's key ring");
        let store = FileStateStore::new(&dir, std::sync::Arc::new(keys));
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(async {
                let guard = store
                    .lock(&provider, std::time::Duration::from_secs(10))
                    .await
                    .expect("reading the state");
                guard.values().clone()
            })
    })
    .join()
    .ok()
}

/// Secret values the tests use. Every log line of the whole suite is checked
/// against them (and against the values tests register with [`record_secret`])
/// by `audit-logs` after the tests ran (`make test`).
pub const KNOWN_SECRETS: &[&str] = &[
    "client-secret-9f8e7d",
    "wrong-secret-5a4b3c",
    "static-pw-1q2w3e",
    "limited-secret",
    "not-the-secret",
    "vault-token",
    "svc-secret",
    "echoed-secret-7h6g5f",
    "from-a-file",
    // The Acme STS peer's API key and the wrong ones the contract tests send.
    "acme-key-7f3a9c",
    "wrong-key-5550123",
    "otp-seed-98765",
    "typo-secret-4711",
    // A config value a failed `describe` prints (not secret by its key's name).
    "describe-leak-8e1f2a",
    // The conformance kit's accepted and wrong client secrets.
    "conformance-secret-8c1f",
    "wrong-secret-77d0",
];

/// Where the suite's logs go: `target/test-logs/` (one file per test binary
/// process; `make test` empties it first).
pub fn log_dir() -> PathBuf {
    root().join("target/test-logs")
}

/// Start capturing this test binary's logs (idempotent; call it first in every
/// test): a process-wide `tracing` subscriber at TRACE level that keeps every line
/// in memory (for assertions) and appends it to a file under [`log_dir`] (for the
/// suite-wide audit).
pub fn logs() -> &'static CapturedLogs {
    static LOGS: OnceLock<CapturedLogs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = CapturedLogs::default();
        let dir = log_dir();
        std::fs::create_dir_all(&dir).expect("creating target/test-logs");
        let exe = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "test".into());
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{exe}-{}.log", std::process::id())))
            .expect("opening the test log file");
        *logs.file.lock().unwrap() = Some(file);
        logs.install_global();
        logs
    })
}

/// Register a secret that only exists at run time (an issued token) for the
/// suite-wide log audit.
pub fn record_secret(value: &str) {
    use std::io::Write as _;
    let path = log_dir().join(format!("recorded-secrets-{}.txt", std::process::id()));
    let _ = std::fs::create_dir_all(log_dir());
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{value}");
    }
}

/// The value of the Prometheus sample `line` (name and labels, exactly) in the
/// text `metrics`; panics naming it when it is absent.
pub fn metric_value(metrics: &str, line: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(line) && l[line.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no {line} in\n{metrics}"))
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}: not a number"))
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Every known or recorded secret found in `text`.
pub fn secrets_in<'a>(text: &str, secrets: &'a [String]) -> Vec<&'a str> {
    secrets
        .iter()
        .filter(|s| !s.is_empty() && text.contains(s.as_str()))
        .map(String::as_str)
        .collect()
}

/// Check every `*.log` file in `dir` against [`KNOWN_SECRETS`] and the secrets
/// recorded there by [`record_secret`] (`recorded-secrets-<pid>.txt`). `Ok` summarises what was checked; `Err`
/// lists the offending file:line pairs (never the secrets), or says there were no
/// logs to check.
pub fn audit_logs(dir: &Path) -> Result<String, String> {
    let mut secrets: Vec<String> = KNOWN_SECRETS.iter().map(|s| s.to_string()).collect();
    let mut logs = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if name.starts_with("recorded-secrets-") && name.ends_with(".txt") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            secrets.extend(text.lines().filter(|l| l.len() >= 8).map(str::to_string));
        } else if name.ends_with(".log") {
            logs.push(path);
        }
    }
    if logs.is_empty() {
        return Err(format!(
            "no test logs under {}: run the tests first",
            dir.display()
        ));
    }
    let (mut lines, mut leaks) = (0usize, Vec::new());
    for path in &logs {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for (n, line) in text.lines().enumerate() {
            lines += 1;
            if let Some(found) = secrets_in(line, &secrets).first() {
                leaks.push(format!(
                    "{}:{}: a secret ({} bytes) appears in this log line",
                    path.display(),
                    n + 1,
                    found.len()
                ));
            }
        }
    }
    if !leaks.is_empty() {
        return Err(format!(
            "{} log line(s) contain secrets:\n{}",
            leaks.len(),
            leaks.join("\n")
        ));
    }
    Ok(format!(
        "{lines} log lines from {} test processes checked against {} secrets: none leaked",
        logs.len(),
        secrets.len()
    ))
}

/// A `tracing` writer that keeps everything logged, so tests can assert what
/// appeared (and, above all, what did not).
#[derive(Clone, Default)]
pub struct CapturedLogs {
    lines: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    file: std::sync::Arc<std::sync::Mutex<Option<std::fs::File>>>,
}

impl CapturedLogs {
    /// Everything logged so far.
    pub fn contents(&self) -> String {
        String::from_utf8_lossy(&self.lines.lock().unwrap()).into_owned()
    }

    /// Install as the process-wide subscriber at TRACE level (once per test
    /// binary: a per-thread subscriber misses events from other threads).
    pub fn install_global(&self) {
        let logs = self.clone();
        // Everything at TRACE, as a user's RUST_LOG=trace, with the directives the
        // reauth binary adds (wasmtime's bindings trace every plugin argument).
        let mut filter = tracing_subscriber::EnvFilter::new("trace");
        for directive in reauth::runtime::SECRET_SAFE_LOG_DIRECTIVES {
            filter = filter.add_directive(directive.parse().expect("valid directive"));
        }
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in this test binary");
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.lines.lock().unwrap().extend_from_slice(buf);
        if let Some(f) = self.file.lock().unwrap().as_mut() {
            f.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_fails_on_a_leak_and_on_no_logs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(audit_logs(dir.path()).unwrap_err().contains("no test logs"));
        std::fs::write(dir.path().join("a-1.log"), "INFO fine\nINFO also fine\n").unwrap();
        assert!(
            audit_logs(dir.path())
                .unwrap()
                .starts_with("2 log lines from 1 test processes")
        );
        // A known secret.
        std::fs::write(
            dir.path().join("b-2.log"),
            format!("x\nDEBUG token={}\n", KNOWN_SECRETS[0]),
        )
        .unwrap();
        let e = audit_logs(dir.path()).unwrap_err();
        assert!(
            e.contains("b-2.log:2:") && !e.contains(KNOWN_SECRETS[0]),
            "{e}"
        );
        // A recorded one.
        std::fs::remove_file(dir.path().join("b-2.log")).unwrap();
        std::fs::write(
            dir.path().join("recorded-secrets-3.txt"),
            "issued-token-xyz\n",
        )
        .unwrap();
        // A test binary named `secrets` writes `secrets-….log`: audited as a log.
        std::fs::write(dir.path().join("secrets-abc-4.log"), "INFO fine\n").unwrap();
        std::fs::write(dir.path().join("c-3.log"), "INFO got issued-token-xyz\n").unwrap();
        assert!(audit_logs(dir.path()).unwrap_err().contains("c-3.log:1:"));
    }
}
