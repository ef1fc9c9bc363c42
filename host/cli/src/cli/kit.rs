//! `reauth test`: the conformance kit, as a command.

use super::*;

/// `reauth test`: run the conformance kit and print its table.
pub(super) async fn test(
    target: &std::path::Path,
    plugin: Option<&std::path::Path>,
    scenarios: &[String],
    format: ReportFormat,
    out: &mut (dyn Write + Send),
) -> Result<ExitCode, BoxError> {
    let (manifest, manifest_path, component) = crate::conformance::resolve_target(target, plugin)?;
    if format == ReportFormat::Table {
        writeln!(
            out,
            "reauth test: {} (manifest {}, endpoint {:?})",
            component.display(),
            manifest_path.display(),
            manifest.endpoint
        )?;
    }
    let started = Instant::now();
    let artifacts = user_artifact_dir();
    let report =
        crate::conformance::run_with_cache(&manifest, &component, scenarios, artifacts.as_deref())
            .await?;
    match format {
        ReportFormat::Table => {
            writeln!(out, "component sha256 {}", &report.sha256[..12])?;
            write!(out, "{}", report.table())?;
            writeln!(out, "({:.1} s)", started.elapsed().as_secs_f64())?;
        }
        ReportFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, &report.to_json())?;
            writeln!(out)?;
        }
    }
    Ok(if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
