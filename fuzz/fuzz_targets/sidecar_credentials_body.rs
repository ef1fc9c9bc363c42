//! The body of `POST /v1/providers/{name}/credentials` (`reauth serve`): any bytes,
//! with or without a content type, parse and convert as the server does into a
//! request or a 4xx refusal with a message, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Option<&str>, &[u8])| {
    let (content_type, body) = input;
    reauth_cli::server::fuzzing::credentials_body(content_type, body);
    // The common case, as real clients send it.
    reauth_cli::server::fuzzing::credentials_body(Some("application/json"), body);
});
