//! `cargo xtask export-check`: a checkpoint written by torchscale-rs loads into PyTorch torchscale
//! 0.3.0 (`load_state_dict(strict=True)`) and gives the same outputs.
//!
//! The Rust side writes (or reads) the checkpoint layout the trainer uses (`model.safetensors` with
//! torchscale's state_dict names, `config.json`), runs our model on fixed tokens in eval mode and
//! stores inputs and outputs in `ours.safetensors`; `xtask/scripts/export_check.py`, run by the
//! reference interpreter, rebuilds torchscale's model from the same files, runs the same call and
//! writes `torchscale.safetensors`, which is compared here under FORMAT.md's forward tolerance.

mod cases;
mod checkpoint;
mod compare;
mod inputs;
mod python;
mod run;
pub mod setup;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::golden::Tolerance;
use crate::parity::TolMode;
use crate::paths::shown;

pub use cases::{default_cases, Case};
pub use checkpoint::{Checkpoint, Model, ModelConfig};
pub use compare::{compare_dir, ModelReport};
pub use inputs::{make_inputs, SplitMix};
pub use python::{default_python, find_python, run_python};
pub use run::{prepare, run_ours, write_ours};
pub use setup::{setup_command, RefSetupArgs, SETUP_SCRIPT};

/// The Python side of the check.
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/export_check.py");

/// File names of the checkpoint layout and of the check's own files.
pub const MODEL_FILE: &str = "model.safetensors";
/// See [`MODEL_FILE`].
pub const CONFIG_FILE: &str = "config.json";
/// Our inputs (`input.*`) and outputs (`ours.*`); metadata `checkpoint` = the checkpoint folder.
pub const OURS_FILE: &str = "ours.safetensors";
/// torchscale's outputs, written by the script under the names of `ours.*` without the prefix.
pub const REFERENCE_FILE: &str = "torchscale.safetensors";

/// The command line of `cargo xtask export-check`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "export-check",
    about = "Checkpoints written here load into PyTorch torchscale 0.3.0 (strict) and give the \
             same outputs; needs the reference environment (`cargo xtask ref-setup`)"
)]
pub struct ExportCheckArgs {
    /// Python of the reference environment [default: ~/.cache/torchscale-ref-venv/bin/python]
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,
    /// Check this checkpoint folder (config.json + model.safetensors, as train_lm writes)
    /// instead of the built-in models
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,
    /// Work folder [default: target/export-check]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Tolerance column of FORMAT.md section 6
    #[arg(long, value_enum, default_value_t = TolMode::Strict)]
    pub tolerance: TolMode,
}

/// Parsed command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--python`.
    pub python: Option<PathBuf>,
    /// `--checkpoint`.
    pub checkpoint: Option<PathBuf>,
    /// `--out` (default `<workspace>/target/export-check`).
    pub out: PathBuf,
    /// `--tolerance`.
    pub tol: TolMode,
}

impl From<ExportCheckArgs> for Options {
    fn from(a: ExportCheckArgs) -> Self {
        Options {
            python: a.python,
            checkpoint: a.checkpoint,
            out: a
                .out
                .unwrap_or_else(|| crate::paths::workspace_root().join("target/export-check")),
            tol: a.tolerance,
        }
    }
}

impl Options {
    /// Parses the arguments after `export-check` (see [`ExportCheckArgs`]).
    pub fn parse(args: &[String]) -> Result<Self> {
        Ok(crate::cli::parse_flags::<ExportCheckArgs>("export-check", args)?.into())
    }
}

/// `cargo xtask export-check ...`: prints one line per model and fails if any model fails.
pub fn main(opts: &Options) -> Result<()> {
    let start = Instant::now();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let python = find_python(opts.python.as_deref(), home.as_deref())?;
    let tol = match opts.tol {
        TolMode::Strict => Tolerance::STRICT_FORWARD,
        TolMode::Default => Tolerance::DEFAULT_FORWARD,
    };
    let mut works: Vec<(String, PathBuf)> = Vec::new();
    match &opts.checkpoint {
        Some(dir) => {
            tracing::info!("loading the checkpoint {}", shown(dir));
            let ck = Checkpoint::load(dir)?;
            ck.config.torchscale_only()?;
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "checkpoint".into());
            // Our files go under --out so that the checkpoint folder stays untouched.
            let work = opts.out.join(format!("checkpoint-{name}"));
            prepare(&ck, dir, &work)?;
            works.push((name, work));
        }
        None => {
            for (i, (name, cfg, learned)) in default_cases().into_iter().enumerate() {
                let dir = opts.out.join(name);
                let ck = Checkpoint::new(cfg, learned, 1000 + i as u64)?;
                ck.perturb_norms(2000 + i as u64)?;
                ck.save(&dir)?;
                // Check what was written, not the in-memory model.
                let ck = Checkpoint::load(&dir)?;
                prepare(&ck, &dir, &dir).with_context(|| name.to_string())?;
                works.push((name.to_string(), dir));
            }
        }
    }
    let prep = start.elapsed();
    let dirs: Vec<PathBuf> = works.iter().map(|(_, w)| w.clone()).collect();
    tracing::info!(
        "{} models written under {} ({:.1} s); running PyTorch torchscale on them",
        works.len(),
        shown(&opts.out),
        prep.as_secs_f64()
    );
    let py_out = run_python(&python, &dirs, tol)?;
    for l in py_out.lines() {
        println!("  [python] {l}");
    }
    let mut failed = 0;
    for (name, work) in &works {
        let r = compare_dir(name, work, tol)?;
        println!("{}", r.line());
        failed += usize::from(!r.pass());
    }
    println!(
        "{} models, {failed} failed; tolerance atol={:e} rtol={:e}; {:.1}s ({:.1}s Rust side)",
        works.len(),
        tol.atol,
        tol.rtol,
        start.elapsed().as_secs_f64(),
        prep.as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} of {} models differ from torchscale", works.len());
    }
    Ok(())
}
