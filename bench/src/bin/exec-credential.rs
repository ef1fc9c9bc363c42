//! The exec-credential-plugin side of the comparison: the same logic as the
//! `bench-logic` component, as a native program that client-go / the AWS CLI / git
//! would spawn per credential fetch. Prints a Kubernetes `ExecCredential`.
//! Config from the environment, as kubeconfig `exec.env` would pass it:
//! `BENCH_CLIENT_ID`, `BENCH_SECRET`, `BENCH_TTL` (default 300).

use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    let client_id = std::env::var("BENCH_CLIENT_ID").unwrap_or_else(|_| "svc".into());
    let secret = std::env::var("BENCH_SECRET").unwrap_or_default();
    let ttl: u64 = std::env::var("BENCH_TTL")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(300);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (token, expires) = reauth_bench_logic::mint(&client_id, secret.as_bytes(), now, ttl);
    let expires = time::OffsetDateTime::from_unix_timestamp(expires as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    println!(
        "{}",
        serde_json::json!({
            "apiVersion": "client.authentication.k8s.io/v1",
            "kind": "ExecCredential",
            "status": {"token": token, "expirationTimestamp": expires},
        })
    );
}
