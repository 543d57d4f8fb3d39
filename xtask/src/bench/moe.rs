//! `cargo xtask bench moe`: index dispatch ([`MoeLayer::forward`]) against torchscale's dense
//! one-hot dispatch ([`MoeLayer::dense_onehot_forward`]), forward and forward+backward, on the
//! CPU in f32, in one process.

use std::time::Instant;

use anyhow::{ensure, Result};
use candle_core::{DType, Device};
use candle_nn::Init;
use clap::Parser;
use torchscale_core::init::ParamStore;
use torchscale_core::RouteOptions;
use torchscale_moe::{MoeConfig, MoeLayer, MoeOutput};

use super::median;
use crate::cli::count;

/// The command line of `cargo xtask bench moe`. `--quick` swaps in the smoke-test sizes; any
/// other flag given overrides them.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "moe",
    about = "X-MoE index dispatch against torchscale's dense one-hot dispatch, forward and \
             forward+backward"
)]
pub struct MoeArgs {
    /// Smoke-test sizes: 256 tokens, width 64, FFN 256, 2 repeats
    #[arg(long)]
    pub quick: bool,
    /// Tokens per call [default: 2048]
    #[arg(long, value_name = "N", value_parser = count)]
    pub tokens: Option<usize>,
    /// Model width [default: 512]
    #[arg(long, value_name = "C", value_parser = count)]
    pub width: Option<usize>,
    /// Hidden width of each expert [default: 2048]
    #[arg(long, value_name = "F", value_parser = count)]
    pub ffn: Option<usize>,
    /// Timed repeats per measurement, after one warm-up call; the median is reported [default: 3]
    #[arg(long, value_name = "N", value_parser = count)]
    pub repeats: Option<usize>,
    /// Expert counts to try [default: 8,64]
    #[arg(long, value_name = "E1,E2,..", value_delimiter = ',', value_parser = count)]
    pub experts: Option<Vec<usize>>,
}

impl MoeArgs {
    /// The sizes: the defaults (or `--quick`'s), then every flag given.
    pub fn into_opts(self) -> Result<BenchOpts> {
        let mut o = if self.quick {
            BenchOpts::quick()
        } else {
            BenchOpts::default()
        };
        o.tokens = self.tokens.unwrap_or(o.tokens);
        o.width = self.width.unwrap_or(o.width);
        o.ffn = self.ffn.unwrap_or(o.ffn);
        o.repeats = self.repeats.unwrap_or(o.repeats);
        o.experts = self.experts.unwrap_or(o.experts);
        ensure!(!o.experts.is_empty(), "--experts is empty");
        Ok(o)
    }
}

/// The sizes of one benchmark run.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchOpts {
    /// Tokens S per call.
    pub tokens: usize,
    /// Model width C.
    pub width: usize,
    /// Hidden width of each expert.
    pub ffn: usize,
    /// Timed repeats per measurement (after one warmup run); the median is reported.
    pub repeats: usize,
    /// Expert counts to try.
    pub experts: Vec<usize>,
}

impl Default for BenchOpts {
    /// The full benchmark: 2048 tokens, width 512, FFN 2048, E in {8, 64}, 3 repeats.
    fn default() -> Self {
        Self {
            tokens: 2048,
            width: 512,
            ffn: 2048,
            repeats: 3,
            experts: vec![8, 64],
        }
    }
}

impl BenchOpts {
    /// The `--quick` smoke-test sizes: 256 tokens, width 64, FFN 256, 2 repeats.
    pub fn quick() -> Self {
        Self {
            tokens: 256,
            width: 64,
            ffn: 256,
            repeats: 2,
            experts: vec![8, 64],
        }
    }

    /// Parses the flags after `moe` (see [`MoeArgs`]).
    pub fn parse(args: &[String]) -> Result<Self> {
        crate::cli::parse_flags::<MoeArgs>("moe", args)?.into_opts()
    }
}

/// Forward only, or forward plus backward of `sum(output * w)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Forward only.
    Fwd,
    /// Forward then `backward()`.
    FwdBwd,
}

impl Pass {
    fn name(self) -> &'static str {
        match self {
            Pass::Fwd => "fwd",
            Pass::FwdBwd => "fwd+bwd",
        }
    }
}

/// One line of the result table.
#[derive(Debug, Clone)]
pub struct Row {
    /// Number of experts E.
    pub experts: usize,
    /// 1 or 2.
    pub top_k: usize,
    /// What was timed.
    pub pass: Pass,
    /// Median seconds of the index path.
    pub index_s: f64,
    /// Median seconds of the dense one-hot path.
    pub dense_s: f64,
    /// Max |index − dense| of the outputs (same routing seed).
    pub max_abs_diff: f32,
    /// Slots per expert.
    pub capacity: usize,
}

/// `cargo xtask bench moe [flags]`.
pub fn main(opts: &BenchOpts) -> Result<()> {
    let rows = run_moe(opts, true)?;
    print_table(opts, &rows);
    Ok(())
}

/// Runs every (E, top-k, pass) case; `verbose` prints each case as it finishes.
pub fn run_moe(opts: &BenchOpts, verbose: bool) -> Result<Vec<Row>> {
    let dev = Device::Cpu;
    // Inputs and loss weights from their own seeded store, detached so no gradient flows to them.
    let data = ParamStore::new(1).var_builder(DType::F32, &dev);
    let randn = Init::Randn {
        mean: 0.0,
        stdev: 1.0,
    };
    let x = data
        .get_with_hints((opts.tokens, opts.width), "x", randn)?
        .detach();
    let w = data
        .get_with_hints((opts.tokens, opts.width), "w", randn)?
        .detach();
    let route = RouteOptions {
        train: true,
        seed: Some(7),
        ..Default::default()
    };
    let mut rows = Vec::new();
    for &e in &opts.experts {
        for top1 in [true, false] {
            let cfg = MoeConfig {
                embed_dim: opts.width,
                ffn_dim: opts.ffn,
                num_experts: e,
                top1,
                use_xmoe: true,
                ..Default::default()
            }
            .validated()?;
            let store = ParamStore::new(0);
            let layer = MoeLayer::new(cfg, 1.0, store.var_builder(DType::F32, &dev))?;
            let idx = layer.forward(&x, &route)?;
            let dense = layer.dense_onehot_forward(&x, &route)?;
            let diff = (&idx.output - &dense.output)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            let top_k = if top1 { 1 } else { 2 };
            for pass in [Pass::Fwd, Pass::FwdBwd] {
                let run = |dense_path: bool| -> Result<()> {
                    let out: MoeOutput = if dense_path {
                        layer.dense_onehot_forward(&x, &route)?
                    } else {
                        layer.forward(&x, &route)?
                    };
                    if pass == Pass::FwdBwd {
                        let loss = (&out.output * &w)?.sum_all()?;
                        let grads = loss.backward()?;
                        std::hint::black_box(grads);
                    } else {
                        std::hint::black_box(out.output.sum_all()?.to_scalar::<f32>()?);
                    }
                    Ok(())
                };
                let index_s = median_time(opts.repeats, || run(false))?;
                let dense_s = median_time(opts.repeats, || run(true))?;
                let row = Row {
                    experts: e,
                    top_k,
                    pass,
                    index_s,
                    dense_s,
                    max_abs_diff: diff,
                    capacity: idx.stats.capacity,
                };
                if verbose {
                    tracing::info!(
                        "E={e:<3} top-{top_k} {:<8} index {index_s:.3}s  dense {dense_s:.3}s  \
                         (capacity {}, max|diff| {diff:.2e})",
                        pass.name(),
                        row.capacity
                    );
                }
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// One untimed warmup call, then the median wall time of `repeats` calls.
fn median_time(repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        f()?;
        t.push(start.elapsed().as_secs_f64());
    }
    Ok(median(&mut t))
}

/// Prints the markdown result table.
pub fn print_table(opts: &BenchOpts, rows: &[Row]) {
    println!(
        "MoE bench: {} tokens, width {}, FFN {}, f32 CPU, X-MoE routing, train-mode capacity, \
         median of {} (after 1 warmup)",
        opts.tokens, opts.width, opts.ffn, opts.repeats
    );
    println!();
    println!(
        "| experts | top-k | capacity | pass | tokens/s index | tokens/s dense | index/dense (speed-up) | max abs diff |"
    );
    println!("|---:|---:|---:|---|---:|---:|---:|---:|");
    let s = opts.tokens as f64;
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.2} | {:.1e} |",
            r.experts,
            r.top_k,
            r.capacity,
            r.pass.name(),
            s / r.index_s,
            s / r.dense_s,
            r.dense_s / r.index_s,
            r.max_abs_diff
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn flags_override_quick() {
        let args: Vec<String> = ["--quick", "--tokens", "32", "--experts", "4,16"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let o = BenchOpts::parse(&args).unwrap();
        assert_eq!((o.tokens, o.width, o.experts), (32, 64, vec![4, 16]));
        assert!(BenchOpts::parse(&["--tokens".to_string(), "0".to_string()]).is_err());
        assert!(BenchOpts::parse(&["--bogus".to_string()]).is_err());
    }

    #[test]
    fn tiny_bench_paths_agree() {
        let o = BenchOpts {
            tokens: 32,
            width: 8,
            ffn: 16,
            repeats: 1,
            experts: vec![4],
        };
        let rows = run_moe(&o, false).unwrap();
        // 1 expert count × {top-1, top-2} × {fwd, fwd+bwd}.
        assert_eq!(rows.len(), 4);
        for r in rows {
            assert!(r.max_abs_diff < 1e-5, "{r:?}");
            assert!(r.index_s > 0.0 && r.dense_s > 0.0);
        }
    }
}
