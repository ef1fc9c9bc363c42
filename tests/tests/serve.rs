//! The sidecar API (`reauth::server`, what `reauth serve` runs) over TCP and a Unix
//! socket: round trips, the API token, socket permissions, loopback-only binding,
//! bad requests, single-flight across HTTP requests, metrics, graceful shutdown,
//! and every response checked against `host/openapi.json`.

use reauth::server::{ServeError, ServeOptions, Server};
use reauth::{Host, ProviderConfig, Secret};
use reauth_tests::peers::{SlowEndpoint, http};
use reauth_tests::{plugins, root};
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

const API_TOKEN: &str = "api-token-0f9e8d7c6b5a";

fn spec() -> Value {
    serde_json::from_slice(&std::fs::read(root().join("host/openapi.json")).unwrap()).unwrap()
}

/// A minimal JSON-schema check (the subset the spec uses): `$ref`, `type`,
/// `required`, `properties`, `enum`, `items`, `additionalProperties`.
fn conforms(spec: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.trim_start_matches("#/components/schemas/");
        return conforms(spec, &spec["components"]["schemas"][name], value, at);
    }
    if value.is_null() && schema["nullable"] == json!(true) {
        return Ok(());
    }
    let ok = match schema["type"].as_str() {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_u64() || value.is_i64(),
        Some("boolean") => value.is_boolean(),
        _ => true,
    };
    if !ok {
        return Err(format!("{at}: expected {}, got {value}", schema["type"]));
    }
    if let Some(options) = schema["enum"].as_array()
        && !options.contains(value)
    {
        return Err(format!("{at}: {value} not in {options:?}"));
    }
    if let Some(required) = schema["required"].as_array() {
        for field in required {
            let field = field.as_str().unwrap();
            if value.get(field).is_none() {
                return Err(format!("{at}: missing required `{field}` in {value}"));
            }
        }
    }
    if let (Some(props), Some(object)) = (schema["properties"].as_object(), value.as_object()) {
        for (k, v) in object {
            match props.get(k) {
                Some(s) => conforms(spec, s, v, &format!("{at}.{k}"))?,
                None if schema["additionalProperties"] == json!(false) => {
                    return Err(format!("{at}: unexpected field `{k}`"));
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, v) in array.iter().enumerate() {
            conforms(spec, items, v, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// Check a JSON response against the spec's schema for `path`/`method`/`status`.
fn check_spec(path: &str, method: &str, status: u16, body: &[u8]) {
    let spec = spec();
    let op = &spec["paths"][path][method];
    assert!(op.is_object(), "{method} {path} is not in openapi.json");
    let mut response = op["responses"][status.to_string()].clone();
    assert!(
        response.is_object(),
        "{method} {path} → {status} is not in openapi.json"
    );
    if let Some(r) = response["$ref"].as_str() {
        response = spec["components"]["responses"][r.trim_start_matches("#/components/responses/")]
            .clone();
    }
    let content = &response["content"];
    if let Some(schema) = content["application/json"].get("schema") {
        let value: Value = serde_json::from_slice(body)
            .unwrap_or_else(|e| panic!("{method} {path} → {status}: not JSON ({e})"));
        conforms(&spec, schema, &value, "$")
            .unwrap_or_else(|e| panic!("{method} {path} → {status}: {e}"));
    }
}

fn host(slow: Option<&SlowEndpoint>) -> Host {
    let mut b = Host::builder()
        .provider(
            "counter",
            ProviderConfig::new(&plugins().testkit).config("mode", "counter"),
        )
        .provider(
            "db",
            ProviderConfig::new(&plugins().static_)
                .config("username", "app")
                .config("password", "static-pw-1q2w3e"),
        );
    if let Some(slow) = slow {
        b = b.provider(
            "slow",
            ProviderConfig::new(&plugins().testkit)
                .allow_host(slow.authority())
                .config("mode", "fetch")
                .config("url", &slow.url),
        );
    }
    b.build().unwrap()
}

struct Running {
    addresses: Vec<String>,
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

async fn start(host: Host, options: ServeOptions) -> Running {
    let server = Server::bind(host, &options).await.unwrap();
    let addresses = server.addresses().to_vec();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Running {
        addresses,
        stop,
        done,
    }
}

async fn post(target: &str, path: &str, body: Value, token: Option<&str>) -> (u16, Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    let (status, _, bytes) = http(
        target,
        "POST",
        path,
        &headers,
        Some(body.to_string().into_bytes()),
    )
    .await
    .unwrap();
    let spec_path = path
        .replace("/counter/", "/{name}/")
        .replace("/db/", "/{name}/")
        .replace("/slow/", "/{name}/")
        .replace("/nope/", "/{name}/");
    check_spec(&spec_path, "post", status, &bytes);
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_round_trips_over_tcp_and_unix_socket_with_a_token() {
    reauth_tests::logs();
    reauth_tests::record_secret(API_TOKEN);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("reauth.sock");
    let running = start(
        host(None),
        ServeOptions {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            socket: Some(socket.clone()),
            api_token: Some(Secret::new(API_TOKEN)),
            ..Default::default()
        },
    )
    .await;
    let (tcp, unix) = (&running.addresses[0], &running.addresses[1]);
    assert!(
        tcp.starts_with("http://127.0.0.1:") && unix.starts_with("unix:"),
        "{:?}",
        running.addresses
    );
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    // The private staging directory is gone.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");

    // No token, wrong token: 401 on /v1, with a challenge; /healthz and /metrics stay open.
    let (status, body) = post(tcp, "/v1/providers/counter/credentials", json!({}), None).await;
    assert_eq!(
        (status, body["error"]["kind"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, _) = post(
        tcp,
        "/v1/providers/counter/credentials",
        json!({}),
        Some("wrong-token-123456"),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _, body) = http(tcp, "GET", "/healthz", &[], None).await.unwrap();
    check_spec("/healthz", "get", status, &body);
    let health: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(health["providers"], json!({"ready": 2, "failed": 0}));

    // Credentials over TCP and over the socket: one cache behind both.
    let (status, a) = post(
        tcp,
        "/v1/providers/counter/credentials",
        json!({}),
        Some(API_TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["kind"], "bearer");
    let (_, b) = post(
        unix,
        "/v1/providers/counter/credentials",
        json!({}),
        Some(API_TOKEN),
    )
    .await;
    assert_eq!(
        a["token"], b["token"],
        "same cached credential over both listeners"
    );
    let (_, alice) = post(
        unix,
        "/v1/providers/counter/credentials",
        json!({"subject": "alice"}),
        Some(API_TOKEN),
    )
    .await;
    assert_eq!(alice["token"], "count-2-alice", "per-subject key");
    let (_, db) = post(
        tcp,
        "/v1/providers/db/credentials",
        json!({}),
        Some(API_TOKEN),
    )
    .await;
    assert_eq!(
        (db["kind"].as_str(), db["username"].as_str()),
        (Some("basic"), Some("app"))
    );

    // A server rejected the token: the provider says refresh; the fresh one comes back.
    let report = json!({"credential": a, "error": {"kind": "token_expired", "status": 401}});
    let (status, decision) = post(
        tcp,
        "/v1/providers/counter/security-errors",
        report.clone(),
        Some(API_TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{decision}");
    assert_eq!(decision["decision"], "refresh_and_retry");
    assert_eq!(decision["credentials"]["token"], "count-3-");
    // Reporting the same stale token again does not drop the new one (compare-and-invalidate).
    let (_, again) = post(
        tcp,
        "/v1/providers/counter/security-errors",
        report,
        Some(API_TOKEN),
    )
    .await;
    assert_eq!(again["credentials"]["token"], "count-3-");
    let forbidden = json!({"credential": decision["credentials"], "error": {"kind": "forbidden"}});
    let (_, fail) = post(
        tcp,
        "/v1/providers/counter/security-errors",
        forbidden,
        Some(API_TOKEN),
    )
    .await;
    assert_eq!(fail, json!({"decision": "fail"}));

    // Providers list: status, no secrets.
    let auth = format!("Bearer {API_TOKEN}");
    let (status, _, body) = http(
        unix,
        "GET",
        "/v1/providers",
        &[("authorization", &auth)],
        None,
    )
    .await
    .unwrap();
    check_spec("/v1/providers", "get", status, &body);
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("\"name\":\"counter\"") && !text.contains("static-pw-1q2w3e"),
        "{text}"
    );

    // Metrics moved, and carry neither secrets nor subjects.
    let (status, _, body) = http(tcp, "GET", "/metrics", &[], None).await.unwrap();
    assert_eq!(status, 200);
    let metrics = String::from_utf8_lossy(&body);
    let value = |line: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("no {line} in\n{metrics}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        value("reauth_cache_lookups_total{provider=\"counter\",result=\"miss\"}"),
        3
    );
    assert!(value("reauth_cache_lookups_total{provider=\"counter\",result=\"hit\"}") >= 2);
    assert_eq!(
        value(
            "reauth_security_errors_total{provider=\"counter\",kind=\"token_expired\",decision=\"refresh_and_retry\"}"
        ),
        2
    );
    assert_eq!(
        value(
            "reauth_security_errors_total{provider=\"counter\",kind=\"forbidden\",decision=\"fail\"}"
        ),
        1
    );
    assert_eq!(
        value(
            "reauth_fetches_total{provider=\"counter\",reason=\"after_security_error\",tier=\"mandatory\"}"
        ),
        1
    );
    assert_eq!(
        value(
            "reauth_plugin_calls_total{provider=\"counter\",function=\"get-credentials\",outcome=\"ok\"}"
        ),
        3
    );
    for secret in [
        "count-1-",
        "count-3-",
        "static-pw-1q2w3e",
        "alice",
        API_TOKEN,
    ] {
        assert!(!metrics.contains(secret), "`{secret}` in /metrics");
    }

    running.stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), running.done)
        .await
        .unwrap()
        .unwrap();
    assert!(!socket.exists(), "the socket is removed on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_named_and_bounded() {
    reauth_tests::logs();
    let running = start(
        host(None),
        ServeOptions {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            max_body_bytes: 1024,
            ..Default::default()
        },
    )
    .await;
    let tcp = &running.addresses[0];
    let raw = |body: &'static str, ct: &'static str| async move {
        let (s, _, b) = http(
            tcp,
            "POST",
            "/v1/providers/counter/credentials",
            &[("content-type", ct)],
            Some(body.as_bytes().to_vec()),
        )
        .await
        .unwrap();
        (s, String::from_utf8_lossy(&b).into_owned())
    };
    let (s, b) = raw("{\"scopes\": \"read\"}", "application/json").await;
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("`scopes`") && b.contains("invalid type"), "{b}");
    check_spec("/v1/providers/{name}/credentials", "post", s, b.as_bytes());
    let (s, b) = raw("{\"subjet\": \"x\"}", "application/json").await;
    assert_eq!(s, 400);
    assert!(b.contains("unknown field `subjet`"), "{b}");
    let (s, b) = raw("{not json", "application/json").await;
    assert_eq!(s, 400, "{b}");
    let (s, _) = raw("{}", "text/plain").await;
    assert_eq!(s, 415);
    let big = format!("{{\"subject\": \"{}\"}}", "x".repeat(4096));
    let (s, _, _) = http(
        tcp,
        "POST",
        "/v1/providers/counter/credentials",
        &[("content-type", "application/json")],
        Some(big.into_bytes()),
    )
    .await
    .unwrap();
    assert_eq!(s, 413);
    let (s, body) = post(tcp, "/v1/providers/nope/credentials", json!({}), None).await;
    assert_eq!(
        (s, body["error"]["kind"].as_str()),
        (404, Some("unknown_provider"))
    );
    let (s, _, _) = http(tcp, "GET", "/v2/whatever", &[], None).await.unwrap();
    assert_eq!(s, 404);
    let _ = running.stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_loopback_needs_the_explicit_flag() {
    reauth_tests::logs();
    let options = ServeOptions {
        listen: Some("0.0.0.0:0".parse().unwrap()),
        ..Default::default()
    };
    match Server::bind(host(None), &options).await {
        Err(ServeError::NotLoopback(addr)) => assert_eq!(addr.port(), 0),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let err = Server::bind(host(None), &options)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("--allow-non-loopback"), "{err}");
    let allowed = ServeOptions {
        allow_non_loopback: true,
        ..options
    };
    Server::bind(host(None), &allowed)
        .await
        .expect("allowed with the flag");
    assert!(matches!(
        Server::bind(host(None), &ServeOptions::default()).await,
        Err(ServeError::NoListener)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_plugin_call_and_shutdown_is_graceful() {
    reauth_tests::logs();
    let slow = SlowEndpoint::start("slow-token-value", Duration::from_millis(400)).await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let host = host(Some(&slow));
    let running = start(
        host.clone(),
        ServeOptions {
            socket: Some(socket.clone()),
            ..Default::default()
        },
    )
    .await;
    let unix = running.addresses[0].clone();
    let callers: Vec<_> = (0..20)
        .map(|_| {
            let unix = unix.clone();
            tokio::spawn(async move {
                post(&unix, "/v1/providers/slow/credentials", json!({}), None).await
            })
        })
        .collect();
    for c in callers {
        let (status, body) = c.await.unwrap();
        assert_eq!(
            (status, body["token"].as_str()),
            (200, Some("slow-token-value"))
        );
    }
    assert_eq!(
        host.plugin_calls("slow"),
        1,
        "20 concurrent HTTP requests, one plugin call"
    );
    assert_eq!(slow.hits.load(std::sync::atomic::Ordering::Relaxed), 1);
    let joins = host
        .metrics()
        .provider("slow")
        .lookups(reauth::metrics::LookupKind::Join);
    assert!(joins >= 1, "joins recorded: {joins}");

    // Graceful shutdown: a request in flight (a fresh subject: a 400 ms plugin call)
    // completes after shutdown began; new connections are refused afterwards.
    let in_flight = {
        let unix = unix.clone();
        tokio::spawn(async move {
            post(
                &unix,
                "/v1/providers/slow/credentials",
                json!({"subject": "late"}),
                None,
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    running.stop.send(()).unwrap();
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200, "in-flight request finished: {body}");
    tokio::time::timeout(Duration::from_secs(10), running.done)
        .await
        .unwrap()
        .unwrap();
    assert!(
        http(&unix, "GET", "/healthz", &[], None).await.is_err(),
        "stopped"
    );
}
