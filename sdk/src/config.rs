//! The provider's configuration (`[providers.<name>.config]` in `reauth.toml`),
//! delivered by the host through `wasi:config`. Secret references (`{ env = … }`,
//! `{ file = … }`) are already resolved by the host.

use crate::ProviderError;
use crate::bindings::wasi::config::store;

/// The value of `key`, if set.
pub fn get(key: &str) -> Result<Option<String>, ProviderError> {
    store::get(key).map_err(|e| {
        let detail = match e {
            store::Error::Upstream(m) | store::Error::Io(m) => m,
        };
        ProviderError::Misconfigured(format!("reading config key `{key}`: {detail}"))
    })
}

/// The value of `key`; a `misconfigured` error naming the key if it is missing or empty.
pub fn required(key: &str) -> Result<String, ProviderError> {
    match get(key)? {
        Some(v) if !v.is_empty() => Ok(v),
        Some(_) => Err(ProviderError::Misconfigured(format!(
            "config key `{key}` is empty"
        ))),
        None => Err(ProviderError::Misconfigured(format!(
            "missing config key `{key}`"
        ))),
    }
}

/// The value of `key`, or `default` when it is not set.
pub fn or(key: &str, default: &str) -> Result<String, ProviderError> {
    Ok(get(key)?.unwrap_or_else(|| default.to_string()))
}

/// Every configured key and value.
pub fn all() -> Result<Vec<(String, String)>, ProviderError> {
    store::get_all().map_err(|_| ProviderError::Misconfigured("reading config failed".into()))
}
