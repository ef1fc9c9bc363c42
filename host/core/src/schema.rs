//! What a provider says about itself (contract 0.2's `describe`): its name, version
//! and config schema, and the check of a provider's `[providers.<name>.config]`
//! against that schema.
//!
//! A schema is the provider's word on which keys it reads: a key that is not in it
//! is almost always a typo (`token_ulr`), so the check refuses it and suggests the
//! closest declared key; a missing required key and a value that does not parse as
//! its declared type are refused too, each naming the key. The declared `secret`
//! keys are what the host redacts.

use std::fmt;

/// The type a config value must parse as (config values are handed over as text).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ValueType {
    /// Any text.
    Text,
    /// A whole number (`-42`, `3600`).
    Integer,
    /// `true` or `false`.
    Boolean,
    /// An absolute `http://` or `https://` URL.
    Url,
}

// ValueType: its WIT name.
names!(ValueType {
    Text => "text",
    Integer => "integer",
    Boolean => "boolean",
    Url => "url",
});

impl ValueType {
    /// Why `value` is not of this type, if it is not (the message never contains
    /// the value: it may be a secret).
    pub fn check(self, value: &str) -> Option<&'static str> {
        match self {
            ValueType::Text => None,
            ValueType::Integer => value
                .trim()
                .parse::<i64>()
                .err()
                .map(|_| "is not a whole number"),
            ValueType::Boolean => {
                (!matches!(value.trim(), "true" | "false")).then_some("is not `true` or `false`")
            }
            ValueType::Url => {
                let v = value.trim();
                let rest = v
                    .strip_prefix("https://")
                    .or_else(|| v.strip_prefix("http://"));
                match rest {
                    Some(rest)
                        if !rest.is_empty()
                            && !rest.starts_with('/')
                            && !v.chars().any(|c| c.is_whitespace() || c.is_control()) =>
                    {
                        None
                    }
                    _ => Some("is not an absolute http:// or https:// URL"),
                }
            }
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One config key a provider reads.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct ConfigKey {
    /// The key, as written under `[providers.<name>.config]`.
    pub name: String,
    /// What its value must parse as.
    pub value_type: ValueType,
    /// Whether the provider cannot work without it.
    pub required: bool,
    /// Whether its value is a secret (redacted everywhere).
    pub secret: bool,
    /// One line of help.
    pub help: String,
}

impl ConfigKey {
    /// An optional, non-secret text key.
    pub fn new(name: impl Into<String>, value_type: ValueType) -> Self {
        ConfigKey {
            name: name.into(),
            value_type,
            required: false,
            secret: false,
            help: String::new(),
        }
    }

    /// Marked required.
    pub fn required(mut self) -> Self {
        self.required = true;
        self
    }

    /// Marked secret.
    pub fn secret(mut self) -> Self {
        self.secret = true;
        self
    }

    /// With one line of help.
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = help.into();
        self
    }
}

/// A provider's name, version and config schema (`describe`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Descriptor {
    /// The provider's name (empty for a 0.1.0 component, which cannot say).
    pub name: String,
    /// Its version (empty when unknown).
    pub version: String,
    /// The keys it reads; `None`: not declared.
    pub config: Option<Vec<ConfigKey>>,
    /// The contract version the component was built against (`0.1.0`, `0.2.0`).
    pub contract: &'static str,
}

impl Descriptor {
    /// A descriptor for a component that says nothing about itself (0.1.0).
    pub fn undeclared(contract: &'static str) -> Self {
        Descriptor {
            contract,
            ..Descriptor::default()
        }
    }

    /// A 0.2 descriptor.
    pub fn new(
        name: impl Into<String>,
        version: impl Into<String>,
        config: Option<Vec<ConfigKey>>,
    ) -> Self {
        Descriptor {
            name: name.into(),
            version: version.into(),
            config,
            contract: "0.2.0",
        }
    }

    /// The keys declared secret.
    pub fn secret_keys(&self) -> impl Iterator<Item = &str> {
        self.config
            .iter()
            .flatten()
            .filter(|k| k.secret)
            .map(|k| k.name.as_str())
    }

    /// Why the schema itself is unusable (a provider bug), if it is: duplicate or
    /// empty names, more than [`MAX_KEYS`] keys, oversized strings.
    pub fn defect(&self) -> Option<String> {
        let keys = self.config.as_deref().unwrap_or_default();
        if keys.len() > MAX_KEYS {
            return Some(format!(
                "its config schema declares {} keys (at most {MAX_KEYS})",
                keys.len()
            ));
        }
        if self.name.len() > MAX_TEXT || self.version.len() > MAX_TEXT {
            return Some(format!(
                "its name or version is longer than {MAX_TEXT} bytes"
            ));
        }
        if unprintable(&self.name) || unprintable(&self.version) {
            return Some("its name or version holds control or bidi characters".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, key) in keys.iter().enumerate() {
            if key.name.is_empty()
                || key.name.len() > MAX_TEXT
                || key.name.chars().any(|c| c.is_control())
            {
                return Some(format!(
                    "config schema key #{i} has an empty, oversized or unprintable name"
                ));
            }
            if unprintable(&key.name) || unprintable(&key.help) {
                return Some(format!(
                    "config schema key #{i} holds control or bidi characters"
                ));
            }
            if key.help.len() > 4 * MAX_TEXT {
                return Some(format!(
                    "the help of config key `{}` is longer than {} bytes",
                    key.name,
                    4 * MAX_TEXT
                ));
            }
            if !seen.insert(key.name.as_str()) {
                return Some(format!("config key `{}` is declared twice", key.name));
            }
        }
        None
    }
}

/// Control characters (a forged log line, terminal escapes) and bidi overrides
/// (text that reads differently than it is): refused in what a plugin says of
/// itself, which is printed by `reauth check` and logged.
fn unprintable(s: &str) -> bool {
    s.chars()
        .any(|c| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'))
}

/// Most keys a schema may declare.
pub const MAX_KEYS: usize = 256;
/// Longest name, version or key name (help: four times this).
pub const MAX_TEXT: usize = 256;

/// One way a provider's config breaks its schema.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Violation {
    /// The config key concerned.
    pub key: String,
    /// What is wrong (never the value).
    pub problem: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config key `{}`: {}", self.key, self.problem)
    }
}

/// Check `config` (key → resolved value; `None` when the value could not be
/// resolved, e.g. an unset `{ env }`, which is reported elsewhere) against
/// `schema`. Every violation, in key order: unknown keys (with the closest declared
/// key), missing required keys, values of the wrong type.
pub fn check<'a>(
    schema: &[ConfigKey],
    config: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
) -> Vec<Violation> {
    let mut out = Vec::new();
    let given: Vec<(&str, Option<&str>)> = config.into_iter().collect();
    for (key, value) in &given {
        match schema.iter().find(|k| k.name == *key) {
            None => {
                let hint = closest(key, schema.iter().map(|k| k.name.as_str()))
                    .map(|k| format!(" (did you mean `{k}`?)"))
                    .unwrap_or_default();
                let known: Vec<&str> = schema.iter().map(|k| k.name.as_str()).take(20).collect();
                let more = schema.len().saturating_sub(known.len());
                out.push(Violation {
                    key: key.to_string(),
                    problem: format!(
                        "not a key this provider reads{hint}; it reads: {}{}",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        },
                        if more > 0 {
                            format!(" and {more} more")
                        } else {
                            String::new()
                        }
                    ),
                });
            }
            Some(declared) => {
                if let Some(why) = value.and_then(|v| declared.value_type.check(v)) {
                    out.push(Violation {
                        key: key.to_string(),
                        problem: format!("{why} (declared {})", declared.value_type),
                    });
                }
            }
        }
    }
    for declared in schema.iter().filter(|k| k.required) {
        if !given.iter().any(|(k, _)| *k == declared.name) {
            let help = if declared.help.is_empty() {
                String::new()
            } else {
                format!(": {}", declared.help)
            };
            out.push(Violation {
                key: declared.name.clone(),
                problem: format!("required, but not set{help}"),
            });
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// The declared key closest to `key` by edit distance, if one is close (a typo).
fn closest<'a>(key: &str, names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    if key.len() > MAX_TEXT {
        return None;
    }
    // The distance is at least the difference in length: candidates further off
    // than the threshold are skipped before the quadratic part.
    let threshold = |n: &str| 2.max(n.len() / 4);
    names
        .filter(|n| n.len() <= MAX_TEXT && n.len().abs_diff(key.len()) <= threshold(n))
        .map(|n| (edit_distance(key, n), n))
        .filter(|(d, n)| *d <= threshold(n))
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

/// Levenshtein distance with adjacent transpositions counted as one edit.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev2: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(prev2[j - 2] + 1);
            }
            cur[j] = d;
        }
        prev2 = std::mem::replace(&mut prev, cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Vec<ConfigKey> {
        vec![
            ConfigKey::new("token_url", ValueType::Url).required(),
            ConfigKey::new("client_secret", ValueType::Text)
                .required()
                .secret()
                .help("the client's secret"),
            ConfigKey::new("ttl", ValueType::Integer),
            ConfigKey::new("insecure", ValueType::Boolean),
        ]
    }

    #[test]
    fn typos_missing_keys_and_wrong_types_are_named() {
        let v = check(
            &schema(),
            [
                ("token_ulr", Some("https://idp/token")),
                ("ttl", Some("ten")),
                ("insecure", Some("yes")),
            ],
        );
        let shown: Vec<String> = v.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 5, "{shown:#?}");
        assert!(
            shown[0].starts_with(
                "config key `client_secret`: required, but not set: the client's secret"
            ),
            "{shown:#?}"
        );
        assert!(shown[1].contains("`insecure`: is not `true` or `false` (declared boolean)"));
        assert!(
            shown[2]
                .contains("`token_ulr`: not a key this provider reads (did you mean `token_url`?)")
        );
        assert!(shown[3].contains("`token_url`: required, but not set"));
        assert!(shown[4].contains("`ttl`: is not a whole number"));
        assert!(
            !shown
                .iter()
                .any(|s| s.contains("ten") && !s.contains("`ten")),
            "values never shown"
        );
    }

    #[test]
    fn a_valid_config_passes_and_unresolved_values_are_not_typed() {
        let ok = check(
            &schema(),
            [
                ("token_url", Some("http://127.0.0.1:8080/token")),
                ("client_secret", None),
                ("ttl", Some("-3")),
                ("insecure", Some("false")),
            ],
        );
        assert!(ok.is_empty(), "{ok:?}");
    }

    #[test]
    fn urls() {
        for bad in [
            "idp/token",
            "https://",
            "https:///x",
            "ftp://x",
            "https://a b",
            "",
        ] {
            assert!(ValueType::Url.check(bad).is_some(), "{bad}");
        }
        for good in ["https://idp.example/token", "http://127.0.0.1:1/x?y=1"] {
            assert!(ValueType::Url.check(good).is_none(), "{good}");
        }
    }

    #[test]
    fn hostile_schemas_are_refused() {
        let dup = Descriptor::new(
            "x",
            "1",
            Some(vec![ConfigKey::new("a", ValueType::Text); 2]),
        );
        assert!(dup.defect().unwrap().contains("declared twice"));
        let many = Descriptor::new(
            "x",
            "1",
            Some(
                (0..=MAX_KEYS)
                    .map(|i| ConfigKey::new(i.to_string(), ValueType::Text))
                    .collect(),
            ),
        );
        assert!(many.defect().unwrap().contains("257 keys"));
        let long = Descriptor::new(
            "x",
            "1",
            Some(vec![ConfigKey::new("k".repeat(10_000), ValueType::Text)]),
        );
        assert!(long.defect().is_some());
        for forged in [
            "acme\n2026-11-28 ERROR forged",
            "\u{1b}[31mred",
            "\u{202e}txt.exe",
        ] {
            assert!(
                Descriptor::new(forged, "1", None).defect().is_some(),
                "{forged:?}"
            );
            let help = ConfigKey::new("k", ValueType::Text).help(forged);
            assert!(
                Descriptor::new("x", "1", Some(vec![help]))
                    .defect()
                    .is_some()
            );
        }
        // The "it reads" list is bounded, whatever the schema declares.
        let wide: Vec<ConfigKey> = (0..200)
            .map(|i| ConfigKey::new(format!("key_{i}"), ValueType::Text))
            .collect();
        let v = check(&wide, [("nope", Some("v"))]);
        assert!(v[0].problem.ends_with("and 180 more"), "{}", v[0].problem);
        // A huge unknown key does not make the suggestion quadratic.
        let v = check(&schema(), [("x".repeat(1 << 20).as_str(), Some("v"))]);
        assert_eq!(v.len(), 3);
    }

    #[test]
    fn edit_distance_counts_transpositions_once() {
        assert_eq!(edit_distance("token_ulr", "token_url"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("scope", "scopes"), 1);
    }
}
