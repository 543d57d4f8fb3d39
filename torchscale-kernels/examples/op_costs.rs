//! Per-call cost of each fused op at small sizes (throwaway profiling aid).
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use torchscale_kernels::attention::{attention, AttentionOptions};
use torchscale_kernels::{gelu_erf, layer_norm, linear};

fn time(name: &str, n: usize, mut f: impl FnMut()) {
    for _ in 0..n / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    println!(
        "{name:<40} {:>8.2} us",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let x = Var::randn(0f32, 1.0, (8, 32, 64), &dev)?;
    let w = Var::randn(0f32, 0.1, (64, 64), &dev)?;
    let b = Var::zeros(64, DType::F32, &dev)?;
    let w1 = Var::randn(0f32, 0.1, (256, 64), &dev)?;
    let b1 = Var::zeros(256, DType::F32, &dev)?;
    let lw = Var::ones(64, DType::F32, &dev)?;
    let h = Var::randn(0f32, 1.0, (8, 32, 256), &dev)?;
    let n = 2000;
    time("add [8,32,64]", n, || {
        let _ = (x.as_tensor() + x.as_tensor()).unwrap();
    });
    time("zeros_like [8,32,64]", n, || {
        let _ = x.zeros_like().unwrap();
    });
    time("linear 64->64", n, || {
        let _ = linear(&x, &w, Some(&b)).unwrap();
    });
    time("linear 64->256", n, || {
        let _ = linear(&x, &w1, Some(&b1)).unwrap();
    });
    time("layer_norm 64", n, || {
        let _ = layer_norm(&x, &lw, &b, 1e-5).unwrap();
    });
    time("gelu [8,32,256]", n, || {
        let _ = gelu_erf(&h).unwrap();
    });
    let mask = Tensor::zeros((32, 32), DType::F32, &dev)?;
    let opts = AttentionOptions {
        scale: 0.25,
        attn_mask: Some(mask),
        key_padding_mask: None,
    };
    let q = x.reshape((8, 32, 4, 16))?;
    time("attention 8x32x4x16", n, || {
        let _ = attention(&q, &q, &q, &opts).unwrap();
    });
    time("fwd+bwd linear 64->64", n, || {
        let y = linear(&x, &w, Some(&b)).unwrap();
        let _ = y.sum_all().unwrap().backward().unwrap();
    });
    time("fwd+bwd sum only", n, || {
        let _ = x.sum_all().unwrap().backward().unwrap();
    });
    time("fwd+bwd layer_norm", n, || {
        let y = layer_norm(&x, &lw, &b, 1e-5).unwrap();
        let _ = y.sum_all().unwrap().backward().unwrap();
    });
    time("fwd+bwd attention", n, || {
        let y = attention(&q, &q, &q, &opts).unwrap();
        let _ = y.sum_all().unwrap().backward().unwrap();
    });
    let xc = Var::randn(0f32, 1.0, (16, 128, 256), &dev)?;
    let wc = Var::randn(0f32, 0.1, (256, 256), &dev)?;
    let bc = Var::zeros(256, DType::F32, &dev)?;
    let w1c = Var::randn(0f32, 0.1, (1024, 256), &dev)?;
    let b1c = Var::zeros(1024, DType::F32, &dev)?;
    let w2c = Var::randn(0f32, 0.1, (256, 1024), &dev)?;
    let hc = Var::randn(0f32, 1.0, (16, 128, 1024), &dev)?;
    let n = 20;
    let gflop = |m: usize, k: usize, nn: usize| 2.0 * (m * k * nn) as f64 / 1e9;
    println!("c shapes: fwd 256->256 {:.2} GFLOP", gflop(2048, 256, 256));
    time("c linear 256->256 fwd", n, || {
        let _ = linear(&xc, &wc, Some(&bc)).unwrap();
    });
    time("c linear 256->256 fwd+bwd", n, || {
        let y = linear(&xc, &wc, Some(&bc)).unwrap();
        let _ = y.sum_all().unwrap().backward().unwrap();
    });
    time("c linear 256->1024 fwd+bwd", n, || {
        let y = linear(&xc, &w1c, Some(&b1c)).unwrap();
        let _ = y.sum_all().unwrap().backward().unwrap();
    });
    time("c linear 1024->256 fwd+bwd", n, || {
        let y = linear(&hc, &w2c, Some(&bc)).unwrap();
        let _ = y.sum_all().unwrap().backward().unwrap();
    });
    time("c sum fwd+bwd [16,128,1024]", n, || {
        let _ = hc.sum_all().unwrap().backward().unwrap();
    });
    Ok(())
}
