//! The provider logic every benchmark variant runs, so the comparison measures the
//! plugin mechanism and not the logic: mint an HMAC-SHA256-signed token for a client
//! (what a small token service or a signing credential plugin does), valid `ttl`
//! seconds from `now`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};

/// A signed token `payload.signature` (both base64url) and its expiry.
pub fn mint(client_id: &str, secret: &[u8], now: u64, ttl: u64) -> (String, u64) {
    let expires = now + ttl;
    let payload = format!("{{\"sub\":\"{client_id}\",\"iat\":{now},\"exp\":{expires}}}");
    let payload = URL_SAFE_NO_PAD.encode(payload);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(payload.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    (format!("{payload}.{signature}"), expires)
}

#[cfg(test)]
mod tests {
    #[test]
    fn deterministic_and_keyed() {
        let a = super::mint("svc", b"k1", 100, 60);
        assert_eq!(a, super::mint("svc", b"k1", 100, 60));
        assert_ne!(a.0, super::mint("svc", b"k2", 100, 60).0);
        assert_eq!(a.1, 160);
    }
}
