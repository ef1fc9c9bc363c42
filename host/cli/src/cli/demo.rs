//! `reauth demo`: a dev issuer, the shipped OAuth2 plugin and a timeline of what the cache does.

use super::*;

/// Where `reauth demo` looks for the shipped OAuth2 plugin unless told otherwise.
pub const DEMO_PLUGIN: &str = "plugins/target/wasm32-wasip2/release/oauth2_client_credentials.wasm";

/// Numbers tokens in order of first appearance so the demo never prints one.
struct TokenNames(HashMap<String, usize>);

impl TokenNames {
    fn name(&mut self, c: &Credentials) -> String {
        let key = match &c.credential {
            Credential::Bearer(t) => t.expose().to_string(),
            other => format!("{other:?}"),
        };
        let next = self.0.len() + 1;
        format!("token #{}", self.0.entry(key).or_insert(next))
    }
}

pub(super) async fn demo(
    plugin: PathBuf,
    lifetime: u64,
    out: &mut (dyn Write + Send),
) -> Result<ExitCode, BoxError> {
    if !plugin.exists() {
        return Err(format!(
            "demo plugin not found at {}: build the shipped plugins first (`make plugins`) or pass --plugin",
            plugin.display()
        )
        .into());
    }
    let lifetime = lifetime.max(1);
    let issuer = DevIssuer::start(DevIssuerConfig {
        clients: vec![DevClient::new("demo-client", "demo-secret")],
        token_lifetime: Duration::from_secs(lifetime),
        default_audience: Some("demo-api".into()),
        ..DevIssuerConfig::default()
    })
    .await?;
    let host = Host::builder()
        .provider(
            "demo",
            ProviderConfig::new(&plugin)
                .allow_host(issuer.addr().to_string())
                .config("token_url", issuer.token_url())
                .config("client_id", "demo-client")
                .config("client_secret", "demo-secret"),
        )
        .build()?;
    if let Some(ProviderStatus::Failed(e)) = host.status().get("demo") {
        return Err(e.clone().into());
    }

    let started = Instant::now();
    let mut names = TokenNames(HashMap::new());
    let request = Request::new();
    writeln!(out, "reauth demo")?;
    writeln!(
        out,
        "  identity provider: dev issuer at {} (tokens live {lifetime}s)",
        issuer.url()
    )?;
    writeln!(
        out,
        "  provider `demo`:   {} (sandboxed WebAssembly component)",
        plugin.display()
    )?;
    writeln!(out)?;

    macro_rules! step {
        ($($arg:tt)*) => {{
            writeln!(out, "[{:>6.3}s] {}", started.elapsed().as_secs_f64(), format!($($arg)*))?;
            out.flush()?;
        }};
    }
    let describe = |lookup: Lookup| match lookup {
        Lookup::Hit => "cache hit".to_string(),
        Lookup::Joined => "joined another caller's fetch".to_string(),
        Lookup::Stale => "stale cache hit (IdP failing)".to_string(),
        Lookup::Fetched(reason) => format!("fetched from the IdP ({})", Reason::as_str(reason)),
        other => format!("{other:?}"),
    };
    let until = |t: Option<SystemTime>| {
        t.and_then(|t| t.duration_since(SystemTime::now()).ok())
            .unwrap_or_default()
    };

    // 1. First fetch.
    let (creds, lookup) = host.get_credentials_traced("demo", &request).await?;
    step!(
        "get-credentials → {}: {}, expires in {:.1}s, principal {}",
        describe(lookup),
        names.name(&creds),
        until(creds.expires_at).as_secs_f64(),
        creds.principal.as_deref().unwrap_or("-")
    );
    // 2. Single-flight: a herd on a cold key makes one plugin call.
    let reports = Request::new().scope("reports");
    let calls_before = host.plugin_calls("demo");
    let herd: Vec<_> = (0..100)
        .map(|_| {
            let (host, reports) = (host.clone(), reports.clone());
            tokio::spawn(async move { host.get_credentials("demo", &reports).await })
        })
        .collect();
    let mut herd_creds = None;
    for task in herd {
        herd_creds = Some(task.await??);
    }
    if let Some(c) = &herd_creds {
        step!(
            "100 concurrent callers for scope `reports` → {} plugin call (single-flight): {}",
            host.plugin_calls("demo") - calls_before,
            names.name(c)
        );
    }
    // 3. Cached hits.
    for _ in 0..2 {
        let (c, lookup) = host.get_credentials_traced("demo", &request).await?;
        step!("get-credentials → {}: {}", describe(lookup), names.name(&c));
    }
    // 4. Refresh ahead: inside the advisory window the cached token is served while
    //    one background refresh replaces it.
    let wait = until(host.refresh_at("demo", &request)) + Duration::from_millis(20);
    step!(
        "… {:.1}s until the refresh-ahead window",
        wait.as_secs_f64()
    );
    tokio::time::sleep(wait).await;
    let (c, lookup) = host.get_credentials_traced("demo", &request).await?;
    step!(
        "get-credentials → {} (advisory window: one background refresh started): {}",
        describe(lookup),
        names.name(&c)
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (c, lookup) = host.get_credentials_traced("demo", &request).await?;
    step!(
        "get-credentials → {}: {} (refreshed ahead of expiry, no caller waited)",
        describe(lookup),
        names.name(&c)
    );
    // 5. Refresh after expiry: the `reports` key saw no traffic in its window.
    let wait = until(host.cached_until("demo", &reports)) + Duration::from_millis(20);
    step!(
        "… {:.1}s until the `reports` token expires unused",
        wait.as_secs_f64()
    );
    tokio::time::sleep(wait).await;
    let (c, lookup) = host.get_credentials_traced("demo", &reports).await?;
    step!(
        "get-credentials (scope `reports`) → {}: {}",
        describe(lookup),
        names.name(&c)
    );
    // 6. Re-authentication: the resource server rejects the current token once
    //    (as if revoked early); with_credentials asks the provider and retries.
    let rejected_once = std::sync::atomic::AtomicBool::new(false);
    let log = std::sync::Mutex::new(Vec::<String>::new());
    let outcome = host
        .with_credentials("demo", &request, |creds| {
            let (issuer, names_seen, rejected_once, log) = (&issuer, creds, &rejected_once, &log);
            async move {
                let Credential::Bearer(token) = &names_seen.credential else {
                    return Err(Rejection::Other(
                        "the demo provider returned a non-bearer credential".to_string(),
                    ));
                };
                let verified = issuer.verify(token.expose(), Some("demo-api"));
                let record =
                    |line: String| log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                if !rejected_once.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    record("resource server → 401 invalid_token (simulated: revoked early)".into());
                    let error = classify::from_http(
                        401,
                        Some(r#"Bearer error="invalid_token", error_description="token expired""#),
                        None,
                    )
                    .ok_or_else(|| Rejection::Other("unclassified".to_string()))?;
                    return Err(Rejection::security(error, "401 invalid_token".to_string()));
                }
                match verified {
                    Ok(_) => {
                        record("resource server → 200: verified against the issuer's JWKS".into());
                        Ok(())
                    }
                    Err(e) => Err(Rejection::Other(format!("resource server → 401: {e}"))),
                }
            }
        })
        .await;
    let lines = log.into_inner().unwrap_or_else(|e| e.into_inner());
    for line in lines {
        step!("with_credentials: {line}");
    }
    match outcome {
        Ok(()) => {
            let (c, _) = host.get_credentials_traced("demo", &request).await?;
            step!(
                "with_credentials → provider decided refresh-and-retry; succeeded on re-authenticated {}",
                names.name(&c)
            );
        }
        Err(e) => step!("with_credentials → failed: {e}"),
    }
    writeln!(out)?;
    writeln!(
        out,
        "summary: {} plugin calls, {} tokens issued by the IdP, {:.1}s",
        host.plugin_calls("demo"),
        issuer.issued(),
        started.elapsed().as_secs_f64()
    )?;
    issuer.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
