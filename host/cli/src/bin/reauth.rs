//! The `reauth` binary: see `reauth --help`.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = reauth_cli::cli::Cli::parse();
    // A daemon logs what it does; one-shot commands and tool helpers only warn.
    let default_level = match cli.command {
        reauth_cli::cli::Command::Serve(_) | reauth_cli::cli::Command::Watch { .. } => "info",
        _ => "warn",
    };
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // wasmtime's WASI bindings trace every argument a plugin passes (URLs,
    // headers): never let them through, whatever RUST_LOG says.
    for directive in reauth::runtime::SECRET_SAFE_LOG_DIRECTIVES {
        if let Ok(d) = directive.parse() {
            filter = filter.add_directive(d);
        }
    }
    // Colour only for a person at a terminal: never escape codes in a log file, a
    // pipe or a journal.
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter);
    match cli.log_format {
        reauth_cli::cli::LogFormat::Text => logs.init(),
        reauth_cli::cli::LogFormat::Json => logs.json().init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("reauth: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let mut stdout = std::io::stdout();
    match runtime.block_on(reauth_cli::cli::run(cli, &mut stdout)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("reauth: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            // 1 is a check that failed, 2 a usage error (clap): reauth itself
            // could not do what it was asked.
            ExitCode::from(3)
        }
    }
}
