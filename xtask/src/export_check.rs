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

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use crate::golden::Tolerance;
use crate::parity::TolMode;

pub use cases::{default_cases, Case};
pub use checkpoint::{Checkpoint, Model, ModelConfig};
pub use compare::{compare_dir, ModelReport};
pub use inputs::{make_inputs, SplitMix};
pub use python::{default_python, find_python, run_python};
pub use run::{prepare, run_ours, write_ours};

/// Command-line usage.
pub const USAGE: &str = "usage: cargo xtask export-check [--python PATH] [--checkpoint DIR] \
[--out DIR] [--tolerance strict|default]";

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

impl Options {
    /// Parses the arguments after `export-check`.
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut o = Options {
            python: None,
            checkpoint: None,
            out: Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/export-check"),
            tol: TolMode::Strict,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = || {
                it.next()
                    .cloned()
                    .ok_or_else(|| anyhow!("{a} needs a value\n{USAGE}"))
            };
            match a.as_str() {
                "--python" => o.python = Some(val()?.into()),
                "--checkpoint" => o.checkpoint = Some(val()?.into()),
                "--out" => o.out = val()?.into(),
                "--tolerance" => {
                    o.tol = match val()?.as_str() {
                        "strict" => TolMode::Strict,
                        "default" => TolMode::Default,
                        _ => bail!("--tolerance takes strict or default"),
                    }
                }
                "-h" | "--help" => bail!("{USAGE}"),
                other => bail!("unknown argument `{other}`\n{USAGE}"),
            }
        }
        Ok(o)
    }
}

/// `cargo xtask export-check ...`: prints one line per model and fails if any model fails.
pub fn main(args: &[String]) -> Result<()> {
    let opts = Options::parse(args)?;
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
