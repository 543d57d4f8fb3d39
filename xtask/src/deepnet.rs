//! `cargo xtask deepnet`: DeepNet's 1,000-layer experiment in miniature. A byte-level decoder of
//! 1,000 layers (2,000 residual sublayers) is trained with DeepNorm, Sub-LN, Admin and Post-LN from
//! the same seed, on the same batches, at the same learning rate; it is the stability experiment
//! ([`crate::stability`], same verdicts and record) at another depth, with the wall time, the peak
//! memory and the per-phase step time of each technique.
//!
//! `--layers 200` is the 10-minute version; `--quick` a seconds-long smoke run (12 layers).
//! Settings and the measured step times are in README.md ("More experiments").

use anyhow::Result;
use torchscale_models::config::Technique;

use crate::paths::workspace_root;
use crate::stability::{self, technique_flags, Experiment, StabilityOpts};

technique_flags!(
    /// The command line of `cargo xtask deepnet`.
    #[command(
        name = "deepnet",
        about = "DeepNet's 1,000-layer experiment: a 1,000-layer byte-level decoder trained with \
                 DeepNorm, Sub-LN, Admin and Post-LN at the same learning rate and batches"
    )]
    DeepnetArgs,
    quick: "12 layers, width 32, FFN 64, 2 heads, 4 steps of 2x16 bytes",
    layers: "1000", dim: "64", heads: "4", ffn: "128", steps: "500", lr: "1e-3", warmup: "50",
    batch: "8", seq: "32", techniques: "deepnorm,subln,admin,post-ln", valid_every: "50",
    out: "target/deepnet"
);

/// The techniques, in run order.
pub const TECHNIQUES: [Technique; 4] = [
    Technique::DeepNorm,
    Technique::SubLn,
    Technique::Admin,
    Technique::PostLn,
];

/// The full run's settings (keep the help text of [`DeepnetArgs`] in step).
pub fn defaults() -> StabilityOpts {
    StabilityOpts {
        experiment: "deepnet".into(),
        layers: 1000,
        dim: 64,
        heads: 4,
        ffn_dim: 128,
        steps: 500,
        lr: 1e-3,
        warmup: 50,
        batch: 8,
        seq_len: 32,
        techniques: TECHNIQUES.to_vec(),
        valid_every: 50,
        valid_batches: 8,
        out: workspace_root().join("target/deepnet"),
        ..StabilityOpts::default()
    }
}

/// The `--quick` smoke-test sizes: 12 layers of width 32, 4 steps of 2×16 bytes.
pub fn quick() -> StabilityOpts {
    StabilityOpts {
        layers: 12,
        dim: 32,
        heads: 2,
        ffn_dim: 64,
        steps: 4,
        warmup: 2,
        batch: 2,
        seq_len: 16,
        valid_every: 2,
        valid_batches: 2,
        ..defaults()
    }
}

impl DeepnetArgs {
    /// The settings: the defaults (or `--quick`'s), then every flag given.
    pub fn into_opts(self) -> Result<StabilityOpts> {
        StabilityOpts::with_flags(defaults(), quick(), self.flags())
    }
}

/// Parses the flags after `deepnet` (see [`DeepnetArgs`]).
pub fn parse(args: &[String]) -> Result<StabilityOpts> {
    crate::cli::parse_flags::<DeepnetArgs>("deepnet", args)?.into_opts()
}

/// `cargo xtask deepnet [flags]`: the runs, the table, and where each step's time went.
pub fn main(opts: &StabilityOpts) -> Result<Experiment> {
    let exp = stability::main(opts)?;
    println!("\nmean seconds per step (every step but the first):");
    print!("{}", stability::phase_table(&exp));
    Ok(exp)
}
