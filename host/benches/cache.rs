//! The token cache's hot path next to a bare map lookup doing the same work (build
//! the key, look it up, clone the credential), throughput with two threads, and a
//! herd of 10,000 tasks on a cold key.
//!
//! Needs the plugins built first: `make bench` does both.

#![allow(missing_docs)]

mod common;
use common::plugin;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use reauth::{CacheKey, Credential, Credentials, Host, ProviderConfig, Request, Secret};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn host() -> Host {
    Host::builder()
        .provider(
            "static",
            ProviderConfig::new(plugin("static")).config("token", "t".repeat(800)),
        )
        .provider("counter", {
            // A new key per herd round: no fetch budget in the way of the rounds.
            let mut p = ProviderConfig::new(plugin("fixture_testkit")).config("mode", "counter");
            p.rate = reauth::RateConfig::unlimited();
            p
        })
        .build()
        .unwrap()
}

fn benches(c: &mut Criterion) {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let host = host();
    let request = Request::new().scope("orders:read");
    tokio
        .block_on(host.get_credentials("static", &request))
        .unwrap();

    // The same work on a plain map: key from the request, lookup under a mutex, clone.
    let provider: Arc<str> = Arc::from("static");
    let bare: Mutex<HashMap<CacheKey, Credentials>> = Mutex::new(HashMap::from([(
        CacheKey::new(provider.clone(), &request),
        Credentials {
            credential: Credential::Bearer(Secret::new("t".repeat(800))),
            expires_at: None,
            principal: None,
        },
    )]));

    let mut group = c.benchmark_group("hit");
    group.throughput(Throughput::Elements(1));
    group.bench_function("bare HashMap lookup + clone", |b| {
        b.iter(|| {
            let key = CacheKey::new(provider.clone(), &request);
            bare.lock().unwrap().get(&key).cloned().unwrap()
        })
    });
    group.bench_function("Host::get_credentials (cached)", |b| {
        b.to_async(&tokio)
            .iter(|| async { host.get_credentials("static", &request).await.unwrap() })
    });
    for threads in [1usize, 2] {
        group.bench_with_input(
            BenchmarkId::new("Host::get_credentials threads", threads),
            &threads,
            |b, &threads| {
                b.iter_custom(|iters| {
                    let per_thread = iters.div_ceil(threads as u64);
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for _ in 0..threads {
                            s.spawn(|| {
                                let rt = tokio::runtime::Builder::new_current_thread()
                                    .build()
                                    .unwrap();
                                rt.block_on(async {
                                    for _ in 0..per_thread {
                                        host.get_credentials("static", &request).await.unwrap();
                                    }
                                });
                            });
                        }
                    });
                    // Wall time per element, so throughput reads as the aggregate rate.
                    start
                        .elapsed()
                        .mul_f64(iters as f64 / (per_thread * threads as u64) as f64)
                })
            },
        );
    }
    group.finish();

    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("herd");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    let mut round = 0u64;
    group.bench_function("10000 tasks on a cold key", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                round += 1;
                let request = Request::new().subject(format!("user-{round}"));
                let before = host.plugin_calls("counter");
                let start = Instant::now();
                multi.block_on(async {
                    let tasks: Vec<_> = (0..10_000)
                        .map(|_| {
                            let (host, request) = (host.clone(), request.clone());
                            tokio::spawn(async move {
                                host.get_credentials("counter", &request).await.unwrap()
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                });
                total += start.elapsed();
                assert_eq!(
                    host.plugin_calls("counter") - before,
                    1,
                    "single-flight broke"
                );
            }
            total
        })
    });
    group.finish();
}

criterion_group!(cache_benches, benches);
criterion_main!(cache_benches);
