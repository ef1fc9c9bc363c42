//! `reauth check` and `reauth demo`, through `reauth_cli::cli::run` — the function the
//! binary calls — with real plugins and the in-process dev issuer.

use clap::Parser;
use reauth_cli::cli::{Cli, run};
use reauth_tests::plugins;
use std::process::ExitCode;

async fn reauth(args: &[&str]) -> (ExitCode, String) {
    let cli = Cli::try_parse_from(std::iter::once("reauth").chain(args.iter().copied()))
        .expect("arguments parse");
    let mut out = Vec::new();
    let code = run(cli, &mut out).await.expect("command runs");
    (code, String::from_utf8(out).unwrap())
}

/// A `reauth.toml` in a new directory: `runtime` (the `[runtime]` keys), a
/// `static` provider `api`, then `more`.
fn config_with_api(runtime: &str, more: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reauth.toml");
    let static_ = plugins().static_.display().to_string();
    std::fs::write(
        &path,
        format!(
            "[runtime]\n{runtime}\n\n[providers.api]\nplugin = {static_:?}\nconfig = {{ token = \"t\" }}\n{more}"
        ),
    )
    .unwrap();
    (dir, path)
}

#[tokio::test]
async fn check_reports_every_provider_and_fails_if_one_is_broken() {
    reauth_tests::logs();
    let oauth2 = plugins().oauth2.display().to_string();
    let static_ = plugins().static_.display().to_string();
    let (_dir, path) = config_with_api(
        "cache_dir = \"cache\"",
        &format!("\n[providers.sso]\nplugin = {oauth2:?}\nconfig = {{ client_id = \"svc\" }}\n"),
    );
    let config = path.to_str().unwrap();
    let (code, out) = reauth(&["check", "--config", config]).await;
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    assert!(
        out.contains("ok   api: static 0.1.0, contract 0.2.0; sha256 "),
        "{out}"
    );
    assert!(
        out.contains("ok   sso: oauth2-client-credentials 0.1.0, contract 0.2.0, 14 config keys declared; sha256 "),
        "{out}"
    );
    assert!(out.contains("(compiled)"), "{out}");
    assert!(out.contains("2 provider(s): 2 ok, 0 failed"), "{out}");
    // The second run loads both from the precompiled cache.
    let (_, out) = reauth(&["check", "--config", config]).await;
    assert_eq!(out.matches("(precompiled cache)").count(), 2, "{out}");

    std::fs::write(
        &path,
        format!(
            "[providers.api]\nplugin = {static_:?}\n\n[providers.gone]\nplugin = \"gone.wasm\"\n"
        ),
    )
    .unwrap();
    let (code, out) = reauth(&["check", "--config", config]).await;
    assert_eq!(code, ExitCode::FAILURE);
    assert!(out.contains("ok   api"), "{out}");
    assert!(
        out.contains("FAIL gone: provider `gone`: failed to load plugin"),
        "{out}"
    );
    assert!(out.contains("2 provider(s): 1 ok, 1 failed"), "{out}");
    // The same report as one JSON document.
    let (code, out) = reauth(&["check", "--config", config, "--format", "json"]).await;
    assert_eq!(code, ExitCode::FAILURE);
    let doc: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON document");
    assert_eq!(doc["ok"], false, "{doc}");
    assert_eq!(
        doc["summary"],
        serde_json::json!({"providers": 2, "ok": 1, "failed": 1})
    );
    let providers = doc["providers"].as_array().unwrap();
    assert_eq!(providers[0]["name"], "api");
    assert_eq!(providers[0]["status"], "ok");
    assert_eq!(providers[0]["contract"], "0.2.0");
    assert_eq!(providers[0]["plugin"]["name"], "static");
    assert_eq!(providers[1]["name"], "gone");
    assert_eq!(providers[1]["status"], "failed");
    assert!(
        providers[1]["error"]
            .as_str()
            .unwrap()
            .contains("failed to load plugin"),
        "{doc}"
    );

    std::fs::write(&path, "[providers.api]\nplugin = 3\n").unwrap();
    let (code, out) = reauth(&["check", "--config", config]).await;
    assert_eq!(code, ExitCode::FAILURE);
    assert_eq!(out, "", "a config error goes to stderr, not stdout");
    // The binary: the error on stderr, exit 1 (a check failed).
    let bin = reauth_tests::workspace_binary("reauth-cli", "reauth");
    let run = std::process::Command::new(bin)
        .args(["check", "--config", config])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    assert!(run.stdout.is_empty());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.starts_with("FAIL config: "), "{err}");
    assert!(
        err.contains("reauth.toml:2: providers.api.plugin: invalid type"),
        "{err}"
    );
    let (code, out) = reauth(&["check", "--config", config, "--format", "json"]).await;
    assert_eq!(code, ExitCode::FAILURE);
    let doc: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON document");
    assert_eq!(doc["ok"], false);
    assert!(
        doc["config_error"]
            .as_str()
            .unwrap()
            .contains("reauth.toml:2: providers.api.plugin: invalid type"),
        "{doc}"
    );
}

/// What reauth keeps at rest is private: what it creates is 0700/0600, and `check`
/// reports anything looser (say, a state directory someone made 0755).
#[tokio::test]
async fn check_reports_loose_permissions_of_what_is_kept_at_rest() {
    use std::os::unix::fs::PermissionsExt;
    reauth_tests::logs();
    let (dir, path) = config_with_api("state_dir = \"state\"", "");
    let config = path.to_str().unwrap();
    let (code, out) = reauth(&["check", "--config", config]).await;
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    assert!(
        !out.contains("WARN"),
        "what reauth created is private: {out}"
    );
    let mode = |p: &str| {
        std::fs::metadata(dir.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("state.keys"), 0o700);
    assert_eq!(mode("state.keys/key"), 0o600);
    assert_eq!(mode("state/shared-cache"), 0o700);
    std::fs::set_permissions(
        dir.path().join("state"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(
        dir.path().join("state.keys/key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (_, out) = reauth(&["check", "--config", config]).await;
    assert!(out.contains("state: mode 755 lets other users in"), "{out}");
    assert!(out.contains("key: mode 644 lets other users in"), "{out}");
}

#[tokio::test]
async fn get_prints_the_credential_in_each_format() {
    reauth_tests::logs();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reauth.toml");
    let static_ = plugins().static_.display().to_string();
    std::fs::write(
        &path,
        format!("[providers.db]\nplugin = {static_:?}\nconfig = {{ username = \"neo4j\", password = \"pw\", principal = \"neo4j\" }}\n"),
    )
    .unwrap();
    let config = path.to_str().unwrap();
    let (_, out) = reauth(&["get", "db", "--config", config]).await;
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"kind": "basic", "username": "neo4j", "password": "pw", "principal": "neo4j"})
    );
    let (_, out) = reauth(&["get", "db", "--config", config, "--format", "header"]).await;
    assert_eq!(out, "Authorization: Basic bmVvNGo6cHc=\n");
}

#[tokio::test]
async fn demo_prints_the_whole_timeline() {
    reauth_tests::logs();
    let plugin = plugins().oauth2.display().to_string();
    let (code, out) = reauth(&["demo", "--plugin", &plugin, "--lifetime", "2"]).await;
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    let steps = [
        "get-credentials → fetched from the IdP (initial): token #1",
        "100 concurrent callers for scope `reports` → 1 plugin call (single-flight): token #2",
        "get-credentials → cache hit: token #1",
        "until the refresh-ahead window",
        "get-credentials → cache hit (advisory window: one background refresh started): token #1",
        "get-credentials → cache hit: token #3 (refreshed ahead of expiry, no caller waited)",
        "until the `reports` token expires unused",
        "get-credentials (scope `reports`) → fetched from the IdP (expired): token #4",
        "with_credentials: resource server → 401 invalid_token",
        "with_credentials: resource server → 200: verified against the issuer's JWKS",
        "with_credentials → provider decided refresh-and-retry; succeeded on re-authenticated token #5",
        "summary: 5 plugin calls, 5 tokens issued by the IdP",
    ];
    let mut rest = out.as_str();
    for step in steps {
        let at = rest
            .find(step)
            .unwrap_or_else(|| panic!("missing `{step}` in order in:\n{out}"));
        rest = &rest[at + step.len()..];
    }
    assert!(
        !out.contains("eyJ"),
        "the demo must not print tokens:\n{out}"
    );
}
