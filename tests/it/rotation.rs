//! Password rotation against real servers: PostgreSQL and Redis from Debian's
//! packages on 127.0.0.1, the `password-rotation` provider reading a Vault-shaped
//! secrets endpoint. The password is rotated while a client loop runs; the first
//! rejection of the old password must cost exactly one refresh and one retry, and
//! no operation may fail.

use reauth::{Credential, Credentials, Host, ProviderConfig, Rejection, Request, classify};
use reauth_tests::peers::{Postgres, Redis, SecretsEndpoint};
use reauth_tests::plugins;
use std::sync::atomic::Ordering;
use std::time::Duration;

const VAULT_TOKEN: &str = "vault-token";
const PW1: &str = "rotating-pw-one-1a2b";
const PW2: &str = "rotating-pw-two-3c4d";

fn setup() {
    reauth_tests::logs();
    reauth_tests::record_secret(PW1);
    reauth_tests::record_secret(PW2);
}

fn provider(secrets: &SecretsEndpoint, format: &str, path: &str) -> ProviderConfig {
    ProviderConfig::new(&plugins().password_rotation)
        .allow_host(secrets.base.trim_start_matches("http://"))
        .config("secret_url", format!("{}{path}", secrets.base))
        .config("format", format)
        .config("vault_token", VAULT_TOKEN)
}

fn basic(c: &Credentials) -> (String, String) {
    match &c.credential {
        Credential::Basic { username, password } => {
            (username.clone(), password.expose().to_string())
        }
        other => panic!("expected basic credentials, got {other:?}"),
    }
}

struct Outcome {
    ops: u64,
    failures: Vec<String>,
    rejections: u64,
}

/// Run `op` through `with_credentials` every 10 ms for `duration`; `rotate` runs once
/// after `rotate_after`.
async fn run_loop<F, Fut, R, RFut>(
    host: &Host,
    duration: Duration,
    rotate_after: Duration,
    rotate: R,
    mut op: F,
) -> Outcome
where
    F: FnMut(Credentials) -> Fut,
    Fut: Future<Output = Result<(), Rejection<String>>>,
    R: FnOnce() -> RFut,
    RFut: Future<Output = ()>,
{
    let started = tokio::time::Instant::now();
    let mut rotate = Some(rotate);
    let (mut ops, mut failures) = (0, Vec::new());
    let rejections = std::sync::atomic::AtomicU64::new(0);
    while started.elapsed() < duration {
        if started.elapsed() >= rotate_after
            && let Some(r) = rotate.take()
        {
            r().await;
        }
        let rejections = &rejections;
        let result = host
            .with_credentials("db", &Request::new(), |c| {
                let fut = op(c);
                async move {
                    let r = fut.await;
                    if matches!(r, Err(Rejection::Security { .. })) {
                        rejections.fetch_add(1, Ordering::Relaxed);
                    }
                    r
                }
            })
            .await;
        ops += 1;
        if let Err(e) = result {
            failures.push(format!("{e:?}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Outcome {
        ops,
        failures,
        rejections: rejections.into_inner(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_password_rotation_costs_one_refresh_and_no_failed_operation() {
    setup();
    let pg = Postgres::start().await;
    pg.admin(&format!("CREATE ROLE app LOGIN PASSWORD '{PW1}'"))
        .await;
    // Vault's database static role: username, password, seconds to next rotation.
    let secrets = SecretsEndpoint::start("app", PW1, 3600, VAULT_TOKEN).await;
    let host = Host::builder()
        .provider(
            "db",
            provider(
                &secrets,
                "vault-static-creds",
                "/v1/database/static-creds/app",
            ),
        )
        .build()
        .unwrap();

    let first = host.get_credentials("db", &Request::new()).await.unwrap();
    let expires = first
        .expires_at
        .expect("the static role's ttl becomes the expiry");
    let ttl = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        ttl > Duration::from_secs(3500) && ttl <= Duration::from_secs(3600),
        "{ttl:?}"
    );

    let outcome = run_loop(
        &host,
        Duration::from_secs(4),
        Duration::from_secs(2),
        || async {
            // What Vault does on rotation: change the password in the database,
            // then serve the new one.
            pg.admin(&format!("ALTER ROLE app PASSWORD '{PW2}'")).await;
            secrets.set_password(PW2);
        },
        |c| {
            let (user, password) = basic(&c);
            let pg = &pg;
            async move {
                let client = match pg.connect(&user, &password).await {
                    Ok(client) => client,
                    Err(e) => {
                        let code = e.code().map(|c| c.code().to_string());
                        return Err(
                            match code
                                .as_deref()
                                .and_then(|c| classify::from_postgres(c, None))
                            {
                                Some(se) => Rejection::security(se, e.to_string()),
                                None => Rejection::Other(e.to_string()),
                            },
                        );
                    }
                };
                let row = client
                    .query_one("SELECT current_user::text", &[])
                    .await
                    .map_err(|e| Rejection::Other(e.to_string()))?;
                assert_eq!(row.get::<_, String>(0), "app");
                Ok(())
            }
        },
    )
    .await;
    println!(
        "postgres: {} operations, {} rejection(s) of the old password, {} plugin calls, {} secret reads",
        outcome.ops,
        outcome.rejections,
        host.plugin_calls("db"),
        secrets.reads.load(Ordering::Relaxed)
    );
    assert!(
        outcome.failures.is_empty(),
        "failed operations: {:?}",
        outcome.failures
    );
    assert!(outcome.ops >= 50, "only {} operations", outcome.ops);
    assert_eq!(
        outcome.rejections, 1,
        "the old password was rejected exactly once"
    );
    assert_eq!(host.plugin_calls("db"), 2, "one fetch, one refresh");
    assert_eq!(secrets.reads.load(Ordering::Relaxed), 2);
    let now = host.get_credentials("db", &Request::new()).await.unwrap();
    assert_eq!(basic(&now).1, PW2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_password_rotation_costs_one_refresh_and_no_failed_operation() {
    setup();
    let redis = Redis::start().await;
    let mut admin = redis.connect(None).await.unwrap();
    redis::cmd("ACL")
        .arg(&["SETUSER", "app", "on", &format!(">{PW1}"), "~*", "+@all"][..])
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    // Vault KV v2: the operator's rotation job writes the new password there.
    let secrets = SecretsEndpoint::start("app", PW1, 0, VAULT_TOKEN).await;
    let host = Host::builder()
        .provider(
            "db",
            provider(&secrets, "vault-kv2", "/v1/secret/data/redis-app"),
        )
        .build()
        .unwrap();

    let outcome = run_loop(
        &host,
        Duration::from_secs(4),
        Duration::from_secs(2),
        || async {
            let mut admin = redis.connect(None).await.unwrap();
            redis::cmd("ACL")
                .arg(&["SETUSER", "app", "resetpass", &format!(">{PW2}")][..])
                .query_async::<()>(&mut admin)
                .await
                .unwrap();
            secrets.set_password(PW2);
        },
        |c| {
            let (user, password) = basic(&c);
            let redis = &redis;
            async move {
                let mut conn = match redis.connect(Some((&user, &password))).await {
                    Ok(conn) => conn,
                    Err(e) => {
                        // redis-rs turns the server's `-WRONGPASS …` reply to AUTH into
                        // ErrorKind::AuthenticationFailed; other replies keep their code.
                        let reply = match (e.kind(), e.code()) {
                            (redis::ErrorKind::AuthenticationFailed, _) => format!("WRONGPASS {e}"),
                            (_, Some(code)) => format!("{code} {}", e.detail().unwrap_or_default()),
                            _ => e.to_string(),
                        };
                        return Err(match classify::from_redis(&reply) {
                            Some(se) => Rejection::security(se, reply),
                            None => Rejection::Other(reply),
                        });
                    }
                };
                redis::cmd("INCR")
                    .arg("ops")
                    .query_async::<i64>(&mut conn)
                    .await
                    .map_err(|e| Rejection::Other(e.to_string()))?;
                Ok(())
            }
        },
    )
    .await;
    let counted: i64 = redis::cmd("GET")
        .arg("ops")
        .query_async(&mut admin)
        .await
        .unwrap();
    println!(
        "redis: {} operations, {} rejection(s) of the old password, {} plugin calls",
        outcome.ops,
        outcome.rejections,
        host.plugin_calls("db")
    );
    assert!(
        outcome.failures.is_empty(),
        "failed operations: {:?}",
        outcome.failures
    );
    assert_eq!(
        counted as u64, outcome.ops,
        "every operation reached Redis once"
    );
    assert_eq!(
        outcome.rejections, 1,
        "the old password was rejected exactly once"
    );
    assert_eq!(host.plugin_calls("db"), 2, "one fetch, one refresh");
}
