//! The reference interpreter: where it is, and running the Python side of the check.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::SCRIPT;
use crate::golden::Tolerance;

/// Where `setup.sh` of the reference environment is, if the checkout has `../shared`.
fn setup_script() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/ref/setup.sh");
    p.is_file().then(|| std::fs::canonicalize(&p).unwrap_or(p))
}

/// The default reference interpreter: `$HOME/.cache/torchscale-ref-venv/bin/python`.
pub fn default_python(home: Option<&Path>) -> Option<PathBuf> {
    home.map(|h| h.join(".cache/torchscale-ref-venv/bin/python"))
}

/// The interpreter to use: `explicit` (`--python`), else the default under `home`; an error that
/// says how to create the environment when it does not exist.
pub fn find_python(explicit: Option<&Path>, home: Option<&Path>) -> Result<PathBuf> {
    let (p, how) = match explicit {
        Some(p) => (Some(p.to_path_buf()), "given with --python"),
        None => (default_python(home), "the default reference interpreter"),
    };
    if let Some(p) = p.as_ref().filter(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let setup = match setup_script() {
        Some(s) => format!("bash {}", s.display()),
        None => "bash ../shared/ref/setup.sh (from the repository root)".to_string(),
    };
    let shown = p
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "$HOME/.cache/torchscale-ref-venv/bin/python ($HOME is unset)".into());
    bail!(
        "no Python interpreter at {shown} ({how}). Create the reference environment (torch, \
         torchscale 0.3.0, safetensors) with `{setup}`, or pass --python PATH to an interpreter \
         that has them"
    )
}

/// Runs the script on the work folders; returns its stdout. Exit status 1 (a FAIL found by the
/// script itself) is not an error here: the Rust comparison decides.
pub fn run_python(python: &Path, works: &[PathBuf], tol: Tolerance) -> Result<String> {
    let out = Command::new(python)
        .arg(SCRIPT)
        .arg("--atol")
        .arg(tol.atol.to_string())
        .arg("--rtol")
        .arg(tol.rtol.to_string())
        .args(works)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !matches!(out.status.code(), Some(0) | Some(1)) {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "{} {SCRIPT} failed ({}):\n{stdout}{stderr}",
            python.display(),
            out.status
        );
    }
    Ok(stdout)
}
