//! `reauth-bench`: side-by-side measurements in one run on one machine, printed as
//! Markdown tables (`make bench-report` writes them into BENCHMARKS.md).
//!
//! Sections (`--sections`, default all):
//! - `cache`: a cache hit through `Host::get_credentials` next to the physical floor
//!   (a read-locked `HashMap` lookup with a prebuilt key and a clone of the same
//!   credential); latency percentiles and throughput at 1 and 2 threads;
//! - `miss`: the same provider logic (`bench/logic`) as a reauth component (fresh
//!   instance per call) and as an exec credential plugin (a process per fetch,
//!   ExecCredential JSON);
//! - `idp`: operations through `with_credentials` against a JWKS-verifying API with
//!   tokens from the real oidc-provider IdP, next to fetching a token per operation;
//! - `herd`: N concurrent callers on a cold key (each size in its own process, for
//!   its peak RSS);
//! - `scale`: RSS per loaded provider and lookup time with many subjects;
//! - `polyglot`: Rust, Python and JavaScript providers (the same trivial logic):
//!   precompile vs load from the precompiled cache, fresh instance + call, and a
//!   call on a reused instance (`instances.reuse`).
//!
//! - `neighbours`: a good provider's fetch latency (fresh instance + call per
//!   fetch) alone, then with hostile providers hammered next to it in the same
//!   host (slow, flooding egress, hoarding host objects, asking for huge random
//!   buffers): the isolation the sandbox promises, measured.
//!
//! - `processes`: many processes on one machine sharing the token cache (L2): a
//!   standalone `reauth kubectl-credential` run with a warm shared cache next to one
//!   without it, an L2 hit from a fresh `Host`, the cost of a cold L2 on a miss, and
//!   20 processes × 100 callers on one cold key (provider calls, wall time).
//!
//! - `fleet`: `reauth serve` replicas in one `[fleet]` on Redis and PostgreSQL:
//!   N replicas × M callers on a cold and an expired key (IdP calls, waits), the
//!   backend killed while tokens are valid, an L2 read, the L1 hit inside and
//!   outside a fleet next to the floor, invalidation reaching 8 replicas, and 32
//!   replicas over 10 token lifetimes with and without the fleet.
//!
//! - `recovery`: 8 clients of a `reauth serve` sidecar polling a client-credentials
//!   provider against the real oidc-provider IdP with 5 s tokens, through an IdP
//!   outage of 2.5 lifetimes: IdP attempts during the outage, how long after the
//!   IdP's return every client is served, and failed operations after it — with
//!   `cache.outage_retry_ms` at its default (1 s) and off (the backoff growing to
//!   10 s, as before #20).
//!
//! - `soak` (not in the default list: it runs 10 minutes): 50 clients through
//!   `Host::with_credentials` and a sidecar against a JWKS-verifying API, 5 s tokens
//!   from the real IdP, a new signing key every 60 s and two 20 s outages: failed
//!   operations while the IdP is up, recovery after each outage, IdP calls vs the
//!   ideal schedule, 401s per key rotation. `--smoke --sections soak`: 30 s.
//!
//! `--smoke` runs every section with tiny counts (CI runs it so the harness never
//! rots); its numbers mean nothing.

use anyhow::{Context, Result, ensure};
use clap::Parser;
use reauth::{Host, ProviderConfig, Rejection, Request};
use reauth_tests::peers::{Idp, ResourceServer, SlowEndpoint, http};
use reauth_tests::plugins;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Tiny counts: check the harness works, not the numbers.
    #[arg(long)]
    smoke: bool,
    /// Comma-separated sections: cache, miss, idp, herd, scale, polyglot, neighbours,
    /// processes, fleet, recovery (the default), soak (10 minutes).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "cache,miss,idp,herd,scale,polyglot,neighbours,processes,fleet,recovery"
    )]
    sections: Vec<String>,
    /// Internal: run one herd of this size and print a JSON line.
    #[arg(long, hide = true)]
    herd_child: Option<usize>,
    /// Internal: load this many providers and print a JSON line.
    #[arg(long, hide = true)]
    providers_child: Option<usize>,
    /// Internal: 100 callers on one key through the shared cache in this
    /// directory, fetching from this URL; prints a JSON line.
    #[arg(long, hide = true, num_args = 2, value_names = ["DIR", "URL"])]
    shared_child: Option<Vec<String>>,
}

struct Stats {
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let pick = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    Stats {
        p50: pick(0.5),
        p99: pick(0.99),
        mean,
    }
}

fn fmt(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < 10_000 {
        format!("{ns} ns")
    } else if ns < 10_000_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else {
        format!("{:.2} ms", ns as f64 / 1e6)
    }
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn logic_provider() -> ProviderConfig {
    unmetered(
        ProviderConfig::new(&plugins().bench_logic)
            .config("client_id", "svc")
            .config("secret", "bench-secret-0123456789")
            .config("ttl", "300"),
    )
}

/// `p` with no fetch budget (`[rate]`): the benchmarks measure fetches, not the
/// pacing that protects an identity provider.
fn unmetered(mut p: ProviderConfig) -> ProviderConfig {
    p.rate = reauth::RateConfig::unlimited();
    p
}

/// Per-operation latency from batches of `batch` operations (timer overhead
/// amortised), and the batches' percentiles.
async fn batched<F: FnMut() -> Fut, Fut: Future<Output = ()>>(
    batches: usize,
    batch: usize,
    mut op: F,
) -> Stats {
    let mut samples = Vec::with_capacity(batches);
    for _ in 0..batches {
        let start = Instant::now();
        for _ in 0..batch {
            op().await;
        }
        samples.push(start.elapsed() / batch as u32);
    }
    stats(samples)
}

fn throughput(threads: usize, run: Duration, op: Arc<dyn Fn() + Send + Sync>) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, count, op) = (stop.clone(), count.clone(), op.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        op();
                    }
                    n += 64;
                }
                count.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    std::thread::sleep(run);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / run.as_secs_f64()
}

/// A bare concurrent map (lock-free reads) from a prebuilt key to a shared
/// credential: the floor of the hit path.
/// (foldhash, as reauth's own map uses.)
type Floor =
    papaya::HashMap<(String, Request), Arc<reauth::Credentials>, foldhash::fast::RandomState>;
/// The same floor behind a read-write lock.
type LockedFloor = RwLock<HashMap<(String, Request), Arc<reauth::Credentials>>>;

fn section_cache(smoke: bool) -> Result<String> {
    let rt = runtime();
    let token = "t".repeat(800);
    let keys = if smoke { 100 } else { 10_000 };
    let mut config = reauth::HostConfig::default();
    // Room for every key: an evicted key would be a miss, not a hit.
    config.runtime.max_cache_entries = keys * 2;
    config.providers.insert(
        "static".into(),
        unmetered(ProviderConfig::new(&plugins().static_).config("token", &token)),
    );
    let host = Host::builder_from_config(config).build()?;
    let handle = host.handle("static")?;
    let request = Request::new().scope("orders:read");
    let credentials = rt.block_on(host.get_credentials("static", &request))?;
    let subjects: Arc<Vec<Request>> = Arc::new(
        (0..keys)
            .map(|i| {
                Request::new()
                    .scope("orders:read")
                    .subject(format!("user-{i}"))
            })
            .collect(),
    );
    for r in subjects.iter() {
        rt.block_on(handle.get_credentials(r))?;
    }
    let floor: Arc<Floor> = Arc::new(Floor::with_hasher(Default::default()));
    let locked: Arc<LockedFloor> = Arc::default();
    let key = ("static".to_string(), request.clone());
    floor.pin().insert(key.clone(), credentials.clone());
    locked
        .write()
        .unwrap()
        .insert(key.clone(), credentials.clone());
    let subject_keys: Arc<Vec<(String, Request)>> = Arc::new(
        subjects
            .iter()
            .map(|r| ("static".to_string(), r.clone()))
            .collect(),
    );
    // Its own credential per key (as reauth holds one per key), not one shared
    // allocation that stays in the CPU cache for every key.
    for k in subject_keys.iter() {
        floor.pin().insert(
            k.clone(),
            Arc::new(reauth::Credentials::clone(&credentials)),
        );
    }
    let (batches, batch) = if smoke { (20, 10) } else { (2000, 200) };
    let run = if smoke {
        Duration::from_millis(50)
    } else {
        Duration::from_secs(2)
    };
    // Each operation, as a closure the latency and throughput loops both run.
    type Op = Arc<dyn Fn() + Send + Sync>;
    let next = |n: usize| {
        move || {
            thread_local!(static I: std::cell::Cell<usize> = const { std::cell::Cell::new(0) });
            I.with(|i| {
                let v = (i.get() + 7919) % n;
                i.set(v);
                v
            })
        }
    };
    let rows: Vec<(String, Op)> = vec![
        ("reauth hit, `Host::get_credentials` (by name)".into(), {
            let (host, request) = (host.clone(), request.clone());
            Arc::new(move || {
                // A hit completes without awaiting: polled once, no runtime needed.
                let c = futures_now(host.get_credentials("static", &request));
                std::hint::black_box(c.expect("a cache hit"));
            })
        }),
        ("reauth hit, `ProviderHandle::get_credentials`".into(), {
            let (handle, request) = (handle.clone(), request.clone());
            Arc::new(move || {
                let c = futures_now(handle.get_credentials(&request));
                std::hint::black_box(c.expect("a cache hit"));
            })
        }),
        ("floor: `papaya::HashMap` lookup + `Arc` clone".into(), {
            let (floor, key) = (floor.clone(), key.clone());
            Arc::new(move || {
                std::hint::black_box(floor.pin().get(&key).cloned());
            })
        }),
        ("floor: `RwLock<HashMap>` lookup + `Arc` clone".into(), {
            let (locked, key) = (locked.clone(), key.clone());
            Arc::new(move || {
                std::hint::black_box(locked.read().unwrap().get(&key).cloned());
            })
        }),
        (format!("reauth hit, handle, {keys} keys"), {
            let (handle, subjects, next) = (handle.clone(), subjects.clone(), next(keys));
            Arc::new(move || {
                let c = futures_now(handle.get_credentials(&subjects[next()]));
                std::hint::black_box(c.expect("a cache hit"));
            })
        }),
        (format!("floor: `papaya::HashMap`, {keys} keys"), {
            let (floor, subject_keys, next) = (floor.clone(), subject_keys.clone(), next(keys));
            Arc::new(move || {
                std::hint::black_box(floor.pin().get(&subject_keys[next()]).cloned());
            })
        }),
    ];
    let mut out = String::from(
        "### Cached credential (800-byte token, one scope)\n\n\
         | | p50 | p99 | 1 thread | 2 threads | 2 / 1 |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    let mut p50s = Vec::new();
    // REAUTH_BENCH_ROW=<i>: that row alone, for a profiler.
    let only: Option<usize> = std::env::var("REAUTH_BENCH_ROW")
        .ok()
        .and_then(|v| v.parse().ok());
    for (i, (name, op)) in rows.into_iter().enumerate() {
        if only.is_some_and(|o| o != i) {
            p50s.push(Duration::from_nanos(1));
            continue;
        }
        let s = rt.block_on(batched(batches, batch, || {
            op();
            std::future::ready(())
        }));
        let one = throughput(1, run, op.clone());
        let two = throughput(2, run, op);
        p50s.push(s.p50);
        out += &format!(
            "| {name} | {} | {} | {:.2} M/s | {:.2} M/s | {:.2}× |\n",
            fmt(s.p50),
            fmt(s.p99),
            one / 1e6,
            two / 1e6,
            two / one
        );
    }
    out += &format!(
        "\nRatio reauth / floor (p50, both on a concurrent map returning a shared credential): \
         **{:.2}×** by name, **{:.2}×** through a handle, **{:.2}×** with {keys} keys. \
         Latencies are per operation, from batches of {batch}.\n",
        p50s[0].as_secs_f64() / p50s[2].as_secs_f64(),
        p50s[1].as_secs_f64() / p50s[2].as_secs_f64(),
        p50s[4].as_secs_f64() / p50s[5].as_secs_f64(),
    );
    Ok(out)
}

/// Poll a future that is expected to be ready at once (a cache hit); a miss
/// (it would wait for a fetch) is a bug of the benchmark.
fn futures_now<F: Future>(fut: F) -> F::Output {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut fut = std::pin::pin!(fut);
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("not a cache hit: the benchmark's key was not cached"),
    }
}

fn exec_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.with_file_name("exec-credential")
}

/// `n` cache misses on `provider` (after a warm-up: the first instantiation pays
/// for lazy initialisation), each a new key made by `request(i)`; per-call times.
fn misses(
    rt: &tokio::runtime::Runtime,
    provider: ProviderConfig,
    n: usize,
    request: impl Fn(String) -> Request,
) -> Result<Vec<Duration>> {
    let host = bench_builder().provider("logic", provider).build()?;
    for i in 0..(n / 10).max(1) {
        rt.block_on(host.get_credentials("logic", &request(format!("warm{i}"))))?;
    }
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let request = request(format!("s{i}"));
        let start = Instant::now();
        let c = rt.block_on(host.get_credentials("logic", &request))?;
        samples.push(start.elapsed());
        std::hint::black_box(c);
    }
    Ok(samples)
}

/// The engine's options for the miss and polyglot benchmarks: the defaults, except
/// `REAUTH_BENCH_KEEP_RESIDENT=<bytes>` (0: `madvise` every finished call's
/// memory, the default before #18 §2) for an A/B comparison.
fn bench_runtime_options() -> reauth::runtime::RuntimeOptions {
    let mut options = reauth::runtime::RuntimeOptions::default();
    if let Some(bytes) = std::env::var("REAUTH_BENCH_KEEP_RESIDENT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        options.keep_resident_bytes = bytes;
    }
    options
}

/// A host builder with the engine options of [`bench_runtime_options`].
fn bench_builder() -> reauth::HostBuilder {
    Host::builder().runtime_options(bench_runtime_options())
}

fn section_miss(smoke: bool) -> Result<String> {
    let rt = runtime();
    let n = if smoke { 5 } else { 400 };
    let static_provider =
        || unmetered(ProviderConfig::new(&plugins().static_).config("token", "static-bench-token"));
    // REAUTH_BENCH_PROFILE_MISS=<n>: only `static` misses, n of them, for a profiler.
    if let Some(runs) = std::env::var("REAUTH_BENCH_PROFILE_MISS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let host = bench_builder()
            .provider("static", static_provider())
            .build()?;
        // On a worker thread, as a server's request handler runs.
        let samples = rt.block_on(rt.spawn(async move {
            let mut samples = Vec::with_capacity(runs);
            for i in 0..runs {
                let request = Request::new().subject(format!("s{i}"));
                let start = Instant::now();
                let c = host.get_credentials("static", &request).await?;
                samples.push(start.elapsed());
                std::hint::black_box(c);
            }
            Ok::<_, reauth::Error>(samples)
        }))??;
        let s = stats(samples);
        return Ok(format!(
            "static misses: p50 {} p99 {}\n",
            fmt(s.p50),
            fmt(s.p99)
        ));
    }
    // REAUTH_BENCH_PROFILE_REUSE=<n>: only the reused-instance misses.
    if let Some(runs) = std::env::var("REAUTH_BENCH_PROFILE_REUSE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let mut reusing = logic_provider();
        reusing.instances.reuse = true;
        reusing.instances.max_calls = 1_000_000;
        let s = stats(misses(&rt, reusing, runs, |s| Request::new().scope(s))?);
        return Ok(format!(
            "reused misses: p50 {} p99 {}\n",
            fmt(s.p50),
            fmt(s.p99)
        ));
    }
    // The least a miss costs: `static` (no HTTP, no crypto), a fresh instance.
    let bare = stats(misses(&rt, static_provider(), n, |s| {
        Request::new().subject(s)
    })?);
    // A new subject per call: a new key and a fresh instance every time.
    let component = misses(&rt, logic_provider(), n, |s| Request::new().subject(s))?;
    // The same misses with `instances.reuse`: one subject, a new scope per call
    // (a new cache key, so every call misses; reuse is per subject).
    let mut reusing = logic_provider();
    reusing.instances.reuse = true;
    reusing.instances.max_calls = 1_000_000;
    let reused = misses(&rt, reusing, n, |s| Request::new().scope(s))?;
    let exec = exec_binary();
    ensure!(
        exec.exists(),
        "{} is missing: build with `cargo build --release -p reauth-bench --bins`",
        exec.display()
    );
    let runs = if smoke { 3 } else { 200 };
    let mut spawned = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let out = Command::new(&exec)
            .env("BENCH_CLIENT_ID", "svc")
            .env("BENCH_SECRET", "bench-secret-0123456789")
            .output()
            .context("spawning the exec plugin")?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        ensure!(
            v["status"]["token"].as_str().is_some_and(|t| !t.is_empty()),
            "exec plugin output: {v}"
        );
        spawned.push(start.elapsed());
    }
    let (c, e, r) = (stats(component), stats(spawned), stats(reused));
    let extism = extism_rows(if smoke { 3 } else { 400 }, c.p50)?;
    Ok(format!(
        "### Miss path: the same provider logic two ways\n\n\
         | | p50 | p99 | mean | samples |\n| --- | --- | --- | --- | --- |\n\
         | `static` (the least a miss costs), fresh instance per call (+ cache insert) | {} | {} | {} | {n} |\n\
         | reauth component, fresh instance per call (+ cache insert) | {} | {} | {} | {n} |\n\
         | reauth component, reused instance (`instances.reuse`; one subject, a new scope per call) | {} | {} | {} | {n} |\n\
         | exec credential plugin, a process per fetch (spawn, ExecCredential JSON, parse) | {} | {} | {} | {runs} |\n\
         {extism}\n\
         Exec / reauth (p50): **{:.0}×** with fresh instances, **{:.0}×** with reused ones.\n",
        fmt(bare.p50),
        fmt(bare.p99),
        fmt(bare.mean),
        fmt(c.p50),
        fmt(c.p99),
        fmt(c.mean),
        fmt(r.p50),
        fmt(r.p99),
        fmt(r.mean),
        fmt(e.p50),
        fmt(e.p99),
        fmt(e.mean),
        e.p50.as_secs_f64() / c.p50.as_secs_f64(),
        e.p50.as_secs_f64() / r.p50.as_secs_f64()
    ))
}

/// Rows for the Extism variant (bench/extism, its own workspace: `make bench-extism`),
/// or a row saying it was not built.
fn extism_rows(n: usize, reauth_p50: Duration) -> Result<String> {
    let root = reauth_tests::root();
    let runner = root.join("target/release/extism-bench");
    let plugin = root.join("target/wasm32-unknown-unknown/release/extism_bench_plugin.wasm");
    if !runner.exists() || !plugin.exists() {
        return Ok(
            "| Extism 1.30.0 | not built in this run (`make bench-extism`) | | | |\n".into(),
        );
    }
    let out = Command::new(&runner)
        .arg(&plugin)
        .arg(n.to_string())
        .output()?;
    ensure!(
        out.status.success(),
        "extism-bench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let ns = |k: &str, f: &str| Duration::from_nanos(v[k][f].as_u64().unwrap_or(0));
    let row = |label: &str, k: &str| {
        format!(
            "| {label} | {} | {} | {} | {n} |\n",
            fmt(ns(k, "p50_ns")),
            fmt(ns(k, "p99_ns")),
            fmt(ns(k, "mean_ns"))
        )
    };
    Ok(format!(
        "{}{}| Extism fresh / reauth (p50) | **{:.2}×** | | | |\n",
        row(
            "Extism 1.30.0 plugin, new instance from the compiled plugin per call",
            "fresh"
        ),
        row("Extism 1.30.0 plugin, one reused instance", "reused"),
        ns("fresh", "p50_ns").as_secs_f64() / reauth_p50.as_secs_f64()
    ))
}

fn section_idp(smoke: bool) -> Result<String> {
    let rt = runtime();
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        let idp = Idp::start(&dir.path().join("keys.json"), 60, None);
        let verifier = reauth::verify::Verifier::builder()
            .jwks_url(format!("{}/jwks", idp.issuer))
            .issuer(&idp.issuer)
            .audience("urn:reauth:test-api")
            .build()?;
        let api = ResourceServer::start(verifier).await;
        let host = Host::builder()
            .provider(
                "api",
                ProviderConfig::new(&plugins().oauth2)
                    .allow_host(idp.authority())
                    .config("issuer", &idp.issuer)
                    .config("client_id", "cc-basic")
                    .config("client_secret", "cc-basic-secret-0123456789"),
            )
            .build()?;
        let run = if smoke { Duration::from_millis(500) } else { Duration::from_secs(10) };
        let target = api.url.trim_end_matches("/orders").to_string();
        let call = |token: String| {
            let target = target.clone();
            async move {
                let auth = format!("Bearer {token}");
                let (status, _, _) = http(&target, "GET", "/orders", &[("authorization", &auth)], None)
                    .await
                    .map_err(|e| Rejection::Other(e.to_string()))?;
                if status == 200 { Ok(()) } else { Err(Rejection::Other(format!("HTTP {status}"))) }
            }
        };
        // reauth: cached token through with_credentials.
        let start = Instant::now();
        let mut cached_ops = 0u64;
        while start.elapsed() < run {
            host.with_credentials("api", &Request::new(), |c| {
                let token = match &c.credential {
                    reauth::Credential::Bearer(t) => t.expose().to_string(),
                    _ => String::new(),
                };
                call(token)
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            cached_ops += 1;
        }
        let cached_secs = start.elapsed().as_secs_f64();
        let (cached_idp, _) = idp.token_requests("cc-basic").await;
        // No cache: a token from the IdP for every operation.
        let basic = "Basic Y2MtYmFzaWM6Y2MtYmFzaWMtc2VjcmV0LTAxMjM0NTY3ODk="; // cc-basic:cc-basic-secret-0123456789
        let start = Instant::now();
        let mut uncached_ops = 0u64;
        while start.elapsed() < run {
            let (status, _, body) = http(
                &idp.issuer,
                "POST",
                "/token",
                &[("authorization", basic), ("content-type", "application/x-www-form-urlencoded")],
                Some(b"grant_type=client_credentials".to_vec()),
            )
            .await?;
            ensure!(status == 200, "token endpoint: HTTP {status}");
            let token = serde_json::from_slice::<serde_json::Value>(&body)?["access_token"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            call(token).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            uncached_ops += 1;
        }
        let uncached_secs = start.elapsed().as_secs_f64();
        let (all_idp, _) = idp.token_requests("cc-basic").await;
        let uncached_idp = all_idp - cached_idp;
        Ok(format!(
            "### End to end: real IdP (oidc-provider) and a JWKS-verifying API, one client loop\n\n\
             | | operations/s | IdP token requests per 1,000 operations |\n| --- | --- | --- |\n\
             | reauth (`with_credentials`, cached token) | {:.0} | {:.2} |\n\
             | a token from the IdP per operation | {:.0} | {:.0} |\n\n\
             Speed-up: **{:.1}×**; IdP load: **{:.0}×** fewer token requests (each loop ran {:?}).\n",
            cached_ops as f64 / cached_secs,
            cached_idp as f64 * 1000.0 / cached_ops as f64,
            uncached_ops as f64 / uncached_secs,
            uncached_idp as f64 * 1000.0 / uncached_ops as f64,
            (cached_ops as f64 / cached_secs) / (uncached_ops as f64 / uncached_secs),
            (uncached_idp as f64 / uncached_ops as f64) / (cached_idp as f64 / cached_ops as f64).max(1e-9),
            run
        ))
    })
}

fn herd_child(n: usize) -> Result<()> {
    let rt = runtime();
    rt.block_on(async {
        let slow = SlowEndpoint::start("herd-token-value", Duration::from_millis(50)).await;
        let host = Host::builder()
            .provider(
                "slow",
                unmetered(
                    ProviderConfig::new(&plugins().testkit)
                        .allow_host(slow.authority())
                        .config("mode", "fetch")
                        .config("url", &slow.url),
                ),
            )
            .build()?;
        let before = status_kib("VmRSS:");
        let start = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let host = host.clone();
                tokio::spawn(
                    async move { host.get_credentials("slow", &Request::new()).await.is_ok() },
                )
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await?);
        }
        let wall = start.elapsed();
        println!(
            "{}",
            serde_json::json!({
                "n": n, "ok": ok, "wall_ms": wall.as_secs_f64() * 1e3,
                "plugin_calls": host.plugin_calls("slow"),
                "rss_before_kib": before, "peak_kib": status_kib("VmHWM:"),
            })
        );
        Ok(())
    })
}

/// A provider fetching a token from `url` (the testkit's `fetch` mode).
fn fetching_provider(url: &str, authority: &str) -> ProviderConfig {
    unmetered(
        ProviderConfig::new(&plugins().testkit)
            .allow_host(authority)
            .config("mode", "fetch")
            .config("url", url),
    )
}

fn shared_child(dir: &str, url: &str) -> Result<()> {
    let rt = runtime();
    rt.block_on(async {
        let authority = url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let mut config = reauth::HostConfig::default();
        config.runtime.cache_dir = Some(PathBuf::from(dir).join("artifacts"));
        config.runtime.shared_cache.dir = Some(PathBuf::from(dir).join("shared"));
        config
            .providers
            .insert("slow".into(), fetching_provider(url, &authority));
        let host = Host::builder_from_config(config).build()?;
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let host = host.clone();
                tokio::spawn(
                    async move { host.get_credentials("slow", &Request::new()).await.is_ok() },
                )
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await?);
        }
        println!(
            "{}",
            serde_json::json!({"ok": ok, "plugin_calls": host.plugin_calls("slow")})
        );
        Ok(())
    })
}

/// The `reauth` binary the process sections run: `REAUTH_BIN` (the smoke test
/// sets it: `cargo test` builds no binaries into target/debug), else the one
/// built beside this bench.
fn reauth_binary() -> Result<PathBuf> {
    let reauth = match std::env::var_os("REAUTH_BIN") {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()?
            .parent()
            .context("the bench binary has no directory")?
            .join("reauth"),
    };
    ensure!(
        reauth.exists(),
        "{} is missing: build it with the bench (cargo build --release -p reauth-cli -p reauth-bench)",
        reauth.display()
    );
    Ok(reauth)
}

fn section_processes(smoke: bool) -> Result<String> {
    let rt = runtime();
    let reauth = reauth_binary()?;
    let dir = tempfile::tempdir()?;
    let slow = rt.block_on(SlowEndpoint::start(
        "shared-token-value",
        Duration::from_millis(50),
    ));
    let runs = if smoke { 3 } else { 50 };
    let mut out = String::from(
        "### Many processes on one machine: the shared token cache (L2)\n\n\
         Provider: the testkit's `fetch` mode behind a 50 ms token endpoint. Release build.\n\n\
         | measurement | p50 | p99 | token endpoint requests |\n| --- | --- | --- | --- |\n",
    );
    // 1. Standalone adapter runs, start to output.
    for (label, shared) in [
        ("with a warm shared cache", true),
        ("without the shared cache", false),
    ] {
        let case = dir.path().join(if shared { "on" } else { "off" });
        std::fs::create_dir_all(&case)?;
        let config = case.join("reauth.toml");
        std::fs::write(
            &config,
            format!(
                "[runtime]\nstate_dir = \"state\"\ncache_dir = \"artifacts\"\n\n[runtime.shared_cache]\nenabled = {shared}\n\n\
                 [providers.slow]\nplugin = \"{}\"\nallowed_hosts = [\"{}\"]\n\n[providers.slow.config]\nmode = \"fetch\"\nurl = \"{}\"\n",
                plugins().testkit.display(),
                slow.authority(),
                slow.url
            ),
        )?;
        let adapter = || -> Result<Duration> {
            let started = Instant::now();
            let output = Command::new(&reauth)
                .args(["kubectl-credential", "--provider", "slow", "--config"])
                .arg(&config)
                .output()?;
            let elapsed = started.elapsed();
            ensure!(
                output.status.success(),
                "reauth kubectl-credential failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            Ok(elapsed)
        };
        adapter()?; // compiles into the artifact cache and fills L2
        let before = slow.hits.load(Ordering::Relaxed);
        let samples = (0..runs).map(|_| adapter()).collect::<Result<Vec<_>>>()?;
        let hits = slow.hits.load(Ordering::Relaxed) - before;
        let s = stats(samples);
        out += &format!(
            "| standalone `reauth kubectl-credential`, {label} ({runs} runs, start to output) | {} | {} | {hits} |\n",
            fmt(s.p50),
            fmt(s.p99)
        );
    }
    // 2. In-process: an L1 miss served by L2 (a fresh Host each time), and the
    // cost a cold L2 adds to a miss (a new key each time; `static`-like provider
    // with no network: the testkit's `counter` needs state, so `fetch` against the
    // endpoint is avoided by keys that always miss L1 and L2).
    let shared_dir = dir.path().join("inproc");
    let host_with = |shared: bool| -> Result<Host> {
        let mut config = reauth::HostConfig::default();
        config.runtime.cache_dir = Some(dir.path().join("artifacts"));
        config.runtime.shared_cache.dir = Some(shared_dir.clone());
        config.runtime.shared_cache.enabled = shared;
        config.providers.insert(
            "static".into(),
            ProviderConfig::new(&plugins().static_).config("token", "static-bench-token"),
        );
        config.providers.insert(
            "slow".into(),
            fetching_provider(&slow.url, &slow.authority()),
        );
        Ok(Host::builder_from_config(config).build()?)
    };
    rt.block_on(async {
        let warm = host_with(true)?;
        warm.get_credentials("slow", &Request::new()).await?;
        let before = slow.hits.load(Ordering::Relaxed);
        let mut hit = Vec::new();
        for _ in 0..runs {
            let host = host_with(true)?;
            let started = Instant::now();
            host.get_credentials("slow", &Request::new()).await?;
            hit.push(started.elapsed());
        }
        let hits = slow.hits.load(Ordering::Relaxed) - before;
        let s = stats(hit);
        out += &format!(
            "| L1 miss served by L2 (fresh `Host` in this process, {runs} runs) | {} | {} | {hits} |\n",
            fmt(s.p50),
            fmt(s.p99)
        );
        for shared in [false, true] {
            let host = host_with(shared)?;
            let mut miss = Vec::new();
            for i in 0..runs * 4 {
                let request = Request::new().audience(format!("bench-{shared}-{i}"));
                let started = Instant::now();
                host.get_credentials("static", &request).await?;
                miss.push(started.elapsed());
            }
            let s = stats(miss);
            out += &format!(
                "| miss (fresh instance + call, `static`), {} | {} | {} | – |\n",
                if shared { "L2 present but cold (read, lock, write)" } else { "no L2" },
                fmt(s.p50),
                fmt(s.p99)
            );
        }
        anyhow::Ok(())
    })?;
    // 3. 20 processes × 100 callers on one cold key.
    let herd_dir = dir.path().join("herd");
    std::fs::create_dir_all(&herd_dir)?;
    // Precompile once so that start-up does not dominate.
    child(&[
        "--shared-child",
        herd_dir.to_str().unwrap_or_default(),
        &slow.url,
    ])?;
    std::fs::remove_dir_all(herd_dir.join("shared"))?;
    let before = slow.hits.load(Ordering::Relaxed);
    let processes = if smoke { 3 } else { 20 };
    let started = Instant::now();
    let children: Vec<_> = (0..processes)
        .map(|_| {
            let (dir, url) = (herd_dir.to_string_lossy().into_owned(), slow.url.clone());
            std::thread::spawn(move || child(&["--shared-child", &dir, &url]))
        })
        .collect();
    let mut calls = 0;
    for c in children {
        let v = c
            .join()
            .map_err(|_| anyhow::anyhow!("child thread panicked"))??;
        ensure!(v["ok"] == 100, "not every caller was served: {v}");
        calls += v["plugin_calls"].as_u64().unwrap_or(0);
    }
    let wall = started.elapsed();
    let hits = slow.hits.load(Ordering::Relaxed) - before;
    out += &format!(
        "\n{processes} processes × 100 callers on one cold key: {calls} provider call(s), {hits} token endpoint request(s), {} wall time (process start included).\n",
        fmt(wall)
    );
    Ok(out)
}

/// A client-credentials provider (`api`) against `idp`, its state per replica.
fn fleet_cc_provider(idp: &Idp) -> String {
    format!(
        "[providers.api]\nplugin = \"{}\"\nallowed_hosts = [\"{}\"]\nshared_state = false\n\n\
         [providers.api.config]\nissuer = \"{}\"\nclient_id = \"cc-basic\"\nclient_secret = \"cc-basic-secret-0123456789\"\nscope = \"api:read\"\n\n\
         [providers.api.cache]\n{}",
        plugins().oauth2.display(),
        idp.authority(),
        idp.issuer,
        reauth_tests::fleet::SHORT_CACHE
    )
}

/// `callers` concurrent requests spread over `ports`: each one's wait and the
/// number that failed.
async fn fleet_burst(ports: &[u16], callers: usize) -> (Vec<Duration>, usize) {
    let tasks: Vec<_> = (0..callers)
        .map(|i| {
            let port = ports[i % ports.len()];
            tokio::spawn(async move {
                let started = Instant::now();
                let ok = reauth_tests::fleet::get(port, "api").await.is_ok();
                (started.elapsed(), ok)
            })
        })
        .collect();
    let (mut waits, mut failed) = (Vec::new(), 0);
    for t in tasks {
        let (wait, ok) = t.await.unwrap_or((Duration::ZERO, false));
        waits.push(wait);
        if !ok {
            failed += 1;
        }
    }
    (waits, failed)
}

fn section_fleet(smoke: bool) -> Result<String> {
    use reauth::store::fleet::{Fleet, FleetBackend, FleetOptions, PostgresBackend, RedisBackend};
    use reauth::store::{KeyRing, RemoteEvent, SharedCache, SharedEntry};
    use reauth_tests::fleet::{FLEET_KEY, Replicas};
    use reauth_tests::peers::{Postgres, Redis};
    let rt = runtime();
    let reauth = reauth_binary()?;
    let dir = tempfile::tempdir()?;
    let (mut redis, pg) = rt.block_on(async { (Redis::start().await, Postgres::start().await) });
    let redis_port = redis.port;
    let mut out = String::from(
        "### Fleet mode: replicas sharing tokens through Redis and PostgreSQL\n\n\
         `reauth serve` replicas (release build) in one `[fleet]`, the OAuth2 client-credentials \
         provider against the real oidc-provider IdP, Redis 7 and PostgreSQL 15, all on loopback \
         on this 2-core machine (replicas, backend, IdP and callers share the two cores).\n\n",
    );
    // 1. N replicas × M callers on a cold key, then on the same key once it
    // expired; the backend killed while tokens are valid.
    let ttl = 5;
    let idp = Idp::start(&dir.path().join("keys.json"), ttl, None);
    let idp_latency = rt.block_on(async {
        let mut samples = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            let (status, _, _) = http(
                &format!("http://{}", idp.authority()),
                "POST",
                "/token",
                &[
                    (
                        "authorization",
                        "Basic Y2MtYmFzaWM6Y2MtYmFzaWMtc2VjcmV0LTAxMjM0NTY3ODk=",
                    ),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                Some(b"grant_type=client_credentials&scope=api:read".to_vec()),
            )
            .await?;
            ensure!(status == 200, "the IdP answered {status}");
            samples.push(started.elapsed());
        }
        anyhow::Ok(stats(samples).p50)
    })?;
    let callers = if smoke { 50 } else { 1000 };
    out += &format!(
        "N replicas × {callers} concurrent callers (spread evenly over the replicas' HTTP APIs) \
         on one key; the IdP answers a token request in {} (p50, direct). Goal: 1 IdP call per \
         key and lifetime, p99 wait ≤ IdP latency + 100 ms.\n\n\
         | backend | N | key | IdP calls | callers' p50 wait | p99 wait | failed |\n| --- | --- | --- | --- | --- | --- | --- |\n",
        fmt(idp_latency)
    );
    let runs: Vec<(&str, String, usize)> = if smoke {
        vec![("redis", redis.url(), 2)]
    } else {
        vec![
            ("redis", redis.url(), 2),
            ("redis", redis.url(), 8),
            ("redis", redis.url(), 32),
            ("postgres", pg.url(), 8),
            ("postgres", pg.url(), 32),
        ]
    };
    let mut killed = String::new();
    for (backend, url, n) in runs {
        let mut fleet = Replicas::named(
            &format!("bench-{backend}-{n}"),
            backend,
            &url,
            &fleet_cc_provider(&idp),
            reauth.clone(),
            "bench-fleet",
        )
        .quiet();
        fleet.start_all(n);
        let ports: Vec<u16> = (0..n).filter_map(|i| fleet.port(i)).collect();
        // `warm`: every caller served from memory (what the concurrent HTTP
        // requests cost here by themselves).
        for key in ["cold", "warm (L1 hits)", "expired"] {
            if key == "expired" {
                std::thread::sleep(Duration::from_secs(ttl + 1));
            }
            let before = rt.block_on(idp.token_requests("cc-basic")).0;
            let (waits, failed) = rt.block_on(fleet_burst(&ports, callers));
            let calls = rt.block_on(idp.token_requests("cc-basic")).0 - before;
            let s = stats(waits);
            out += &format!(
                "| {backend} | {n} | {key} | {calls} | {} | {} | {failed} |\n",
                fmt(s.p50),
                fmt(s.p99)
            );
        }
        if backend == "redis" && (n == 8 || smoke) {
            // Redis killed while every replica holds a valid token.
            let (_, warm_failed) = rt.block_on(fleet_burst(&ports, callers));
            redis.stop();
            let (waits, failed) = rt.block_on(fleet_burst(&ports, callers));
            let s = stats(waits);
            killed = format!(
                "\nRedis killed while the tokens are valid ({n} replicas, {callers} callers): \
                 {failed} failed calls (goal 0; {warm_failed} failed just before), p99 wait {}.\n",
                fmt(s.p99)
            );
            redis = rt.block_on(Redis::start_on(redis_port));
        }
        fleet.stop_all();
    }
    out += &killed;

    // 2. An L2 read (what an L1 miss costs before any provider call), and the
    // L1 hit path of a host in a fleet next to one outside any fleet.
    let fleet_on = |backend: Arc<dyn FleetBackend>, name: &str| {
        Fleet::new(
            backend,
            Arc::new(KeyRing::parse(FLEET_KEY, "bench").expect("key ring")),
            FleetOptions {
                name: name.to_string(),
                lease: Duration::from_secs(10),
                wait: Duration::from_secs(10),
                timeout: Duration::from_secs(2),
            },
        )
    };
    let redis_backend = |name: &str| -> Arc<dyn FleetBackend> {
        Arc::new(RedisBackend::new(&redis.url(), name, Duration::from_secs(2)).expect("redis url"))
    };
    let pg_backend = |name: &str| -> Arc<dyn FleetBackend> {
        Arc::new(PostgresBackend::new(&pg.url(), name, Duration::from_secs(2)).expect("pg url"))
    };
    let reads = if smoke { 20 } else { 2000 };
    out += "\n| measurement | p50 | p99 |\n| --- | --- | --- |\n";
    for (label, backend) in [
        ("Redis", redis_backend("bench-l2")),
        ("PostgreSQL", pg_backend("bench-l2")),
    ] {
        let fleet = fleet_on(backend, "bench-l2");
        let s = rt.block_on(async {
            let id = fleet.entry_id(b"bench");
            let lease = fleet
                .fetching(&id, Duration::from_secs(2))
                .await
                .context("lease")?;
            let now = std::time::SystemTime::now();
            let entry = SharedEntry {
                credentials: reauth::Credentials {
                    credential: reauth::Credential::Bearer("t".repeat(800).into()),
                    expires_at: Some(now + Duration::from_secs(600)),
                    principal: None,
                },
                written_at: now,
                fresh_until: now + Duration::from_secs(480),
            };
            fleet.write(&id, &entry, Some(&lease)).await?;
            drop(lease);
            let mut samples = Vec::new();
            for _ in 0..reads {
                let started = Instant::now();
                ensure!(fleet.read(&id).await.is_some(), "L2 miss");
                samples.push(started.elapsed());
            }
            anyhow::Ok(stats(samples))
        })?;
        out += &format!(
            "| L2 hit from a cold L1, {label} (read + open, {reads} reads; goal p99 ≤ {}) | {} | {} |\n",
            if label == "Redis" { "2 ms" } else { "5 ms" },
            fmt(s.p50),
            fmt(s.p99)
        );
    }
    let (batches, batch) = if smoke { (20, 10) } else { (2000, 200) };
    for (label, fleet) in [
        ("outside any fleet", None),
        (
            "in a fleet (Redis)",
            Some(fleet_on(redis_backend("bench-hit"), "bench-hit")),
        ),
    ] {
        let mut builder = Host::builder().provider(
            "static",
            ProviderConfig::new(&plugins().static_).config("token", "t".repeat(800)),
        );
        if let Some(fleet) = fleet {
            builder = builder.fleet(fleet);
        }
        let host = rt.block_on(async { builder.build() })?;
        let request = Request::new().scope("orders:read");
        rt.block_on(host.get_credentials("static", &request))?;
        let s = rt.block_on(batched(batches, batch, || async {
            std::hint::black_box(host.get_credentials("static", &request).await.unwrap());
        }));
        out += &format!(
            "| L1 hit, host {label} | {} | {} |\n",
            fmt(s.p50),
            fmt(s.p99)
        );
    }
    let map: Arc<RwLock<HashMap<String, String>>> = Arc::default();
    map.write()
        .unwrap()
        .insert("static".into(), "t".repeat(800));
    let s = rt.block_on(batched(batches, batch, || async {
        std::hint::black_box(map.read().unwrap().get("static").cloned().unwrap());
    }));
    out += &format!(
        "| floor: bare `RwLock<HashMap>` lookup + clone | {} | {} |\n",
        fmt(s.p50),
        fmt(s.p99)
    );

    // 3. Invalidation: from compare-and-invalidate on one replica until all 8
    // others got the announcement.
    let trials = if smoke { 3 } else { 100 };
    for (label, make) in [
        (
            "Redis",
            &redis_backend as &dyn Fn(&str) -> Arc<dyn FleetBackend>,
        ),
        ("PostgreSQL", &pg_backend),
    ] {
        let s = rt.block_on(async {
            let writer = fleet_on(make("bench-inv"), "bench-inv");
            let mut receivers = Vec::new();
            let mut keep = Vec::new();
            for _ in 0..8 {
                let f = fleet_on(make("bench-inv"), "bench-inv");
                receivers.push(f.events().context("events")?);
                keep.push(f);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut samples = Vec::new();
            for t in 0..trials {
                let id = writer.entry_id(format!("inv-{t}").as_bytes());
                let now = std::time::SystemTime::now();
                let credentials = reauth::Credentials {
                    credential: reauth::Credential::Bearer(format!("tok-{t}").into()),
                    expires_at: Some(now + Duration::from_secs(600)),
                    principal: None,
                };
                let entry = SharedEntry {
                    credentials: credentials.clone(),
                    written_at: now,
                    fresh_until: now + Duration::from_secs(480),
                };
                let lease = writer
                    .fetching(&id, Duration::from_secs(2))
                    .await
                    .context("lease")?;
                writer.write(&id, &entry, Some(&lease)).await?;
                drop(lease);
                let started = Instant::now();
                ensure!(
                    writer
                        .remove_if(&id, &SharedEntry::fingerprint(&credentials))
                        .await,
                    "not removed"
                );
                for r in &mut receivers {
                    loop {
                        match tokio::time::timeout(Duration::from_secs(5), r.recv()).await {
                            Ok(Ok(RemoteEvent::Invalidated { id: got, .. })) if got == id => break,
                            Ok(Ok(_))
                            | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                                continue;
                            }
                            other => anyhow::bail!("no announcement within 5 s: {other:?}"),
                        }
                    }
                }
                samples.push(started.elapsed());
            }
            anyhow::Ok(stats(samples))
        })?;
        out += &format!(
            "| invalidation reaching 8 other replicas, {label} ({trials} trials; goal p99 ≤ 1 s) | {} | {} |\n",
            fmt(s.p50),
            fmt(s.p99)
        );
    }

    // 4. 32 replicas over 10 token lifetimes, with and without the fleet.
    // The same signing keys as the first IdP: no second RSA key generation.
    let short = Idp::start(&dir.path().join("keys.json"), 2, None);
    let (n, lifetimes) = if smoke { (2, 2) } else { (32, 10) };
    out += &format!(
        "\n{n} replicas, one caller each (a request every 100 ms), {lifetimes} token lifetimes of 2 s \
         (each token used until 1 s before it expires, `skew_secs = 1`: one IdP call per second is \
         one per usable lifetime):\n\n\
         | mode | IdP token requests | failed calls |\n| --- | --- | --- |\n"
    );
    for (mode, backend) in [
        ("without `[fleet]` (each replica alone)", "none"),
        ("fleet on Redis", "redis"),
    ] {
        let mut fleet = Replicas::named(
            "bench-lifetimes",
            backend,
            &redis.url(),
            &fleet_cc_provider(&short),
            reauth.clone(),
            "bench-fleet",
        )
        .quiet();
        fleet.start_all(n);
        let ports: Vec<u16> = (0..n).filter_map(|i| fleet.port(i)).collect();
        let before = rt.block_on(short.token_requests("cc-basic")).0;
        let until = Instant::now() + Duration::from_secs(2 * lifetimes);
        let failed = rt.block_on(async {
            let tasks: Vec<_> = ports
                .iter()
                .map(|&port| {
                    tokio::spawn(async move {
                        let mut failed = 0u64;
                        while Instant::now() < until {
                            if reauth_tests::fleet::get(port, "api").await.is_err() {
                                failed += 1;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        failed
                    })
                })
                .collect();
            let mut failed = 0;
            for t in tasks {
                failed += t.await.unwrap_or(1);
            }
            failed
        });
        let calls = rt.block_on(short.token_requests("cc-basic")).0 - before;
        out += &format!("| {mode} | {calls} | {failed} |\n");
        fleet.stop_all();
    }
    Ok(out)
}

fn child(args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new(std::env::current_exe()?).args(args).output()?;
    ensure!(
        out.status.success(),
        "child {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(
        line.lines().last().unwrap_or_default(),
    )?)
}

fn section_herd(smoke: bool) -> Result<String> {
    let sizes: &[usize] = if smoke {
        &[100]
    } else {
        &[1_000, 10_000, 100_000]
    };
    let mut out = String::from(
        "### Herd: concurrent callers on a cold key (provider behind a 50 ms token endpoint, 2 worker threads)\n\n\
         | callers | wall time to serve all | plugin calls | peak RSS |\n| --- | --- | --- | --- |\n",
    );
    for n in sizes {
        let v = child(&["--herd-child", &n.to_string()])?;
        ensure!(v["ok"] == *n, "not every caller was served: {v}");
        ensure!(
            v["plugin_calls"] == 1,
            "herd of {n}: {} plugin calls",
            v["plugin_calls"]
        );
        out += &format!(
            "| {n} | {:.1} ms | {} | {:.1} MiB |\n",
            v["wall_ms"].as_f64().unwrap_or(0.0),
            v["plugin_calls"],
            v["peak_kib"].as_f64().unwrap_or(0.0) / 1024.0
        );
    }
    Ok(out)
}

fn providers_child(n: usize) -> Result<()> {
    let cache = tempfile::tempdir()?;
    // Warm the precompiled cache first, as a deployment would (`reauth check`).
    let mut config = reauth::HostConfig::default();
    config.runtime.cache_dir = Some(cache.path().to_path_buf());
    // 100 providers × the default bulkhead of 8 need more than the default pool.
    config.runtime.max_instances = 1024;
    config.providers.insert("warm".into(), logic_provider());
    drop(Host::builder_from_config(config.clone()).build()?);
    config.providers.clear();
    for i in 0..n {
        config.providers.insert(format!("p{i}"), logic_provider());
    }
    let before = status_kib("VmRSS:");
    let host = Host::builder_from_config(config).build()?;
    let rt = runtime();
    for i in 0..n {
        rt.block_on(host.get_credentials(&format!("p{i}"), &Request::new()))?;
    }
    let after = status_kib("VmRSS:");
    println!(
        "{}",
        serde_json::json!({"n": n, "before_kib": before, "after_kib": after})
    );
    Ok(())
}

fn section_scale(smoke: bool) -> Result<String> {
    let mut out = String::from(
        "### Scale\n\nLoaded providers (same component, precompiled cache warm, one call each):\n\n\
         | providers | RSS added | per provider |\n| --- | --- | --- |\n",
    );
    let counts: &[usize] = if smoke { &[1, 2] } else { &[1, 10, 100] };
    for n in counts {
        let v = child(&["--providers-child", &n.to_string()])?;
        let added =
            v["after_kib"].as_f64().unwrap_or(0.0) - v["before_kib"].as_f64().unwrap_or(0.0);
        out += &format!(
            "| {n} | {:.1} MiB | {:.2} MiB |\n",
            added / 1024.0,
            added / 1024.0 / *n as f64
        );
    }
    out += "\nSubjects cached for one provider (one key each), then cache hits on random subjects:\n\n\
            | subjects | RSS added | hit p50 | hit p99 |\n| --- | --- | --- | --- |\n";
    let rt = runtime();
    let sizes: &[usize] = if smoke { &[1, 10] } else { &[1, 100, 10_000] };
    for n in sizes {
        let host = Host::builder()
            .provider("logic", logic_provider())
            .build()?;
        let requests: Vec<Request> = (0..*n)
            .map(|i| Request::new().subject(format!("user-{i}")))
            .collect();
        let before = status_kib("VmRSS:");
        rt.block_on(async {
            for r in &requests {
                host.get_credentials("logic", r).await?;
            }
            anyhow::Ok(())
        })?;
        let after = status_kib("VmRSS:");
        let mut i = 0usize;
        let s = rt.block_on(batched(if smoke { 10 } else { 2000 }, 100, || {
            i = (i * 7919 + 13) % n;
            let r = &requests[i];
            let host = &host;
            async move {
                std::hint::black_box(host.get_credentials("logic", r).await.unwrap());
            }
        }));
        out += &format!(
            "| {n} | {:.2} MiB | {} | {} |\n",
            (after.saturating_sub(before)) as f64 / 1024.0,
            fmt(s.p50),
            fmt(s.p99)
        );
    }
    Ok(out)
}

/// One provider of the polyglot section, loaded with or without instance reuse.
fn polyglot_provider(
    runtime: &reauth::runtime::Runtime,
    plugin: &std::path::Path,
    config: &[(&str, &str)],
    reuse: bool,
) -> Result<reauth::runtime::ProviderRuntime> {
    let instances = {
        let mut c = reauth::config::InstancesConfig::default();
        c.reuse = reuse;
        c.max_calls = u32::MAX;
        c
    };
    Ok(reauth::runtime::ProviderRuntime::load(
        runtime,
        reauth::runtime::ProviderSpec {
            name: "bench".into(),
            plugin: plugin.to_path_buf(),
            sha256: None,
            allowed_hosts: Vec::new(),
            allow_http: false,
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), reauth::Secret::new(*v)))
                .collect(),
            limits: reauth::LimitsConfig::default(),
            breaker: reauth::BreakerConfig::default(),
            instances,
            state_file: None,
            shared_state: false,
            secret_keys: Vec::new(),
            credential_keys: Vec::new(),
            rate: reauth::RateConfig::unlimited(),
        },
    )?)
}

fn section_polyglot(smoke: bool) -> Result<String> {
    use reauth::runtime::{CompileSource, Runtime, RuntimeOptions};
    use sha2::Digest;
    let rt = runtime();
    let p = plugins();
    type Lang<'a> = (&'a str, &'a std::path::Path, &'a [(&'a str, &'a str)]);
    let langs: [Lang; 3] = [
        ("Rust (`static`)", &p.static_, &[("token", "rust-ok")]),
        ("Python (componentize-py)", &p.hostile_py, &[("mode", "ok")]),
        (
            "JavaScript (componentize-js)",
            &p.hostile_js,
            &[("mode", "ok")],
        ),
    ];
    // REAUTH_BENCH_PROFILE_POLYGLOT=<row>,<n>: only row's fresh instance + call,
    // n of them (the component precompiled first, outside the measured loop), for
    // a profiler (`perf stat -e page-faults`, `perf record`).
    if let Some((row, runs)) = std::env::var("REAUTH_BENCH_PROFILE_POLYGLOT")
        .ok()
        .and_then(|v| {
            let (row, n) = v.split_once(',')?;
            Some((row.parse::<usize>().ok()?, n.parse::<usize>().ok()?))
        })
    {
        let (label, plugin, config) = langs.get(row).context("no such row")?;
        let dir = tempfile::tempdir()?;
        let runtime = Runtime::new(
            RuntimeOptions {
                cache_dir: Some(dir.path().to_path_buf()),
                ..bench_runtime_options()
            },
            std::sync::Arc::new(reauth::clock::SystemClock),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let provider = polyglot_provider(&runtime, plugin, config, false)?;
        let request = Request::new();
        let mut samples = Vec::with_capacity(runs);
        rt.block_on(async {
            for _ in 0..runs {
                let start = Instant::now();
                let c = provider.get_credentials(&runtime, &request).await?;
                samples.push(start.elapsed());
                std::hint::black_box(c);
            }
            anyhow::Ok(())
        })?;
        let s = stats(samples);
        return Ok(format!(
            "{label}: fresh instance + call p50 {} p99 {}\n",
            fmt(s.p50),
            fmt(s.p99)
        ));
    }
    let (compiles, loads, calls) = if smoke { (1, 2, 5) } else { (3, 20, 400) };
    let mut out = String::from(
        "### Polyglot providers: compile, load, instantiate\n\n\
         The same trivial logic (return a configured bearer token) in each language, \
         in-process through `ProviderRuntime` (no cache in front).\n\n\
         | provider | component | precompile (compile + write artifact) | load, copy path (read + hash + copy) | \
         load by a host: first (hash + map) / later (map) | \
         fresh instance + call p50 / p99 | reused instance call p50 / p99 | fresh / reused |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for (label, plugin, config) in langs {
        let bytes = std::fs::read(plugin)?;
        let sha = hex::encode(sha2::Sha256::digest(&bytes));
        let mut compile = Vec::new();
        // A runtime whose precompiled cache is `dir`.
        let cached = |dir: &std::path::Path| {
            Runtime::new(
                RuntimeOptions {
                    cache_dir: Some(dir.to_path_buf()),
                    ..bench_runtime_options()
                },
                std::sync::Arc::new(reauth::clock::SystemClock),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))
        };
        for _ in 0..compiles {
            let dir = tempfile::tempdir()?;
            let runtime = cached(dir.path())?;
            let start = Instant::now();
            let (_, source) = runtime
                .compile(&bytes, &sha)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            compile.push(start.elapsed());
            ensure!(source == CompileSource::Compiled);
        }
        let dir = tempfile::tempdir()?;
        let runtime = cached(dir.path())?;
        runtime
            .compile(&bytes, &sha)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // The copy path (`Runtime::compile`: the artifact read whole, hashed and
        // copied into executable memory; the plugin's bytes already in hand).
        let mut load = Vec::new();
        for _ in 0..loads {
            let start = Instant::now();
            let (_, source) = runtime
                .compile(&bytes, &sha)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            load.push(start.elapsed());
            ensure!(source == CompileSource::Cache);
        }
        // What a host does (`ProviderRuntime::load`: plugin path to linked
        // component): once the artifact has settled, the first load hashes it and
        // maps it; later ones find both files unchanged and only map.
        std::thread::sleep(Duration::from_millis(2500));
        let start = Instant::now();
        let first = polyglot_provider(&runtime, plugin, config, false)?;
        let first_load = start.elapsed();
        ensure!(first.compile_source() == CompileSource::Cache);
        drop(first);
        let mut mapped = Vec::new();
        for _ in 0..loads {
            let start = Instant::now();
            let provider = polyglot_provider(&runtime, plugin, config, false)?;
            mapped.push(start.elapsed());
            ensure!(provider.compile_source() == CompileSource::Cache);
        }
        let measure = |reuse: bool| -> Result<Stats> {
            let provider = polyglot_provider(&runtime, plugin, config, reuse)?;
            let request = Request::new();
            let mut samples = Vec::with_capacity(calls);
            rt.block_on(async {
                for i in 0..calls + 5 {
                    let start = Instant::now();
                    let c = provider.get_credentials(&runtime, &request).await?;
                    if i >= 5 {
                        samples.push(start.elapsed());
                    }
                    std::hint::black_box(c);
                }
                anyhow::Ok(())
            })?;
            Ok(stats(samples))
        };
        let fresh = measure(false)?;
        let reused = measure(true)?;
        out += &format!(
            "| {label} | {:.1} MB | {} | {} | {} / {} | {} / {} | {} / {} | {:.0}× |\n",
            bytes.len() as f64 / 1e6,
            fmt(stats(compile).p50),
            fmt(stats(load).p50),
            fmt(first_load),
            fmt(stats(mapped).p50),
            fmt(fresh.p50),
            fmt(fresh.p99),
            fmt(reused.p50),
            fmt(reused.p99),
            fresh.p50.as_secs_f64() / reused.p50.as_secs_f64()
        );
    }
    out += &format!(
        "\nPrecompile: median of {compiles} (each into an empty cache); copy-path and mapped \
         loads: median of {loads} (a host's load includes stat-ing the plugin, the artifact's \
         meta, the mapping and linking; see `host/src/runtime/artifact.rs`); calls: {calls} \
         after 5 warm-up calls. A reused instance serves one subject \
         only and is recycled after `instances.max_calls` (here unlimited).\n"
    );
    Ok(out)
}

/// The hostile fixture in `mode`, hammered: no backoff, pacing or breaker in the
/// way, so every attempt reaches the plugin.
fn hostile_provider(mode: &str) -> ProviderConfig {
    let mut p = unmetered(ProviderConfig::new(&plugins().hostile).config("mode", mode));
    p.cache.backoff_initial_ms = 1;
    p.cache.backoff_max_ms = 1;
    p.cache.min_interval_ms = 0;
    p.circuit_breaker.faults = 1000;
    p.circuit_breaker.cooldown_ms = 1;
    p.circuit_breaker.max_cooldown_ms = 1;
    p
}

fn section_neighbours(smoke: bool) -> Result<String> {
    let rt = runtime();
    rt.block_on(async {
        // Accepts connections and never answers: the egress flood's target.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let sink = listener.local_addr()?;
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
                if held.len() > 4096 {
                    held.clear();
                }
            }
        });
        let mut slow = hostile_provider("sleep").config("sleep_ms", "2000");
        slow.limits.queue_timeout_ms = 100;
        let mut flood = hostile_provider("request-flood")
            .config("authority", sink.to_string())
            .config("count", "30000")
            .allow_host(sink.to_string());
        flood.limits.timeout_ms = 1000;
        let host = Host::builder()
            .provider("good", hostile_provider("ok"))
            .provider("slow", slow)
            .provider("flood", flood)
            .provider("hoard", hostile_provider("fields-flood"))
            .provider("random", hostile_provider("random-flood"))
            .build()?;
        let samples = if smoke { 20 } else { 2000 };
        let next = AtomicU64::new(0);
        // Four callers of the good provider, each fetch for a new subject (a
        // plugin call every time, never a cache hit).
        let measure = || async {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..4 {
                let host = host.clone();
                let start = next.fetch_add(samples as u64, Ordering::Relaxed);
                tasks.spawn(async move {
                    let mut latencies = Vec::new();
                    let mut failures = 0u64;
                    for i in 0..samples / 4 {
                        let request = Request::new().subject(format!("g{}", start + i as u64));
                        let t = Instant::now();
                        match host.get_credentials("good", &request).await {
                            Ok(_) => latencies.push(t.elapsed()),
                            Err(_) => failures += 1,
                        }
                    }
                    (latencies, failures)
                });
            }
            let (mut all, mut failures) = (Vec::new(), 0);
            while let Some(done) = tasks.join_next().await {
                let (l, f) = done.expect("caller task");
                all.extend(l);
                failures += f;
            }
            (stats(all), failures)
        };
        // Warm up (first instantiations, allocator) before the quiet run.
        for i in 0..50 {
            let _ = host
                .get_credentials("good", &Request::new().subject(format!("warm-{i}")))
                .await;
        }
        let (quiet, quiet_failures) = measure().await;
        let stop = Arc::new(AtomicBool::new(false));
        let hammered = Arc::new(AtomicU64::new(0));
        let mut hammers = tokio::task::JoinSet::new();
        for (provider, callers) in [("slow", 64), ("flood", 2), ("hoard", 2), ("random", 2)] {
            for c in 0..callers {
                let (host, stop, hammered) = (host.clone(), stop.clone(), hammered.clone());
                hammers.spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let request = Request::new().subject(format!("{provider}-{c}-{i}"));
                        let _ = host.get_credentials(provider, &request).await;
                        hammered.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                        // A refused call returns at once: let the other tasks run
                        // (the hammer measures hostile providers, not a client
                        // spinning on a worker thread).
                        tokio::task::yield_now().await;
                    }
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss_before = status_kib("VmRSS:");
        let (noisy, noisy_failures) = measure().await;
        let rss_peak = status_kib("VmHWM:");
        stop.store(true, Ordering::Relaxed);
        while hammers.join_next().await.is_some() {}
        holder.abort();
        let ratio = noisy.p99.as_secs_f64() / quiet.p99.as_secs_f64();
        let mut out = String::from("### Noisy neighbours\n\n");
        out += "A good provider's fetches (fresh instance + call, 4 callers, a new subject per \
                fetch) alone, then with hostile providers hammered in the same host: `sleep` (64 \
                callers, 2 s each), `request-flood` (30,000 requests to a listener that never \
                answers), `fields-flood` (thousands of 12 KB header objects), `random-flood` (64 MiB \
                random buffers); breakers disabled so every attempt reaches its plugin.\n\n\
                | good provider | p50 | p99 | mean | failures |\n| --- | --- | --- | --- | --- |\n";
        out += &format!(
            "| quiet | {} | {} | {} | {quiet_failures} |\n",
            fmt(quiet.p50),
            fmt(quiet.p99),
            fmt(quiet.mean)
        );
        out += &format!(
            "| with hostile neighbours | {} | {} | {} | {noisy_failures} |\n",
            fmt(noisy.p50),
            fmt(noisy.p99),
            fmt(noisy.mean)
        );
        out += &format!(
            "
p99 ratio noisy/quiet: {ratio:.2} (goal ≤ 2.0, zero failures). Hostile calls attempted              meanwhile: {}; RSS {} MiB before the noisy run, peak {} MiB.
",
            hammered.load(Ordering::Relaxed),
            rss_before / 1024,
            rss_peak / 1024
        );
        Ok(out)
    })
}

/// One outage through the sidecar: (IdP attempts during the outage, slowest
/// client's wait after the IdP's return, operations that failed after it).
fn recovery_run(
    rt: &tokio::runtime::Runtime,
    reauth: &std::path::Path,
    dir: &std::path::Path,
    outage_retry_ms: u64,
    outage: Duration,
    after: Duration,
) -> Result<(u64, Duration, u64)> {
    use reauth_tests::fleet::Replicas;
    let keys = dir.join(format!("keys-{outage_retry_ms}.json"));
    let mut idp = Idp::start(&keys, 5, None);
    let providers = format!(
        "[providers.api]\nplugin = \"{}\"\nallowed_hosts = [\"{}\"]\n\n\
         [providers.api.config]\nissuer = \"{}\"\nclient_id = \"cc-basic\"\nclient_secret = \"cc-basic-secret-0123456789\"\nscope = \"api:read\"\n\n\
         [providers.api.cache]\nmin_period_secs = 0\nbuffer_secs = 0\nskew_secs = 1\noutage_retry_ms = {outage_retry_ms}\n",
        plugins().oauth2.display(),
        idp.authority(),
        idp.issuer,
    );
    let mut sidecar = Replicas::new(
        "none",
        "",
        &providers,
        reauth.to_path_buf(),
        "bench-recovery",
    )
    .quiet();
    sidecar.start(0);
    let port = sidecar.port(0).context("the sidecar's port")?;
    let result = rt.block_on(async {
        reauth_tests::fleet::get(port, "api")
            .await
            .map_err(|(s, b)| anyhow::anyhow!("first fetch: {s} {b}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let back_at: Arc<RwLock<Option<Instant>>> = Arc::new(RwLock::new(None));
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let (stop, back_at) = (stop.clone(), back_at.clone());
                tokio::spawn(async move {
                    let (mut first_ok_after, mut failed_after) = (None, 0u64);
                    while !stop.load(Ordering::SeqCst) {
                        let ok = reauth_tests::fleet::get(port, "api").await.is_ok();
                        let back = *back_at.read().unwrap();
                        if let Some(back) = back {
                            if ok && first_ok_after.is_none() {
                                first_ok_after = Some(back.elapsed());
                            } else if !ok && first_ok_after.is_none() {
                                failed_after += 1;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    (first_ok_after, failed_after)
                })
            })
            .collect();
        idp.stop();
        tokio::time::sleep(outage).await;
        // The IdP counts requests since it started: during the outage it saw
        // none; the attempts are the sidecar's failed fetches (its metrics).
        let attempts = fetch_attempts(port).await?;
        idp.restart(&keys);
        *back_at.write().unwrap() = Some(Instant::now());
        tokio::time::sleep(after).await;
        stop.store(true, Ordering::SeqCst);
        let (mut slowest, mut failed) = (Duration::ZERO, 0);
        for c in clients {
            let (first, f) = c.await?;
            slowest = slowest.max(first.unwrap_or(Duration::MAX));
            failed += f;
        }
        anyhow::Ok((attempts, slowest, failed))
    });
    sidecar.stop_all();
    idp.stop();
    result
}

/// The sidecar's failed `get-credentials` calls so far (`/metrics`).
async fn fetch_attempts(port: u16) -> Result<u64> {
    let (_, _, body) = http(
        &format!("http://127.0.0.1:{port}"),
        "GET",
        "/metrics",
        &[],
        None,
    )
    .await?;
    let text = String::from_utf8_lossy(&body);
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("reauth_plugin_calls_total{")
                && l.contains("function=\"get-credentials\"")
                && !l.contains("outcome=\"ok\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

fn section_recovery(smoke: bool) -> Result<String> {
    let rt = runtime();
    let reauth = reauth_binary()?;
    let dir = tempfile::tempdir()?;
    let outage = Duration::from_secs(if smoke { 6 } else { 13 });
    let mut out = format!(
        "### Recovery after an identity-provider outage (#20)\n\n\
         8 clients poll a `reauth serve` sidecar (release build) every 20 ms for a \
         client-credentials token from the real oidc-provider IdP (5 s tokens, default \
         backoff 100 ms doubling to 10 s). The IdP is stopped for {} s (the token expires \
         during it), then restarted. Goal: every waiting client served ≤ 1 s after the \
         IdP's return, ≤ 1 attempt per second per key during the outage.\n\n\
         | `cache.outage_retry_ms` | IdP attempts during the outage | slowest client served after the return | failed operations after the return |\n\
         | --- | --- | --- | --- |\n",
        outage.as_secs()
    );
    for retry in [1000, 0] {
        let after = Duration::from_secs(if smoke { 4 } else { 12 });
        let (attempts, slowest, failed) =
            recovery_run(&rt, &reauth, dir.path(), retry, outage, after)?;
        out += &format!(
            "| {} | {attempts} | {} | {failed} |\n",
            if retry == 0 {
                "0 (backoff to 10 s, as before)".to_string()
            } else {
                format!("{retry} (default)")
            },
            if slowest == Duration::MAX {
                "not served".into()
            } else {
                fmt(slowest)
            }
        );
    }
    Ok(out)
}

/// One operation of a soak client against the API: `Ok`, or whether the API
/// rejected the token (401) or something else failed.
async fn soak_call(api: &str, token: &str) -> Result<(), Rejection<String>> {
    reauth_tests::peers::call_api(&format!("{api}/orders"), token).await
}

/// What the soak clients saw: (when, ok) per operation, and 401s.
#[derive(Default)]
struct SoakLog {
    ops: std::sync::Mutex<Vec<(Duration, bool)>>,
}

fn section_soak(smoke: bool) -> Result<String> {
    use reauth_tests::fleet::Replicas;
    let rt = runtime();
    let reauth = reauth_binary()?;
    let dir = tempfile::tempdir()?;
    let (total, rotate_every, outages, clients) = if smoke {
        (
            Duration::from_secs(30),
            Duration::from_secs(12),
            vec![(Duration::from_secs(16), Duration::from_secs(5))],
            10,
        )
    } else {
        (
            Duration::from_secs(600),
            Duration::from_secs(60),
            vec![
                (Duration::from_secs(150), Duration::from_secs(20)),
                (Duration::from_secs(390), Duration::from_secs(20)),
            ],
            50,
        )
    };
    let ttl = 5u64;
    let key = |n: u32| dir.path().join(format!("k{n}.json"));
    let mut idp = Idp::start(&key(1), ttl, None);
    let providers = format!(
        "[providers.api]\nplugin = \"{}\"\nallowed_hosts = [\"{}\"]\n\n\
         [providers.api.config]\nissuer = \"{}\"\nclient_id = \"cc-basic\"\nclient_secret = \"cc-basic-secret-0123456789\"\nscope = \"api:read\"\n\n\
         [providers.api.cache]\nmin_period_secs = 0\nbuffer_secs = 0\nskew_secs = 1\n",
        plugins().oauth2.display(),
        idp.authority(),
        idp.issuer,
    );
    let mut sidecar = Replicas::new("none", "", &providers, reauth.clone(), "bench-soak").quiet();
    sidecar.start(0);
    let port = sidecar.port(0).context("the sidecar's port")?;
    let mut host_config =
        reauth::HostConfig::from_toml(&providers, None, dir.path().to_path_buf())?;
    if let Some(p) = host_config.providers.get_mut("api") {
        p.plugin = plugins().oauth2.clone();
    }
    let host = Host::builder_from_config(host_config).build()?;
    let result = rt.block_on(async {
        let verifier = reauth::verify::Verifier::builder()
            .jwks_url(format!("{}/jwks", idp.issuer))
            .issuer(&idp.issuer)
            .audience("urn:reauth:test-api")
            .leeway(Duration::ZERO)
            .jwks_max_age(Duration::from_secs(30))
            .min_refetch_interval(Duration::from_secs(1))
            .build()?;
        let api = ResourceServer::start(verifier).await;
        let target = api.url.trim_end_matches("/orders").to_string();
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(SoakLog::default());
        let mut tasks = Vec::new();
        for c in 0..clients {
            let (stop, log, target, host) = (stop.clone(), log.clone(), target.clone(), host.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let ok = if c % 2 == 0 {
                        // In process: Host::with_credentials.
                        host.with_credentials("api", &Request::new(), |cred| {
                            let target = target.clone();
                            async move {
                                let token = match &cred.credential {
                                    reauth::Credential::Bearer(t) => t.expose().to_string(),
                                    _ => String::new(),
                                };
                                soak_call(&target, &token).await
                            }
                        })
                        .await
                        .is_ok()
                    } else {
                        // Through the sidecar: get, call, on 401 report and retry once.
                        match reauth_tests::fleet::get(port, "api").await {
                            Err(_) => false,
                            Ok(token) => match soak_call(&target, &token).await {
                                Ok(()) => true,
                                Err(Rejection::Security { .. }) => {
                                    reauth_tests::fleet::report_401(port, "api", &token).await;
                                    match reauth_tests::fleet::get(port, "api").await {
                                        Ok(fresh) => soak_call(&target, &fresh).await.is_ok(),
                                        Err(_) => false,
                                    }
                                }
                                Err(_) => false,
                            },
                        }
                    };
                    log.ops.lock().unwrap().push((started.elapsed(), ok));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }));
        }
        // The IdP's schedule: a new signing key every `rotate_every`, down for the
        // outages. Its token counters restart with it: summed per life.
        let (mut idp_calls, mut rotations, mut key_n) = (0u64, 0u32, 1u32);
        let mut down: Vec<(Duration, Duration)> = Vec::new();
        let mut next_rotation = rotate_every;
        let mut outages_left = outages.clone();
        while started.elapsed() < total {
            let now = started.elapsed();
            if let Some(&(at, length)) = outages_left.first()
                && now >= at
            {
                outages_left.remove(0);
                idp_calls += idp.token_requests("cc-basic").await.0;
                idp.stop();
                let from = started.elapsed();
                tokio::time::sleep(length).await;
                idp.restart(&key(key_n));
                down.push((from, started.elapsed()));
                continue;
            }
            if now >= next_rotation {
                next_rotation += rotate_every;
                idp_calls += idp.token_requests("cc-basic").await.0;
                key_n += 1;
                rotations += 1;
                idp.restart(&key(key_n));
                continue;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            t.await?;
        }
        idp_calls += idp.token_requests("cc-basic").await.0;
        let elapsed = started.elapsed();
        let ops = log.ops.lock().unwrap().clone();
        let is_down = |t: Duration| down.iter().any(|(a, b)| t >= *a && t < *b);
        // Right after an outage the clients whose token expired meanwhile wait
        // for the first fetch (the recovery below); any other failure while the
        // IdP is up is one too many.
        let recovering = |t: Duration| {
            down.iter()
                .any(|(_, back)| t >= *back && t < *back + Duration::from_secs(2))
        };
        let failed_recovering = ops
            .iter()
            .filter(|(t, ok)| !ok && recovering(*t))
            .count();
        let failed_up = ops
            .iter()
            .filter(|(t, ok)| !ok && !is_down(*t) && !recovering(*t))
            .count();
        let failed_down = ops.iter().filter(|(t, ok)| !ok && is_down(*t)).count();
        // Recovery: from the IdP's return until every client's operations succeed
        // again (the last failure after the return).
        let recoveries: Vec<Duration> = down
            .iter()
            .map(|(_, back)| {
                ops.iter()
                    .filter(|(t, ok)| !ok && *t >= *back && *t < *back + Duration::from_secs(30))
                    .map(|(t, _)| t.saturating_sub(*back))
                    .max()
                    .unwrap_or(Duration::ZERO)
            })
            .collect();
        // The ideal: two hosts (in-process, sidecar), one token per ~80 % of a
        // lifetime while the IdP is up, plus one re-authentication per host per
        // key rotation and per outage.
        let up: f64 = elapsed.as_secs_f64()
            - down.iter().map(|(a, b)| (*b - *a).as_secs_f64()).sum::<f64>();
        let ideal = 2.0 * (up / (ttl as f64 * 0.8) + f64::from(rotations) + down.len() as f64);
        let invalid = api.stats.invalid.load(Ordering::Relaxed);
        let expired = api.stats.expired.load(Ordering::Relaxed);
        let mut out = format!(
            "### Soak: key rotations and outages (#20)\n\n\
             {clients} clients for {} s (half through `Host::with_credentials`, half through a \
             `reauth serve` sidecar: get, call, on 401 report and retry once), each an \
             operation every 50 ms against a JWKS-verifying API (`reauth::verify`, JWKS \
             max age 30 s), 5 s tokens from the real oidc-provider IdP, restarted with a \
             new signing key every {} s and down for {}.\n\n\
             | measure | result | goal |\n| --- | --- | --- |\n",
            elapsed.as_secs(),
            rotate_every.as_secs(),
            outages
                .iter()
                .map(|(at, len)| format!("{} s at {} s", len.as_secs(), at.as_secs()))
                .collect::<Vec<_>>()
                .join(" and ")
        );
        out += &format!("| operations | {} | |\n", ops.len());
        out += &format!("| failed operations while the IdP is up (outside the 2 s after an outage) | {failed_up} | 0 |\n");
        out += &format!("| failed operations in the 2 s after an outage (tokens expired during it) | {failed_recovering} | – |\n");
        out += &format!("| failed operations while it is down (no valid token left) | {failed_down} | – |\n");
        for (i, r) in recoveries.iter().enumerate() {
            out += &format!("| recovery after outage {} (last failure after the IdP's return) | {} | ≤ 1 s |\n", i + 1, fmt(*r));
        }
        out += &format!(
            "| IdP token calls vs the ideal schedule | {idp_calls} vs {ideal:.0} ({:.2}×) | ≤ 1.1× |\n",
            idp_calls as f64 / ideal
        );
        out += &format!(
            "| 401s (invalid) per key rotation | {:.1} ({invalid} in {rotations} rotations; {expired} expired) | ≤ 1 per in-flight token |\n",
            if rotations > 0 { invalid as f64 / f64::from(rotations) } else { 0.0 }
        );
        anyhow::Ok(out)
    });
    sidecar.stop_all();
    idp.stop();
    result
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    format!(
        "{cpu}, {cores} cores, {:.0} GiB RAM",
        mem as f64 / 1024.0 / 1024.0
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(n) = args.herd_child {
        return herd_child(n);
    }
    if let Some(n) = args.providers_child {
        return providers_child(n);
    }
    if let Some(v) = &args.shared_child {
        return shared_child(&v[0], &v[1]);
    }
    println!(
        "Machine: {}. Mode: {}.\n",
        machine(),
        if args.smoke {
            "smoke (numbers meaningless)"
        } else {
            "full"
        }
    );
    for section in &args.sections {
        let text = match section.as_str() {
            "cache" => section_cache(args.smoke)?,
            "miss" => section_miss(args.smoke)?,
            "idp" => section_idp(args.smoke)?,
            "herd" => section_herd(args.smoke)?,
            "scale" => section_scale(args.smoke)?,
            "polyglot" => section_polyglot(args.smoke)?,
            "neighbours" => section_neighbours(args.smoke)?,
            "processes" => section_processes(args.smoke)?,
            "fleet" => section_fleet(args.smoke)?,
            "recovery" => section_recovery(args.smoke)?,
            "soak" => section_soak(args.smoke)?,
            other => {
                anyhow::bail!(
                    "unknown section `{other}` (cache, miss, idp, herd, scale, polyglot, neighbours, processes, fleet, recovery, soak)"
                )
            }
        };
        println!("{text}");
    }
    Ok(())
}
