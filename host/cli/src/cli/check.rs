//! `reauth check`: load every provider and report each (lines or JSON).

use super::*;

/// The host `reauth check` loads: the config's own `runtime.cache_dir`, else the
/// per-user artifact cache ([`user_artifact_dir`]) for compiled plugins.
fn check_host(config: HostConfig) -> Result<Host, BoxError> {
    let options = reauth::runtime::RuntimeOptions {
        cache_dir: match config.runtime.cache_dir {
            Some(_) => None,
            None => user_artifact_dir(),
        },
        ..Default::default()
    };
    Ok(Host::builder_from_config(config)
        .runtime_options(options)
        .build()?)
}

pub(super) async fn check(
    config: PathBuf,
    format: ReportFormat,
    out: &mut (dyn Write + Send),
) -> Result<ExitCode, BoxError> {
    if format == ReportFormat::Json {
        return check_json(config, out).await;
    }
    let parsed = match HostConfig::from_file(&config) {
        Ok(c) => c,
        Err(e) => {
            // An error, so on stderr like every command's; the exit status says
            // the check failed.
            eprintln!("FAIL config: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let at_rest = at_rest_paths(&parsed);
    let host = check_host(parsed)?;
    // Secrets at rest are sealed, but their files should still be private.
    for path in at_rest {
        if let Some(mode) = reauth::store::loose_permissions(&path) {
            writeln!(
                out,
                "WARN {}: mode {mode:o} lets other users in (reauth creates 0700 directories and 0600 files); chmod go-rwx it",
                path.display()
            )?;
        }
    }
    let mut failed = 0;
    let status = host.check().await;
    for (name, status) in &status {
        if !print_status(name, status, out)? {
            failed += 1;
        }
    }
    // The fleet's backend: reachable, and how far this host's clock is off.
    let mut fleet_failed = false;
    if let Some(fleet) = host.fleet() {
        match fleet.probe().await {
            Ok(offset_ms) => writeln!(
                out,
                "ok   fleet `{}`: {} reachable; key {}; its clock minus this host's: {:+.3} s",
                fleet.name(),
                fleet.backend(),
                fleet.key_id(),
                offset_ms as f64 / 1000.0
            )?,
            Err(e) => {
                fleet_failed = true;
                writeln!(
                    out,
                    "FAIL fleet `{}`: {e} (tokens are then fetched per replica; shared provider state is refused)",
                    fleet.name()
                )?
            }
        }
    }
    writeln!(
        out,
        "{} provider(s): {} ok, {failed} failed",
        status.len(),
        status.len() - failed
    )?;
    Ok(if failed == 0 && !fleet_failed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `reauth check --format json`: the same checks as the lines, as one document.
async fn check_json(config: PathBuf, out: &mut (dyn Write + Send)) -> Result<ExitCode, BoxError> {
    use serde_json::json;
    let parsed = match HostConfig::from_file(&config) {
        Ok(c) => c,
        Err(e) => {
            let doc = json!({
                "config": config.display().to_string(),
                "ok": false,
                "config_error": e.to_string(),
                "providers": [],
                "warnings": [],
                "fleet": null,
                "summary": {"providers": 0, "ok": 0, "failed": 0},
            });
            writeln!(out, "{doc}")?;
            return Ok(ExitCode::FAILURE);
        }
    };
    let at_rest = at_rest_paths(&parsed);
    let host = check_host(parsed)?;
    let warnings: Vec<String> = at_rest
        .iter()
        .filter_map(|path| {
            reauth::store::loose_permissions(path).map(|mode| {
                format!(
                    "{}: mode {mode:o} lets other users in (reauth creates 0700 directories and 0600 files); chmod go-rwx it",
                    path.display()
                )
            })
        })
        .collect();
    let status = host.check().await;
    let mut failed = 0usize;
    let providers: Vec<serde_json::Value> = status
        .iter()
        .map(|(name, status)| match status {
            ProviderStatus::Ready {
                sha256,
                from_cache,
                breaker,
                reload_error,
                contract,
                descriptor,
                rollout,
                ..
            } => json!({
                "name": name,
                "status": "ok",
                "error": null,
                "sha256": sha256,
                "precompiled": from_cache,
                "contract": contract,
                "plugin": descriptor.as_deref().map(crate::server::plugin_json),
                "cooling_down_ms": breaker.cooling_down_for.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                "consecutive_faults": breaker.consecutive_faults,
                "reload_error": reload_error,
                "rollout": rollout.as_ref().map(crate::server::rollout_json),
            }),
            ProviderStatus::Failed(e) => {
                failed += 1;
                json!({"name": name, "status": "failed", "error": e})
            }
            // A status this command does not know yet: not serving.
            other => {
                failed += 1;
                json!({"name": name, "status": "failed", "error": format!("{other:?}")})
            }
        })
        .collect();
    let mut fleet_failed = false;
    let fleet = match host.fleet() {
        None => serde_json::Value::Null,
        Some(fleet) => match fleet.probe().await {
            Ok(offset_ms) => json!({
                "name": fleet.name(),
                "backend": fleet.backend().to_string(),
                "reachable": true,
                "key_id": fleet.key_id().to_string(),
                "clock_offset_ms": offset_ms,
                "error": null,
            }),
            Err(e) => {
                fleet_failed = true;
                json!({
                    "name": fleet.name(),
                    "backend": fleet.backend().to_string(),
                    "reachable": false,
                    "error": e.to_string(),
                })
            }
        },
    };
    let ok = failed == 0 && !fleet_failed;
    let doc = json!({
        "config": config.display().to_string(),
        "ok": ok,
        "config_error": null,
        "providers": providers,
        "warnings": warnings,
        "fleet": fleet,
        "summary": {"providers": status.len(), "ok": status.len() - failed, "failed": failed},
    });
    writeln!(out, "{doc}")?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The directories and files where reauth keeps data at rest (state, key ring,
/// shared cache, precompiled artifacts) and what they hold, as far as they exist.
fn at_rest_paths(config: &HostConfig) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = [&config.runtime.state_dir, &config.runtime.cache_dir]
        .into_iter()
        .flatten()
        .map(|d| config.resolve(d))
        .collect();
    dirs.extend(config.shared_cache_dir());
    let mut paths = Vec::new();
    if let Some(key) = config.key_file() {
        paths.extend(key.parent().map(Path::to_path_buf));
        paths.push(key);
    }
    for dir in dirs {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            paths.extend(entries.flatten().map(|e| e.path()));
        }
        paths.push(dir);
    }
    paths.retain(|p| p.exists());
    paths.sort();
    paths.dedup();
    paths
}

/// One `check`/`watch` status line; returns whether the provider is serving.
pub(super) fn print_status(
    name: &str,
    status: &ProviderStatus,
    out: &mut (dyn Write + Send),
) -> Result<bool, BoxError> {
    match status {
        ProviderStatus::Ready {
            sha256,
            from_cache,
            breaker,
            reload_error,
            contract,
            descriptor,
            rollout,
            ..
        } => {
            let about = match descriptor.as_deref() {
                Some(d) if !d.name.is_empty() => format!(
                    "{} {}, contract {contract}{}; ",
                    d.name,
                    d.version,
                    match &d.config {
                        Some(keys) => format!(", {} config keys declared", keys.len()),
                        None => String::new(),
                    }
                ),
                _ => format!("contract {contract}; "),
            };
            writeln!(
                out,
                "ok   {name}: {about}sha256 {}… ({}){}{}",
                &sha256[..12],
                if *from_cache {
                    "precompiled cache"
                } else {
                    "compiled"
                },
                match breaker.cooling_down_for {
                    Some(left) => format!(
                        "; cooling down for {} ms after {} faults",
                        left.as_millis(),
                        breaker.consecutive_faults
                    ),
                    None => String::new(),
                },
                match reload_error {
                    Some(e) => format!("; previous version kept, reload failed: {e}"),
                    None => String::new(),
                }
            )?;
            if let Some(r) = rollout {
                writeln!(
                    out,
                    "     {name}: candidate sha256 {}… for {} % of keys: {} ({} fetches, {} errors, {} faults in the window)",
                    r.candidate_sha256.get(..12).unwrap_or(&r.candidate_sha256),
                    (r.share * 1000.0).round() / 10.0,
                    match &r.rolled_back {
                        Some(why) => format!("rolled back ({why})"),
                        None => "active".to_string(),
                    },
                    r.fetches,
                    r.errors,
                    r.faults
                )?;
            }
            Ok(true)
        }
        ProviderStatus::Failed(e) => {
            writeln!(out, "FAIL {name}: {e}")?;
            Ok(false)
        }
        other => {
            writeln!(out, "FAIL {name}: {other:?}")?;
            Ok(false)
        }
    }
}
