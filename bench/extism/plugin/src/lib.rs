//! bench/logic's token minting as an Extism plugin (the Extism side of the
//! miss-path comparison). Input JSON: client_id, secret, now, ttl.

use extism_pdk::*;

#[derive(serde::Deserialize)]
struct Input {
    client_id: String,
    secret: String,
    now: u64,
    ttl: u64,
}

#[plugin_fn]
pub fn mint(input: String) -> FnResult<String> {
    let i: Input = serde_json::from_str(&input)?;
    let (token, expires) =
        reauth_bench_logic::mint(&i.client_id, i.secret.as_bytes(), i.now, i.ttl);
    Ok(serde_json::json!({"token": token, "expires_at": expires}).to_string())
}
