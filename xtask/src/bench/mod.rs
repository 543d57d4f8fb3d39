//! `cargo xtask bench <what>`: `moe` (index against one-hot dispatch) and `train` (whole training
//! steps, side by side with PyTorch torchscale) and `routing` (capacity, dropless and
//! expert-choice routing on one MoE language model).

pub mod moe;
pub mod routing;
pub mod train;
pub mod train_configs;
pub mod train_report;

use clap::Subcommand;

pub use moe::{print_table, run_moe, BenchOpts, MoeArgs, Pass, Row};
pub use train::TrainArgs;

/// `cargo xtask bench <what>`.
#[derive(Debug, Clone, Subcommand)]
pub enum BenchCmd {
    /// X-MoE index dispatch against torchscale's dense one-hot dispatch
    Moe(MoeArgs),
    /// Whole training steps, optionally side by side with PyTorch torchscale
    Train(TrainArgs),
    /// Capacity routing against dropless and expert-choice routing (tokens/s, drops, loss)
    Routing(routing::RoutingArgs),
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
