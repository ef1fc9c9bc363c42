//! Runtime costs: compiling a plugin, loading it from the precompiled cache, and
//! the per-call price of a fresh sandbox (instantiate + `get-credentials`).
//!
//! Needs the plugins built first: `make bench` does both.

#![allow(missing_docs)]

mod common;
use common::plugin;

use criterion::{Criterion, criterion_group, criterion_main};
use reauth::clock::SystemClock;
use reauth::config::LimitsConfig;
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
    let static_ = ProviderRuntime::load(
        &rt,
        ProviderSpec {
            name: "static".into(),
            plugin: plugin("static"),
            sha256: None,
            allowed_hosts: Vec::new(),
            config: vec![("token".into(), Secret::new("t"))],
            limits: LimitsConfig::default(),
            state_file: None,
        },
    )
    .unwrap();
    let request = Request::new();
    let mut group = c.benchmark_group("call");
    group.bench_function("static: fresh instance + get-credentials", |b| {
        b.to_async(&tokio)
            .iter(|| async { static_.get_credentials(&rt, &request).await.unwrap() })
    });
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
