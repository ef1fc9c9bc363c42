//! Read a JWT's claims **without verifying** it: enough to learn when a token
//! expires and whom it names. Never use this to make a trust decision.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

/// The registered claims a provider usually needs.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct Claims {
    /// Expiry, seconds since the Unix epoch.
    pub exp: Option<u64>,
    /// Issued-at, seconds since the Unix epoch.
    pub iat: Option<u64>,
    /// Issuer.
    pub iss: Option<String>,
    /// Subject.
    pub sub: Option<String>,
}

impl Claims {
    /// `iss|sub`, the stable identity of the token, when both are present.
    pub fn principal(&self) -> Option<String> {
        Some(format!("{}|{}", self.iss.as_ref()?, self.sub.as_ref()?))
    }
}

/// The claims of `token` if it looks like a JWT (three dot-separated parts with a
/// base64url JSON payload); `None` for opaque tokens.
pub fn peek(token: &str) -> Option<Claims> {
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}
