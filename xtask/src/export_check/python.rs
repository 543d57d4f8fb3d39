//! The reference interpreter: where it is, and running the Python side of the check.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::setup::SETUP_SCRIPT_SHOWN;
use super::SCRIPT;
use crate::golden::Tolerance;
use crate::paths::{shown, shown_from};

/// The default reference interpreter: `$HOME/.cache/torchscale-ref-venv/bin/python`.
pub fn default_python(home: Option<&Path>) -> Option<PathBuf> {
    home.map(|h| h.join(".cache/torchscale-ref-venv/bin/python"))
}

/// The interpreter to use: `explicit` (`--python`), else the default under `home`; an error that
/// says how to create the environment when it does not exist (paths under `home` shown as `~`).
pub fn find_python(explicit: Option<&Path>, home: Option<&Path>) -> Result<PathBuf> {
    let (p, how) = match explicit {
        Some(p) => (Some(p.to_path_buf()), "given with --python"),
        None => (default_python(home), "the default reference interpreter"),
    };
    if let Some(p) = p.as_ref().filter(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let cwd = std::env::current_dir().ok();
    let show = |p: &Path| shown_from(p, cwd.as_deref(), home);
    // A `--python DIR/bin/python` that is missing is most likely a venv still to be made there.
    let venv = explicit
        .filter(|p| p.ends_with("bin/python") || p.ends_with("bin/python3"))
        .and_then(|p| p.parent()?.parent())
        .map(|v| format!(" --venv {}", show(v)))
        .unwrap_or_default();
    let shown = p.as_deref().map(show).unwrap_or_else(|| {
        "~/.cache/torchscale-ref-venv/bin/python ($HOME is unset; pass --python)".into()
    });
    bail!(
        "no Python interpreter at {shown} ({how}). Create the reference environment (CPU torch, \
         torchscale 0.3.0, safetensors) with `cargo xtask ref-setup{venv}` (the same as `bash \
         {SETUP_SCRIPT_SHOWN}{venv}` from the repository root), or pass --python PATH to an \
         interpreter that has them"
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
        .with_context(|| format!("running {}", shown(python)))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !matches!(out.status.code(), Some(0) | Some(1)) {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "{} {} failed ({}):\n{stdout}{stderr}",
            shown(python),
            shown(Path::new(SCRIPT)),
            out.status
        );
    }
    Ok(stdout)
}
