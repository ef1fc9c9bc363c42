//! The redaction of known secret values (config secrets, the credential a call
//! returned, borrowed credentials) in a plugin's captured output.

use std::borrow::Cow;

/// Replaces every occurrence of known secret values with `[redacted]`.
///
/// Values shorter than [`Redactor::MIN_LEN`] are not searched for: they would
/// shred ordinary text, and a secret that short is not protected by redaction
/// anyway.
#[derive(Debug, Default, Clone)]
pub(crate) struct Redactor {
    needles: Vec<String>,
}

impl Redactor {
    /// Shortest value redacted.
    pub(crate) const MIN_LEN: usize = 6;

    /// Add a value to redact.
    pub(crate) fn add(&mut self, value: &str) {
        if value.len() >= Self::MIN_LEN && !self.needles.iter().any(|n| n == value) {
            self.needles.push(value.to_string());
            // Longest first, so that a secret containing another is removed whole.
            self.needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        }
    }

    /// `text` with every known secret replaced.
    pub(crate) fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for needle in &self.needles {
            if out.contains(needle.as_str()) {
                out = Cow::Owned(out.replace(needle.as_str(), "[redacted]"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redactor_replaces_known_values_longest_first() {
        let mut r = Redactor::default();
        r.add("s3cret-token");
        r.add("s3cret-token-and-more");
        r.add("abc"); // too short to redact
        assert_eq!(
            r.redact("a s3cret-token-and-more b s3cret-token c abc"),
            "a [redacted] b [redacted] c abc"
        );
        assert!(matches!(r.redact("nothing here"), Cow::Borrowed(_)));
    }
}
