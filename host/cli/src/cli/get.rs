//! `reauth get`.

use super::*;

/// Arguments of `reauth get`.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// Provider name.
    pub provider: String,
    /// The config file.
    #[arg(long, short, env = "REAUTH_CONFIG", default_value = "reauth.toml")]
    pub config: PathBuf,
    /// Subject (per-user credentials).
    #[arg(long)]
    pub subject: Option<String>,
    /// Scope (repeatable).
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// Audience / resource.
    #[arg(long)]
    pub audience: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    /// Then report that a server rejected the credential with this kind of
    /// error (the security-error path, without writing code): the provider's
    /// decision goes to stderr, and the credential in effect after it (a
    /// fresh one after `refresh-and-retry`) to stdout.
    #[arg(long, value_enum, value_name = "KIND")]
    pub after_error: Option<ErrorKind>,
    /// With `--after-error`: the server's HTTP status.
    #[arg(long, requires = "after_error")]
    pub status: Option<u16>,
    /// With `--after-error`: the server's error code (`invalid_token`, `28P01`…).
    #[arg(long, requires = "after_error")]
    pub code: Option<String>,
    /// With `--after-error`: the server's `WWW-Authenticate` value, any scheme
    /// (e.g. `AcmeSession error="expired"`).
    #[arg(long, requires = "after_error", value_name = "VALUE")]
    pub www_authenticate: Option<String>,
    /// With `--after-error`: the server's `Retry-After` (seconds or HTTP date).
    #[arg(long, requires = "after_error", value_name = "VALUE")]
    pub retry_after: Option<String>,
}

/// `reauth get`: one credential, optionally through the security-error path.
pub(super) async fn get(args: GetArgs, out: &mut (dyn Write + Send)) -> Result<ExitCode, BoxError> {
    let GetArgs {
        provider,
        config,
        subject,
        scopes,
        audience,
        format,
        after_error,
        status,
        code,
        www_authenticate,
        retry_after,
    } = args;
    let host = Host::from_config_file(&config)?;
    let request = Request {
        subject,
        scopes,
        audience,
        reason: Reason::Initial,
    };
    let mut credentials = host.get_credentials(&provider, &request).await?;
    if let Some(kind) = after_error {
        let error = crate::wire::WireSecurityError {
            kind: match kind {
                ErrorKind::TokenExpired => reauth::SecurityErrorKind::TokenExpired,
                ErrorKind::Unauthorized => reauth::SecurityErrorKind::Unauthorized,
                ErrorKind::Forbidden => reauth::SecurityErrorKind::Forbidden,
                ErrorKind::Other => reauth::SecurityErrorKind::Other,
            },
            status,
            code,
            message: None,
            www_authenticate,
            retry_after,
        }
        .into_security_error(host.now());
        let decision = host
            .handle_security_error(&provider, &request, &credentials, &error)
            .await?;
        match decision {
            crate::types::Decision::RefreshAndRetry => {
                let again = Request {
                    reason: Reason::AfterSecurityError,
                    ..request
                };
                credentials = host.get_credentials(&provider, &again).await?;
                eprintln!("decision: refresh-and-retry (fetched a new credential)");
            }
            crate::types::Decision::RetryAfter(wait) => eprintln!(
                "decision: retry-after {} ms (the same credential)",
                wait.as_millis()
            ),
            crate::types::Decision::Fail => {
                eprintln!("decision: fail (the caller would get the error)")
            }
            other => eprintln!("decision: {other:?}"),
        }
    }
    print_credentials(&credentials, format, out)?;
    Ok(ExitCode::SUCCESS)
}

fn print_credentials(
    c: &Credentials,
    format: Format,
    out: &mut (dyn Write + Send),
) -> Result<(), BoxError> {
    // Printing the credential is this command's job: this is the one place where
    // secrets are exposed on purpose.
    match format {
        Format::Header => match &c.credential {
            Credential::Headers(headers) => {
                for (k, v) in headers {
                    writeln!(out, "{k}: {}", v.expose())?;
                }
            }
            other => {
                let value = other
                    .authorization_header()
                    .ok_or("credential has no Authorization form")?;
                writeln!(out, "Authorization: {}", value.expose())?;
            }
        },
        Format::Json => {
            let v = serde_json::to_value(crate::wire::WireCredentials::from(c))?;
            writeln!(out, "{v}")?;
        }
    }
    Ok(())
}
