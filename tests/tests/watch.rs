//! `reauth watch`: the real binary, reloading on file changes and on SIGHUP, and
//! stopping cleanly on SIGTERM.

use reauth_tests::plugins;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

fn reauth_binary() -> PathBuf {
    reauth_tests::workspace_binary("reauth", "reauth")
}

/// Kills the child if the test fails half-way.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The next line containing `needle`, within `limit`; panics with what was seen.
fn expect_line(lines: &Receiver<String>, needle: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(line) => seen.push(line),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                panic!("no line with {needle:?} within {limit:?}; saw: {seen:#?}")
            }
        }
    }
}

fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn watch_reloads_on_file_change_and_sighup_and_stops_on_sigterm() {
    reauth_tests::logs();
    let binary = reauth_binary();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("reauth.toml");
    // `a` runs a copy of the plugin, so the test can break it on disk.
    let a_plugin = dir.path().join("a.wasm");
    std::fs::copy(&plugins().hostile, &a_plugin).unwrap();
    let plugin = plugins().hostile.display().to_string();
    let a = a_plugin.display().to_string();
    let provider = |name: &str, plugin: &str| {
        format!("[providers.{name}]\nplugin = {plugin:?}\nconfig = {{ mode = \"ok\" }}\n")
    };
    write_config(&config, &provider("a", &a));
    let child = Command::new(&binary)
        .args(["watch", "--config"])
        .arg(&config)
        .env("RUST_LOG", "reauth=debug,warn")
        .stdout(Stdio::piped())
        // The binary's own logs join the suite's, for the secret audit.
        .stderr(
            std::fs::File::create(
                reauth_tests::log_dir().join(format!("reauth-watch-{}.log", std::process::id())),
            )
            .unwrap(),
        )
        .spawn()
        .unwrap();
    let mut child = Guard(child);
    let stdout = child.0.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let limit = Duration::from_secs(60);
    expect_line(&lines, "ok   a: sha256", limit);
    expect_line(&lines, "watching", limit);

    // A new provider in the file: picked up without a signal.
    write_config(
        &config,
        &format!("{}{}", provider("a", &a), provider("b", &plugin)),
    );
    let line = expect_line(&lines, "reload (file change)", limit);
    assert!(
        line.contains("added=b") && line.contains("unchanged=a"),
        "{line}"
    );

    // SIGHUP: a reload with nothing to do.
    signal(&child.0, "HUP");
    let line = expect_line(&lines, "reload (SIGHUP)", limit);
    assert!(
        line.contains("added=- updated=- unchanged=a,b removed=- failed=-"),
        "{line}"
    );

    // b's plugin goes missing: b fails to reload (it keeps its old version), a is
    // untouched.
    write_config(
        &config,
        &format!(
            "{}{}",
            provider("a", &a),
            provider("b", "/nonexistent/b.wasm")
        ),
    );
    let line = expect_line(&lines, "reload (file change)", limit);
    assert!(
        line.contains("failed=b") && line.contains("unchanged=a"),
        "{line}"
    );
    let line = expect_line(&lines, "FAIL b:", limit);
    assert!(line.contains("/nonexistent/b.wasm"), "{line}");

    // A plugin file changing on disk is a trigger too: a truncated build of a's
    // plugin fails to load and a keeps its running version.
    let bytes = std::fs::read(&a_plugin).unwrap();
    std::fs::write(&a_plugin, &bytes[..bytes.len() / 2]).unwrap();
    let line = expect_line(&lines, "reload (file change)", limit);
    assert!(line.contains("failed=a,b"), "{line}");
    let line = expect_line(&lines, "FAIL a:", limit);
    assert!(line.contains("not a valid WebAssembly component"), "{line}");

    signal(&child.0, "TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "reauth watch did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}
