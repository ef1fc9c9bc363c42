//! The harness in smoke mode (tiny counts) on every `make test`, so it never rots.
//! Its numbers mean nothing; what is checked is that every section runs, the herd is
//! served by one plugin call, and the comparisons produce their tables.

#[test]
fn every_section_runs_in_smoke_mode() {
    reauth_tests::logs();
    // The `processes` section runs the `reauth` binary: built first (this may
    // rebuild the bench binary too, which is why the bench does not build it).
    let reauth = reauth_tests::workspace_binary("reauth-cli", "reauth");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_reauth-bench"))
        .arg("--smoke")
        .env("REAUTH_BIN", reauth)
        .output()
        .expect("running reauth-bench --smoke");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for heading in [
        "### Cached credential",
        "### Miss path",
        "### End to end: real IdP",
        "### Herd",
        "### Scale",
        "### Polyglot providers",
        "### Many processes on one machine",
        "### Fleet mode",
    ] {
        assert!(stdout.contains(heading), "missing `{heading}` in\n{stdout}");
    }
    assert!(
        stdout.contains("| 100 | ") && stdout.contains(" | 1 | "),
        "herd row: {stdout}"
    );
    assert!(stdout.contains("Exec / reauth (p50)"), "{stdout}");
    for row in [
        "| Rust (`static`)",
        "| Python (componentize-py)",
        "| JavaScript (componentize-js)",
    ] {
        assert!(
            stdout.contains(row),
            "missing polyglot row `{row}` in\n{stdout}"
        );
    }
}
