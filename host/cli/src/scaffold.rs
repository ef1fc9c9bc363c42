//! `reauth new`: scaffold a provider project from the templates in
//! `sdk/templates/` (embedded in the binary), in Rust, Python or JavaScript.
//!
//! Every template is a working provider (the OAuth2 client-credentials grant) with
//! a `build.sh`, a `conformance.toml` for `reauth test` and a README naming the two
//! commands: `./build.sh` and `reauth test .`.

use std::path::{Path, PathBuf};

/// A provider's language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust with `reauth-sdk` (wit-bindgen), built for wasm32-wasip2.
    Rust,
    /// Python with componentize-py and the kit in `sdk/python`.
    Python,
    /// JavaScript with componentize-js and the kit in `sdk/js`.
    Js,
}

/// (path in the project, template text, executable)
type File = (&'static str, &'static str, bool);

const RUST: &[File] = &[
    (
        "Cargo.toml",
        include_str!("../../../sdk/templates/rust/Cargo.toml.tmpl"),
        false,
    ),
    (
        "src/lib.rs",
        include_str!("../../../sdk/templates/rust/src/lib.rs"),
        false,
    ),
    // The SDK's own lockfile: the project starts from the versions the SDK was
    // tested with (cargo adds the project's own entry at the first build).
    ("Cargo.lock", include_str!("../../../sdk/Cargo.lock"), false),
    (
        "build.sh",
        include_str!("../../../sdk/templates/rust/build.sh"),
        true,
    ),
    (
        "conformance.toml",
        include_str!("../../../sdk/templates/rust/conformance.toml"),
        false,
    ),
    (
        "README.md",
        include_str!("../../../sdk/templates/rust/README.md"),
        false,
    ),
];

const PYTHON: &[File] = &[
    (
        "app.py",
        include_str!("../../../sdk/templates/python/app.py"),
        false,
    ),
    (
        "build.sh",
        include_str!("../../../sdk/templates/python/build.sh"),
        true,
    ),
    (
        "conformance.toml",
        include_str!("../../../sdk/templates/python/conformance.toml"),
        false,
    ),
    (
        "README.md",
        include_str!("../../../sdk/templates/python/README.md"),
        false,
    ),
];

const JS: &[File] = &[
    (
        "app.js",
        include_str!("../../../sdk/templates/js/app.js"),
        false,
    ),
    (
        "build.sh",
        include_str!("../../../sdk/templates/js/build.sh"),
        true,
    ),
    (
        "conformance.toml",
        include_str!("../../../sdk/templates/js/conformance.toml"),
        false,
    ),
    (
        "README.md",
        include_str!("../../../sdk/templates/js/README.md"),
        false,
    ),
];

/// Why a project could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The name cannot be a package/crate name.
    #[error(
        "provider name `{0}`: use lowercase letters, digits and `-`, starting with a letter (at most 64)"
    )]
    BadName(String),
    /// The target directory exists and is not empty.
    #[error("{}: already exists and is not empty", .0.display())]
    Exists(PathBuf),
    /// The SDK checkout could not be found.
    #[error(
        "cannot find the reauth SDK (sdk/ of a reauth checkout, with templates/ and the language kits): {0}; pass --sdk <path> or set REAUTH_SDK"
    )]
    NoSdk(String),
    /// Writing a file failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

/// The SDK directory: `explicit`, else `$REAUTH_SDK`, else the `sdk/` of the
/// checkout this binary was built from.
pub fn find_sdk(explicit: Option<&Path>) -> Result<PathBuf, ScaffoldError> {
    let candidate = match explicit {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("REAUTH_SDK") {
            Some(p) => PathBuf::from(p),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk"),
        },
    };
    let sdk = candidate
        .canonicalize()
        .map_err(|e| ScaffoldError::NoSdk(format!("{}: {e}", candidate.display())))?;
    for needed in ["Cargo.toml", "python/build.sh", "js/build.sh"] {
        if !sdk.join(needed).exists() {
            return Err(ScaffoldError::NoSdk(format!(
                "{} has no {needed}",
                sdk.display()
            )));
        }
    }
    Ok(sdk)
}

/// Create the project `name` in `dir` (which must not exist or be empty); returns
/// the files written.
pub fn create(
    name: &str,
    lang: Lang,
    dir: &Path,
    sdk: &Path,
) -> Result<Vec<PathBuf>, ScaffoldError> {
    // A provider name by the config's one rule, and also a package name in
    // every language the kit scaffolds (lowercase, starting with a letter, no
    // `_`, not ending in `-`).
    let valid = crate::config::valid_provider_name(name)
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if !valid {
        return Err(ScaffoldError::BadName(name.to_string()));
    }
    if dir.exists()
        && std::fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(ScaffoldError::Exists(dir.to_path_buf()));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ScaffoldError::Io { path, source }
    };
    let crate_name = name.replace('-', "_");
    let (files, kit, plugin) = match lang {
        Lang::Rust => (
            RUST,
            sdk.to_path_buf(),
            format!("target/wasm32-wasip2/release/{crate_name}.wasm"),
        ),
        Lang::Python => (PYTHON, sdk.join("python"), "provider.wasm".to_string()),
        Lang::Js => (JS, sdk.join("js"), "provider.wasm".to_string()),
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let abs = dir.canonicalize().map_err(io(dir))?;
    // Paths relative to the project, so that the project and the reauth checkout
    // can move together (or the project be committed) without naming this
    // machine's directories; `REAUTH_SDK` overrides the SDK's.
    let from_project = |target: &Path| {
        let target = target
            .canonicalize()
            .unwrap_or_else(|_| target.to_path_buf());
        relative_path(&abs, &target).display().to_string()
    };
    let mut written = Vec::new();
    for (rel, text, executable) in files {
        let text = text
            .replace("{{name}}", name)
            .replace("{{crate}}", &crate_name)
            .replace("{{sdk}}", &from_project(sdk))
            .replace("{{kit}}", &from_project(&kit))
            .replace("{{plugin}}", &plugin);
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(&path, text).map_err(io(&path))?;
        if *executable {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .map_err(io(&path))?;
        }
        written.push(path);
    }
    Ok(written)
}

/// `target` as a path relative to the directory `base` (both absolute).
fn relative_path(base: &Path, target: &Path) -> PathBuf {
    use std::path::Component;
    let base: Vec<Component> = base.components().collect();
    let target: Vec<Component> = target.components().collect();
    let common = base.iter().zip(&target).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..base.len() {
        out.push("..");
    }
    for c in &target[common..] {
        out.push(c.as_os_str());
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        for (base, target, want) in [
            ("/home/a/proj", "/home/a/reauth/sdk", "../reauth/sdk"),
            ("/home/a/proj", "/home/a/proj/sdk", "sdk"),
            ("/home/a/proj", "/home/a/proj", "."),
            ("/tmp/x/y", "/work/sdk", "../../../work/sdk"),
        ] {
            assert_eq!(
                relative_path(Path::new(base), Path::new(target)),
                Path::new(want)
            );
        }
    }

    #[test]
    fn every_language_gets_the_two_commands_and_no_placeholder() {
        let sdk = find_sdk(None).unwrap();
        for lang in [Lang::Rust, Lang::Python, Lang::Js] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("acme-sso");
            let files = create("acme-sso", lang, &dir, &sdk).unwrap();
            for f in &files {
                let text = std::fs::read_to_string(f).unwrap();
                assert!(!text.contains("{{"), "{} keeps a placeholder", f.display());
            }
            let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
            assert!(readme.contains("./build.sh\nreauth test ."), "{readme}");
            // Nothing names this machine's directories: the SDK is found
            // relative to the project.
            let tmp_abs = tmp.path().canonicalize().unwrap();
            let sdk_abs = sdk.canonicalize().unwrap();
            for f in &files {
                let text = std::fs::read_to_string(f).unwrap();
                for abs in [&tmp_abs, &sdk_abs] {
                    let abs = abs.to_string_lossy();
                    // (`../../work/sdk` contains `/work/sdk`: only a path that
                    // starts there is absolute.)
                    let absolute = text
                        .match_indices(&*abs)
                        .any(|(i, _)| !text[..i].ends_with(".."));
                    assert!(!absolute, "{} names {abs}:\n{text}", f.display());
                }
            }
            if lang == Lang::Rust {
                let lock = std::fs::read_to_string(dir.join("Cargo.lock")).unwrap();
                assert!(
                    lock.contains("name = \"wit-bindgen\""),
                    "versions are pinned"
                );
            } else {
                let build = std::fs::read_to_string(dir.join("build.sh")).unwrap();
                assert!(build.contains("${REAUTH_SDK:-"), "{build}");
            }
            let manifest = std::fs::read_to_string(dir.join("conformance.toml")).unwrap();
            crate::conformance::Manifest::from_toml(&manifest, &dir).unwrap();
            // A second run refuses to overwrite the project.
            assert!(matches!(
                create("acme-sso", lang, &dir, &sdk),
                Err(ScaffoldError::Exists(_))
            ));
        }
    }

    #[test]
    fn names_are_checked() {
        let sdk = find_sdk(None).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        for bad in ["", "Acme", "1acme", "acme_sso", "acme-", "a b"] {
            let e = create(bad, Lang::Rust, &tmp.path().join("x"), &sdk).unwrap_err();
            assert!(matches!(e, ScaffoldError::BadName(_)), "{bad}: {e}");
        }
        let e = find_sdk(Some(tmp.path())).unwrap_err();
        assert!(e.to_string().contains("--sdk"), "{e}");
    }
}
