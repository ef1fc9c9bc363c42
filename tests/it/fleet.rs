//! Fleet mode with real processes: `reauth serve` replicas configured with one
//! `[fleet]` on a real Redis 7 or PostgreSQL 15 (127.0.0.1), a real identity
//! provider (npm oidc-provider, with refresh-token rotation and reuse
//! detection) and a JWKS-verifying resource server.
//!
//! - 8 replicas × concurrent clients on one key, over several token lifetimes,
//!   two replicas with clocks 5 minutes behind and ahead (faketime): about one
//!   IdP call per lifetime for the whole fleet, plus one per reported 401, which
//!   reaches every replica's in-memory cache (on Redis even when the
//!   announcement is lost: the subscriptions are killed first); 0 failed
//!   operations.
//! - A rotating refresh token shared by 8 replicas for ≥ 20 rotations while
//!   replicas are SIGKILLed and restarted: no refresh token is ever replayed
//!   (the IdP would revoke the grant), every access token is accepted.
//! - The backend down for longer than a token lifetime: client-credentials
//!   callers see no failure (per-replica fetching), the rotating grant fails
//!   closed with `state_unavailable` once its token expires and never calls the
//!   IdP meanwhile; both recover on their own when the backend is back.

use reauth_tests::fleet::{Replicas, SHORT_CACHE, get, report_401};
use reauth_tests::peers::{Idp, Postgres, Redis, RedisCluster, ResourceServer, http_get};
use reauth_tests::{plugins, workspace_binary};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const API: &str = "urn:reauth:test-api";
const CC_SECRET: &str = "cc-basic-secret-0123456789";
const RP_SECRET: &str = "rp-secret-0123456789";

fn setup() {
    reauth_tests::logs();
    reauth_tests::record_secret(CC_SECRET);
    reauth_tests::record_secret(RP_SECRET);
}

fn replicas(backend: &str, url: &str, providers: &str) -> Replicas {
    Replicas::new(
        backend,
        url,
        providers,
        workspace_binary("reauth-cli", "reauth"),
        "fleet",
    )
}

async fn resource_server(idp: &Idp) -> ResourceServer {
    idp.resource_server(API).await
}

fn cc_provider(idp: &Idp) -> String {
    format!(
        r#"[providers.api]
plugin = "{plugin}"
allowed_hosts = ["{authority}"]
# Its state is only a discovery cache: per replica, so it keeps working while
# the fleet's backend is down.
shared_state = false

[providers.api.config]
issuer = "{issuer}"
client_id = "cc-basic"
client_secret = "{CC_SECRET}"
scope = "api:read"

[providers.api.cache]
{SHORT_CACHE}
"#,
        plugin = plugins().oauth2.display(),
        authority = idp.authority(),
        issuer = idp.issuer,
    )
}

fn rt_provider(idp: &Idp, seed_file: &std::path::Path) -> String {
    format!(
        r#"[providers.sso]
plugin = "{plugin}"
allowed_hosts = ["{authority}"]

[providers.sso.config]
token_url = "{issuer}/token"
client_id = "rp"
client_secret = "{RP_SECRET}"
refresh_token = {{ file = "{seed}" }}

[providers.sso.cache]
{SHORT_CACHE}

# A call holding the shared state ends well before its lease (3 s) could lapse.
[providers.sso.limits]
timeout_ms = 2000
"#,
        plugin = plugins().oidc_refresh.display(),
        authority = idp.authority(),
        issuer = idp.issuer,
        seed = seed_file.display(),
    )
}

/// What the clients saw.
#[derive(Default)]
struct Outcome {
    ops: AtomicU64,
    failures: Mutex<Vec<String>>,
    tokens: Mutex<HashSet<String>>,
}

/// `clients` loops per replica calling `provider` until `stop`.
fn clients(
    ports: Vec<u16>,
    per_replica: usize,
    provider: &'static str,
    until: Instant,
    outcome: Arc<Outcome>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for port in ports {
        for _ in 0..per_replica {
            let outcome = outcome.clone();
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    match get(port, provider).await {
                        Ok(token) => {
                            outcome.tokens.lock().unwrap().insert(token);
                        }
                        Err((status, body)) => outcome
                            .failures
                            .lock()
                            .unwrap()
                            .push(format!("replica :{port}: {status} {body}")),
                    }
                    outcome.ops.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }));
        }
    }
    tasks
}

/// 8 replicas (two of them with clocks 5 minutes off) on `backend`; with
/// `bus`, the replicas' subscriptions are killed just before the 401 report (a
/// lost announcement: they catch up when they reconnect).
async fn eight_replicas_share_one_token(backend: &str, url: &str, bus: Option<&Redis>) {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let idp = Idp::start(&dir.path().join("keys.json"), 4, None);
    let mut fleet = replicas(backend, url, &cc_provider(&idp));
    fleet.start_all_skewed(8);
    let ports: Vec<u16> = (0..8).filter_map(|i| fleet.port(i)).collect();
    let outcome = Arc::new(Outcome::default());
    let started = Instant::now();
    let run = Duration::from_secs(13);
    for t in clients(ports.clone(), 3, "api", started + run, outcome.clone()) {
        t.await.unwrap();
    }
    let (idp_calls, idp_failed) = idp.token_requests("cc-basic").await;
    let ops = outcome.ops.load(Ordering::Relaxed);
    let tokens = outcome.tokens.lock().unwrap().clone();
    println!(
        "{backend}: 8 replicas, {ops} operations in {:?}, {idp_calls} IdP token requests, {} distinct tokens",
        started.elapsed(),
        tokens.len()
    );
    let failures = outcome.failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "failed operations: {failures:#?}");
    assert_eq!(idp_failed, 0);
    // 13 s of 4 s tokens refreshed ahead at ~80%: 4–5 tokens for the fleet.
    // Without the fleet: 8 replicas × that.
    assert!(
        (3..=7).contains(&idp_calls),
        "{idp_calls} IdP calls for 8 replicas over 13 s of 4 s tokens"
    );
    assert!(ops >= 300, "only {ops} operations ran");
    // The tokens were valid: the resource server verifies signature and audience
    // (the latest is still within its lifetime).
    let rs = resource_server(&idp).await;
    let latest = get(ports[0], "api").await.unwrap();
    assert!(matches!(
        http_get(&rs.url, Some(&latest)).await,
        Ok((200, _, _))
    ));

    // A 401 reported on one replica: one new token for the whole fleet, and no
    // replica hands out the rejected one afterwards.
    let rejected = latest.clone();
    let before = idp.token_requests("cc-basic").await.0;
    if let Some(redis) = bus {
        let mut c = redis.connect(None).await.unwrap();
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(killed, 8, "one bus subscription per replica");
    }
    assert_eq!(report_401(ports[3], "api", &rejected).await, 200);
    // The announcement reaches every replica's memory within a bounded time.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut stale: Vec<u16> = ports.clone();
    while !stale.is_empty() {
        let mut still = Vec::new();
        for &port in &stale {
            if get(port, "api").await.unwrap() == rejected {
                still.push(port);
            }
        }
        stale = still;
        assert!(
            Instant::now() < deadline || stale.is_empty(),
            "replicas {stale:?} still hand out the rejected token 3 s after the report"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = idp.token_requests("cc-basic").await.0;
    assert!(
        after - before <= 2,
        "{} IdP calls after one reported 401 (one expected; two if a refresh was due)",
        after - before
    );
    // The skewed replicas followed the backend's clock (and said so).
    assert!(fleet.log_lines("this host's clock differs from the fleet backend's") >= 2);
    fleet.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_fleet_of_eight_calls_the_idp_once_per_lifetime() {
    let redis = Redis::start().await;
    eight_replicas_share_one_token("redis", &redis.url(), Some(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_fleet_of_eight_calls_the_idp_once_per_lifetime() {
    let cluster = RedisCluster::start().await;
    eight_replicas_share_one_token("redis-cluster", &cluster.url(), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_fleet_of_eight_calls_the_idp_once_per_lifetime() {
    let pg = Postgres::start().await;
    eight_replicas_share_one_token("postgres", &pg.url(), None).await;
}

/// A rotating refresh token shared by 8 replicas for ≥ 20 rotations while
/// replicas are killed (SIGKILL) and restarted: no replay, every token accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_refresh_token_survives_replica_kills() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start().await;
    let idp = Idp::start(&dir.path().join("keys.json"), 2, None);
    let (seed, seed_file) = idp.offline_token(dir.path());
    let mut fleet = replicas("postgres", &pg.url(), &rt_provider(&idp, &seed_file));
    fleet.start_all(8);
    let rs = resource_server(&idp).await;
    let refreshes = || async {
        idp.stats()
            .await
            .iter()
            .filter(|s| s.client == "rp" && s.grant == "refresh_token")
            .fold((0u64, 0u64), |(ok, failed), s| {
                (ok + s.ok, failed + s.failed)
            })
    };
    let started = Instant::now();
    let (mut ops, mut failures, mut kills) = (0u64, Vec::new(), 0u32);
    let mut tokens = HashSet::new();
    let mut refused = 0u32;
    let mut next_kill = Instant::now() + Duration::from_secs(2);
    let mut round = 0usize;
    loop {
        let (ok, _) = refreshes().await;
        if ok >= 20 || started.elapsed() > Duration::from_secs(90) {
            break;
        }
        round += 1;
        // Every replica that runs answers.
        for i in 0..8 {
            let Some(port) = fleet.port((i + round) % 8) else {
                continue;
            };
            ops += 1;
            match get(port, "sso").await {
                Ok(token) => {
                    if tokens.insert(token.clone())
                        && !matches!(http_get(&rs.url, Some(&token)).await, Ok((200, _, _)))
                    {
                        refused += 1;
                    }
                }
                Err((0, _)) => {} // killed between the check and the call
                Err((status, body)) => failures.push(format!("{status} {body}")),
            }
        }
        // Now and then a replica dies (not the one holding the state right now:
        // a holder killed after the IdP rotated the token and before it was
        // stored loses the login, whatever the store — see the chaos test) and
        // comes back.
        if Instant::now() >= next_kill {
            let holder = current_state_holder(&pg).await;
            let victim = (0..8)
                .map(|k| (round * 3 + k) % 8)
                .find(|&i| fleet.pid(i).is_some() && fleet.pid(i) != holder);
            if let Some(i) = victim {
                fleet.kill(i);
                kills += 1;
                fleet.start(i);
            }
            next_kill = Instant::now() + Duration::from_secs(2);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ok, replays) = refreshes().await;
    println!(
        "8 replicas, {ops} operations, {kills} kills, {ok} refresh grants, {replays} refused, {} distinct access tokens",
        tokens.len()
    );
    assert_eq!(replays, 0, "a consumed refresh token was replayed");
    assert!(ok >= 20, "only {ok} rotations in 90 s");
    assert!(kills >= 5, "only {kills} kills");
    assert!(failures.is_empty(), "failed operations: {failures:#?}");
    assert_eq!(refused, 0, "the resource server refused an access token");
    assert!(
        tokens.len() as u64 <= ok + 1,
        "{} tokens for {ok} refreshes: replicas fetched on their own",
        tokens.len()
    );
    // Nothing in clear in the backend.
    let c = pg
        .connect("postgres", reauth_tests::peers::PG_ADMIN_PASSWORD)
        .await
        .unwrap();
    let rows = c
        .query(
            "SELECT encode(data, 'escape') || tag FROM reauth_records",
            &[],
        )
        .await
        .unwrap();
    assert!(!rows.is_empty());
    for row in rows {
        let text: String = row.get(0);
        assert!(!text.contains(&seed) && !text.contains("refresh_token"));
        for t in &tokens {
            assert!(
                !text.contains(t.as_str()),
                "an access token in clear in PostgreSQL"
            );
        }
    }
    fleet.stop_all();
}

/// The pid in the holder record of provider `sso`'s state lease, if held.
async fn current_state_holder(pg: &Postgres) -> Option<u32> {
    let c = pg
        .connect("postgres", reauth_tests::peers::PG_ADMIN_PASSWORD)
        .await
        .ok()?;
    let row = c
        .query_opt(
            "SELECT holder FROM reauth_leases WHERE name = 's.sso:lease' AND token IS NOT NULL",
            &[],
        )
        .await
        .ok()??;
    let holder: Option<String> = row.get(0);
    holder?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("pid=")?.parse().ok())
}

/// Redis down for longer than a token lifetime: the client-credentials provider
/// keeps serving (per-replica fetching), the rotating grant fails closed with
/// `state_unavailable` and never calls the IdP while the backend is down; an
/// empty Redis on the same port brings the fleet back without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_keeps_serving_and_fails_closed_for_rotation() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start().await;
    let port = redis.port;
    let idp = Idp::start(&dir.path().join("keys.json"), 3, None);
    let (_, seed_file) = idp.offline_token(dir.path());
    let providers = format!("{}\n{}", cc_provider(&idp), rt_provider(&idp, &seed_file));
    let mut fleet = replicas("redis", &redis.url(), &providers);
    fleet.start_all(3);
    let ports: Vec<u16> = (0..3).filter_map(|i| fleet.port(i)).collect();
    for &p in &ports {
        get(p, "api").await.unwrap();
        get(p, "sso").await.unwrap();
    }
    let rt_before = idp.token_requests("rp").await.0;

    // Down for 7 s (> 2 lifetimes of 3 s).
    redis.stop();
    let down_until = Instant::now() + Duration::from_secs(7);
    let outcome = Arc::new(Outcome::default());
    let tasks = clients(ports.clone(), 2, "api", down_until, outcome.clone());
    let mut sso_refused = 0;
    let mut sso_other = Vec::new();
    while Instant::now() < down_until {
        for &p in &ports {
            match get(p, "sso").await {
                Ok(_) => {}
                Err((503, body)) if body.contains("state_unavailable") => sso_refused += 1,
                Err(e) => sso_other.push(e),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let failures = outcome.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "client-credentials calls failed while the backend was down: {failures:#?}"
    );
    assert!(outcome.ops.load(Ordering::Relaxed) > 100);
    assert!(
        sso_refused > 0,
        "the rotating grant kept serving past its token's expiry"
    );
    assert!(sso_other.is_empty(), "{sso_other:?}");
    assert_eq!(
        idp.token_requests("rp").await.0,
        rt_before,
        "a refresh token was spent while the fleet's state was unreachable"
    );
    assert!(fleet.log_lines("fleet backend unreachable") >= 1);

    // Back (empty: no persistence — the grant's state is gone, so only the
    // stateless provider is expected to recover; see README on persistence).
    let _redis = Redis::start_on(port).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    for &p in &ports {
        loop {
            if get(p, "api").await.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "no recovery within 10 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The replicas say so at their first backend operation that succeeds (a
    // refresh, a heartbeat, the rotating grant's state): bounded wait, not a
    // fixed sleep (on a loaded machine the first one may take a few seconds).
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleet.log_lines("fleet backend reachable again") == 0 {
        assert!(
            Instant::now() < deadline,
            "no replica logged the backend's return within 10 s"
        );
        for &p in &ports {
            let _ = get(p, "api").await;
            let _ = get(p, "sso").await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    fleet.stop_all();
}
