//! The host's wall clock (virtual in tests, so expiry logic stays testable).

use crate::Datetime;
use crate::bindings::wasi::clocks::wall_clock;

/// Now, as seconds and nanoseconds since the Unix epoch.
pub fn now() -> Datetime {
    let now = wall_clock::now();
    Datetime {
        seconds: now.seconds,
        nanoseconds: now.nanoseconds,
    }
}

/// Now, as whole seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    now().seconds
}
