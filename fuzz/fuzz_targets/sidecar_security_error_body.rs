//! The body of `POST /v1/providers/{name}/security-errors` (`reauth serve`): any
//! bytes parse and convert as the server does (checked expiry arithmetic) into the
//! request, the rejected credential and the error, or a 4xx refusal, never a
//! panic; what converts round-trips through the wire form and shows no secret in
//! `Debug` (checked inside `reauth_cli::server::fuzzing`).
//!
//! Besides raw bytes, the input can be a structured report whose
//! `expires_at_unix` and strings are chosen by the fuzzer, so the numeric edge
//! cases (2^64-1, just past 9999-12-31) are reached at once.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Report {
    kind: u8,
    strings: Vec<String>,
    expires_at_unix: Option<u64>,
    error_kind: u8,
    status: Option<u16>,
}

#[derive(Arbitrary, Debug)]
enum Input<'a> {
    Raw(Option<&'a str>, &'a [u8]),
    Structured(Report),
}

fuzz_target!(|input: Input| {
    match input {
        Input::Raw(content_type, body) => {
            reauth_cli::server::fuzzing::security_error_body(content_type, body);
        }
        Input::Structured(r) => {
            let s = |i: usize| r.strings.get(i).cloned().unwrap_or_default();
            let mut credential = match r.kind % 3 {
                0 => serde_json::json!({"kind": "bearer", "token": s(0)}),
                1 => serde_json::json!({"kind": "basic", "username": s(0), "password": s(1)}),
                _ => serde_json::json!({"kind": "headers", "headers": {s(0): s(1)}}),
            };
            if let Some(t) = r.expires_at_unix {
                credential["expires_at_unix"] = t.into();
            }
            let kind = ["token_expired", "unauthorized", "forbidden", "other"]
                [usize::from(r.error_kind % 4)];
            let mut error = serde_json::json!({"kind": kind, "message": s(2)});
            if let Some(status) = r.status {
                error["status"] = status.into();
            }
            let body = serde_json::json!({
                "request": {"subject": s(3)},
                "credential": credential,
                "error": error,
            });
            reauth_cli::server::fuzzing::security_error_body(
                Some("application/json"),
                body.to_string().as_bytes(),
            );
        }
    }
});
