//! A small key/value store the host persists per provider, atomically, across calls
//! and restarts: the place for a rotated refresh token. Values are treated as
//! secrets by the host (never logged).

use crate::bindings::reauth::provider::state as raw;

/// The value stored under `key`.
pub fn get(key: &str) -> Option<String> {
    raw::get(key)
}

/// Store `value` under `key`; durable when this returns `Ok`.
pub fn set(key: &str, value: &str) -> Result<(), String> {
    raw::set(key, value)
}

/// Remove `key` (a missing key is not an error).
pub fn delete(key: &str) -> Result<(), String> {
    raw::delete(key)
}
