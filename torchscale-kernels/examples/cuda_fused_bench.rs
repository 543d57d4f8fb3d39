//! GPU benchmark (feature `cuda`): each fused op against its composed candle version on the same
//! GPU, forward and forward + backward, at the Magneto benchmark's sizes (2048 rows of width 512,
//! FFN 2048, 8 heads over 256 tokens, vocabulary 32000), f32 and bf16. Run by `run.sh bench`
//! (from `cargo xtask cuda build`); prints one table.
//!
//! `TS_BENCH_REPEATS` (default 20) sets the timed runs per cell (median reported).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use torchscale_kernels::adamw::{adamw_composed, adamw_update_tensors, AdamWStep};
use torchscale_kernels::cross_entropy::label_smoothed_ce;
use torchscale_kernels::{
    attention_packed, gelu_erf, layer_norm, linear, linear_gelu, residual_layer_norm,
    softmax_last_dim, with_fused, AttentionOptions,
};

const ROWS: usize = 2048;
const WIDTH: usize = 512;
const FFN: usize = 2048;
const VOCAB: usize = 32000;
const BATCH: usize = 8;
const HEADS: usize = 8;

fn repeats() -> usize {
    std::env::var("TS_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// Median milliseconds of `f` after two warm-up runs, the GPU synchronised around each run.
fn time(dev: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    dev.synchronize()?;
    let mut t = Vec::new();
    for _ in 0..repeats() {
        let start = Instant::now();
        f()?;
        dev.synchronize()?;
        t.push(start.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// A random variable on `dev`.
fn var(dev: &Device, dims: &[usize], scale: f64, dtype: DType) -> Result<Var> {
    Var::from_tensor(&(Tensor::randn(0f32, 1.0, dims, dev)? * scale)?.to_dtype(dtype)?)
}

/// One table row: `f` forward, and forward + backward of `sum(f())`, fused and composed.
fn row(dev: &Device, name: &str, dtype: DType, f: impl Fn() -> Result<Tensor>) -> Result<()> {
    let fwd = |on: bool| time(dev, || with_fused(on, || f().map(drop)));
    let both = |on: bool| {
        time(dev, || {
            with_fused(on, || {
                let y = f()?;
                y.to_dtype(DType::F32)?.sum_all()?.backward().map(drop)
            })
        })
    };
    let (ff, fc) = (fwd(true)?, fwd(false)?);
    let (bf, bc) = (both(true)?, both(false)?);
    println!(
        "| {name:<24} | {:<4} | {ff:8.3} | {fc:8.3} | {:5.2}x | {bf:8.3} | {bc:8.3} | {:5.2}x |",
        format!("{dtype:?}").to_lowercase(),
        fc / ff,
        bc / bf
    );
    Ok(())
}

fn main() -> Result<()> {
    let dev = match Device::new_cuda(0) {
        Ok(dev) => dev,
        Err(e) => candle_core::bail!("cuda_fused_bench needs a CUDA GPU: {e}"),
    };
    println!(
        "fused vs composed on {dev:?}, median of {} runs, ms (ratio = composed / fused)",
        repeats()
    );
    println!("| op                       | type | fwd fused | fwd comp | ratio | f+b fused | f+b comp | ratio |");
    println!("|---|---|---|---|---|---|---|---|");
    for dtype in [DType::F32, DType::BF16] {
        let x = var(&dev, &[ROWS, WIDTH], 1.0, dtype)?;
        let fx = var(&dev, &[ROWS, WIDTH], 1.0, dtype)?;
        let w = var(&dev, &[WIDTH], 1.0, dtype)?;
        let b = var(&dev, &[WIDTH], 1.0, dtype)?;
        row(&dev, "layer_norm", dtype, || layer_norm(&x, &w, &b, 1e-5))?;
        row(&dev, "residual_layer_norm a=2", dtype, || {
            residual_layer_norm(&x, &fx, 2.0, &w, &b, 1e-5)
        })?;
        let t = ROWS / BATCH;
        let scores = var(&dev, &[BATCH, HEADS, t, t], 3.0, dtype)?;
        row(&dev, "softmax [8,8,256,256]", dtype, || {
            softmax_last_dim(&scores)
        })?;
        let h = var(&dev, &[ROWS, FFN], 1.0, dtype)?;
        row(&dev, "gelu_erf [2048,2048]", dtype, || gelu_erf(&h))?;
        let w1 = var(&dev, &[FFN, WIDTH], 0.04, dtype)?;
        let b1 = var(&dev, &[FFN], 0.04, dtype)?;
        let x3 = var(&dev, &[BATCH, t, WIDTH], 1.0, dtype)?;
        row(&dev, "linear_gelu 512->2048", dtype, || {
            linear_gelu(&x3, &w1, Some(&b1))
        })?;
        let w2 = var(&dev, &[WIDTH, FFN], 0.02, dtype)?;
        let h3 = var(&dev, &[BATCH, t, FFN], 1.0, dtype)?;
        row(&dev, "linear 2048->512", dtype, || {
            linear(&h3, &w2, Some(&b))
        })?;
        let qkv = var(&dev, &[BATCH, t, 3 * WIDTH], 1.0, dtype)?;
        let opts = AttentionOptions::new(((WIDTH / HEADS) as f64).powf(-0.5));
        row(&dev, "attention_packed", dtype, || {
            attention_packed(&qkv, HEADS, &opts)
        })?;
        let logits = var(&dev, &[ROWS, VOCAB], 2.0, dtype)?;
        let targets: Vec<u32> = (0..ROWS as u32)
            .map(|i| (i * 7919) % VOCAB as u32)
            .collect();
        row(&dev, "label_smoothed_ce 32000", dtype, || {
            label_smoothed_ce(&logits, &targets, 0.1, Some(1))
        })?;
        adamw_row(&dev, dtype)?;
    }
    Ok(())
}

/// The in-place AdamW update of a `[2048, 512]` parameter against the composed update.
fn adamw_row(dev: &Device, dtype: DType) -> Result<()> {
    let p = var(dev, &[FFN, WIDTH], 0.02, dtype)?;
    let g = var(dev, &[FFN, WIDTH], 0.01, dtype)?;
    let m = Tensor::zeros((FFN, WIDTH), DType::F32, dev)?;
    let v = Tensor::zeros((FFN, WIDTH), DType::F32, dev)?;
    let s = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 10,
    };
    let fused = time(dev, || {
        adamw_update_tensors(p.as_tensor(), g.as_tensor(), &m, &v, &s)
    })?;
    let composed = time(dev, || {
        let (np, nm, nv) = adamw_composed(p.as_tensor(), g.as_tensor(), &m, &v, &s)?;
        p.set(&np)?;
        drop((nm, nv));
        Ok(())
    })?;
    println!(
        "| {:<24} | {:<4} | {fused:8.3} | {composed:8.3} | {:5.2}x |        - |        - |     - |",
        "adamw [2048,512]",
        format!("{dtype:?}").to_lowercase(),
        composed / fused
    );
    Ok(())
}
