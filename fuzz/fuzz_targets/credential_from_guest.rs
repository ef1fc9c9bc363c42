//! Credentials crossing the WIT boundary from a plugin: whatever a plugin returns
//! is converted or refused without a panic, the size limit holds, and no secret
//! shows in `Debug` output or in the refusal message (checked inside
//! `reauth::runtime::fuzzing`).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    kind: u8,
    strings: Vec<String>,
    expires: Option<(u64, u32)>,
    principal: Option<String>,
    max_bytes: u16,
    /// A JWT payload for bearer tokens (e.g. `{"exp": 18446744073709551615}`).
    jwt_payload: Option<Vec<u8>>,
    now_secs: u64,
}

fuzz_target!(|input: Input| {
    reauth::runtime::fuzzing::credential_from_guest(
        input.kind,
        &input.strings,
        input.expires,
        input.principal,
        u64::from(input.max_bytes),
        input.jwt_payload.as_deref(),
        input.now_secs,
    );
});
