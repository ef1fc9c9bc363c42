//! Runtime costs: compiling a plugin, loading it from the precompiled cache, and
//! the per-call price of a fresh sandbox (instantiate + `get-credentials`).
//!
//! Needs the plugins built first: `make bench` does both.

#![allow(missing_docs)]

mod common;
use common::plugin;

use criterion::{Criterion, criterion_group, criterion_main};
use reauth::clock::SystemClock;
use reauth::config::{BreakerConfig, InstancesConfig, LimitsConfig};
use reauth::runtime::{ProviderRuntime, ProviderSpec, Runtime, RuntimeOptions};
use reauth::{Host, ProviderConfig, Request, Secret};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Arc;

fn runtime(cache_dir: Option<PathBuf>) -> Runtime {
    Runtime::new(
        RuntimeOptions {
            cache_dir,
            ..RuntimeOptions::default()
        },
        Arc::new(SystemClock),
    )
    .expect("engine starts")
}

fn benches(c: &mut Criterion) {
    let oauth2 = std::fs::read(plugin("oauth2_client_credentials")).unwrap();
    let sha = hex::encode(Sha256::digest(&oauth2));

    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    let rt = runtime(None);
    group.bench_function("oauth2 plugin from .wasm", |b| {
        b.iter(|| rt.compile(&oauth2, &sha).unwrap())
    });
    let dir = tempfile::tempdir().unwrap();
    let cached = runtime(Some(dir.path().to_path_buf()));
    cached.compile(&oauth2, &sha).unwrap();
    group.bench_function("oauth2 plugin from precompiled cache", |b| {
        b.iter(|| {
            let (_, source) = cached.compile(&oauth2, &sha).unwrap();
            assert_eq!(source, reauth::runtime::CompileSource::Cache);
        })
    });
    group.finish();

    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let request = Request::new();
    // The hot miss path under each combination of limits, in the same run.
    let load = |options: RuntimeOptions, fuel: Option<u64>| {
        let rt = Runtime::new(options, Arc::new(SystemClock)).expect("engine starts");
        let provider = ProviderRuntime::load(
            &rt,
            ProviderSpec {
                name: "static".into(),
                plugin: plugin("static"),
                sha256: None,
                allowed_hosts: Vec::new(),
                allow_http: false,
                config: vec![("token".into(), Secret::new("t"))],
                limits: {
                    let mut c = LimitsConfig::default();
                    c.fuel = fuel;
                    c
                },
                breaker: BreakerConfig::default(),
                instances: InstancesConfig::default(),
                state_file: None,
                shared_state: false,
                secret_keys: Vec::new(),
                credential_keys: Vec::new(),
                rate: reauth::RateConfig::unlimited(),
            },
        )
        .unwrap();
        (rt, provider)
    };
    let none = RuntimeOptions {
        consume_fuel: false,
        epoch_interruption: false,
        limit_memory: false,
        ..RuntimeOptions::default()
    };
    let variants = [
        ("no limits", none.clone(), None),
        (
            "memory cap",
            RuntimeOptions {
                limit_memory: true,
                ..none.clone()
            },
            None,
        ),
        (
            "epoch deadline",
            RuntimeOptions {
                epoch_interruption: true,
                ..none.clone()
            },
            None,
        ),
        (
            "fuel metering (unlimited)",
            RuntimeOptions {
                consume_fuel: true,
                ..none.clone()
            },
            None,
        ),
        ("all (default engine)", RuntimeOptions::default(), None),
        (
            "all + fuel limit 10M",
            RuntimeOptions::default(),
            Some(10_000_000),
        ),
    ];
    let mut group = c.benchmark_group("static: fresh instance + get-credentials");
    for (label, options, fuel) in variants {
        let (rt, provider) = load(options, fuel);
        group.bench_function(label, |b| {
            b.to_async(&tokio)
                .iter(|| async { provider.get_credentials(&rt, &request).await.unwrap() })
        });
    }
    group.finish();
    let mut group = c.benchmark_group("call");
    let host = Host::builder()
        .provider(
            "static",
            ProviderConfig::new(plugin("static")).config("token", "t"),
        )
        .build()
        .unwrap();
    tokio
        .block_on(host.get_credentials("static", &request))
        .unwrap();
    group.bench_function("static: cached hit through Host", |b| {
        b.to_async(&tokio)
            .iter(|| async { host.get_credentials("static", &request).await.unwrap() })
    });
    group.finish();
}

criterion_group!(runtime_benches, benches);
criterion_main!(runtime_benches);
