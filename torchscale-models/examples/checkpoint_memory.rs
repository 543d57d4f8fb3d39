//! Peak memory of a training step with and without activation checkpointing.
//!
//! ```text
//! cargo run --release -p torchscale-models --example checkpoint_memory -- --layers 48
//! cargo run --release -p torchscale-models --example checkpoint_memory -- --layers 1000 --every 1
//! ```
//!
//! Each mode runs in a child process of its own (this binary again, with `--mode`), so that one
//! mode's peak cannot hide the other's: the child builds a Sub-LN decoder LM (dropout 0.1) and its
//! AdamW trainer, then takes `--steps` training steps on random bytes and reports its peak
//! resident set (`VmHWM` of `/proc/self/status`) before and after the steps, and each step's
//! time. The allocator is train_lm's (mimalloc, freed pages kept for reuse), so the peak is what
//! a training run holds.

use std::process::Command;
use std::time::Instant;

#[global_allocator]
static ALLOC: torchscale_kernels::alloc::Allocator = torchscale_kernels::alloc::Allocator {};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use torchscale_models::build::BuildOptions;
use torchscale_models::config::DecoderConfig;
use torchscale_models::data::{BYTE_OFFSET, BYTE_VOCAB};
use torchscale_models::lm::{LanguageModel, LossConfig};
use torchscale_models::train::{AdamWConfig, ClipMode, Schedule, Trainer, TrainerConfig};

/// Peak resident memory of training steps, plain against activation checkpointing.
#[derive(Debug, Parser)]
#[command(name = "checkpoint_memory", max_term_width = 100)]
struct Args {
    /// Decoder layers
    #[arg(long, default_value_t = 48)]
    layers: usize,
    /// Model width
    #[arg(long, default_value_t = 64)]
    dim: usize,
    /// Attention heads
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Feed-forward width (default 4 x dim)
    #[arg(long)]
    ffn: Option<usize>,
    /// Sequences per batch
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Sequence length
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Layers per checkpointed segment
    #[arg(long, default_value_t = 1)]
    every: usize,
    /// Training steps per mode (the first also allocates AdamW's moments)
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Modes to measure: plain, checkpointed (the parent runs each in a child)
    #[arg(long, value_delimiter = ',', default_value = "plain,checkpointed")]
    modes: Vec<String>,
    /// Internal: run one mode in this process and print its result line
    #[arg(long, hide = true)]
    child: bool,
}

fn main() -> Result<()> {
    torchscale_kernels::alloc::keep_freed_memory();
    let a = Args::parse();
    if a.child {
        let mode = a
            .modes
            .first()
            .ok_or_else(|| anyhow!("--child needs one mode"))?;
        return child(&a, mode);
    }
    let ffn = a.ffn.unwrap_or(4 * a.dim);
    println!(
        "Sub-LN decoder LM: {} layers, width {}, {} heads, ffn {}, batch {} x {} tokens, {} step(s); checkpointed segments of {} layer(s)",
        a.layers, a.dim, a.heads, ffn, a.batch, a.seq, a.steps, a.every
    );
    println!(
        "{:<13} {:>12} {:>12} {:>14} {:>10}  step times",
        "mode", "params MiB", "before MiB", "peak MiB", "step MiB"
    );
    let exe = std::env::current_exe()?;
    let mut peaks = Vec::new();
    for mode in &a.modes {
        let args = [
            format!("--layers={}", a.layers),
            format!("--dim={}", a.dim),
            format!("--heads={}", a.heads),
            format!("--ffn={ffn}"),
            format!("--batch={}", a.batch),
            format!("--seq={}", a.seq),
            format!("--every={}", a.every),
            format!("--steps={}", a.steps),
            format!("--modes={mode}"),
            "--child".into(),
        ];
        let out = Command::new(&exe)
            .args(&args)
            .output()
            .with_context(|| format!("starting the {mode} child"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let Some(line) = stdout.lines().find(|l| l.starts_with("RESULT ")) else {
            println!(
                "{mode:<13} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            continue;
        };
        let f: Vec<&str> = line.split_whitespace().collect();
        let (params, before, peak) = (num(f[2])?, num(f[3])?, num(f[4])?);
        let fastest = f[5..]
            .iter()
            .filter_map(|t| t.trim_end_matches('s').parse::<f64>().ok())
            .fold(f64::INFINITY, f64::min);
        println!(
            "{mode:<13} {params:>12.1} {before:>12.1} {peak:>14.1} {:>10.1}  {} (fastest {fastest:.2}s)",
            peak - before,
            f[5..].join(" ")
        );
        peaks.push((mode.clone(), peak, peak - before));
    }
    if let [(_, p0, s0), (_, p1, s1)] = peaks.as_slice() {
        println!(
            "peak: {:.2}x less with checkpointing; the step's own growth {:.2}x less",
            p0 / p1,
            s0 / s1
        );
    }
    Ok(())
}

fn num(s: &str) -> Result<f64> {
    s.parse().with_context(|| format!("reading `{s}`"))
}

/// One mode, in this process: prints `RESULT mode params_mib before_mib peak_mib step_s...`.
fn child(a: &Args, mode: &str) -> Result<()> {
    let every = match mode {
        "plain" => None,
        "checkpointed" => Some(a.every),
        m => bail!("unknown mode `{m}` (plain or checkpointed)"),
    };
    let cfg = DecoderConfig::default()
        .with_vocab_size(BYTE_VOCAB as i64)
        .with_embed_dim(a.dim)
        .with_heads(a.heads)
        .with_ffn_dim(a.ffn.unwrap_or(4 * a.dim))
        .with_layers(a.layers)
        .with_max_positions(a.seq.max(8))
        .with_subln(true)
        .with_dropout(0.1);
    // The plain mode is what is measured, even where the default budget (the memory available
    // now) would refuse its batch: the machine's whole memory is the limit here.
    let opts = BuildOptions {
        learned_positions: Some(true),
        memory_budget: Some(mem_total()?),
        ..Default::default()
    };
    let lm = LanguageModel::with_build_options(cfg, &opts, 1, &Device::Cpu, DType::F32)?;
    let params_mib = (lm.num_parameters() * 4) as f64 / MIB;
    let mut t = Trainer::new(
        &lm.store,
        &lm.model.expert_parameters(),
        TrainerConfig {
            seed: 1,
            clip: ClipMode::GlobalNorm(1.0),
            max_consecutive_skips: 2,
        },
        AdamWConfig::default(),
        Schedule::Constant(1e-3),
    )?;
    let loss = LossConfig::default();
    let before = peak_mib()?;
    let mut times = Vec::new();
    for _ in 0..a.steps {
        let clock = Instant::now();
        t.step(1, |ctx| {
            let (input, target) = random_batch(a.batch, a.seq, ctx.seed)?;
            match every {
                Some(k) => lm.micro_batch_checkpointed(&input, &target, true, &loss, ctx.seed, k),
                None => lm.micro_batch(&input, &target, true, &loss, ctx.seed),
            }
        })?;
        times.push(format!("{:.2}s", clock.elapsed().as_secs_f64()));
    }
    println!(
        "RESULT {mode} {params_mib:.1} {before:.1} {:.1} {}",
        peak_mib()?,
        times.join(" ")
    );
    Ok(())
}

const MIB: f64 = 1024.0 * 1024.0;

/// Byte ids drawn from `seed` (ids `BYTE_OFFSET..`), the target the input shifted by one.
fn random_batch(b: usize, t: usize, seed: u64) -> torchscale_core::Result<(Tensor, Tensor)> {
    let mut x = seed | 1;
    let ids: Vec<u32> = (0..b * (t + 1))
        .map(|_| {
            // xorshift: reproducible, no dependency.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            BYTE_OFFSET + (x % 256) as u32
        })
        .collect();
    let all = Tensor::from_vec(ids, (b, t + 1), &Device::Cpu)?;
    Ok((all.narrow(1, 0, t)?, all.narrow(1, 1, t)?))
}

/// This process's peak resident set so far, in MiB (`VmHWM`).
fn peak_mib() -> Result<f64> {
    Ok(kib_field("/proc/self/status", "VmHWM:")? / 1024.0)
}

/// The machine's memory in bytes (`MemTotal`).
fn mem_total() -> Result<u64> {
    Ok(kib_field("/proc/meminfo", "MemTotal:")? as u64 * 1024)
}

/// A `key   N kB` line of a /proc file.
fn kib_field(path: &str, key: &str) -> Result<f64> {
    std::fs::read_to_string(path)?
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no {key} in {path}"))
}
