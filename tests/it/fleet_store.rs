//! The fleet store's conformance suite, run on both backends against real
//! servers on 127.0.0.1 (Redis 7 and PostgreSQL 15 from Debian's packages):
//! leases and fencing, compare-and-set writes, compare-and-invalidate with its
//! announcement, provider state under a lease (a holder whose lease lapsed
//! cannot write), sealing (tampered or moved ciphertexts do not open, nothing
//! in clear in any key or row), key rotation, the backend's clock, and a
//! backend that goes away and comes back.

use reauth::clock::ManualClock;
use reauth::store::fleet::{
    Fleet, FleetBackend, FleetOptions, PostgresBackend, Record, RedisBackend,
};
use reauth::store::{KeyRing, RemoteEvent, SharedCache, SharedEntry, StateStore, StoreError};
use reauth::{Credential, Credentials};
use reauth_tests::peers::{Postgres, Redis, RedisCluster};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

const K1: &str = "v1 k1 1111111111111111111111111111111111111111111111111111111111111111";
const K2: &str = "v1 k2 2222222222222222222222222222222222222222222222222222222222222222";

enum Engine {
    Redis(Redis),
    Postgres(Postgres),
    Cluster(RedisCluster),
}

impl Engine {
    async fn redis() -> Engine {
        Engine::Redis(Redis::start().await)
    }

    async fn postgres() -> Engine {
        Engine::Postgres(Postgres::start().await)
    }

    fn backend(&self, fleet: &str) -> Arc<dyn FleetBackend> {
        let timeout = Duration::from_millis(1000);
        match self {
            Engine::Redis(r) => Arc::new(RedisBackend::new(&r.url(), fleet, timeout).unwrap()),
            Engine::Postgres(p) => {
                Arc::new(PostgresBackend::new(&p.url(), fleet, timeout).unwrap())
            }
            Engine::Cluster(c) => {
                let url = c.url();
                let nodes: Vec<&str> = url.split(',').collect();
                Arc::new(RedisBackend::cluster(&nodes, fleet, timeout).unwrap())
            }
        }
    }

    fn fleet(&self, fleet: &str, ring: &str) -> Fleet {
        Fleet::new(
            self.backend(fleet),
            Arc::new(KeyRing::parse(ring, "test ring").unwrap()),
            FleetOptions {
                name: fleet.to_string(),
                // Generous for a loaded CI machine: a release that times out is
                // (rightly) not a clean one, and the conformance steps lapse
                // leases explicitly rather than waiting for them.
                lease: Duration::from_millis(5000),
                wait: Duration::from_secs(10),
                timeout: Duration::from_millis(2500),
            },
        )
    }

    /// Every stored byte: Redis keys with their values, PostgreSQL rows.
    async fn dump(&self) -> Vec<(String, Vec<u8>)> {
        match self {
            Engine::Cluster(_) => panic!("raw access is only used on single servers"),
            Engine::Redis(r) => {
                let mut c = r.connect(None).await.unwrap();
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg("*")
                    .query_async(&mut c)
                    .await
                    .unwrap();
                let mut out = Vec::new();
                for key in keys {
                    let kind: String = redis::cmd("TYPE")
                        .arg(&key)
                        .query_async(&mut c)
                        .await
                        .unwrap();
                    let value: Vec<u8> = if kind == "hash" {
                        let fields: Vec<Vec<u8>> = redis::cmd("HGETALL")
                            .arg(&key)
                            .query_async(&mut c)
                            .await
                            .unwrap();
                        fields.concat()
                    } else {
                        redis::cmd("GET")
                            .arg(&key)
                            .query_async(&mut c)
                            .await
                            .unwrap()
                    };
                    out.push((key, value));
                }
                out
            }
            Engine::Postgres(p) => {
                let c = p
                    .connect("postgres", reauth_tests::peers::PG_ADMIN_PASSWORD)
                    .await
                    .unwrap();
                let mut out = Vec::new();
                for row in c
                    .query("SELECT fleet || '/' || name, convert_to(coalesce(token,'') || coalesce(holder,''), 'UTF8') FROM reauth_leases", &[])
                    .await
                    .unwrap()
                {
                    out.push((row.get(0), row.get(1)));
                }
                for row in c
                    .query(
                        "SELECT fleet || '/' || name, tag, data FROM reauth_records",
                        &[],
                    )
                    .await
                    .unwrap()
                {
                    let mut bytes: Vec<u8> = row.get::<_, String>(1).into_bytes();
                    bytes.extend(row.get::<_, Vec<u8>>(2));
                    out.push((row.get(0), bytes));
                }
                out
            }
        }
    }

    /// Flip a byte in the sealed data of `fleet`'s record `name`.
    async fn tamper(&self, fleet: &str, name: &str) {
        match self {
            Engine::Cluster(_) => panic!("raw access is only used on single servers"),
            Engine::Redis(r) => {
                let mut c = r.connect(None).await.unwrap();
                let (group, kind) = name.rsplit_once(':').unwrap();
                let key = format!("reauth:{{{fleet}:{group}}}:{kind}");
                let mut data: Vec<u8> = redis::cmd("HGET")
                    .arg(&key)
                    .arg("d")
                    .query_async(&mut c)
                    .await
                    .unwrap();
                assert!(!data.is_empty(), "no record {key}");
                let last = data.len() - 1;
                data[last] ^= 1;
                let _: i64 = redis::cmd("HSET")
                    .arg(&key)
                    .arg("d")
                    .arg(data)
                    .query_async(&mut c)
                    .await
                    .unwrap();
            }
            Engine::Postgres(p) => {
                p.admin(&format!(
                    "UPDATE reauth_records SET data = overlay(data placing '\\xff'::bytea from length(data)) WHERE fleet = '{fleet}' AND name = '{name}'"
                ))
                .await;
            }
        }
    }

    /// Copy record `from` over record `to` (a ciphertext moved to another key).
    async fn copy(&self, fleet: &str, from: &str, to: &str) {
        match self {
            Engine::Cluster(_) => panic!("raw access is only used on single servers"),
            Engine::Redis(r) => {
                let mut c = r.connect(None).await.unwrap();
                let key = |name: &str| {
                    let (group, kind) = name.rsplit_once(':').unwrap();
                    format!("reauth:{{{fleet}:{group}}}:{kind}")
                };
                let fields: Vec<Vec<u8>> = redis::cmd("HGETALL")
                    .arg(key(from))
                    .query_async(&mut c)
                    .await
                    .unwrap();
                let mut cmd = redis::cmd("HSET");
                cmd.arg(key(to));
                for f in fields {
                    cmd.arg(f);
                }
                let _: i64 = cmd.query_async(&mut c).await.unwrap();
            }
            Engine::Postgres(p) => {
                p.admin(&format!(
                    "INSERT INTO reauth_records SELECT fleet, '{to}', version, tag, data, expires_at FROM reauth_records WHERE fleet = '{fleet}' AND name = '{from}'"
                ))
                .await;
            }
        }
    }

    /// Make every lease of `fleet` lapse now (as if its holders had been
    /// stopped past the lease).
    async fn lapse_leases(&self, fleet: &str) {
        match self {
            Engine::Redis(r) => {
                let mut c = r.connect(None).await.unwrap();
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("reauth:{{{fleet}:*}}:lease"))
                    .query_async(&mut c)
                    .await
                    .unwrap();
                for key in keys {
                    let _: i64 = redis::cmd("DEL")
                        .arg(key)
                        .query_async(&mut c)
                        .await
                        .unwrap();
                }
            }
            Engine::Postgres(p) => {
                p.admin(&format!(
                    "UPDATE reauth_leases SET expires_at = '-infinity' WHERE fleet = '{fleet}'"
                ))
                .await;
            }
            Engine::Cluster(c) => {
                for &port in &c.ports {
                    let mut n = c.node(port).await.unwrap();
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg(format!("reauth:{{{fleet}:*}}:lease"))
                        .query_async(&mut n)
                        .await
                        .unwrap();
                    for key in keys {
                        let _: i64 = redis::cmd("DEL")
                            .arg(key)
                            .query_async(&mut n)
                            .await
                            .unwrap();
                    }
                }
            }
        }
    }
}

fn entry(token: &str) -> SharedEntry {
    // Whole seconds: what the wire format keeps.
    let now = SystemTime::UNIX_EPOCH
        + Duration::from_secs(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        );
    SharedEntry {
        credentials: Credentials {
            credential: Credential::Bearer(token.into()),
            expires_at: Some(now + Duration::from_secs(600)),
            principal: Some("alice".into()),
        },
        written_at: now,
        fresh_until: now + Duration::from_secs(480),
    }
}

fn values(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Leases: one holder per key, a waiter gets it after the release with a larger
/// fence; an entry written under a lease is what the other replica reads.
async fn leases_and_entries(engine: &Engine) {
    let a = engine.fleet("lease", K1);
    let b = engine.fleet("lease", K1);
    let id = a.entry_id(b"provider|request");
    assert_eq!(id, b.entry_id(b"provider|request"), "replicas agree on ids");
    let la = a
        .fetching(&id, Duration::from_secs(2))
        .await
        .expect("a lease");
    assert!(
        b.fetching(&id, Duration::from_millis(300)).await.is_none(),
        "a second replica got a lease that was held"
    );
    let written = entry("tok-LEASE-aaaaaaaaaaaa");
    a.write(&id, &written, Some(&la)).await.unwrap();
    assert_eq!(
        b.read(&id).await,
        Some(written.clone()),
        "the other replica reads it"
    );
    // The waiter is let in once the holder releases.
    let waiter = {
        let (b, id) = (b.clone(), id.clone());
        tokio::spawn(async move { b.fetching(&id, Duration::from_secs(8)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let first_fence = la.fence;
    drop(la);
    let lb = waiter
        .await
        .unwrap()
        .expect("the waiter got the lease after the release");
    assert!(
        lb.fence > first_fence,
        "fences grow: {} then {}",
        first_fence,
        lb.fence
    );
    // A write without the lease is not made (a replica that could not get it
    // keeps its credential to itself).
    a.write(&id, &entry("tok-NOLEASE-bbbbbbbbb"), None)
        .await
        .unwrap();
    assert_eq!(b.read(&id).await, Some(written));
}

/// The backend itself: a lapsed lease's token can neither renew nor write; the
/// next holder learns the lapsed holder.
async fn fencing(engine: &Engine) {
    let backend = engine.backend("fence");
    let first = backend
        .acquire("g:lease", "t1", "pid=4242 host=h", 1000)
        .await
        .unwrap()
        .expect("free lease");
    assert!(
        backend
            .acquire("g:lease", "t2", "pid=2", 10_000)
            .await
            .unwrap()
            .is_none()
    );
    engine.lapse_leases("fence").await;
    let second = backend
        .acquire("g:lease", "t2", "pid=2 host=h", 10_000)
        .await
        .unwrap()
        .expect("a lapsed lease is free");
    assert!(second.fence > first.fence);
    assert!(
        second
            .previous
            .as_deref()
            .is_some_and(|p| p.starts_with("pid=4242 ")),
        "the lapsed holder is reported: {:?}",
        second.previous
    );
    let record = Record {
        version: first.fence,
        tag: String::new(),
        data: b"stale".to_vec(),
    };
    assert!(
        !backend
            .put("g:entry", &record, 0, Some(("g:lease", "t1")))
            .await
            .unwrap(),
        "a lapsed holder wrote"
    );
    assert!(
        !backend.renew("g:lease", "t1", 10_000).await.unwrap(),
        "a lapsed holder renewed"
    );
    backend.release("g:lease", "t1", None).await.unwrap();
    assert!(
        backend
            .acquire("g:lease", "t3", "pid=3", 10_000)
            .await
            .unwrap()
            .is_none(),
        "a stale release freed the lease"
    );
    let fresh = Record {
        version: second.fence,
        tag: "t".into(),
        data: b"fresh".to_vec(),
    };
    assert!(
        backend
            .put("g:entry", &fresh, 0, Some(("g:lease", "t2")))
            .await
            .unwrap()
    );
    assert_eq!(backend.get("g:entry").await.unwrap().0, Some(fresh));
    // A clean release leaves no holder record behind.
    backend.release("g:lease", "t2", None).await.unwrap();
    let third = backend
        .acquire("g:lease", "t3", "pid=3", 10_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(third.previous, None);
    assert!(
        third.now_ms > 1_600_000_000_000,
        "the backend's time: {}",
        third.now_ms
    );
}

/// Provider state: one call at a time fleet-wide; a holder whose lease lapsed
/// cannot overwrite what the next holder wrote.
async fn state(engine: &Engine) {
    let a = engine.fleet("state", K1);
    let b = engine.fleet("state", K1);
    let mut g = a.lock("sso", Duration::from_secs(2)).await.unwrap();
    assert!(g.values().is_empty());
    g.commit(values(&[("refresh", "rt-STATE-one-1111")]))
        .await
        .unwrap();
    match b.lock("sso", Duration::from_millis(300)).await {
        Err(StoreError::Locked { .. }) => {}
        other => panic!("a second holder: {:?}", other.map(|_| ())),
    }
    drop(g);
    let mut g = b.lock("sso", Duration::from_secs(5)).await.unwrap();
    assert_eq!(g.values(), &values(&[("refresh", "rt-STATE-one-1111")]));
    assert!(
        g.previous_holder().is_none(),
        "a clean release is not a dead holder"
    );
    // This holder is stopped past its lease; another one takes over and rotates.
    engine.lapse_leases("state").await;
    let mut other = a.lock("sso", Duration::from_secs(5)).await.unwrap();
    assert!(
        other.previous_holder().is_some(),
        "the lapsed holder is reported"
    );
    other
        .commit(values(&[("refresh", "rt-STATE-two-2222")]))
        .await
        .unwrap();
    drop(other);
    match g.commit(values(&[("refresh", "rt-STATE-stale-333")])).await {
        Err(StoreError::LeaseLost { .. }) => {}
        other => panic!("a late commit after the lease lapsed: {other:?}"),
    }
    drop(g);
    let g = a.lock("sso", Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        g.values(),
        &values(&[("refresh", "rt-STATE-two-2222")]),
        "the late commit changed nothing"
    );
}

/// Compare-and-invalidate and its announcement to the other replicas.
async fn invalidation(engine: &Engine) {
    let a = engine.fleet("inval", K1);
    let b = engine.fleet("inval", K1);
    let mut events = b.events().expect("a fleet announces");
    // Let the subscription start.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = a.entry_id(b"inval");
    let e = entry("tok-INVAL-cccccccccccc");
    let lease = a.fetching(&id, Duration::from_secs(2)).await.unwrap();
    a.write(&id, &e, Some(&lease)).await.unwrap();
    drop(lease);
    let other = SharedEntry::fingerprint(&entry("tok-OTHER-dddddd").credentials);
    assert!(
        !a.remove_if(&id, &other).await,
        "removed for another credential"
    );
    assert!(b.read(&id).await.is_some());
    // A message without the fleet's MAC (anyone with access to the backend can
    // publish): ignored and counted.
    engine
        .backend("inval")
        .publish("inv forged-id 00ff 0123456789abcdef0123456789abcdef")
        .await
        .unwrap();
    let mine = SharedEntry::fingerprint(&e.credentials);
    assert!(a.remove_if(&id, &mine).await);
    assert!(b.read(&id).await.is_none());
    let tag = b.credential_tag(&e.credentials);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(RemoteEvent::Invalidated { id: got, .. })) if got == "forged-id" => {
                panic!("a forged announcement was applied")
            }
            Ok(Ok(RemoteEvent::Invalidated { id: got, tag: t })) if got == id => {
                assert_eq!(t, tag, "the announcement names the rejected credential");
                break;
            }
            Ok(Ok(_)) => continue,
            other => panic!("no invalidation announced within 5 s: {other:?}"),
        }
    }
    let metrics = b.render_metrics();
    assert!(
        metrics.contains("reauth_fleet_bus_forged_total{fleet=\"inval\"} 1"),
        "{metrics}"
    );
}

/// Sealing: nothing in clear, tampered or moved ciphertexts do not open, a
/// rotated key opens what the old one sealed.
async fn sealing(engine: &Engine) {
    let a = engine.fleet("seal", K1);
    let id = a.entry_id(b"seal");
    let id2 = a.entry_id(b"seal-2");
    let token = "tok-SEAL-SECRET-eeeeeeeeeeee";
    let lease = a.fetching(&id, Duration::from_secs(2)).await.unwrap();
    a.write(&id, &entry(token), Some(&lease)).await.unwrap();
    drop(lease);
    let mut g = a.lock("sso", Duration::from_secs(2)).await.unwrap();
    g.commit(values(&[("refresh", "rt-SEAL-SECRET-ffffffff")]))
        .await
        .unwrap();
    drop(g);
    let dump = engine.dump().await;
    assert!(dump.len() >= 3, "{} keys/rows", dump.len());
    for (name, bytes) in &dump {
        let text = String::from_utf8_lossy(bytes);
        for secret in [token, "rt-SEAL-SECRET-ffffffff", "alice"] {
            assert!(!text.contains(secret), "{name} holds `{secret}` in clear");
        }
        assert!(
            !name.contains("alice") && !name.contains("SECRET"),
            "a secret in a key name: {name}"
        );
    }
    // A ciphertext moved to another key does not open.
    engine
        .copy("seal", &format!("{id}:entry"), &format!("{id2}:entry"))
        .await;
    assert_eq!(a.read(&id2).await, None, "a moved ciphertext opened");
    // Tampered: a miss, counted.
    engine.tamper("seal", &format!("{id}:entry")).await;
    assert_eq!(a.read(&id).await, None, "a tampered entry opened");
    let metrics = a.render_metrics();
    assert!(
        metrics.contains("reauth_fleet_unopenable_total{fleet=\"seal\"} 2"),
        "{metrics}"
    );
    // Rotation: a replica with the new key first and the old one second reads
    // the state the old key sealed and seals with the new one; a replica that
    // only has the old key then gets a typed error, never a plaintext fallback.
    let rotated = engine.fleet("seal", &format!("{K2}\n{K1}"));
    let mut g = rotated.lock("sso", Duration::from_secs(2)).await.unwrap();
    assert_eq!(
        g.values().get("refresh").map(String::as_str),
        Some("rt-SEAL-SECRET-ffffffff")
    );
    g.commit(values(&[("refresh", "rt-SEAL-ROTATED-99999")]))
        .await
        .unwrap();
    drop(g);
    match a.lock("sso", Duration::from_secs(5)).await {
        Err(StoreError::Corrupt { why, .. }) => assert!(why.contains("key ring"), "{why}"),
        other => panic!(
            "the old ring opened state sealed with the new key: {:?}",
            other.map(|_| ())
        ),
    }
    engine.tamper("seal", "s.sso:state").await;
    assert!(
        rotated.lock("sso", Duration::from_secs(5)).await.is_err(),
        "tampered state opened"
    );
}

/// The host follows the backend's clock: a replica 5 minutes off reads the
/// backend's time after one answer.
async fn clock(engine: &Engine) {
    for skew in [-300i64, 300] {
        let a = engine.fleet("clock", K1);
        let real = SystemTime::now();
        let skewed = if skew < 0 {
            real - Duration::from_secs(300)
        } else {
            real + Duration::from_secs(300)
        };
        let base = ManualClock::new(skewed);
        let corrected = a.clock(Arc::new(base.clone()));
        let _ = a.read("0000").await;
        let now = corrected.now();
        let off = match now.duration_since(SystemTime::now()) {
            Ok(d) => d,
            Err(e) => e.duration(),
        };
        assert!(
            off < Duration::from_secs(2),
            "skew {skew} s: still {off:?} off the backend's clock"
        );
    }
}

async fn conformance(engine: &Engine) {
    leases_and_entries(engine).await;
    fencing(engine).await;
    state(engine).await;
    invalidation(engine).await;
    sealing(engine).await;
    clock(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backend_conforms() {
    reauth_tests::logs();
    conformance(&Engine::redis().await).await;
}

/// The same suite on a 3-master Redis Cluster (every script's keys share a
/// hash slot), except the checks that need raw access to the stored bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_backend_conforms() {
    reauth_tests::logs();
    let engine = Engine::Cluster(RedisCluster::start().await);
    leases_and_entries(&engine).await;
    fencing(&engine).await;
    state(&engine).await;
    invalidation(&engine).await;
    clock(&engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_backend_conforms() {
    reauth_tests::logs();
    conformance(&Engine::postgres().await).await;
}

/// The backend goes away: reads miss, fetches go ahead without a lease,
/// provider state is refused with a typed error, the breaker shows it; it comes
/// back (an empty Redis on the same port): everything works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_closed_for_state_and_recovers() {
    reauth_tests::logs();
    let Engine::Redis(mut redis) = Engine::redis().await else {
        unreachable!()
    };
    let port = redis.port;
    let a = Fleet::new(
        Arc::new(RedisBackend::new(&redis.url(), "down", Duration::from_millis(500)).unwrap()),
        Arc::new(KeyRing::parse(K1, "ring").unwrap()),
        FleetOptions {
            name: "down".into(),
            lease: Duration::from_millis(1500),
            wait: Duration::from_secs(5),
            timeout: Duration::from_millis(500),
        },
    );
    let id = a.entry_id(b"down");
    let lease = a.fetching(&id, Duration::from_secs(1)).await.unwrap();
    a.write(&id, &entry("tok-DOWN-1111111111"), Some(&lease))
        .await
        .unwrap();
    drop(lease);
    assert!(a.read(&id).await.is_some());
    redis.stop();
    assert_eq!(a.read(&id).await, None);
    assert!(a.fetching(&id, Duration::from_secs(1)).await.is_none());
    match a.lock("sso", Duration::from_secs(1)).await {
        Err(StoreError::Backend { what, .. }) => assert!(what.contains("down"), "{what}"),
        other => panic!("state while the backend is down: {:?}", other.map(|_| ())),
    }
    assert!(!a.backend_up());
    let metrics = a.render_metrics();
    assert!(
        metrics.contains("reauth_fleet_backend_up{fleet=\"down\"} 0"),
        "{metrics}"
    );
    // Back, empty (no persistence): the fleet recovers on its own.
    let _redis = Redis::start_on(port).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let lease = loop {
        if let Some(lease) = a.fetching(&id, Duration::from_secs(1)).await {
            break lease;
        }
        assert!(Instant::now() < deadline, "no recovery within 15 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    a.write(&id, &entry("tok-BACK-222222222"), Some(&lease))
        .await
        .unwrap();
    drop(lease);
    assert!(a.read(&id).await.is_some());
    assert!(a.backend_up());
    let mut g = a.lock("sso", Duration::from_secs(2)).await.unwrap();
    g.commit(values(&[("k", "v")])).await.unwrap();
}

/// The README's line of `name` that starts with `prefix` (its commands are
/// tested, not just shown).
fn readme_line(prefix: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    readme
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no README line starting with `{prefix}`"))
        .to_string()
}

/// Everything a replica does, as a user with only what the README grants.
async fn least_privilege(engine: &Engine, url: &str) {
    let fleet = Fleet::new(
        match engine {
            Engine::Redis(_) => {
                Arc::new(RedisBackend::new(url, "payments", Duration::from_secs(1)).unwrap())
                    as Arc<dyn FleetBackend>
            }
            Engine::Postgres(_) => {
                Arc::new(PostgresBackend::new(url, "payments", Duration::from_secs(1)).unwrap())
            }
            Engine::Cluster(_) => {
                let nodes: Vec<&str> = url.split(',').collect();
                Arc::new(RedisBackend::cluster(&nodes, "payments", Duration::from_secs(1)).unwrap())
            }
        },
        Arc::new(KeyRing::parse(K1, "ring").unwrap()),
        FleetOptions {
            name: "payments".into(),
            lease: Duration::from_millis(1500),
            wait: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
        },
    );
    let mut events = fleet.events().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = fleet.entry_id(b"acl");
    let e = entry("tok-ACL-1234567890");
    let lease = fleet
        .fetching(&id, Duration::from_secs(2))
        .await
        .expect("a lease as the restricted user");
    fleet
        .write(&id, &e, Some(&lease))
        .await
        .expect("a write as the restricted user");
    drop(lease);
    assert_eq!(fleet.read(&id).await, Some(e.clone()));
    let mut g = fleet
        .lock("sso", Duration::from_secs(2))
        .await
        .expect("state as the restricted user");
    g.commit(values(&[("refresh", "rt-ACL")])).await.unwrap();
    drop(g);
    assert!(
        fleet
            .remove_if(&id, &SharedEntry::fingerprint(&e.credentials))
            .await
    );
    let got = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
    assert!(
        matches!(got, Ok(Ok(RemoteEvent::Invalidated { .. }))),
        "{got:?}"
    );
    assert!(fleet.backend_up());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_redis_acl_is_enough() {
    reauth_tests::logs();
    let engine = Engine::redis().await;
    let Engine::Redis(redis) = &engine else {
        unreachable!()
    };
    let line = readme_line("ACL SETUSER reauth-payments").replace(">…", ">acl-pw-0123456789");
    let mut c = redis.connect(None).await.unwrap();
    let mut cmd = redis::cmd("ACL");
    for arg in line.split_whitespace().skip(1) {
        cmd.arg(arg);
    }
    let _: String = cmd.query_async(&mut c).await.unwrap();
    let url = format!(
        "redis://reauth-payments:acl-pw-0123456789@127.0.0.1:{}",
        redis.port
    );
    least_privilege(&engine, &url).await;
    // And the ACL really restricts: another fleet's keys are out of reach.
    let other = RedisBackend::new(&url, "other", Duration::from_secs(1)).unwrap();
    assert!(
        other.get("x:entry").await.is_err(),
        "the ACL let a fleet read another's keys"
    );
}

/// The same ACL on every node of a Redis Cluster, plus what the README adds for
/// a cluster client; seed URLs carry the credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_redis_acl_is_enough_on_a_cluster() {
    reauth_tests::logs();
    let engine = Engine::Cluster(RedisCluster::start().await);
    let Engine::Cluster(cluster) = &engine else {
        unreachable!()
    };
    let line = format!(
        "{} +cluster|slots",
        readme_line("ACL SETUSER reauth-payments").replace(">…", ">acl-pw-0123456789")
    );
    for &port in &cluster.ports {
        let mut c = cluster.node(port).await.unwrap();
        let mut cmd = redis::cmd("ACL");
        for arg in line.split_whitespace().skip(1) {
            cmd.arg(arg);
        }
        let _: String = cmd.query_async(&mut c).await.unwrap();
    }
    let url = cluster
        .ports
        .iter()
        .map(|p| format!("redis://reauth-payments:acl-pw-0123456789@127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    least_privilege(&engine, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_postgres_grants_are_enough() {
    reauth_tests::logs();
    let engine = Engine::postgres().await;
    let Engine::Postgres(pg) = &engine else {
        unreachable!()
    };
    // The administrator's part, as the README writes it: the tables, the role
    // and its grants (the role cannot create anything).
    for prefix in [
        "CREATE TABLE reauth_leases",
        "CREATE TABLE reauth_records",
        "CREATE ROLE reauth_payments",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON reauth_leases",
    ] {
        pg.admin(&readme_line(prefix).replace("'…'", "'pg-role-pw-0123456789'"))
            .await;
    }
    let url = format!(
        "postgres://reauth_payments:pg-role-pw-0123456789@127.0.0.1:{}/postgres",
        pg.port
    );
    least_privilege(&engine, &url).await;
}
