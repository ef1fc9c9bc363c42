//! The programs in `examples/` run as a user would run them, against the real peers:
//! the OAuth2 API client against the IdP and a JWKS-verifying API, the PostgreSQL and
//! Redis clients against real servers.

use reauth::verify::Verifier;
use reauth_tests::peers::{Idp, Postgres, Redis, ResourceServer, SecretsEndpoint};
use reauth_tests::{plugins, workspace_binary};
use std::path::{Path, PathBuf};
use std::process::Command;

const ITERATIONS: u32 = 20;

/// Write `config`, run the example for [`ITERATIONS`] operations (off the async
/// runtime: the peers it talks to run on it) and return its stdout.
async fn run_example(
    dir: &Path,
    bin: &'static str,
    config: String,
    provider: &'static str,
    args: Vec<String>,
    env: Vec<(&'static str, &'static str)>,
) -> String {
    let path: PathBuf = dir.join(format!("{bin}.toml"));
    std::fs::write(&path, config).unwrap();
    let binary = workspace_binary("reauth-examples", bin);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(binary)
            .arg("--config")
            .arg(&path)
            .args([
                "--provider",
                provider,
                "--iterations",
                &ITERATIONS.to_string(),
            ])
            .args(["--interval-ms", "20"])
            .args(args)
            .envs(env)
            .output()
            .expect("running the example")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{bin} failed:\n{stdout}\n{stderr}");
    let ok = stdout.lines().filter(|l| l.contains(": ok ")).count() as u32;
    assert_eq!(ok, ITERATIONS, "{bin}:\n{stdout}");
    assert!(
        stderr.contains(&format!("{ITERATIONS} operations, 1 credential fetches")),
        "{stderr}"
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_api_client_example() {
    reauth_tests::logs();
    reauth_tests::record_secret("cc-basic-secret-0123456789");
    let dir = tempfile::tempdir().unwrap();
    let idp = Idp::start(&dir.path().join("k.json"), 60, None);
    let verifier = Verifier::builder()
        .jwks_url(format!("{}/jwks", idp.issuer))
        .issuer(&idp.issuer)
        .audience("urn:reauth:test-api")
        .build()
        .unwrap();
    let api = ResourceServer::start(verifier).await;
    let config = format!(
        r#"
[providers.orders-api]
plugin = "{}"
allowed_hosts = ["{}"]
[providers.orders-api.config]
issuer = "{}"
client_id = "cc-basic"
client_secret = {{ env = "ORDERS_CLIENT_SECRET" }}
scope = "api:read"
"#,
        plugins().oauth2.display(),
        idp.authority(),
        idp.issuer
    );
    let stdout = run_example(
        dir.path(),
        "oauth2-api-client",
        config,
        "orders-api",
        vec!["--url".into(), api.url.clone()],
        vec![("ORDERS_CLIENT_SECRET", "cc-basic-secret-0123456789")],
    )
    .await;
    assert!(stdout.contains("HTTP 200"), "{stdout}");
    assert_eq!(idp.token_requests("cc-basic").await, (1, 0));
}

fn password_config(secrets: &SecretsEndpoint, name: &str, format: &str, path: &str) -> String {
    format!(
        r#"
[providers.{name}]
plugin = "{}"
allowed_hosts = ["{}"]
[providers.{name}.config]
secret_url = "{}{path}"
format = "{format}"
vault_token = "vault-token"
username = "app"
"#,
        plugins().password_rotation.display(),
        secrets.base.trim_start_matches("http://"),
        secrets.base,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_redis_examples() {
    reauth_tests::logs();
    let pw = "example-db-pw-8u7y6t";
    reauth_tests::record_secret(pw);
    let dir = tempfile::tempdir().unwrap();
    let secrets = SecretsEndpoint::start("app", pw, 3600, "vault-token").await;

    let pg = Postgres::start().await;
    pg.admin(&format!("CREATE ROLE app LOGIN PASSWORD '{pw}'"))
        .await;
    let config = password_config(
        &secrets,
        "orders-db",
        "vault-static-creds",
        "/v1/database/static-creds/app",
    );
    let stdout = run_example(
        dir.path(),
        "postgres-rotation",
        config,
        "orders-db",
        vec![
            "--pg".into(),
            format!("host=127.0.0.1 port={} dbname=postgres", pg.port),
        ],
        vec![],
    )
    .await;
    assert!(stdout.lines().all(|l| l.ends_with("ok app")), "{stdout}");

    let redis = Redis::start().await;
    let mut admin = redis.connect(None).await.unwrap();
    redis::cmd("ACL")
        .arg(&["SETUSER", "app", "on", &format!(">{pw}"), "~*", "+@all"][..])
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    let config = password_config(&secrets, "cache", "vault-kv2", "/v1/secret/data/redis-app");
    let stdout = run_example(
        dir.path(),
        "redis-rotation",
        config,
        "cache",
        vec!["--redis".into(), format!("127.0.0.1:{}", redis.port)],
        vec![],
    )
    .await;
    assert!(stdout.contains(&format!("ops={ITERATIONS}")), "{stdout}");
}

/// The smallest embedder (`examples/embedder`, reauth without its optional
/// features) loads a config and gets credentials, printing no secret.
#[tokio::test]
async fn the_minimal_embedder_gets_credentials_and_prints_no_secret() {
    reauth_tests::logs();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("reauth.toml");
    std::fs::write(
        &config,
        format!(
            "[providers.api]\nplugin = {:?}\nconfig = {{ token = \"embedded-static-token-42\", principal = \"svc\" }}\n",
            plugins().static_.display().to_string()
        ),
    )
    .unwrap();
    let binary = workspace_binary("reauth-embedder-example", "reauth-embedder-example");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(binary)
            .arg(&config)
            .arg("api")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.trim(), "api: a bearer token for svc");
    assert!(!stdout.contains("embedded-static-token-42"));
    let unknown = Command::new(workspace_binary(
        "reauth-embedder-example",
        "reauth-embedder-example",
    ))
    .arg(dir.path().join("reauth.toml"))
    .arg("nope")
    .output()
    .unwrap();
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown provider `nope`"));
}

/// The smallest embedder compiles none of the tools: no HTTP server, CLI parser,
/// file watcher, log subscriber or JWT stack (`rsa` is flagged by
/// RUSTSEC-2023-0071) in its normal dependency tree, and no tokio `full` or
/// `test-util`. (`anyhow` is there only because wasmtime itself depends on it.)
#[test]
fn the_minimal_embedder_compiles_none_of_the_tools() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let tree = |args: &[&str]| {
        let output = Command::new(&cargo)
            .args(["tree", "--offline", "--locked", "--manifest-path"])
            .arg(&manifest)
            .args(["-p", "reauth-embedder-example", "-e"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let packages = tree(&["normal", "--prefix", "none"]);
    let names: std::collections::BTreeSet<&str> = packages
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(names.contains("reauth"), "{packages}");
    for tool in [
        "axum",
        "clap",
        "notify",
        "tracing-subscriber",
        "p256",
        "rsa",
        "jsonwebtoken",
        "reauth-cli",
        "reauth-verify",
        "prometheus-client",
    ] {
        assert!(!names.contains(tool), "{tool} is in the embedder's tree");
    }
    // Who brings anyhow: wasmtime's own crates only.
    let anyhow = tree(&["normal", "--prefix", "none", "-i", "anyhow", "--depth", "1"]);
    for dependent in anyhow
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("anyhow "))
    {
        assert!(
            ["wasm", "wit-", "cranelift"]
                .iter()
                .any(|p| dependent.starts_with(p)),
            "anyhow through {dependent}"
        );
    }
    let features = tree(&["normal,features", "-i", "tokio"]);
    for feature in ["tokio feature \"full\"", "tokio feature \"test-util\""] {
        assert!(
            !features.contains(feature),
            "{feature} in the embedder's tree"
        );
    }
    // No membarrier registration at start (8.7 ms per process on a small VM,
    // paid by every adapter run): papaya without `fast-barrier`, here and in
    // the CLI that runs the adapters.
    let seize = tree(&["normal,features", "-i", "seize"]);
    assert!(
        seize.contains("seize") && !seize.contains("fast-barrier"),
        "{seize}"
    );
    let output = Command::new(&cargo)
        .args(["tree", "--offline", "--locked", "--manifest-path"])
        .arg(&manifest)
        .args(["-p", "reauth-cli", "-e", "normal,features", "-i", "seize"])
        .output()
        .unwrap();
    let cli = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && cli.contains("seize") && !cli.contains("fast-barrier"),
        "{cli}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
