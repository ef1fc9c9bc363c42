//! Turn servers' authentication failures into [`SecurityError`]s.
//!
//! Embedders call these on the errors their client libraries return, then hand the
//! result to `Host::with_credentials` (or `handle_security_error`). The rules:
//!
//! | source | → kind |
//! | --- | --- |
//! | HTTP 401 + `WWW-Authenticate: Bearer error="invalid_token"` (RFC 6750), description mentioning expiry | `token-expired` |
//! | HTTP 401 otherwise, 407 | `unauthorized` |
//! | HTTP 403, or `error="insufficient_scope"` | `forbidden` |
//! | neo4j `Neo.ClientError.Security.TokenExpired` / `AuthorizationExpired` | `token-expired` |
//! | neo4j `…Security.Unauthorized` / `Forbidden` / other `…Security.*` | `unauthorized` / `forbidden` / `other` |
//! | PostgreSQL SQLSTATE `28P01` (invalid_password), `28000` | `unauthorized` |
//! | Redis `WRONGPASS`, `NOAUTH` / `NOPERM` | `unauthorized` / `forbidden` |
//!
//! Every `WWW-Authenticate` challenge, whatever its scheme (RFC 9110 §11.6.1:
//! `Bearer`, `DPoP`, `Basic`, a company's `AcmeSession error="revoked"`), is parsed
//! into [`SecurityError::challenges`] for the provider to read (contract 0.2); the
//! `code` is the Bearer challenge's `error`, else the first challenge's `error`
//! parameter. [`parse_retry_after`] reads `Retry-After` (delta-seconds or an HTTP
//! date) into [`SecurityError::retry_after`].

use crate::types::{SecurityError, SecurityErrorKind};
use std::time::{Duration, SystemTime};

/// Longest `WWW-Authenticate` value parsed; longer input is truncated.
pub const MAX_HEADER: usize = 8 * 1024;

pub use crate::types::Challenge;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Token(String),
    Quoted(String),
    Equals,
    Comma,
}

fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~/".contains(c)
}

fn lex(input: &str) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut chars = input.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            ' ' | '\t' => {
                chars.next();
            }
            ',' => {
                chars.next();
                out.push(Tok::Comma);
            }
            '=' => {
                chars.next();
                out.push(Tok::Equals);
            }
            '"' => {
                chars.next();
                let mut s = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(escaped) = chars.next() {
                                s.push(escaped);
                            }
                        }
                        c => s.push(c),
                    }
                }
                out.push(Tok::Quoted(s));
            }
            c if is_tchar(c) => {
                let mut s = String::new();
                while let Some(&c) = chars.peek() {
                    if !is_tchar(c) {
                        break;
                    }
                    s.push(c);
                    chars.next();
                }
                out.push(Tok::Token(s));
            }
            _ => {
                // Not allowed here: skip it rather than fail the whole header.
                chars.next();
            }
        }
    }
    out
}

/// Parse a `WWW-Authenticate` (or `Proxy-Authenticate`) value into its challenges.
/// Never panics; malformed parts are skipped; input beyond [`MAX_HEADER`] is ignored.
pub fn parse_www_authenticate(value: &str) -> Vec<Challenge> {
    let mut end = value.len().min(MAX_HEADER);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    let toks = lex(&value[..end]);
    let mut challenges: Vec<Challenge> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let Tok::Token(scheme) = &toks[i] else {
            i += 1;
            continue;
        };
        let mut challenge = Challenge {
            scheme: scheme.clone(),
            token68: None,
            params: Vec::new(),
        };
        i += 1;
        // token68: a token followed only by `=` padding, then a comma or the end.
        if let Some(Tok::Token(t)) = toks.get(i) {
            let mut j = i + 1;
            let mut padding = String::new();
            while toks.get(j) == Some(&Tok::Equals) {
                padding.push('=');
                j += 1;
            }
            let ends = matches!(toks.get(j), None | Some(Tok::Comma));
            let is_param = !padding.is_empty()
                && padding.len() == 1
                && matches!(toks.get(j), Some(Tok::Token(_)) | Some(Tok::Quoted(_)));
            if ends && !is_param {
                challenge.token68 = Some(format!("{t}{padding}"));
                challenges.push(challenge);
                i = j;
                continue;
            }
        }
        // auth-params: name = (token | quoted), separated by commas, until a
        // token that is not followed by `=` starts the next challenge.
        loop {
            match (toks.get(i), toks.get(i + 1), toks.get(i + 2)) {
                (
                    Some(Tok::Token(name)),
                    Some(Tok::Equals),
                    Some(Tok::Token(v) | Tok::Quoted(v)),
                ) => {
                    challenge
                        .params
                        .push((name.to_ascii_lowercase(), v.clone()));
                    i += 3;
                }
                (Some(Tok::Token(name)), Some(Tok::Equals), _) => {
                    challenge
                        .params
                        .push((name.to_ascii_lowercase(), String::new()));
                    i += 2;
                }
                (Some(Tok::Comma), _, _) => {
                    i += 1;
                }
                _ => break,
            }
            // After a comma, a token not followed by `=` is the next scheme.
            if let (Some(Tok::Token(_)), next) = (toks.get(i), toks.get(i + 1))
                && next != Some(&Tok::Equals)
            {
                break;
            }
        }
        challenges.push(challenge);
    }
    challenges
}

/// The error code the challenges carry: the Bearer challenge's `error`, else the
/// first challenge's `error` parameter (`AcmeSession error="revoked"`).
pub fn challenge_code(challenges: &[Challenge]) -> Option<&str> {
    challenges
        .iter()
        .find(|c| c.scheme.eq_ignore_ascii_case("bearer"))
        .and_then(|c| c.param("error"))
        .or_else(|| challenges.iter().find_map(|c| c.param("error")))
}

fn mentions_expiry(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("expired")
        || t.contains("expiry")
        || t.contains("expires")
        || t.contains("exp claim")
}

/// Classify an HTTP response. `www_authenticate` is the header value (or
/// `Proxy-Authenticate` for 407), `body` an optional JSON/text body whose
/// `error_description` may mention expiry. `None` for statuses that are not
/// authentication failures.
pub fn from_http(
    status: u16,
    www_authenticate: Option<&str>,
    body: Option<&str>,
) -> Option<SecurityError> {
    if !matches!(status, 401 | 403 | 407) {
        return None;
    }
    let challenges = www_authenticate
        .map(parse_www_authenticate)
        .unwrap_or_default();
    let bearer = challenges
        .iter()
        .find(|c| c.scheme.eq_ignore_ascii_case("bearer"));
    let code = challenge_code(&challenges).map(str::to_string);
    let description = bearer
        .and_then(|c| c.param("error_description"))
        .map(str::to_string)
        .or_else(|| {
            let body = body?;
            let json: serde_json::Value = serde_json::from_str(body).ok()?;
            json.get("error_description")
                .or_else(|| json.get("message"))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        });
    // A non-Bearer scheme's own code may say it (`AcmeSession error="expired"`).
    let code_says_expired = bearer.is_none() && code.as_deref().is_some_and(mentions_expiry);
    let expired = code_says_expired
        || description.as_deref().is_some_and(mentions_expiry)
        || body.is_some_and(|b| b.len() <= MAX_HEADER && mentions_expiry(b));
    let kind = match (status, code.as_deref()) {
        (403, _) | (_, Some("insufficient_scope")) => SecurityErrorKind::Forbidden,
        (401, _) if code_says_expired => SecurityErrorKind::TokenExpired,
        (401, Some("invalid_token")) | (401, None) if expired => SecurityErrorKind::TokenExpired,
        _ => SecurityErrorKind::Unauthorized,
    };
    Some(SecurityError {
        kind,
        code,
        status: Some(status),
        message: description,
        challenges,
        retry_after: None,
    })
}

/// Longest `Retry-After` honoured: a day (a larger value is clamped to it).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Parse a `Retry-After` value (RFC 9110 §10.2.3): delta-seconds, or an HTTP date
/// (taken relative to `now`; a date in the past is zero). Clamped to
/// [`MAX_RETRY_AFTER`]; `None` for anything else. Never panics.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() || value.len() > 64 {
        return None;
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        // Any number of digits: a value past u64 is "very long", not an error.
        let secs = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

/// Classify a neo4j status code (`Neo.ClientError.Security.*`); `None` for codes
/// outside the security classification.
pub fn from_neo4j(code: &str, message: Option<&str>) -> Option<SecurityError> {
    let rest = code.strip_prefix("Neo.ClientError.Security.")?;
    let kind = match rest {
        "TokenExpired" | "AuthorizationExpired" => SecurityErrorKind::TokenExpired,
        "Unauthorized" | "CredentialsExpired" => SecurityErrorKind::Unauthorized,
        "Forbidden" => SecurityErrorKind::Forbidden,
        _ => SecurityErrorKind::Other,
    };
    Some(SecurityError {
        challenges: Vec::new(),
        retry_after: None,
        kind,
        code: Some(code.to_string()),
        status: None,
        message: message.map(str::to_string),
    })
}

/// Classify a PostgreSQL SQLSTATE; `None` for non-authentication errors.
pub fn from_postgres(sqlstate: &str, message: Option<&str>) -> Option<SecurityError> {
    let kind = match sqlstate {
        "28P01" | "28000" => SecurityErrorKind::Unauthorized,
        "42501" => SecurityErrorKind::Forbidden,
        _ => return None,
    };
    Some(SecurityError {
        challenges: Vec::new(),
        retry_after: None,
        kind,
        code: Some(sqlstate.to_string()),
        status: None,
        message: message.map(str::to_string),
    })
}

/// Classify a Redis error reply (`-WRONGPASS …`, `-NOAUTH …`, `-NOPERM …`).
pub fn from_redis(reply: &str) -> Option<SecurityError> {
    let reply = reply.trim_start_matches('-');
    let prefix = reply.split_whitespace().next()?;
    let kind = match prefix {
        "WRONGPASS" | "NOAUTH" => SecurityErrorKind::Unauthorized,
        "NOPERM" => SecurityErrorKind::Forbidden,
        _ => return None,
    };
    Some(SecurityError {
        challenges: Vec::new(),
        retry_after: None,
        kind,
        code: Some(prefix.to_string()),
        status: None,
        message: Some(reply.chars().take(512).collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc6750_and_multiple_challenges() {
        let c = parse_www_authenticate(
            r#"Bearer realm="example", error="invalid_token", error_description="The access token expired""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].param("ERROR"), Some("invalid_token"));
        assert_eq!(
            c[0].param("error_description"),
            Some("The access token expired")
        );
        let c = parse_www_authenticate(
            r#"Newauth realm="apps", type=1, title="Login to \"apps\"", Basic realm="simple""#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].param("title"), Some(r#"Login to "apps""#));
        assert_eq!(c[1].scheme, "Basic");
        assert_eq!(c[1].param("realm"), Some("simple"));
        let c = parse_www_authenticate("Negotiate YIIB5gYGKwYBBQUCoII=, Bearer");
        assert_eq!(c[0].token68.as_deref(), Some("YIIB5gYGKwYBBQUCoII="));
        assert_eq!(c[1].scheme, "Bearer");
    }

    #[test]
    fn hostile_headers_do_not_panic() {
        for input in [
            "",
            "=",
            ",,,",
            "\"",
            "Bearer \"unterminated",
            "Bearer error=",
            "Bearer ===",
            "é\u{0}\u{7f}",
            "Bearer a=\"\\",
            "Bearer ,, error=\"x\",",
            &"Bearer a=b, ".repeat(5000),
            &"\"".repeat(20_000),
        ] {
            let _ = parse_www_authenticate(input);
            let _ = from_http(401, Some(input), Some(input));
        }
        let long = "é".repeat(MAX_HEADER);
        let _ = parse_www_authenticate(&long);
    }

    /// Randomised hostile input, biased towards the grammar's special characters:
    /// the parser never panics, and what it returns is well-formed.
    #[test]
    fn random_headers_never_panic_and_parse_to_well_formed_challenges() {
        let alphabet: Vec<char> =
            "Bearer basic=,\" \\\t\r\n\0é漢🦀=====,,,\"\"abcXYZ019-._~+/!#$%&'*^`|"
                .chars()
                .collect();
        for round in 0..10_000u32 {
            let len = (rand::random::<u32>() % 96) as usize + usize::from(round % 7 == 0) * 4000;
            let input: String = (0..len)
                .map(|_| alphabet[rand::random::<u32>() as usize % alphabet.len()])
                .collect();
            for c in parse_www_authenticate(&input) {
                assert!(!c.scheme.is_empty());
                assert!(c.scheme.chars().all(is_tchar), "{:?}", c.scheme);
                for (k, _) in &c.params {
                    assert_eq!(k, &k.to_ascii_lowercase());
                }
            }
            let status = [401, 403, 407][round as usize % 3];
            let e = from_http(status, Some(&input), Some(&input)).expect("auth statuses classify");
            assert_eq!(e.status, Some(status));
        }
    }

    #[test]
    fn any_scheme_is_parsed_and_its_error_code_read() {
        let e = from_http(
            401,
            Some(r#"AcmeSession realm="acme", error="expired", Basic realm="x""#),
            None,
        )
        .unwrap();
        assert_eq!(e.kind, SecurityErrorKind::TokenExpired);
        assert_eq!(e.code.as_deref(), Some("expired"));
        assert_eq!(e.challenges.len(), 2);
        assert_eq!(e.challenges[0].scheme, "AcmeSession");
        assert_eq!(e.challenges[0].param("ERROR"), Some("expired"));
        assert_eq!(e.challenges[1].scheme, "Basic");
        let revoked = from_http(401, Some(r#"AcmeSession error="revoked""#), None).unwrap();
        assert_eq!(revoked.kind, SecurityErrorKind::Unauthorized);
        assert_eq!(revoked.code.as_deref(), Some("revoked"));
        // A Bearer challenge's code wins over another scheme's.
        let both = from_http(
            401,
            Some(r#"AcmeSession error="expired", Bearer error="invalid_token""#),
            None,
        )
        .unwrap();
        assert_eq!(both.code.as_deref(), Some("invalid_token"));
        assert_eq!(both.kind, SecurityErrorKind::Unauthorized);
        let negotiate = from_http(401, Some("Negotiate YIIBhgYGKwYBBQUCoII="), None).unwrap();
        assert_eq!(
            negotiate.challenges[0].token68.as_deref(),
            Some("YIIBhgYGKwYBBQUCoII=")
        );
        assert_eq!(negotiate.code, None);
    }

    #[test]
    fn retry_after_takes_seconds_and_dates_and_survives_extremes() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        for huge in [
            "18446744073709551615",
            "99999999999999999999999999999999999999",
        ] {
            assert_eq!(parse_retry_after(huge, now), Some(MAX_RETRY_AFTER));
        }
        let far = httpdate::fmt_http_date(now + Duration::from_secs(10 * 365 * 86_400));
        assert_eq!(parse_retry_after(&far, now), Some(MAX_RETRY_AFTER));
        for bad in [
            "",
            "-1",
            "1.5",
            "soon",
            "Mon, 99 Foo 2024",
            &"9".repeat(100),
        ] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn classifies_http() {
        let expired = from_http(
            401,
            Some(r#"Bearer error="invalid_token", error_description="jwt expired""#),
            None,
        )
        .unwrap();
        assert_eq!(expired.kind, SecurityErrorKind::TokenExpired);
        assert_eq!(expired.code.as_deref(), Some("invalid_token"));
        assert_eq!(expired.status, Some(401));
        let bad = from_http(
            401,
            Some(r#"Bearer error="invalid_token", error_description="signature invalid""#),
            None,
        )
        .unwrap();
        assert_eq!(bad.kind, SecurityErrorKind::Unauthorized);
        assert_eq!(
            from_http(401, Some("Basic realm=x"), None).unwrap().kind,
            SecurityErrorKind::Unauthorized
        );
        assert_eq!(
            from_http(403, None, None).unwrap().kind,
            SecurityErrorKind::Forbidden
        );
        assert_eq!(
            from_http(401, Some(r#"Bearer error="insufficient_scope""#), None)
                .unwrap()
                .kind,
            SecurityErrorKind::Forbidden
        );
        assert_eq!(
            from_http(407, None, None).unwrap().kind,
            SecurityErrorKind::Unauthorized
        );
        let body = r#"{"error":"invalid_token","error_description":"Token has expired"}"#;
        assert_eq!(
            from_http(401, None, Some(body)).unwrap().kind,
            SecurityErrorKind::TokenExpired
        );
        assert_eq!(from_http(500, None, None), None);
        assert_eq!(from_http(200, Some("Bearer"), None), None);
    }

    #[test]
    fn classifies_databases() {
        let k = |e: Option<SecurityError>| e.map(|e| e.kind);
        assert_eq!(
            k(from_neo4j("Neo.ClientError.Security.TokenExpired", None)),
            Some(SecurityErrorKind::TokenExpired)
        );
        assert_eq!(
            k(from_neo4j(
                "Neo.ClientError.Security.AuthorizationExpired",
                None
            )),
            Some(SecurityErrorKind::TokenExpired)
        );
        assert_eq!(
            k(from_neo4j("Neo.ClientError.Security.Unauthorized", None)),
            Some(SecurityErrorKind::Unauthorized)
        );
        assert_eq!(
            k(from_neo4j("Neo.ClientError.Security.Forbidden", None)),
            Some(SecurityErrorKind::Forbidden)
        );
        assert_eq!(
            k(from_neo4j(
                "Neo.ClientError.Security.AuthenticationRateLimit",
                None
            )),
            Some(SecurityErrorKind::Other)
        );
        assert_eq!(
            k(from_neo4j("Neo.ClientError.Statement.SyntaxError", None)),
            None
        );
        assert_eq!(
            k(from_postgres(
                "28P01",
                Some("password authentication failed")
            )),
            Some(SecurityErrorKind::Unauthorized)
        );
        assert_eq!(k(from_postgres("23505", None)), None);
        assert_eq!(
            k(from_redis("-WRONGPASS invalid username-password pair")),
            Some(SecurityErrorKind::Unauthorized)
        );
        assert_eq!(
            k(from_redis("NOAUTH Authentication required.")),
            Some(SecurityErrorKind::Unauthorized)
        );
        assert_eq!(
            k(from_redis("NOPERM this user has no permissions")),
            Some(SecurityErrorKind::Forbidden)
        );
        assert_eq!(k(from_redis("ERR unknown command")), None);
    }
}
