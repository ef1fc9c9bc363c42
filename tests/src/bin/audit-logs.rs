//! `audit-logs`: after the test suite ran, check that no known or recorded secret
//! appears in any log line any test binary wrote (see `reauth_tests::logs`).
//! Exits non-zero, naming the file and line (never the secret), if one does — or
//! if there are no logs at all, so that the audit cannot pass by checking nothing.

fn main() -> anyhow::Result<()> {
    let summary = reauth_tests::audit_logs(&reauth_tests::log_dir()).map_err(anyhow::Error::msg)?;
    println!("audit-logs: {summary}");
    Ok(())
}
