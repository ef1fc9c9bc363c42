//! [`Secret`]: a string that never shows itself by accident.

use std::fmt;

/// A secret value: a password, token, client secret or resolved config reference.
///
/// `Debug` and `Display` print `[redacted]`; the value is only reachable through
/// [`Secret::expose`], so every place that handles the raw secret is greppable.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The raw secret.
    ///
    /// **Security:** the returned value must not be logged, put in an error message
    /// or exported as a metric. Hand it to the client library that needs it and
    /// nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// The value is overwritten with zeros when the secret is dropped (what the
/// allocator hands out next does not hold it). Copies made through
/// [`Secret::expose`] are the caller's to handle.
impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_string())
    }
}

/// Whether `a` and `b` are equal, in time that depends on their lengths only (for
/// comparing a presented secret with the expected one).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&s)), "Some([redacted])");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(super::constant_time_eq(b"api-token", b"api-token"));
        assert!(!super::constant_time_eq(b"api-token", b"api-tokem"));
        assert!(!super::constant_time_eq(b"api-token", b"api-token-longer"));
        assert!(!super::constant_time_eq(b"", b"x"));
    }
}
