//! Fused kernels against their composed candle versions, forward and backward together (what a
//! training step pays): linear with bias, LayerNorm and causal attention at the sizes of the
//! README's language model (batch 16 × 128 tokens, width 128, 4 heads).
//!
//! `cargo bench -p torchscale-kernels --bench fused` (add `-- linear` to run one group).

use candle_core::{Device, Result, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use torchscale_kernels::{attention, layer_norm, linear, with_fused, AttentionOptions};

const B: usize = 16;
const T: usize = 128;
const C: usize = 128;
const HEADS: usize = 4;

fn var(dims: &[usize], std: f64) -> Var {
    Var::randn(0f32, std as f32, dims, &Device::Cpu).expect("randn")
}

/// Runs `f` (forward, then backward of the sum) once on each path per iteration.
fn compare(c: &mut Criterion, group: &str, f: impl Fn() -> Result<Tensor>) {
    let mut g = c.benchmark_group(group);
    for fused in [true, false] {
        let name = if fused { "fused" } else { "composed" };
        g.bench_function(BenchmarkId::from_parameter(name), |bench| {
            bench.iter(|| {
                with_fused(fused, || f()?.sum_all()?.backward()).expect("forward and backward")
            })
        });
    }
    g.finish();
}

fn linear_bias(c: &mut Criterion) {
    let x = var(&[B, T, C], 1.0);
    let w = var(&[4 * C, C], 0.1);
    let b = var(&[4 * C], 0.1);
    compare(c, "linear 2048x128 -> 512", || linear(&x, &w, Some(&b)));
}

fn layer_norm_rows(c: &mut Criterion) {
    let x = var(&[B, T, C], 1.0);
    let w = var(&[C], 0.1);
    let b = var(&[C], 0.1);
    compare(c, "layer_norm 2048x128", || layer_norm(&x, &w, &b, 1e-5));
}

fn causal_attention(c: &mut Criterion) {
    let d = C / HEADS;
    let (q, k, v) = (
        var(&[B, T, HEADS, d], 1.0),
        var(&[B, T, HEADS, d], 1.0),
        var(&[B, T, HEADS, d], 1.0),
    );
    let mask: Vec<f32> = (0..T * T)
        .map(|i| {
            if i % T > i / T {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mut opts = AttentionOptions::new(1.0 / (d as f64).sqrt());
    opts.attn_mask = Some(Tensor::from_vec(mask, (T, T), &Device::Cpu).expect("mask"));
    compare(c, "attention causal 16x128x4x32", || {
        attention(&q, &k, &v, &opts)
    });
}

criterion_group!(benches, linear_bias, layer_norm_rows, causal_attention);
criterion_main!(benches);
