//! `aws-sts`: AWS credentials from STS `AssumeRoleWithWebIdentity`: an OIDC token
//! in (usually another reauth provider's, `web_identity_token = { credential =
//! "oidc" }`), temporary AWS credentials out, as the headers
//! `aws-access-key-id`, `aws-secret-access-key` and `aws-session-token` that
//! `reauth aws-credential-process` turns into the AWS CLI's and SDKs' format,
//! expiring at STS's `Expiration`.
//!
//! `AssumeRoleWithWebIdentity` is not signed (the web identity token is the
//! proof), so the provider needs no AWS keys of its own: it POSTs the form
//! `Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn=…&
//! RoleSessionName=…&WebIdentityToken=…[&DurationSeconds=…]` to `sts_url` and
//! reads the XML answer.
//!
//! Errors:
//! - `AccessDenied` (the role's trust policy does not take this identity) is
//!   `misconfigured`;
//! - `InvalidIdentityToken`, `ExpiredTokenException`, `IDPRejectedClaim` (and any
//!   other 401/403) are `denied`: when the token came from another provider the
//!   host then reports that token as rejected to it and tries once more with a
//!   fresh one;
//! - `IDPCommunicationError`, throttling, 429 and 5xx are `unavailable`, with
//!   STS's `Retry-After` when it sends one;
//! - anything else (a malformed role ARN, a duration the role does not allow) is
//!   `misconfigured`, with STS's own message.
//!
//! A security error from an AWS service (`ExpiredToken`, `InvalidClientTokenId`,
//! `RequestExpired`, 401) means refresh-and-retry; other 403s (`AccessDenied`:
//! the role lacks a permission) fail — new credentials for the same role would be
//! refused the same way.

use reauth_sdk::http::Request as HttpRequest;
use reauth_sdk::{
    ConfigKey, Credentials, Decision, Descriptor, Provider, ProviderError, Request, SecurityError,
    SecurityErrorKind, config, time,
};

struct AwsSts;

/// STS error codes that mean "this web identity token is not acceptable" (a
/// fresh one may be).
const TOKEN_REJECTED: &[&str] = &[
    "InvalidIdentityToken",
    "ExpiredTokenException",
    "IDPRejectedClaim",
];

/// STS error codes that are an outage rather than a refusal.
const TRANSIENT: &[&str] = &[
    "IDPCommunicationError",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "ServiceUnavailable",
    "InternalFailure",
];

/// AWS service error codes (in a security error's `code`) that new credentials fix.
const STALE_CREDENTIALS: &[&str] = &[
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidClientTokenId",
    "RequestExpired",
    "InvalidToken",
    "TokenRefreshRequired",
];

impl Provider for AwsSts {
    fn describe() -> Descriptor {
        Descriptor::new()
            .key(
                ConfigKey::text(
                    "role_arn",
                    "the IAM role to assume (arn:aws:iam::<account>:role/<name>)",
                )
                .required(),
            )
            .key(
                ConfigKey::text(
                    "web_identity_token",
                    "the OIDC token: { credential = \"<provider>\" } or { file = \"…\" }",
                )
                .required()
                .secret(),
            )
            .key(ConfigKey::url(
                "sts_url",
                "the STS endpoint (default https://sts.amazonaws.com; regional: https://sts.<region>.amazonaws.com)",
            ))
            .key(ConfigKey::text(
                "session_name",
                "RoleSessionName (default `reauth`, or `reauth-<subject>` for a subject)",
            ))
            .key(ConfigKey::integer(
                "duration_secs",
                "DurationSeconds (900 to the role's maximum; default STS's 3600)",
            ))
            .key(ConfigKey::integer(
                "timeout_ms",
                "timeout towards STS (ms, default 10000)",
            ))
    }

    fn get_credentials(request: Request) -> Result<Credentials, ProviderError> {
        let url = config::or("sts_url", "https://sts.amazonaws.com")?;
        let role_arn = config::required("role_arn")?;
        let token = config::required("web_identity_token")?;
        let session = match (config::get("session_name")?, &request.subject) {
            (Some(name), _) => name,
            (None, Some(subject)) => session_name(subject),
            (None, None) => "reauth".to_string(),
        };
        let timeout_ms = number("timeout_ms")?.unwrap_or(10_000);
        let duration = number("duration_secs")?.map(|d| d.to_string());
        let mut form = vec![
            ("Action", "AssumeRoleWithWebIdentity"),
            ("Version", "2011-06-15"),
            ("RoleArn", role_arn.as_str()),
            ("RoleSessionName", session.as_str()),
            ("WebIdentityToken", token.as_str()),
        ];
        if let Some(d) = &duration {
            form.push(("DurationSeconds", d));
        }
        let response = HttpRequest::post(url.trim_end_matches('/'))
            .header("accept", "text/xml")
            .form(&form)
            .timeout_ms(timeout_ms)
            .send()?;
        let body = response.text();
        if response.status == 200 {
            return credentials(&body);
        }
        // STS may quote the request: the token never goes into a message (the
        // host redacts it too, but only whole; a cut token would slip through).
        let body = body.replace(token.as_str(), "[web identity token]");
        let code = tag(&body, "Code").unwrap_or_default();
        let message: String = match tag(&body, "Message") {
            Some(m) => m.chars().take(500).collect(),
            None if body.trim_start().starts_with('<') => "(no message)".into(),
            None => body.chars().take(200).collect(),
        };
        let what = if code.is_empty() {
            format!("STS answered HTTP {}: {message}", response.status)
        } else {
            format!("STS answered HTTP {} {code}: {message}", response.status)
        };
        if code == "AccessDenied" {
            // The token is fine; the role's trust policy does not take it (a new
            // token would be refused the same way).
            Err(ProviderError::misconfigured(format!(
                "the role's trust policy does not allow this identity: {what}"
            )))
        } else if TOKEN_REJECTED.contains(&code.as_str()) || matches!(response.status, 401 | 403) {
            Err(ProviderError::denied(format!(
                "the web identity token was refused: {what}"
            )))
        } else if TRANSIENT.contains(&code.as_str())
            || response.status == 429
            || response.status >= 500
        {
            Err(ProviderError::unavailable(what).retry_after_ms(response.retry_after_ms()))
        } else {
            Err(ProviderError::misconfigured(what))
        }
    }

    fn handle_security_error(_: Request, _: Credentials, error: SecurityError) -> Decision {
        let code = error.code.as_deref().unwrap_or_default();
        if STALE_CREDENTIALS.contains(&code) {
            return Decision::RefreshAndRetry;
        }
        match error.kind {
            SecurityErrorKind::TokenExpired | SecurityErrorKind::Unauthorized => {
                Decision::RefreshAndRetry
            }
            SecurityErrorKind::Forbidden | SecurityErrorKind::Other => Decision::Fail,
        }
    }
}

/// A whole-number config value, if set.
fn number(key: &str) -> Result<Option<u64>, ProviderError> {
    config::get(key)?
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| ProviderError::misconfigured(format!("`{key}` is not a number")))
        })
        .transpose()
}

/// A RoleSessionName for a subject: STS takes 2–64 of `[\w+=,.@-]`.
fn session_name(subject: &str) -> String {
    let cleaned: String = subject
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(56)
        .collect();
    format!("reauth-{cleaned}")
}

/// The credentials of a successful `AssumeRoleWithWebIdentityResponse`.
fn credentials(body: &str) -> Result<Credentials, ProviderError> {
    let field = |name: &str| {
        tag(body, name).filter(|v| !v.is_empty()).ok_or_else(|| {
            ProviderError::unavailable(format!(
                "STS's answer has no `{name}` (not an AssumeRoleWithWebIdentity response?)"
            ))
        })
    };
    let (key_id, secret, session) = (
        field("AccessKeyId")?,
        field("SecretAccessKey")?,
        field("SessionToken")?,
    );
    let expiration = field("Expiration")?;
    let expires_at = time::parse_rfc3339(&expiration).ok_or_else(|| {
        ProviderError::unavailable(format!(
            "STS's `Expiration` is not a timestamp: {:?}",
            expiration.chars().take(40).collect::<String>()
        ))
    })?;
    let mut credentials = Credentials::headers([
        ("aws-access-key-id", key_id),
        ("aws-secret-access-key", secret),
        ("aws-session-token", session),
    ])
    .expires_at(expires_at);
    if let Some(arn) = tag(body, "Arn") {
        credentials = credentials.principal(arn);
    }
    Ok(credentials)
}

/// The text of the first `<name>…</name>` element, XML entities decoded. Enough
/// for STS's answers (no attributes, namespace prefixes or CDATA on these
/// elements); not a general XML parser.
fn tag(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    Some(unescape(xml[start..end].trim()))
}

/// Decode the five predefined XML entities and numeric character references.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        // An entity is short: look for its `;` in the next few bytes only (a
        // hostile body full of `&` stays linear).
        let Some(end) = rest.bytes().take(12).position(|b| b == b';') else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..end];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

reauth_sdk::export_provider!(AwsSts);
