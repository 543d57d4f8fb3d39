//! `cargo xtask bench train`: whole training steps of four configurations, split into forward,
//! backward and optimizer, in tokens per second with peak memory, and, with `--torch PYTHON`,
//! PyTorch torchscale on the same configurations alternating with the Rust side in one session.
//!
//! Every measurement runs in its own process (this binary re-invoked with `--child`, or the
//! PyTorch driver `xtask/py/bench_torch_split.py`), so that each one's peak memory is its own and
//! no allocator state carries over; rounds alternate Rust and PyTorch per configuration.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;

use super::train_configs::{measure, Measurement, TrainConfig};
use super::train_report::{load_average, machine, render, Report, Sample};
use crate::cli::count;
use crate::paths::shown;

/// The command line of `cargo xtask bench train`. `--quick` swaps in the smoke test; any other
/// flag given overrides it.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "train",
    about = "Whole training steps (forward, backward, optimizer) of four configurations, tokens/s \
             and peak memory, optionally side by side with PyTorch torchscale"
)]
pub struct TrainArgs {
    /// Smoke test: the tiny configuration, one round, two timed steps, in this process
    #[arg(long)]
    pub quick: bool,
    /// Configurations, in table order (a, b, c, d) [default: a,b,c,d]
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = config_arg)]
    pub configs: Option<Vec<TrainConfig>>,
    /// Alternating rounds; each measures every configuration once per side [default: 3]
    #[arg(long, value_name = "N", value_parser = count)]
    pub rounds: Option<usize>,
    /// Timed steps per measurement, median reported [default: 5]
    #[arg(long, value_name = "N", value_parser = count)]
    pub steps: Option<usize>,
    /// Untimed steps first [default: 3]
    #[arg(long, value_name = "N")]
    pub warmup: Option<usize>,
    /// Compute threads on both sides [default: 2]
    #[arg(long, value_name = "N", value_parser = count)]
    pub threads: Option<usize>,
    /// Python of the reference environment (`cargo xtask ref-setup`): also measure PyTorch
    #[arg(long, value_name = "PYTHON")]
    pub torch: Option<PathBuf>,
    /// Folder holding the reference's bench_torch.py [default: ../shared/ref]
    #[arg(long = "ref", value_name = "DIR")]
    pub ref_dir: Option<PathBuf>,
    /// Where the JSON results go [default: target/bench-train/results.json]
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Measure in this process instead of one child process per measurement
    #[arg(long)]
    pub in_process: bool,
    /// Internal: one measurement in this process, printed as JSON (what the parent runs)
    #[arg(long, hide = true, num_args = 3, value_names = ["KEY", "STEPS", "WARMUP"])]
    pub child: Option<Vec<String>>,
}

impl TrainArgs {
    /// The options: the defaults (or `--quick`'s), then every flag given.
    pub fn into_opts(self) -> Result<TrainBenchOpts> {
        let mut o = if self.quick {
            TrainBenchOpts::quick()
        } else {
            TrainBenchOpts::default()
        };
        o.configs = self.configs.unwrap_or(o.configs);
        o.rounds = self.rounds.unwrap_or(o.rounds);
        o.steps = self.steps.unwrap_or(o.steps);
        o.warmup = self.warmup.unwrap_or(o.warmup);
        o.threads = self.threads.unwrap_or(o.threads);
        o.torch = self.torch.or(o.torch);
        o.ref_dir = self.ref_dir.unwrap_or(o.ref_dir);
        o.out = self.out.unwrap_or(o.out);
        o.in_process |= self.in_process;
        ensure!(!o.configs.is_empty(), "--configs is empty");
        Ok(o)
    }
}

fn config_arg(s: &str) -> Result<TrainConfig, String> {
    TrainConfig::from_key(s).map_err(|e| e.to_string())
}

/// Options of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainBenchOpts {
    /// Configurations, in table order.
    pub configs: Vec<TrainConfig>,
    /// Alternating rounds (each measures every configuration once per side).
    pub rounds: usize,
    /// Timed steps per measurement (median reported).
    pub steps: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Compute threads on both sides.
    pub threads: usize,
    /// Python of the reference environment (`cargo xtask ref-setup`).
    pub torch: Option<PathBuf>,
    /// Folder holding `bench_torch.py`.
    pub ref_dir: PathBuf,
    /// Where the JSON results go.
    pub out: PathBuf,
    /// Measure in this process instead of child processes (the `--quick` smoke test).
    pub in_process: bool,
}

impl Default for TrainBenchOpts {
    fn default() -> Self {
        Self {
            configs: TrainConfig::FULL.to_vec(),
            rounds: 3,
            steps: 5,
            warmup: 3,
            threads: 2,
            torch: None,
            ref_dir: PathBuf::from("../shared/ref"),
            out: PathBuf::from("target/bench-train/results.json"),
            in_process: false,
        }
    }
}

impl TrainBenchOpts {
    /// The smoke test: the tiny configuration, one round, two timed steps, in process.
    pub fn quick() -> Self {
        Self {
            configs: vec![TrainConfig::Quick],
            rounds: 1,
            steps: 2,
            warmup: 1,
            in_process: true,
            out: PathBuf::from("target/bench-train/quick.json"),
            ..Self::default()
        }
    }

    /// Parses the flags after `train` (see [`TrainArgs`]).
    pub fn parse(args: &[String]) -> Result<Self> {
        crate::cli::parse_flags::<TrainArgs>("train", args)?.into_opts()
    }
}

/// `cargo xtask bench train [flags]`, or `--child KEY STEPS WARMUP` (one measurement, JSON out).
pub fn main(args: TrainArgs) -> Result<()> {
    if let Some(child) = &args.child {
        let [key, steps, warmup] = child.as_slice() else {
            bail!("--child KEY STEPS WARMUP")
        };
        let cfg = TrainConfig::from_key(key)?;
        let (warmup, steps) = (warmup.parse()?, steps.parse()?);
        // As a training loop should run: on one of rayon's workers (`runtime::in_pool`).
        let m = torchscale_kernels::runtime::in_pool(|| measure(cfg, warmup, steps))?;
        println!("{}", serde_json::to_string(&m)?);
        return Ok(());
    }
    let opts = args.into_opts()?;
    let report = run(&opts, true)?;
    if let Some(dir) = opts.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&opts.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", opts.out.display()))?;
    println!("{}", render(&report));
    tracing::info!("results: {}", shown(&opts.out));
    Ok(())
}

/// Runs every round; `verbose` prints each measurement as it lands.
pub fn run(opts: &TrainBenchOpts, verbose: bool) -> Result<Report> {
    if let Some(py) = &opts.torch {
        ensure!(
            opts.ref_dir.join("bench_torch.py").is_file(),
            "--ref {}: no bench_torch.py there",
            opts.ref_dir.display()
        );
        ensure!(py.exists(), "--torch {}: no such file", py.display());
    }
    let mut report = Report {
        machine: machine(),
        threads: opts.threads,
        steps: opts.steps,
        warmup: opts.warmup,
        rounds: opts.rounds,
        samples: Vec::new(),
    };
    for round in 1..=opts.rounds {
        for &cfg in &opts.configs {
            let load = load_average();
            let m = if opts.in_process {
                measure(cfg, opts.warmup, opts.steps)?
            } else {
                rust_child(cfg, opts)?
            };
            if verbose {
                tracing::info!(
                    "round {round} {:<5} rust  step {:.3}s  (load {load:.2})",
                    cfg.key(),
                    m.train_step
                );
            }
            report.samples.push(Sample {
                side: "rust".into(),
                round,
                load,
                m,
            });
            if let Some(py) = &opts.torch {
                let load = load_average();
                let m = torch_child(py, cfg, opts)?;
                if verbose {
                    tracing::info!(
                        "round {round} {:<5} torch step {:.3}s  (load {load:.2})",
                        cfg.key(),
                        m.train_step
                    );
                }
                report.samples.push(Sample {
                    side: "torch".into(),
                    round,
                    load,
                    m,
                });
            }
        }
    }
    Ok(report)
}

fn parse_child_json(what: &str, out: std::process::Output) -> Result<Measurement> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("{what} printed no JSON:\n{stdout}"))?;
    serde_json::from_str(line).with_context(|| format!("{what}: bad JSON `{line}`"))
}

fn rust_child(cfg: TrainConfig, opts: &TrainBenchOpts) -> Result<Measurement> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args(["bench", "train", "--child", cfg.key()])
        .arg(opts.steps.to_string())
        .arg(opts.warmup.to_string())
        .env("RAYON_NUM_THREADS", opts.threads.to_string())
        .output()?;
    parse_child_json(&format!("rust child {}", cfg.key()), out)
}

fn torch_child(py: &Path, cfg: TrainConfig, opts: &TrainBenchOpts) -> Result<Measurement> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/bench_torch_split.py");
    let out = Command::new(py)
        .arg(script)
        .arg("--ref")
        .arg(&opts.ref_dir)
        .args(["--config", cfg.key()])
        .args(["--steps", &opts.steps.to_string()])
        .args(["--warmup", &opts.warmup.to_string()])
        .args(["--threads", &opts.threads.to_string()])
        .env("PYTHONWARNINGS", "ignore")
        .output()?;
    parse_child_json(&format!("torch child {}", cfg.key()), out)
}
