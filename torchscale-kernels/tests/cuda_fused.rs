//! The fused CUDA kernels against the fused CPU kernels, on a GPU: every op on the same random
//! inputs (odd sizes) on both devices, forward and every gradient, f32 to 1e-5 relative and
//! bf16 / f16 to 1e-2; AdamW over three steps. Kernel outputs are NaN-poisoned before each
//! launch, so an element a kernel fails to write shows as a NaN on one side only.
//!
//! Every test is `#[ignore]`d (the build machine has no GPU); `run.sh` from
//! `cargo xtask cuda build` runs them with `--include-ignored`. Without a GPU they fail with a
//! message saying so, never skip.
#![cfg(feature = "cuda")]

mod common;

use std::sync::OnceLock;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{max_diff, randn};
use torchscale_kernels::adamw::{adamw_update, adamw_update_tensors, AdamWStep};
use torchscale_kernels::cross_entropy::label_smoothed_ce;
use torchscale_kernels::cuda::set_poison_outputs;
use torchscale_kernels::{
    attention, attention_packed, gelu_erf, layer_norm, linear, linear_gelu, residual_layer_norm,
    softmax_last_dim, with_fused, AttentionOptions,
};

/// The GPU, created once (each device has its own stream, cuBLAS handle and loaded modules),
/// with kernel outputs NaN-poisoned.
fn gpu() -> Device {
    static GPU: OnceLock<std::result::Result<Device, String>> = OnceLock::new();
    set_poison_outputs(true);
    match GPU.get_or_init(|| Device::new_cuda(0).map_err(|e| e.to_string())) {
        Ok(d) => d.clone(),
        Err(e) => panic!("no CUDA GPU: Device::new_cuda(0) failed ({e}); these tests need one"),
    }
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-5
    } else {
        1e-2
    }
}

/// `|gpu - cpu| <= tol * max(1, max |cpu|)`, and NaN in the same places.
fn assert_near(what: &str, gpu: &Tensor, cpu: &Tensor, tol: f64) {
    let g = gpu.to_device(&Device::Cpu).unwrap();
    assert_eq!(g.dtype(), cpu.dtype(), "{what}: dtype");
    assert_eq!(g.dims(), cpu.dims(), "{what}: shape");
    let (d, m) = max_diff(&g, cpu);
    assert!(
        d <= tol * m.max(1.0),
        "{what}: max |gpu - cpu| = {d:e} (max |cpu| {m:e}, tol {tol:e})"
    );
}

/// One input of a comparison: its values, and whether it is a variable (gets a gradient).
struct Input {
    value: Tensor,
    var: bool,
}

fn var(value: Tensor) -> Input {
    Input { value, var: true }
}

fn constant(value: Tensor) -> Input {
    Input { value, var: false }
}

/// Runs `f` with fused kernels on the CPU inputs and on their copies on the GPU, and compares
/// the outputs and the gradients of `sum(y * w)` (`w` random) for every variable input.
fn compare(what: &str, inputs: &[Input], tol: f64, f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    let dev = gpu();
    let run = |device: &Device| {
        with_fused(true, || {
            let ts: Vec<Tensor> = inputs
                .iter()
                .map(|i| {
                    let t = i.value.to_device(device).unwrap();
                    if i.var {
                        Var::from_tensor(&t).unwrap().as_tensor().clone()
                    } else {
                        t
                    }
                })
                .collect();
            let y = f(&ts).unwrap_or_else(|e| panic!("{what} on {device:?}: {e}"));
            let w = randn(99, y.dims(), 1.0, DType::F32)
                .to_device(device)
                .unwrap();
            let loss = (y.to_dtype(DType::F32).unwrap() * w)
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            let g: Vec<Option<Tensor>> = ts
                .iter()
                .zip(inputs)
                .map(|(t, i)| {
                    i.var.then(|| {
                        grads
                            .get(t)
                            .unwrap_or_else(|| panic!("{what} on {device:?}: no gradient"))
                            .clone()
                    })
                })
                .collect();
            (y, g)
        })
    };
    let (yc, gc) = run(&Device::Cpu);
    let (yg, gg) = run(&dev);
    assert_near(&format!("{what} forward"), &yg, &yc, tol);
    for (i, (g, c)) in gg.iter().zip(&gc).enumerate() {
        if let (Some(g), Some(c)) = (g, c) {
            assert_near(&format!("{what} gradient {i}"), g, c, tol);
        }
    }
}

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

#[test]
#[ignore = "needs a CUDA GPU; run.sh runs it"]
fn layer_norm_matches_cpu() {
    for dtype in DTYPES {
        for (dims, wdtype) in [
            (vec![3, 37, 203], dtype),
            (vec![5, 1031], dtype),
            (vec![4, 1], dtype),
            (vec![2, 19, 203], DType::F32),
        ] {
            let d = *dims.last().unwrap();
            let what = format!("layer_norm {dims:?} {dtype:?} weights {wdtype:?}");
            let inputs = [
                var(randn(1, &dims, 2.0, dtype)),
                var((randn(2, &[d], 0.5, DType::F32) + 1.0)
                    .unwrap()
                    .to_dtype(wdtype)
                    .unwrap()),
                var(randn(3, &[d], 0.5, wdtype)),
            ];
            compare(&what, &inputs, tol(dtype), |t| {
                layer_norm(&t[0], &t[1], &t[2], 1e-5)
            });
        }
    }
    // A strided input, and a frozen one (no dx: only the weight kernels run).
    let x = randn(4, &[37, 203], 1.0, DType::F32);
    let inputs = [
        var(x.clone()),
        var(randn(5, &[37], 1.0, DType::F32)),
        var(randn(6, &[37], 1.0, DType::F32)),
    ];
    compare("layer_norm transposed", &inputs, 1e-5, |t| {
        layer_norm(&t[0].t()?, &t[1], &t[2], 1e-5)
    });
    let inputs = [
        constant(x.t().unwrap().contiguous().unwrap()),
        var(randn(5, &[37], 1.0, DType::F32)),
        var(randn(6, &[37], 1.0, DType::F32)),
    ];
    compare("layer_norm frozen input", &inputs, 1e-5, |t| {
        layer_norm(&t[0], &t[1], &t[2], 1e-5)
    });
}

#[test]
#[ignore = "needs a CUDA GPU; run.sh runs it"]
fn residual_layer_norm_matches_cpu() {
    for dtype in DTYPES {
        for alpha in [1.0, 2.5] {
            for (x_var, fx_var) in [(true, true), (true, false), (false, true)] {
                let dims = [3, 29, 203];
                let what = format!("residual_layer_norm {dtype:?} alpha {alpha} {x_var} {fx_var}");
                let mk = |on: bool, t: Tensor| if on { var(t) } else { constant(t) };
                let inputs = [
                    mk(x_var, randn(7, &dims, 1.0, dtype)),
                    mk(fx_var, randn(8, &dims, 1.0, dtype)),
                    var(randn(9, &[203], 1.0, dtype)),
                    var(randn(10, &[203], 1.0, dtype)),
                ];
                compare(&what, &inputs, tol(dtype), |t| {
                    residual_layer_norm(&t[0], &t[1], alpha, &t[2], &t[3], 1e-5)
                });
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run.sh runs it"]
fn softmax_matches_cpu() {
    for dtype in DTYPES {
        for dims in [vec![4, 7, 203], vec![3, 1031], vec![5, 1], vec![2, 33, 5]] {
            let what = format!("softmax {dims:?} {dtype:?}");
            compare(
                &what,
                &[var(randn(11, &dims, 3.0, dtype))],
                tol(dtype),
                |t| softmax_last_dim(&t[0]),
            );
        }
    }
    // -inf entries (masked scores) get probability 0 and no gradient.
    let x = randn(12, &[6, 45], 1.0, DType::F32);
    let mask = Tensor::from_vec(
        (0..6 * 45)
            .map(|i| {
                if i % 45 > i / 45 * 7 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect::<Vec<_>>(),
        (6, 45),
        &Device::Cpu,
    )
    .unwrap();
    compare(
        "softmax masked",
        &[var(x.clone()), constant(mask)],
        1e-5,
        |t| softmax_last_dim(&(&t[0] + &t[1])?),
    );
    // Rows of only -inf (fully masked attention rows) give zeros and a zero gradient, as on the
    // CPU (a NaN on one side fails the comparison).
    let dead = Tensor::from_vec(
        (0..6 * 45)
            .map(|i| {
                if i / 45 == 2 || i / 45 == 5 || i % 45 > i / 45 * 7 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect::<Vec<_>>(),
        (6, 45),
        &Device::Cpu,
    )
    .unwrap();
    compare("softmax dead rows", &[var(x), constant(dead)], 1e-5, |t| {
        softmax_last_dim(&(&t[0] + &t[1])?)
    });
}

#[test]
#[ignore = "needs a CUDA GPU; run.sh runs it"]
fn gelu_matches_cpu() {
    for dtype in DTYPES {
        let what = format!("gelu {dtype:?}");
        compare(
            &what,
            &[var(randn(13, &[3, 37, 203], 3.0, dtype))],
            tol(dtype),
            |t| gelu_erf(&t[0]),
        );
    }
    compare(
        "gelu strided",
        &[var(randn(14, &[37, 21], 2.0, DType::F32))],
        1e-5,
        |t| gelu_erf(&t[0].t()?),
    );
}

#[test]
#[ignore = "needs a CUDA GPU; run.sh runs it"]
fn linear_and_linear_gelu_match_cpu() {
    for dtype in DTYPES {
        for bias in [true, false] {
            let inputs = [
                var(randn(15, &[3, 37, 203], 1.0, dtype)),
                var(randn(16, &[129, 203], 0.1, dtype)),
                var(randn(17, &[129], 0.1, dtype)),
            ];
            let b = |t: &[Tensor]| if bias { Some(t[2].clone()) } else { None };
            let what = format!("linear {dtype:?} bias {bias}");
            compare(&what, &inputs[..2 + usize::from(bias)], tol(dtype), |t| {
                linear(&t[0], &t[1], b(t).as_ref())
            });
            let what = format!("linear_gelu {dtype:?} bias {bias}");
            compare(&what, &inputs[..2 + usize::from(bias)], tol(dtype), |t| {
                linear_gelu(&t[0], &t[1], b(t).as_ref())
            });
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run.sh runs it"]
fn attention_matches_cpu() {
    let (b, t, h, d) = (2, 9, 3, 16);
    let causal = Tensor::from_vec(
        (0..t * t)
            .map(|i| {
                if i % t > i / t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect::<Vec<_>>(),
        (t, t),
        &Device::Cpu,
    )
    .unwrap();
    let padding = Tensor::from_vec(
        vec![0u8, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        (b, t),
        &Device::Cpu,
    )
    .unwrap();
    // Batch 0 left-padded by 2 (under the causal mask its first two query rows see only padded
    // keys), batch 1 entirely padded: fully masked rows give zeros, not NaN, on both devices.
    let left = Tensor::from_vec(
        vec![1u8, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        (b, t),
        &Device::Cpu,
    )
    .unwrap();
    for dtype in DTYPES {
        let inputs = [
            var(randn(22, &[b, t, h, d], 1.0, dtype)),
            var(randn(23, &[b, t, h, d], 1.0, dtype)),
            var(randn(24, &[b, t, h, d], 1.0, dtype)),
            constant(causal.clone()),
            constant(left.clone()),
        ];
        let what = format!("attention dead rows {dtype:?}");
        compare(&what, &inputs, tol(dtype), |x| {
            let mut opts = AttentionOptions::new(0.25);
            opts.attn_mask = Some(x[3].clone());
            opts.key_padding_mask = Some(x[4].clone());
            attention(&x[0], &x[1], &x[2], &opts)
        });
        let inputs = [
            var(randn(25, &[b, t, 3 * h * d], 1.0, dtype)),
            constant(causal.clone()),
            constant(left.clone()),
        ];
        let what = format!("attention_packed dead rows {dtype:?}");
        compare(&what, &inputs, tol(dtype), |x| {
            let mut opts = AttentionOptions::new(0.25);
            opts.attn_mask = Some(x[1].clone());
            opts.key_padding_mask = Some(x[2].clone());
            attention_packed(&x[0], h, &opts)
        });
        let inputs = [
            var(randn(18, &[b, t, h, d], 1.0, dtype)),
            var(randn(19, &[b, t, h, d], 1.0, dtype)),
            var(randn(20, &[b, t, h, d], 1.0, dtype)),
            constant(causal.clone()),
            constant(padding.clone()),
        ];
        let what = format!("attention {dtype:?}");
        compare(&what, &inputs, tol(dtype), |x| {
            let mut opts = AttentionOptions::new(0.25);
            opts.attn_mask = Some(x[3].clone());
            opts.key_padding_mask = Some(x[4].clone());
            attention(&x[0], &x[1], &x[2], &opts)
        });
        let inputs = [
            var(randn(21, &[b, t, 3 * h * d], 1.0, dtype)),
            constant(causal.clone()),
        ];
        let what = format!("attention_packed {dtype:?}");
        compare(&what, &inputs, tol(dtype), |x| {
            let mut opts = AttentionOptions::new(0.25);
            opts.attn_mask = Some(x[1].clone());
            attention_packed(&x[0], h, &opts)
        });
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run.sh runs it"]
fn cross_entropy_matches_cpu() {
    let (n, v) = (37, 1031);
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % v as u32).collect();
    for dtype in DTYPES {
        for (eps, ignore) in [
            (0.0, None),
            (0.1, None),
            (0.1, Some(targets[3])),
            (0.0, Some(targets[5])),
        ] {
            let what = format!("label_smoothed_ce {dtype:?} eps {eps} ignore {ignore:?}");
            compare(
                &what,
                &[var(randn(22, &[n, v], 4.0, dtype))],
                tol(dtype),
                |x| label_smoothed_ce(&x[0], &targets, eps, ignore),
            );
        }
    }
    // Every row ignored: zero loss, zero gradient.
    let all: Vec<u32> = vec![2; 5];
    compare(
        "label_smoothed_ce all ignored",
        &[var(randn(23, &[5, 33], 1.0, DType::F32))],
        1e-5,
        |x| label_smoothed_ce(&x[0], &all, 0.1, Some(2)),
    );
}

#[test]
#[ignore = "needs a CUDA GPU; run.sh runs it"]
fn adamw_three_steps_match_cpu() {
    let dev = gpu();
    for pdtype in DTYPES {
        for gdtype in [pdtype, DType::F32] {
            for wd in [0.0, 0.01] {
                let dims = [37, 203];
                let n = 37 * 203;
                let p0 = randn(24, &dims, 1.0, pdtype);
                let cpu = Var::from_tensor(&p0).unwrap();
                let on_gpu = Var::from_tensor(&p0.to_device(&dev).unwrap()).unwrap();
                let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
                let mg = Tensor::zeros(n, DType::F32, &dev).unwrap();
                let vg = Tensor::zeros(n, DType::F32, &dev).unwrap();
                for step in 1..=3u64 {
                    let g = randn(30 + step, &dims, 0.5, gdtype);
                    let s = AdamWStep {
                        lr: 1e-2,
                        beta1: 0.9,
                        beta2: 0.98,
                        eps: 1e-8,
                        weight_decay: wd,
                        step,
                    };
                    adamw_update(cpu.as_tensor(), &g, &mut m, &mut v, &s).unwrap();
                    let gg = g.to_device(&dev).unwrap();
                    adamw_update_tensors(on_gpu.as_tensor(), &gg, &mg, &vg, &s).unwrap();
                }
                let what = format!("adamw {pdtype:?} grad {gdtype:?} wd {wd}");
                // The same operations, each rounded alone on both sides: equal up to 1e-6.
                assert_near(
                    &format!("{what} param"),
                    on_gpu.as_tensor(),
                    cpu.as_tensor(),
                    1e-6,
                );
                let host = |x: Vec<f32>| Tensor::from_vec(x, n, &Device::Cpu).unwrap();
                assert_near(&format!("{what} m"), &mg, &host(m), 1e-6);
                assert_near(&format!("{what} v"), &vg, &host(v), 1e-6);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run.sh runs it"]
fn bad_inputs_are_errors() {
    let dev = gpu();
    let x = Tensor::zeros((4, 7), DType::F32, &dev).unwrap();
    let w = Tensor::ones(6, DType::F32, &dev).unwrap();
    assert!(
        layer_norm(&x, &w, &w, 1e-5).is_err(),
        "layer_norm weight of the wrong width"
    );
    let p = Var::zeros(10, DType::F32, &dev).unwrap();
    let g = Tensor::ones(10, DType::F32, &dev).unwrap();
    let half = Tensor::zeros(10, DType::F16, &dev).unwrap();
    let m = Tensor::zeros(10, DType::F32, &dev).unwrap();
    let s = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
    };
    assert!(
        adamw_update_tensors(p.as_tensor(), &g, &half, &m, &s).is_err(),
        "f16 moment"
    );
    assert!(
        adamw_update_tensors(p.as_tensor(), &g, &m, &m, &s).is_err(),
        "m and v shared"
    );
    let cpu_m = Tensor::zeros(10, DType::F32, &Device::Cpu).unwrap();
    assert!(
        adamw_update_tensors(p.as_tensor(), &g, &cpu_m, &m, &s).is_err(),
        "m on the CPU"
    );
    let logits = Tensor::zeros((3, 5), DType::F32, &dev).unwrap();
    assert!(
        label_smoothed_ce(&logits, &[0, 9, 1], 0.0, None).is_err(),
        "target out of range"
    );
}
