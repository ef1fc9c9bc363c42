//! `extism-bench PLUGIN.wasm N`: the bench/logic token minting as an Extism plugin,
//! called N times two ways: a new instance from the compiled plugin per call (what
//! reauth does with components), and one reused instance. Prints one JSON line of
//! nanosecond percentiles.

use extism::{CompiledPlugin, Plugin, PluginBuilder};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn percentiles(mut v: Vec<u128>) -> serde_json::Value {
    v.sort();
    let pick = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    let mean = v.iter().sum::<u128>() / v.len() as u128;
    serde_json::json!({"p50_ns": pick(0.5), "p99_ns": pick(0.99), "mean_ns": mean, "n": v.len()})
}

fn input() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    serde_json::json!({"client_id": "svc", "secret": "bench-secret-0123456789", "now": now, "ttl": 300}).to_string()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let wasm = std::fs::read(&args[1]).expect("reading the plugin");
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200);
    let compiled = CompiledPlugin::new(PluginBuilder::new(&wasm).with_wasi(false))
        .expect("compiling the plugin");
    let mut fresh = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let mut plugin = Plugin::new_from_compiled(&compiled).expect("instantiating");
        let out: String = plugin.call("mint", input()).expect("calling mint");
        assert!(out.contains('.'));
        fresh.push(start.elapsed().as_nanos());
    }
    let mut plugin = Plugin::new_from_compiled(&compiled).expect("instantiating");
    let mut reused = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let out: String = plugin.call("mint", input()).expect("calling mint");
        assert!(out.contains('.'));
        reused.push(start.elapsed().as_nanos());
    }
    println!(
        "{}",
        serde_json::json!({"fresh": percentiles(fresh), "reused": percentiles(reused)})
    );
}
