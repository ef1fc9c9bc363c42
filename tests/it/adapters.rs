//! The tool adapters as the tools run them: the real `reauth` binary as a sidecar
//! (`reauth serve` on a Unix socket), Debian's kubectl against a fake HTTPS API
//! server, git against `git http-backend` behind lighttpd's Basic auth, and the
//! docker and AWS helper protocols checked against the tools' documented formats.

use reauth_tests::peers::{Idp, Peer, SecretsEndpoint, free_port, http};
use reauth_tests::{plugins, root, workspace_binary};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn reauth() -> PathBuf {
    workspace_binary("reauth", "reauth")
}

fn proc(child: Child) -> Peer {
    Peer::new(child, "-TERM", Duration::from_secs(10))
}

fn sidecar_log() -> std::fs::File {
    let dir = reauth_tests::log_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("sidecar-{}.log", std::process::id())))
        .unwrap()
}

/// `reauth serve --socket` with `config`; returns once it listens.
fn sidecar(config: &Path, socket: &Path) -> (Peer, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(reauth())
        .args(["serve", "--config"])
        .arg(config)
        .arg("--socket")
        .arg(socket)
        .env("RUST_LOG", "reauth=debug")
        .stdout(Stdio::piped())
        // Into the suite's log directory, so `audit-logs` checks the sidecar's logs
        // for leaked secrets too.
        .stderr(sidecar_log())
        .spawn()
        .expect("starting reauth serve");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.starts_with("listening on unix:") => break,
            Ok(_) => {}
            Err(_) if Instant::now() > deadline => panic!("reauth serve did not start"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("reauth serve exited: {e}"),
        }
    }
    (proc(child), rx)
}

async fn metric(socket: &Path, line: &str) -> u64 {
    let (_, _, body) = http(
        &format!("unix:{}", socket.display()),
        "GET",
        "/metrics",
        &[],
        None,
    )
    .await
    .unwrap();
    reauth_tests::metric_value(&String::from_utf8_lossy(&body), line) as u64
}

fn run(cmd: &mut Command, stdin: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn kubectl_binary() -> PathBuf {
    // One install at a time: two tests unpacking the same package at once
    // break each other's (seen on a fresh machine; CI installs it first).
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _installing = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let path = root().join("target/peers/kubectl/usr/bin/kubectl");
    if !path.exists() {
        let status = Command::new("bash")
            .arg(root().join("scripts/install-peers.sh"))
            .status()
            .unwrap();
        assert!(
            status.success(),
            "installing kubectl (scripts/install-peers.sh) failed"
        );
    }
    path
}

fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args([
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            // Self-signed and its own trust anchor, as a leaf (rustls refuses a
            // CA certificate as a server's).
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ])
        .stderr(Stdio::null())
        .status()
        .expect("running openssl");
    assert!(status.success());
    (cert, key)
}

fn tokens_seen(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<Value>(l).ok()?["token"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

/// Everything a kubectl test needs: the fake API server, the IdP, the sidecar and
/// a kubeconfig running the adapter with `provideClusterInfo: true`. The adapters'
/// ledger lives in `run_dir` (`XDG_RUNTIME_DIR` of every process started here).
struct Kube {
    dir: tempfile::TempDir,
    kubectl: PathBuf,
    cert: PathBuf,
    port: u16,
    log: PathBuf,
    reject: PathBuf,
    socket: PathBuf,
    kubeconfig: PathBuf,
    run_dir: PathBuf,
    idp: Idp,
    server: Peer,
    _api: Peer,
}

impl Kube {
    async fn start() -> Kube {
        let kubectl = kubectl_binary();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed_cert(dir.path());
        let (log, reject) = (
            dir.path().join("requests.jsonl"),
            dir.path().join("rejected.txt"),
        );
        let mut api = Command::new("python3")
            .arg(root().join("tests/peers/kube-api/server.py"))
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--log")
            .arg(&log)
            .arg("--reject")
            .arg(&reject)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the fake API server");
        let mut port = String::new();
        BufReader::new(api.stdout.take().unwrap())
            .read_line(&mut port)
            .unwrap();
        let api = proc(api);
        let port: u16 = port.trim().parse().expect("API server port");

        // Tokens come from the real IdP (client credentials, JWTs).
        reauth_tests::record_secret("cc-basic-secret-0123456789");
        let idp = Idp::start(&dir.path().join("idp-keys.json"), 300, None);
        let config = dir.path().join("reauth.toml");
        std::fs::write(
            &config,
            format!(
                r#"[providers.k8s]
plugin = "{}"
allowed_hosts = ["{}"]
[providers.k8s.config]
issuer = "{}"
client_id = "cc-basic"
client_secret = "cc-basic-secret-0123456789"
"#,
                plugins().oauth2.display(),
                idp.authority(),
                idp.issuer
            ),
        )
        .unwrap();
        let socket = dir.path().join("reauth.sock");
        let (server, _stdout) = sidecar(&config, &socket);

        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                r#"apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: https://127.0.0.1:{port}
    certificate-authority: {cert}
users:
- name: reauth
  user:
    exec:
      apiVersion: client.authentication.k8s.io/v1beta1
      command: {reauth}
      args: ["kubectl-credential", "--provider", "k8s", "--server", "{socket}"]
      provideClusterInfo: true
contexts:
- name: fake
  context:
    cluster: fake
    user: reauth
current-context: fake
"#,
                cert = cert.display(),
                reauth = reauth().display(),
                socket = socket.display()
            ),
        )
        .unwrap();
        let run_dir = dir.path().join("run");
        std::fs::create_dir_all(&run_dir).unwrap();
        Kube {
            dir,
            kubectl,
            cert,
            port,
            log,
            reject,
            socket,
            kubeconfig,
            run_dir,
            idp,
            server,
            _api: api,
        }
    }

    /// `kubectl get --raw /version`.
    fn kubectl_version(&self) -> Output {
        Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["get", "--raw", "/version", "--request-timeout=10s"])
            .env("HOME", self.dir.path())
            .env("XDG_RUNTIME_DIR", &self.run_dir)
            .env("RUST_LOG", "reauth=info")
            .output()
            .unwrap()
    }

    /// The adapter's command line, as the kubeconfig has it.
    fn adapter_args(&self) -> Vec<String> {
        vec![
            reauth().display().to_string(),
            "kubectl-credential".into(),
            "--provider".into(),
            "k8s".into(),
            "--server".into(),
            self.socket.display().to_string(),
        ]
    }

    /// `KUBERNETES_EXEC_INFO` as kubectl 1.20 sets it with `provideClusterInfo`.
    fn exec_info(&self) -> String {
        use base64::Engine as _;
        let ca = std::fs::read(&self.cert).unwrap();
        json!({
            "kind": "ExecCredential",
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "spec": {"cluster": {
                "server": format!("https://127.0.0.1:{}", self.port),
                "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca),
                "config": null,
            }},
        })
        .to_string()
    }

    /// Run `program args…` (a shell or Python standing in for kubectl or a
    /// dispatcher) with the ledger in `run_dir`; `ADAPTER` in its environment is
    /// the adapter's command line, shell-quoted.
    fn run_as_parent(&self, program: &str, args: &[&str], exec_info: bool) -> Output {
        let adapter = self
            .adapter_args()
            .iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("ADAPTER", adapter)
            .env("XDG_RUNTIME_DIR", &self.run_dir)
            .env_remove("KUBERNETES_EXEC_INFO");
        if exec_info {
            cmd.env("KUBERNETES_EXEC_INFO", self.exec_info());
        }
        let out = cmd.output().expect("running the stand-in parent");
        assert!(
            out.status.success(),
            "{program}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    async fn rejections(&self) -> u64 {
        metric_or_zero(
            &self.socket,
            "reauth_security_errors_total{provider=\"k8s\"",
        )
        .await
    }

    async fn fetches(&self) -> u64 {
        metric_or_zero(
            &self.socket,
            "reauth_plugin_calls_total{provider=\"k8s\",function=\"get-credentials\",outcome=\"ok\"}",
        )
        .await
    }

    /// The files the adapters keep: only the ledger, whose entries of ended
    /// processes are gone.
    fn assert_no_leftovers(&self) {
        let dir = self.run_dir.join("reauth");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["adapters.json"], "files kept in {}", dir.display());
        let ledger: Value =
            serde_json::from_slice(&std::fs::read(dir.join("adapters.json")).unwrap()).unwrap();
        let handed = ledger["handed"].as_array().map_or(0, Vec::len);
        assert!(
            handed <= 1,
            "entries of ended processes were kept: {ledger}"
        );
    }
}

/// The sum of every `/metrics` sample whose line starts with `prefix` (0 if none).
async fn metric_or_zero(socket: &Path, prefix: &str) -> u64 {
    let (_, _, body) = http(
        &format!("unix:{}", socket.display()),
        "GET",
        "/metrics",
        &[],
        None,
    )
    .await
    .unwrap();
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_kubectl_gets_its_token_through_the_sidecar_and_a_fresh_one_after_a_401() {
    reauth_tests::logs();
    let mut k = Kube::start().await;
    // What versions before the ledger left behind: one marker per kubectl process.
    let legacy = k.run_dir.join("reauth/kubectl");
    std::fs::create_dir_all(&legacy).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    for d in [legacy.parent().unwrap(), &legacy] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    std::fs::write(legacy.join("4242-123456"), "x").unwrap();

    // Two kubectl processes, one token: the sidecar's cache is shared.
    for _ in 0..2 {
        let out = k.kubectl_version();
        assert!(
            out.status.success(),
            "kubectl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("v1.20.2-fake"));
    }
    let seen = tokens_seen(&k.log);
    for t in &seen {
        reauth_tests::record_secret(t);
    }
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0], seen[1],
        "both kubectl runs sent the same cached token"
    );
    let first = seen[0].clone();
    assert_eq!(k.fetches().await, 1);
    assert_eq!(k.rejections().await, 0);

    // The API server revokes the token: kubectl gets a 401 and re-runs the plugin;
    // the adapter sees the same kubectl process ask again for the token it already
    // has, the API server confirms it rejects that token, the adapter reports the
    // rejection, and the sidecar drops it and fetches a fresh one.
    std::fs::write(&k.reject, format!("{first}\n")).unwrap();
    let rejected_run = k.kubectl_version();
    eprintln!(
        "the run with the revoked token: {}",
        String::from_utf8_lossy(&rejected_run.stderr)
    );
    let seen = tokens_seen(&k.log);
    assert_eq!(seen[2], first);
    assert_eq!(
        seen.len(),
        4,
        "kubectl's request and the adapter's check, both with the revoked token"
    );
    assert_eq!(seen[3], first);
    assert_eq!(
        metric(&k.socket, "reauth_security_errors_total{provider=\"k8s\",kind=\"unauthorized\",decision=\"refresh_and_retry\"}").await,
        1,
        "the 401 re-run was reported as a rejection"
    );
    assert_eq!(
        metric(
            &k.socket,
            "reauth_fetches_total{provider=\"k8s\",reason=\"after_security_error\"}"
        )
        .await,
        1,
        "and made the sidecar fetch a fresh token"
    );
    // kubectl 1.20 does not repeat the failed request itself; the next run uses the
    // fresh token.
    let out = k.kubectl_version();
    assert!(
        out.status.success(),
        "after the refresh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = tokens_seen(&k.log);
    for t in &seen {
        reauth_tests::record_secret(t);
    }
    let last = seen.last().unwrap();
    assert_ne!(last, &first, "a fresh token");
    assert_eq!(k.idp.token_requests("cc-basic").await, (2, 0));
    assert_eq!(k.rejections().await, 1);
    println!(
        "kubectl: the run with the revoked token exited {:?}; the API server saw {} requests",
        rejected_run.status.code(),
        seen.len()
    );
    k.assert_no_leftovers();

    let status = k.server.stop().expect("reauth serve stops on SIGTERM");
    assert!(status.success(), "reauth serve exit: {status:?}");
    assert!(!k.socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_adapter_run_three_times_from_one_shell_reports_no_rejection() {
    reauth_tests::logs();
    let k = Kube::start().await;
    // Before: the second and third runs had the same parent (the shell) and got the
    // same token, which read as "kubectl re-ran the plugin after a 401".
    let three = "$ADAPTER >/dev/null && $ADAPTER >/dev/null && $ADAPTER >/dev/null; true";
    let out = k.run_as_parent("sh", &["-c", &format!("eval \"{three}\"")], false);
    assert!(out.stdout.is_empty());
    assert_eq!(k.rejections().await, 0, "no rejection reported");
    assert_eq!(
        k.fetches().await,
        1,
        "one token fetched, for all three runs"
    );
    assert!(
        tokens_seen(&k.log).is_empty(),
        "standalone runs are not checked against the API server"
    );
    // The same from a shell that looks like client-go (KUBERNETES_EXEC_INFO set):
    // the later runs are suspected, and the API server, asked, accepts the token.
    let out = k.run_as_parent("sh", &["-c", &format!("eval \"{three}\"")], true);
    assert!(out.status.success());
    assert_eq!(k.rejections().await, 0, "no rejection reported");
    assert_eq!(k.fetches().await, 1, "no extra fetch");
    let checks = tokens_seen(&k.log);
    for t in &checks {
        reauth_tests::record_secret(t);
    }
    assert_eq!(checks.len(), 2, "the two suspected re-runs were checked");
    assert_eq!(k.idp.token_requests("cc-basic").await, (1, 0));
    k.assert_no_leftovers();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_dispatcher_that_execs_kubectl_in_the_same_process_reports_no_rejection() {
    reauth_tests::logs();
    let k = Kube::start().await;
    // The gcloud kubectl dispatcher: runs the plugin for its version probe, then
    // execs the real kubectl in the same process (same PID, same start time), which
    // runs the plugin again and gets the same token. Here Python stands in for the
    // dispatcher and a shell for the real kubectl.
    let dispatcher = r#"
import os, shlex, subprocess
adapter = shlex.split(os.environ["ADAPTER"])
subprocess.run(adapter, check=True, stdout=subprocess.DEVNULL)
os.execv(os.environ["NEXT"], [os.environ["NEXT"], "-c", os.environ["NEXT_ARGS"]])
"#;
    let pid_of_runs = "import os, shlex, subprocess; subprocess.run(shlex.split(os.environ['ADAPTER']), check=True, stdout=subprocess.DEVNULL)";
    // 1. The dispatcher execs another program (as gcloud's does).
    let out = Command::new("python3")
        .args(["-c", dispatcher])
        .env(
            "ADAPTER",
            k.adapter_args()
                .iter()
                .map(|a| format!("'{a}'"))
                .collect::<Vec<_>>()
                .join(" "),
        )
        .env("NEXT", "/bin/sh")
        .env("NEXT_ARGS", "eval \"$ADAPTER\" >/dev/null; true")
        .env("XDG_RUNTIME_DIR", &k.run_dir)
        .env("KUBERNETES_EXEC_INFO", k.exec_info())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(k.rejections().await, 0, "no rejection reported");
    assert_eq!(k.fetches().await, 1);
    assert!(
        tokens_seen(&k.log).is_empty(),
        "another program is another caller: not even a check"
    );
    // 2. A process that execs the same program again: suspected, checked with the
    // API server, which accepts the token: nothing reported.
    let out = Command::new("python3")
        .args(["-c", dispatcher])
        .env(
            "ADAPTER",
            k.adapter_args()
                .iter()
                .map(|a| format!("'{a}'"))
                .collect::<Vec<_>>()
                .join(" "),
        )
        .env("NEXT", which("python3"))
        .env("NEXT_ARGS", pid_of_runs)
        .env("XDG_RUNTIME_DIR", &k.run_dir)
        .env("KUBERNETES_EXEC_INFO", k.exec_info())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(k.rejections().await, 0, "no rejection reported");
    assert_eq!(k.fetches().await, 1, "no extra fetch");
    let checks = tokens_seen(&k.log);
    for t in &checks {
        reauth_tests::record_secret(t);
    }
    assert_eq!(checks.len(), 1, "the suspected re-run was checked once");
    assert_eq!(k.idp.token_requests("cc-basic").await, (1, 0));
    k.assert_no_leftovers();
}

/// The absolute path of `program` on `PATH`.
fn which(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(program))
                .find(|f| f.is_file())
        })
        .unwrap_or_else(|| panic!("{program} not on PATH"))
}

fn git(dir: &Path, args: &[&str]) -> Output {
    Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env_remove("GIT_ASKPASS")
        .env_remove("SSH_ASKPASS")
        .output()
        .expect("running git")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_git_clones_with_the_helper_and_erase_invalidates() {
    reauth_tests::logs();
    let (pw1, pw2) = ("git-pw-one-5r4e3w", "git-pw-two-2q1a0z");
    reauth_tests::record_secret(pw1);
    reauth_tests::record_secret(pw2);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A repository with one commit, served by git http-backend behind Basic auth.
    std::fs::create_dir_all(d.join("repos")).unwrap();
    assert!(
        git(d, &["init", "-q", "--bare", "repos/app.git"])
            .status
            .success()
    );
    assert!(git(d, &["init", "-q", "work"]).status.success());
    let work = d.join("work");
    assert!(
        git(
            &work,
            &[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@e",
                "commit",
                "-q",
                "--allow-empty",
                "-m",
                "init"
            ]
        )
        .status
        .success()
    );
    assert!(
        git(
            &work,
            &["push", "-q", "../repos/app.git", "HEAD:refs/heads/main"]
        )
        .status
        .success()
    );
    std::fs::write(d.join("repos/app.git/HEAD"), "ref: refs/heads/main\n").unwrap();
    let exec_path = String::from_utf8(git(d, &["--exec-path"]).stdout).unwrap();
    let users = d.join("users");
    std::fs::write(&users, format!("git-user:{pw1}\n")).unwrap();
    let port = free_port();
    let lighttpd_conf = d.join("lighttpd.conf");
    std::fs::write(
        &lighttpd_conf,
        format!(
            r#"server.document-root = "{root}"
server.bind = "127.0.0.1"
server.port = {port}
server.errorlog = "{root}/lighttpd-error.log"
server.modules = ("mod_alias", "mod_setenv", "mod_cgi", "mod_auth", "mod_authn_file")
alias.url = ("/git/" => "{backend}/git-http-backend/")
$HTTP["url"] =~ "^/git/" {{
    cgi.assign = ("" => "")
    setenv.add-environment = ("GIT_PROJECT_ROOT" => "{root}/repos", "GIT_HTTP_EXPORT_ALL" => "1")
}}
auth.backend = "plain"
auth.backend.plain.userfile = "{users}"
auth.require = ("/git/" => ("method" => "basic", "realm" => "git", "require" => "valid-user"))
"#,
            root = d.display(),
            backend = exec_path.trim(),
            users = users.display()
        ),
    )
    .unwrap();
    let lighttpd = if Path::new("/usr/sbin/lighttpd").exists() {
        "/usr/sbin/lighttpd"
    } else {
        "lighttpd"
    };
    let _web = proc(
        Command::new(lighttpd)
            .arg("-D")
            .arg("-f")
            .arg(&lighttpd_conf)
            .stdout(Stdio::null())
            .spawn()
            .expect("starting lighttpd"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "lighttpd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The password lives in a Vault-shaped endpoint; the sidecar reads it.
    let secrets = SecretsEndpoint::start("git-user", pw1, 3600, "vault-token").await;
    let config = vault_backed_config(d, "repo", "git", &secrets.base);
    let socket = d.join("reauth.sock");
    let (_server, _stdout) = sidecar(&config, &socket);
    let helper = format!(
        "credential.helper=!{} git-credential --provider repo --server {}",
        reauth().display(),
        socket.display()
    );
    let url = format!("http://127.0.0.1:{port}/git/app.git");
    let clone = |dest: &str| {
        git(
            d,
            &[
                "-c",
                "credential.helper=",
                "-c",
                &helper,
                "clone",
                "-q",
                &url,
                dest,
            ],
        )
    };

    let out = clone("c1");
    assert!(
        out.status.success(),
        "clone with the helper: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.join("c1/.git").exists());

    // Rotation: the server's password changes and the secret store has the new one,
    // but the sidecar still caches the old one. git gets a 401 and calls `erase`;
    // the adapter reports the rejection, the sidecar drops the old password and
    // reads the new one; the next clone works.
    std::fs::write(&users, format!("git-user:{pw2}\n")).unwrap();
    secrets.set_password(pw2);
    let out = clone("c2");
    assert!(
        !out.status.success(),
        "the stale password should be refused"
    );
    assert_eq!(
        metric(&socket, "reauth_security_errors_total{provider=\"repo\",kind=\"unauthorized\",decision=\"refresh_and_retry\"}").await,
        1,
        "git's erase reached the provider"
    );
    assert_eq!(secrets.reads.load(std::sync::atomic::Ordering::Relaxed), 2);
    let out = clone("c3");
    assert!(
        out.status.success(),
        "clone after erase: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `get` carries the expiry (the static role's ttl) for git ≥ 2.41.
    let out = run(
        Command::new(reauth())
            .args(["git-credential", "--provider", "repo", "--server"])
            .arg(&socket)
            .arg("get"),
        "protocol=http\nhost=127.0.0.1\n\n",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("username=git-user\n") && text.contains(&format!("password={pw2}\n")),
        "{text}"
    );
    let expiry: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("password_expiry_utc="))
        .expect("password_expiry_utc")
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!((now + 3000..=now + 3601).contains(&expiry), "{expiry}");
}

fn standalone_config(dir: &Path) -> PathBuf {
    let config = dir.join("reauth.toml");
    std::fs::write(
        &config,
        format!(
            r#"[runtime]
cache_dir = "{cache}"
[providers.registry]
plugin = "{static_}"
[providers.registry.config]
username = "david"
password = "static-pw-1q2w3e"
[providers.aws]
plugin = "{static_}"
[providers.aws.config]
"header.aws-access-key-id" = "AKIAEXAMPLE"
"header.aws-secret-access-key" = "static-pw-1q2w3e"
"header.aws-session-token" = "echoed-secret-7h6g5f"
"#,
            cache = dir.join("cache").display(),
            static_ = plugins().static_.display()
        ),
    )
    .unwrap();
    config
}

#[test]
fn docker_credential_helper_protocol() {
    reauth_tests::logs();
    let dir = tempfile::tempdir().unwrap();
    let config = standalone_config(dir.path());
    let helper = |op: &str, stdin: &str| {
        run(
            Command::new(reauth())
                .args([
                    "docker-credential",
                    "--provider",
                    "registry",
                    "--registry",
                    "https://index.docker.io/v1/",
                    "--config",
                ])
                .arg(&config)
                .arg(op),
            stdin,
        )
    };
    // docker-credential-helpers' documented `get` exchange.
    let out = helper("get", "https://index.docker.io/v1/");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let documented = json!({"ServerURL": "https://index.docker.io/v1", "Username": "david", "Secret": "passw0rd1"});
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&got), keys(&documented));
    assert_eq!(got["ServerURL"], "https://index.docker.io/v1/");
    assert_eq!(
        (got["Username"].as_str(), got["Secret"].as_str()),
        (Some("david"), Some("static-pw-1q2w3e"))
    );
    let out = helper("list", "");
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        json!({"https://index.docker.io/v1/": "david"})
    );
    let out = helper(
        "store",
        r#"{"ServerURL": "https://index.docker.io/v1/", "Username": "david", "Secret": "x"}"#,
    );
    assert!(out.status.success());
    let out = helper("erase", "https://index.docker.io/v1/");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = helper("get", "");
    assert!(!out.status.success(), "an empty server URL is an error");
    let out = helper("bogus", "");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("unknown docker credential operation `bogus`")
    );
}

fn docker_helper(config: &Path, registries: &[&str], op: &str, stdin: &str) -> Output {
    let mut cmd = Command::new(reauth());
    cmd.args(["docker-credential", "--provider", "registry"]);
    for r in registries {
        cmd.args(["--registry", r]);
    }
    run(cmd.arg("--config").arg(config).arg(op), stdin)
}

#[test]
fn docker_get_answers_not_found_for_a_server_that_is_not_the_registry() {
    reauth_tests::logs();
    let dir = tempfile::tempdir().unwrap();
    let config = standalone_config(dir.path());
    let registry = ["https://registry.example.com"];
    // The registry, in the forms docker sends it.
    for server in [
        "registry.example.com",
        "https://registry.example.com/",
        "REGISTRY.example.com/v2/",
    ] {
        let out = docker_helper(&config, &registry, "get", server);
        assert!(
            out.status.success(),
            "{server}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got["Secret"], "static-pw-1q2w3e");
    }
    // Any other server (what credsStore asks for every pull): docker-credential-
    // helpers' "not found", exit code 1, and no secret.
    for server in [
        "https://index.docker.io/v1/",
        "evil.example.com",
        "registry.example.com.evil.example.com",
        "registry.example.com:5000",
        "registry.example.com@evil.example.com",
        "evil.example.com/registry.example.com",
        "ftp://registry.example.com",
    ] {
        let out = docker_helper(&config, &registry, "get", server);
        assert_eq!(out.status.code(), Some(1), "{server}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "credentials not found in native keychain",
            "{server}"
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("static-pw-1q2w3e"));
    }
    // Without --registry, nothing is handed out.
    let out = docker_helper(&config, &[], "get", "registry.example.com");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "credentials not found in native keychain"
    );
    // A --registry that is not a registry URL is a configuration error.
    let out = docker_helper(&config, &["user@host"], "get", "host");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--registry `user@host`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_logout_erasing_twice_refreshes_once_and_other_registries_not_at_all() {
    reauth_tests::logs();
    let (pw1, pw2) = ("docker-pw-one-8u7y6t", "docker-pw-two-5r4e3w");
    reauth_tests::record_secret(pw1);
    reauth_tests::record_secret(pw2);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let secrets = SecretsEndpoint::start("robot", pw1, 3600, "vault-token").await;
    let config = vault_backed_config(d, "registry", "registry", &secrets.base);
    let socket = d.join("reauth.sock");
    let (_server, _stdout) = sidecar(&config, &socket);
    let run_dir = d.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let helper = format!(
        "'{}' docker-credential --provider registry --registry registry.example.com --server '{}'",
        reauth().display(),
        socket.display()
    );
    std::fs::write(d.join("host"), "registry.example.com").unwrap();
    std::fs::write(d.join("url"), "https://registry.example.com/").unwrap();
    std::fs::write(d.join("other"), "ghcr.io").unwrap();
    // One docker process (a shell here) running the helper as `docker logout` does:
    // its children, stdin from a file.
    let as_docker = |script: String| {
        let out = Command::new("sh")
            .current_dir(d)
            .args(["-c", &format!("{script}; true")])
            .env("HELPER", &helper)
            .env("XDG_RUNTIME_DIR", &run_dir)
            .output()
            .unwrap();
        assert!(out.status.success());
        out
    };
    let reads = || secrets.reads.load(std::sync::atomic::Ordering::Relaxed);
    let rejections = || {
        metric_or_zero(
            &socket,
            "reauth_security_errors_total{provider=\"registry\"",
        )
    };

    let out = as_docker("eval \"$HELPER get\" < host".into());
    assert!(String::from_utf8_lossy(&out.stdout).contains(pw1));
    assert_eq!(reads(), 1);

    // Erase for another registry: nothing happens.
    as_docker("eval \"$HELPER erase\" < other".into());
    assert_eq!(reads(), 1);
    assert_eq!(rejections().await, 0);

    // docker 28's logout: erase for the host name, then for the URL. Before, each
    // erase dropped whatever was current: two refreshes.
    secrets.set_password(pw2);
    as_docker("eval \"$HELPER erase\" < host; eval \"$HELPER erase\" < url".into());
    assert_eq!(rejections().await, 1, "one rejection reported");
    assert_eq!(reads(), 2, "one refresh");
    let out = as_docker("eval \"$HELPER get\" < host".into());
    assert!(String::from_utf8_lossy(&out.stdout).contains(pw2));
    assert_eq!(reads(), 2);
}

#[test]
fn aws_credential_process_protocol() {
    reauth_tests::logs();
    let dir = tempfile::tempdir().unwrap();
    let config = standalone_config(dir.path());
    let out = run(
        Command::new(reauth())
            .args(["aws-credential-process", "--provider", "aws", "--config"])
            .arg(&config),
        "",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The AWS CLI's documented credential_process output (Expiration omitted: these
    // credentials do not expire).
    let documented = json!({
        "Version": 1,
        "AccessKeyId": "an AWS access key",
        "SecretAccessKey": "your AWS secret access key",
        "SessionToken": "the AWS session token for temporary credentials",
    });
    let keys = |v: &Value| {
        let mut k = v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        k.sort();
        k
    };
    assert_eq!(keys(&got), keys(&documented));
    assert_eq!(got["Version"], 1);
    assert_eq!(got["AccessKeyId"], "AKIAEXAMPLE");
    assert_eq!(got["SessionToken"], "echoed-secret-7h6g5f");
    // A bearer-token provider cannot serve AWS: a clear error.
    let out = run(
        Command::new(reauth())
            .args(["aws-credential-process", "--provider", "nope", "--config"])
            .arg(&config),
        "",
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_reloads_its_config_and_logs_json() {
    reauth_tests::logs();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("reauth.toml");
    let provider = |name: &str| {
        format!(
            "[providers.{name}]\nplugin = \"{}\"\n[providers.{name}.config]\ntoken = \"static-pw-1q2w3e\"\n",
            plugins().static_.display()
        )
    };
    std::fs::write(&config, provider("one")).unwrap();
    let socket = dir.path().join("s.sock");
    let log = dir.path().join("serve.jsonl");
    let mut sidecar = proc(
        Command::new(reauth())
            .args(["serve", "--log-format", "json", "--config"])
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let target = format!("unix:{}", socket.display());
    let names = || async {
        let (_, _, body) = http(&target, "GET", "/v1/providers", &[], None)
            .await
            .ok()?;
        let v: Value = serde_json::from_slice(&body).ok()?;
        Some(
            v["providers"]
                .as_array()?
                .iter()
                .filter_map(|p| p["name"].as_str().map(str::to_string))
                .collect::<Vec<_>>(),
        )
    };
    let wait_for = |want: Vec<&'static str>| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if names().await.is_some_and(|n| n == want) {
                return;
            }
            assert!(Instant::now() < deadline, "providers never became {want:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    wait_for(vec!["one"]).await;
    // A config change is picked up without a restart…
    std::fs::write(&config, provider("one") + &provider("two")).unwrap();
    wait_for(vec!["one", "two"]).await;
    // …and so is SIGHUP after an edit.
    std::fs::write(&config, provider("two")).unwrap();
    let _ = Command::new("kill")
        .args(["-HUP", &sidecar.id().unwrap().to_string()])
        .status();
    wait_for(vec!["two"]).await;
    let status = sidecar.stop().expect("stops on SIGTERM");
    assert!(status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.lines().count() >= 3, "{text}");
    for line in text.lines() {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("fields").is_some(),
            "{line}"
        );
    }
    assert!(text.contains("reloaded"), "{text}");
    assert!(!text.contains("static-pw-1q2w3e"));
}

/// A `reauth.toml` in `dir` with one `password-rotation` provider `provider`
/// reading `static-creds/<path>` from the Vault-shaped endpoint at `base`.
fn vault_backed_config(dir: &Path, provider: &str, path: &str, base: &str) -> PathBuf {
    let config = dir.join("reauth.toml");
    std::fs::write(
        &config,
        format!(
            r#"[providers.{provider}]
plugin = "{}"
allowed_hosts = ["{}"]
[providers.{provider}.config]
secret_url = "{base}/v1/database/static-creds/{path}"
format = "vault-static-creds"
vault_token = "vault-token"
"#,
            plugins().password_rotation.display(),
            base.trim_start_matches("http://"),
        ),
    )
    .unwrap();
    config
}
