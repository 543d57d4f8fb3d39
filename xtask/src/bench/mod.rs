//! `cargo xtask bench <what>`: `moe` (index against one-hot dispatch) and `train` (whole training
//! steps, side by side with PyTorch torchscale).

pub mod moe;
pub mod train;
pub mod train_configs;
pub mod train_report;

use anyhow::{bail, Result};

pub use moe::{print_table, run_moe, BenchOpts, Pass, Row};

const USAGE: &str = "usage: cargo xtask bench moe [flags] | cargo xtask bench train [flags]";

/// `cargo xtask bench <what> [flags]`.
pub fn main(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("moe") => moe::main(&args[1..]),
        Some("train") => train::main(&args[1..]),
        _ => bail!("{USAGE}"),
    }
}

/// The median (mean of the two middle values for an even count); 0 for an empty slice.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
