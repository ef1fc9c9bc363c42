//! The sidecar API (`reauth_cli::server`, what `reauth serve` runs) over TCP and a Unix
//! socket: round trips, the API token, socket permissions, loopback-only binding,
//! bad requests, single-flight across HTTP requests, metrics, graceful shutdown,
//! and every response checked against `host/openapi.json`; and the server against
//! hostile clients (issue #14), with raw TCP clients writing bytes: slow headers,
//! bodies that never finish, oversize announcements, connection floods, a
//! half-sent request at SIGTERM (the real binary).

use reauth::{Host, ProviderConfig, Secret};
use reauth_cli::server::{ServeError, ServeOptions, Server};
use reauth_tests::peers::{Peer, SlowEndpoint, free_port, http};
use reauth_tests::{plugins, root, workspace_binary};
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const API_TOKEN: &str = "api-token-0f9e8d7c6b5a";

fn spec() -> Value {
    serde_json::from_slice(&std::fs::read(root().join("host/openapi.json")).unwrap()).unwrap()
}

/// Validate `value` against `schema` (a schema of the spec, usually a `$ref`) with
/// `jsonschema`: JSON Schema 2020-12, the dialect of OpenAPI 3.1, with formats
/// (`date-time`) checked; references resolve inside the spec.
fn conforms(spec: &Value, schema: &Value, value: &Value) -> Result<(), String> {
    let mut root = schema.clone();
    root["components"] = spec["components"].clone();
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .build(&root)
        .map_err(|e| format!("the spec's schema does not compile: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| format!("${}: {e}", e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// The check fails on what the hand-written subset checker it replaced let
/// through (a bad `date-time`, a bound) and on the rest (an enum, a required field).
#[test]
fn the_spec_check_can_fail() {
    let spec = spec();
    let credentials = json!({"$ref": "#/components/schemas/Credentials"});
    let good = json!({"kind": "bearer", "token": "t", "expires_at": "2026-11-28T00:00:00Z"});
    conforms(&spec, &credentials, &good).unwrap();
    let mut bad_date = good.clone();
    bad_date["expires_at"] = json!("tomorrow");
    let e = conforms(&spec, &credentials, &bad_date).unwrap_err();
    assert!(e.contains("/expires_at"), "{e}");
    let mut bad_kind = good.clone();
    bad_kind["kind"] = json!("cookie");
    assert!(conforms(&spec, &credentials, &bad_kind).is_err());
    let mut too_late = good.clone();
    too_late["expires_at_unix"] = json!(253_402_300_800_u64);
    assert!(conforms(&spec, &credentials, &too_late).is_err(), "bounds");
    assert!(conforms(&spec, &credentials, &json!({"token": "t"})).is_err());
}

/// Check a JSON response against the spec's schema for `path`/`method`/`status`.
fn check_spec(path: &str, method: &str, status: u16, body: &[u8]) {
    let spec = spec();
    let op = &spec["paths"][path][method];
    assert!(op.is_object(), "{method} {path} is not in openapi.json");
    let mut response = op["responses"][status.to_string()].clone();
    if !response.is_object() && status >= 400 {
        // Any other error status: the common error shape.
        response = op["responses"]["default"].clone();
    }
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
        conforms(&spec, schema, &value)
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
        value("reauth_fetches_total{provider=\"counter\",reason=\"after_security_error\"}"),
        1
    );
    // The host's gauges: entries held, no breaker open, no egress, the version.
    assert!(value("reauth_cache_entries") >= 1);
    assert_eq!(value("reauth_breaker_open{provider=\"counter\"}"), 0);
    assert_eq!(
        value("reauth_egress_requests_total{provider=\"counter\",outcome=\"denied\"}"),
        0
    );
    assert_eq!(
        value(&format!(
            "reauth_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1
    );
    assert!(metrics.contains("reauth_last_refresh_timestamp_seconds{provider=\"counter\"}"));
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
    let (s, _, b) = http(
        tcp,
        "POST",
        "/v1/providers/counter/credentials",
        &[("content-type", "application/json")],
        Some(big.into_bytes()),
    )
    .await
    .unwrap();
    assert_eq!(s, 413);
    check_spec("/v1/providers/{name}/credentials", "post", s, &b);
    let (s, body) = post(tcp, "/v1/providers/nope/credentials", json!({}), None).await;
    assert_eq!(
        (s, body["error"]["kind"].as_str()),
        (404, Some("unknown_provider"))
    );
    let (s, _, _) = http(tcp, "GET", "/v2/whatever", &[], None).await.unwrap();
    assert_eq!(s, 404);
    // A request head over 64 KiB is refused by the HTTP layer (no buffering of
    // whatever a client sends); the server serves on.
    let huge = "h".repeat(100 * 1024);
    let (s, _, _) = http(tcp, "GET", "/healthz", &[("x-huge", huge.as_str())], None)
        .await
        .unwrap();
    assert_eq!(s, 431);
    let (s, _, _) = http(tcp, "GET", "/healthz", &[], None).await.unwrap();
    assert_eq!(s, 200);
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

/// A raw TCP client: connect to `target` (`http://127.0.0.1:PORT`) and write `bytes`.
async fn raw(target: &str, bytes: &[u8]) -> TcpStream {
    let addr = target.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream
}

/// Read until the server closes the connection, at most `bound`: what arrived, and
/// whether the connection was closed (EOF or reset) within the bound.
async fn read_until_closed(stream: &mut TcpStream, bound: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let closed = tokio::time::timeout(bound, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (got, closed)
}

/// The status and the JSON body of a raw HTTP/1.1 response (`Content-Length` framed).
fn status_and_json(response: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(response);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    (status, value)
}

async fn serving(options: ServeOptions) -> Running {
    start(
        host(None),
        ServeOptions {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..options
        },
    )
    .await
}

/// Issue #14: a client sending its headers one byte at a time (or never finishing
/// them) held the connection forever (> 75 s). Now it is cut off after the header
/// read timeout, however it dribbles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_headers_are_cut_off_after_the_header_timeout() {
    reauth_tests::logs();
    let running = serving(ServeOptions {
        header_read_timeout: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let tcp = running.addresses[0].clone();
    // Headers started, never finished.
    let mut stalled = raw(&tcp, b"GET /healthz HTTP/1.1\r\nHost: reauth\r\n").await;
    // Headers dribbled one byte every 100 ms, for longer than the timeout.
    let dribbling = tokio::spawn({
        let tcp = tcp.clone();
        async move {
            let mut stream = raw(&tcp, b"G").await;
            let started = Instant::now();
            for &b in b"ET /healthz HTTP/1.1\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if stream.write_all(&[b]).await.is_err() {
                    return Some(started.elapsed());
                }
            }
            let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
            closed.then(|| started.elapsed())
        }
    });
    let (got, closed) = read_until_closed(&mut stalled, Duration::from_secs(10)).await;
    assert!(closed, "a stalled request stayed open 10 s");
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    let cut = dribbling.await.unwrap();
    assert!(cut.is_some(), "a dribbling client was never cut off");
    // An idle connection (no byte sent) is closed too.
    let mut idle = raw(&tcp, b"").await;
    let (_, closed) = read_until_closed(&mut idle, Duration::from_secs(10)).await;
    assert!(closed, "an idle connection stayed open 10 s");
    // The server still answers.
    let (status, _, _) = http(&tcp, "GET", "/healthz", &[], None).await.unwrap();
    assert_eq!(status, 200);
    let _ = running.stop.send(());
}

/// Issue #14: a body that never finishes is answered 408 (JSON) after the body
/// read timeout, and the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_finishes_is_answered_408_after_the_body_timeout() {
    reauth_tests::logs();
    let running = serving(ServeOptions {
        body_read_timeout: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let tcp = &running.addresses[0];
    let mut stream = raw(
        tcp,
        b"POST /v1/providers/counter/credentials HTTP/1.1\r\nHost: reauth\r\n\
          Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"",
    )
    .await;
    let (got, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(closed, "the connection stayed open");
    let (status, body) = status_and_json(&got);
    assert_eq!(status, 408, "{body}");
    assert_eq!(body["error"]["kind"], "request_timeout", "{body}");
    check_spec(
        "/v1/providers/{name}/credentials",
        "post",
        status,
        serde_json::to_vec(&body).unwrap().as_slice(),
    );
    let _ = running.stop.send(());
}

/// Issue #14: `Content-Length: 10000000000` with a 2-byte body was never
/// answered. Now: 413 (JSON) at once, before any body is read (the body timeout
/// here is far longer than the bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announced_oversize_body_is_answered_413_at_once() {
    reauth_tests::logs();
    let running = serving(ServeOptions {
        body_read_timeout: Duration::from_secs(300),
        ..Default::default()
    })
    .await;
    let tcp = &running.addresses[0];
    for path in [
        "/v1/providers/counter/credentials",
        "/v1/providers/counter/security-errors",
    ] {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: reauth\r\nContent-Type: application/json\r\n\
             Content-Length: 10000000000\r\n\r\n{{}}"
        );
        let mut stream = raw(tcp, request.as_bytes()).await;
        let (got, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
        assert!(closed, "{path}: not answered and closed within 10 s");
        let (status, body) = status_and_json(&got);
        assert_eq!(
            (status, body["error"]["kind"].as_str()),
            (413, Some("too_large")),
            "{path}: {body}"
        );
        check_spec(
            &path.replace("/counter/", "/{name}/"),
            "post",
            status,
            serde_json::to_vec(&body).unwrap().as_slice(),
        );
    }
    let _ = running.stop.send(());
}

/// Issue #14: 405 had an empty body, and axum's own rejections were plain text.
/// Every error status carries `{"error": {"kind", "message"}}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_status_has_a_json_body() {
    reauth_tests::logs();
    let running = serving(ServeOptions::default()).await;
    let tcp = &running.addresses[0];
    for (method, path, status) in [
        ("GET", "/v1/providers/counter/credentials", 405),
        ("DELETE", "/healthz", 405),
        ("GET", "/v2/whatever", 404),
    ] {
        let (s, headers, body) = http(tcp, method, path, &[], None).await.unwrap();
        assert_eq!(s, status, "{method} {path}");
        assert_eq!(
            headers["content-type"], "application/json",
            "{method} {path}"
        );
        let value: Value = serde_json::from_slice(&body).unwrap();
        let spec = spec();
        conforms(&spec, &spec["components"]["schemas"]["Error"], &value)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    }
    let (_, headers, body) = http(tcp, "GET", "/v1/providers/counter/credentials", &[], None)
        .await
        .unwrap();
    assert_eq!(headers["allow"], "POST");
    let value: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(value["error"]["kind"], "method_not_allowed");
    let _ = running.stop.send(());
}

/// Issue #14: 1,100 idle connections under a 1,024 fd limit made valid requests
/// time out with nothing logged. Now connections are capped: at the cap a warning
/// is logged, new connections wait in the backlog, and a good request is served
/// once the idle ones are closed (here by the header read timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_wait_and_a_good_request_is_served() {
    let logs = reauth_tests::logs();
    let running = serving(ServeOptions {
        max_connections: 4,
        header_read_timeout: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let tcp = running.addresses[0].clone();
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(raw(&tcp, b"").await);
    }
    let (status, _, _) = http(&tcp, "GET", "/healthz", &[], None)
        .await
        .expect("a good request behind 8 idle connections is served within 10 s");
    assert_eq!(status, 200);
    assert!(
        logs.contents().contains("connection limit reached"),
        "no log line for the cap"
    );
    drop(idle);
    let _ = running.stop.send(());

    // With no timeout to help: a good request waits while the cap is held, and is
    // served as soon as the holders close.
    let running = serving(ServeOptions {
        max_connections: 4,
        header_read_timeout: Duration::from_secs(300),
        ..Default::default()
    })
    .await;
    let tcp = running.addresses[0].clone();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(raw(&tcp, b"GET /healthz HTTP/1.1\r\nHost: r").await);
    }
    let good = tokio::spawn({
        let tcp = tcp.clone();
        async move { http(&tcp, "GET", "/healthz", &[], None).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(held);
    let (status, _, _) = good.await.unwrap().expect("served once the holders closed");
    assert_eq!(status, 200);
    let _ = running.stop.send(());
}

/// RFC 9110: the auth scheme is case-insensitive; `bearer <token>` was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowercase_bearer_scheme_is_accepted() {
    reauth_tests::logs();
    reauth_tests::record_secret(API_TOKEN);
    let running = serving(ServeOptions {
        api_token: Some(Secret::new(API_TOKEN)),
        ..Default::default()
    })
    .await;
    let tcp = &running.addresses[0];
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let auth = format!("{scheme} {API_TOKEN}");
        let (status, _, body) = http(
            tcp,
            "GET",
            "/v1/providers",
            &[("authorization", auth.as_str())],
            None,
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{scheme}: {}", String::from_utf8_lossy(&body));
    }
    let auth = format!("Basic {API_TOKEN}");
    let (status, _, _) = http(
        tcp,
        "GET",
        "/v1/providers",
        &[("authorization", &auth)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
    let _ = running.stop.send(());
}

/// Issue #14 item 2: `credential.expires_at_unix = 18446744073709551615` panicked
/// in the conversion and dropped the connection. Now: a 400 naming the field, and
/// the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_error_with_an_expiry_past_year_9999_is_a_400_naming_the_field() {
    reauth_tests::logs();
    let running = serving(ServeOptions::default()).await;
    let tcp = &running.addresses[0];
    for value in [u64::MAX, 253_402_300_800] {
        let report = json!({
            "credential": {"kind": "bearer", "token": "count-1-", "expires_at_unix": value},
            "error": {"kind": "token_expired", "status": 401}
        });
        let (status, body) = post(tcp, "/v1/providers/counter/security-errors", report, None).await;
        assert_eq!(status, 400, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("`credential.expires_at_unix`") && message.contains("9999"),
            "{message}"
        );
    }
    // The largest accepted value still works.
    let report = json!({
        "credential": {"kind": "bearer", "token": "count-1-", "expires_at_unix": 253_402_300_799u64},
        "error": {"kind": "token_expired", "status": 401}
    });
    let (status, body) = post(tcp, "/v1/providers/counter/security-errors", report, None).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = http(tcp, "GET", "/healthz", &[], None).await.unwrap();
    assert_eq!(status, 200);
    let _ = running.stop.send(());
}

/// Issue #14: SIGTERM waited forever for a half-sent request. Now the real
/// `reauth serve` exits once the shutdown grace is over (1 s here; the bound
/// below only proves it is not hung).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_half_sent_request_exits_after_the_shutdown_grace() {
    use std::io::{BufRead as _, BufReader};
    reauth_tests::logs();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("reauth.toml");
    std::fs::write(
        &config,
        format!(
            "[providers.db]\nplugin = \"{}\"\n[providers.db.config]\nusername = \"app\"\npassword = \"static-pw-1q2w3e\"\n",
            plugins().static_.display()
        ),
    )
    .unwrap();
    let port = free_port();
    let mut child = std::process::Command::new(workspace_binary("reauth", "reauth"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--header-timeout", "300s", "--body-timeout", "300s"])
        .args(["--shutdown-grace", "1s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting reauth serve");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut sidecar = Peer::new(child, "-TERM", Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.starts_with("listening on http://") => break,
            Ok(_) => {}
            Err(_) => assert!(Instant::now() < deadline, "reauth serve did not start"),
        }
    }
    let tcp = format!("http://127.0.0.1:{port}");
    // One request with half its body, one with half its headers.
    let _half_body = raw(
        &tcp,
        b"POST /v1/providers/db/credentials HTTP/1.1\r\nHost: reauth\r\n\
          Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{",
    )
    .await;
    let _half_headers = raw(
        &tcp,
        b"POST /v1/providers/db/credentials HTTP/1.1\r\nHost: r",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = tokio::task::spawn_blocking(move || sidecar.stop())
        .await
        .unwrap()
        .expect("reauth serve did not exit within 20 s of SIGTERM");
    assert!(status.success(), "{status:?}");
    let lines: Vec<String> = rx.try_iter().collect();
    assert!(lines.iter().any(|l| l == "stopped"), "{lines:?}");
}

/// Issue #14, items 5 and 10 through the sidecar: a provider whose bulkhead is
/// full answers 503 `busy` with `Retry-After` (and its breaker does not count it),
/// and a plugin's `retry-after` of 2^64−1 ms reaches the client clamped to the
/// provider's `retry.max_retry_after_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_bulkhead_is_503_busy_and_retry_after_is_clamped() {
    reauth_tests::logs();
    let slow = SlowEndpoint::start("slow-token-value", Duration::from_millis(1500)).await;
    let mut narrow = ProviderConfig::new(&plugins().testkit)
        .allow_host(slow.authority())
        .config("mode", "fetch")
        .config("url", &slow.url);
    narrow.limits.max_concurrent_calls = 1;
    narrow.limits.queue_timeout_ms = 50;
    let host = Host::builder()
        .provider("slow", narrow)
        .provider(
            "db",
            ProviderConfig::new(&plugins().hostile)
                .config("mode", "ok")
                .config("handle", "retry-after-max"),
        )
        .build()
        .unwrap();
    let running = start(
        host,
        ServeOptions {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..ServeOptions::default()
        },
    )
    .await;
    let tcp = running.addresses[0].clone();
    let first = {
        let tcp = tcp.clone();
        tokio::spawn(async move {
            post(
                &tcp,
                "/v1/providers/slow/credentials",
                json!({"subject": "a"}),
                None,
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _, bytes) = http(
        &tcp,
        "POST",
        "/v1/providers/slow/credentials",
        &[("content-type", "application/json")],
        Some(json!({"subject": "b"}).to_string().into_bytes()),
    )
    .await
    .unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["kind"], "busy", "{body}");
    let (status, body) = first.await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (_, _, listing) = http(&tcp, "GET", "/v1/providers", &[], None).await.unwrap();
    let listing: Value = serde_json::from_slice(&listing).unwrap();
    let slow_status = listing["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "slow")
        .unwrap()
        .clone();
    assert_eq!(slow_status["consecutive_faults"], 0, "{slow_status}");

    let (status, fetched) = post(&tcp, "/v1/providers/db/credentials", json!({}), None).await;
    assert_eq!(status, 200, "{fetched}");
    let report = json!({
        "credential": fetched,
        "error": {"kind": "unauthorized", "status": 401}
    });
    let (status, body) = post(&tcp, "/v1/providers/db/security-errors", report, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["decision"], "retry_after", "{body}");
    let max = reauth::RetryPolicy::default().max_retry_after().as_millis() as u64;
    assert_eq!(body["retry_after_ms"], max, "{body}");
    let _ = running.stop.send(());
}
