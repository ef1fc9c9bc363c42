//! `reauth.toml` parsing and validation: any text gives a config or an error that
//! names a place, never a panic; errors never echo an inline config value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reauth::HostConfig;
use std::path::{Path, PathBuf};

fuzz_target!(|text: &str| {
    match HostConfig::from_toml(text, Some(Path::new("reauth.toml")), PathBuf::from(".")) {
        Ok(config) => {
            // Debug output of a parsed config never shows inline values.
            let debug = format!("{config:?}");
            for p in config.providers.values() {
                for value in p.config.values() {
                    if let reauth::config::ConfigValue::Value(secret) = value {
                        let s = secret.expose();
                        if s.len() >= 12 && !s.contains("redacted") {
                            assert!(!debug.contains(s), "Debug shows a config value");
                        }
                    }
                }
            }
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with("reauth.toml"), "{message}");
        }
    }
});
