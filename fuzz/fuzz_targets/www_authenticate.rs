//! The `WWW-Authenticate` parser and the HTTP classifier: any header value and body
//! give challenges / a classification, never a panic, in bounded output.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reauth::classify::{from_http, parse_www_authenticate};

fuzz_target!(|input: (u16, &str, Option<&str>)| {
    let (status, header, body) = input;
    let challenges = parse_www_authenticate(header);
    let total: usize = challenges
        .iter()
        .map(|c| {
            c.scheme.len()
                + c.token68.as_ref().map_or(0, |t| t.len())
                + c.params.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        })
        .sum();
    assert!(total <= header.len(), "output larger than input");
    for c in &challenges {
        assert!(!c.scheme.is_empty());
        for (name, _) in &c.params {
            assert_eq!(name, &name.to_ascii_lowercase());
        }
    }
    if let Some(e) = from_http(status, Some(header), body) {
        assert!(matches!(status, 401 | 403 | 407));
        let _ = format!("{e:?}");
    }
});
