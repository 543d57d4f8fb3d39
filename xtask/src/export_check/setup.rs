//! `cargo xtask ref-setup`: creates the reference environment with `xtask/scripts/setup_ref.sh`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use clap::Parser;

/// The setup script.
pub const SETUP_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/setup_ref.sh");
/// [`SETUP_SCRIPT`] as typed from the repository root (what messages show).
pub const SETUP_SCRIPT_SHOWN: &str = "xtask/scripts/setup_ref.sh";

/// The command line of `cargo xtask ref-setup`.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "ref-setup",
    about = "Create the PyTorch reference environment (a venv with CPU torch, torchscale 0.3.0 and \
             safetensors) that export-check uses; leaves one that already works as it is"
)]
pub struct RefSetupArgs {
    /// Where to create it [default: ~/.cache/torchscale-ref-venv, where export-check looks]
    #[arg(long, value_name = "DIR")]
    pub venv: Option<PathBuf>,
    /// The Python that creates it, 3.9 or newer [default: python3]
    #[arg(long, value_name = "PY")]
    pub python: Option<PathBuf>,
    /// Print the commands without running them
    #[arg(long)]
    pub dry_run: bool,
}

/// `bash setup_ref.sh` with the flags of `args`.
pub fn setup_command(args: &RefSetupArgs) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(SETUP_SCRIPT);
    if let Some(v) = &args.venv {
        cmd.arg("--venv").arg(v);
    }
    if let Some(p) = &args.python {
        cmd.arg("--python").arg(p);
    }
    if args.dry_run {
        cmd.arg("--dry-run");
    }
    cmd
}

/// Runs the script; its output goes straight to the terminal (pip's progress included).
pub fn main(args: &RefSetupArgs) -> Result<()> {
    let status = setup_command(args)
        .status()
        .with_context(|| format!("running bash {SETUP_SCRIPT_SHOWN}"))?;
    ensure!(status.success(), "{SETUP_SCRIPT_SHOWN} failed ({status})");
    Ok(())
}
