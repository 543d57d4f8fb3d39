//! The fused `LayerNorm(alpha x + fx)` against the composed scale, sum and LayerNorm: values and
//! the gradients of x, fx, weight and bias, over alphas, widths, leading shapes, layouts, dtypes.

mod common;

// The training binaries' allocator, for the timing (`--features mimalloc`).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: torchscale_kernels::alloc::Allocator = torchscale_kernels::alloc::Allocator {};

use candle_core::{DType, Tensor};
use common::{assert_close, check, randn, var};
use torchscale_kernels::{residual_layer_norm, residual_layer_norm_composed, with_fused};

const ALPHAS: [f64; 3] = [1.0, 1.7, 0.81 * 1.37];

#[test]
fn matches_composed_f32() {
    for d in [1, 7, 64, 513] {
        for lead in [vec![3], vec![2, 3], vec![2, 1, 3]] {
            let mut dims = lead.clone();
            dims.push(d);
            let x = var(1, &dims, 1.0, DType::F32);
            let fx = var(2, &dims, 0.7, DType::F32);
            let w = var(3, &[d], 0.5, DType::F32);
            let b = var(4, &[d], 0.5, DType::F32);
            for alpha in ALPHAS {
                check(
                    &format!("residual_layer_norm {dims:?} alpha {alpha}"),
                    &[&x, &fx, &w, &b],
                    1e-5,
                    || residual_layer_norm(&x, &fx, alpha, &w, &b, 1e-5),
                );
            }
        }
    }
}

#[test]
fn large_enough_to_thread() {
    let x = var(5, &[4, 40, 515], 1.0, DType::F32);
    let fx = var(6, &[4, 40, 515], 1.0, DType::F32);
    let w = var(7, &[515], 0.5, DType::F32);
    let b = var(8, &[515], 0.5, DType::F32);
    for alpha in ALPHAS {
        check(
            &format!("threaded residual_layer_norm alpha {alpha}"),
            &[&x, &fx, &w, &b],
            1e-5,
            || residual_layer_norm(&x, &fx, alpha, &w, &b, 1e-5),
        );
    }
}

#[test]
fn non_contiguous_inputs() {
    let x = var(9, &[33, 10], 1.0, DType::F32);
    let fx = var(10, &[10, 33], 1.0, DType::F32);
    let w = var(11, &[33], 0.5, DType::F32);
    let b = var(12, &[33], 0.5, DType::F32);
    check("x^T + fx", &[&x, &fx, &w, &b], 1e-5, || {
        residual_layer_norm(&x.t()?, &fx, 1.7, &w, &b, 1e-5)
    });
    let fx2 = var(13, &[33, 10], 1.0, DType::F32);
    check("x + fx^T", &[&fx, &fx2, &w, &b], 1e-5, || {
        residual_layer_norm(&fx, &fx2.t()?, 1.0, &w, &b, 1e-5)
    });
    let w10 = var(14, &[10], 0.5, DType::F32);
    let b10 = var(15, &[10], 0.5, DType::F32);
    check("row slices", &[&x, &fx2, &w10, &b10], 1e-5, || {
        residual_layer_norm(
            &x.narrow(0, 3, 20)?,
            &fx2.narrow(0, 1, 20)?,
            1.3,
            &w10,
            &b10,
            1e-5,
        )
    });
}

#[test]
fn half_precision_inputs_with_f32_affine() {
    for dt in [DType::F16, DType::BF16] {
        let x = var(16, &[3, 5, 67], 1.0, dt);
        let fx = var(17, &[3, 5, 67], 1.0, dt);
        let w = var(18, &[67], 0.5, DType::F32);
        let b = var(19, &[67], 0.5, DType::F32);
        for alpha in [1.0, 1.7] {
            check(
                &format!("residual_layer_norm {dt:?} alpha {alpha}"),
                &[&x, &fx, &w, &b],
                1e-2,
                || residual_layer_norm(&x, &fx, alpha, &w, &b, 1e-5),
            );
        }
        let y = residual_layer_norm(&x, &fx, 1.7, &w, &b, 1e-5).unwrap();
        assert_eq!(y.dtype(), dt);
        let grads = y
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(grads.get(&w).unwrap().dtype(), DType::F32);
        assert_eq!(grads.get(&b).unwrap().dtype(), DType::F32);
        assert_eq!(grads.get(&x).unwrap().dtype(), dt);
        assert_eq!(grads.get(&fx).unwrap().dtype(), dt);
        // Half weight and bias too.
        let wh = var(20, &[67], 0.5, dt);
        let bh = var(21, &[67], 0.5, dt);
        check(
            &format!("residual_layer_norm {dt:?} with {dt:?} affine"),
            &[&x, &fx, &wh, &bh],
            1e-2,
            || residual_layer_norm(&x, &fx, 1.0, &wh, &bh, 1e-5),
        );
    }
}

#[test]
fn inputs_without_gradient() {
    let xc = randn(22, &[4, 9], 1.0, DType::F32);
    let fxc = randn(23, &[4, 9], 1.0, DType::F32);
    let x = var(24, &[4, 9], 1.0, DType::F32);
    let fx = var(25, &[4, 9], 1.0, DType::F32);
    let w = var(26, &[9], 0.5, DType::F32);
    let b = var(27, &[9], 0.5, DType::F32);
    for alpha in [1.0, 1.7] {
        check("constant x", &[&fx, &w, &b], 1e-5, || {
            residual_layer_norm(&xc, &fx, alpha, &w, &b, 1e-5)
        });
        check("constant fx", &[&x, &w, &b], 1e-5, || {
            residual_layer_norm(&x, &fxc, alpha, &w, &b, 1e-5)
        });
        check("constant x and fx", &[&w, &b], 1e-5, || {
            residual_layer_norm(&xc, &fxc, alpha, &w, &b, 1e-5)
        });
        let wc = randn(28, &[9], 0.5, DType::F32);
        let bc = randn(29, &[9], 0.5, DType::F32);
        check("constant weight and bias", &[&x, &fx], 1e-5, || {
            residual_layer_norm(&x, &fx, alpha, &wc, &bc, 1e-5)
        });
        let y = residual_layer_norm(&xc, &fx, alpha, &w, &b, 1e-5).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&xc).is_none());
        assert!(grads.get(&fx).is_some());
        let y = residual_layer_norm(&xc, &fxc, alpha, &wc, &bc, 1e-5).unwrap();
        assert!(!y.track_op(), "all constants give a constant");
    }
}

/// The same tensor as skip and sublayer output: both gradients land on it.
#[test]
fn same_tensor_as_x_and_fx() {
    let x = var(30, &[5, 12], 1.0, DType::F32);
    let w = var(31, &[12], 0.5, DType::F32);
    let b = var(32, &[12], 0.5, DType::F32);
    for alpha in [1.0, 1.7] {
        check("x as fx", &[&x, &w, &b], 1e-5, || {
            residual_layer_norm(&x, &x, alpha, &w, &b, 1e-5)
        });
    }
}

#[test]
fn f64_stays_composed() {
    let x = var(33, &[3, 11], 1.0, DType::F64);
    let fx = var(34, &[3, 11], 1.0, DType::F64);
    let w = var(35, &[11], 0.5, DType::F64);
    let b = var(36, &[11], 0.5, DType::F64);
    check("residual_layer_norm f64", &[&x, &fx, &w, &b], 1e-12, || {
        residual_layer_norm(&x, &fx, 1.7, &w, &b, 1e-5)
    });
}

/// With the fused kernels on, the composed reference uses the fused LayerNorm on the f32 sum:
/// the same rounding as the fused residual kernel.
#[test]
fn f32_sum_is_rounded_as_composed() {
    let x = randn(37, &[6, 33], 1.0, DType::F32);
    let fx = randn(38, &[6, 33], 1.0, DType::F32);
    let w = randn(39, &[33], 0.5, DType::F32);
    let b = randn(40, &[33], 0.5, DType::F32);
    for alpha in ALPHAS {
        let fused = residual_layer_norm(&x, &fx, alpha, &w, &b, 1e-5).unwrap();
        let composed = residual_layer_norm_composed(&x, &fx, alpha, &w, &b, 1e-5).unwrap();
        assert_close("bitwise", &fused, &composed, 0.0);
    }
}

#[test]
fn backward_twice_reuses_the_statistics() {
    let x = var(41, &[5, 13], 1.0, DType::F32);
    let fx = var(42, &[5, 13], 1.0, DType::F32);
    let w = var(43, &[13], 0.5, DType::F32);
    let b = var(44, &[13], 0.5, DType::F32);
    let y = residual_layer_norm(&x, &fx, 1.7, &w, &b, 1e-5)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let g1 = y.backward().unwrap();
    let g2 = y.backward().unwrap();
    for t in [&x, &fx, &w, &b] {
        assert_close(
            "second backward",
            g2.get(t).unwrap(),
            g1.get(t).unwrap(),
            0.0,
        );
    }
}

#[test]
fn wrong_shapes_are_errors() {
    let x = randn(45, &[3, 4], 1.0, DType::F32);
    let ok = randn(46, &[4], 1.0, DType::F32);
    let long = randn(47, &[5], 1.0, DType::F32);
    let fx_bad = randn(48, &[4, 3], 1.0, DType::F32);
    let fx_half = randn(49, &[3, 4], 1.0, DType::BF16);
    let scalar = Tensor::new(1f32, &candle_core::Device::Cpu).unwrap();
    let err = |r: candle_core::Result<Tensor>| r.err().map(|e| e.to_string()).unwrap_or_default();
    for on in [true, false] {
        with_fused(on, || {
            let e = err(residual_layer_norm(&x, &fx_bad, 1.0, &ok, &ok, 1e-5));
            assert!(e.contains("fx"), "{e}");
            let e = err(residual_layer_norm(&x, &fx_half, 1.0, &ok, &ok, 1e-5));
            assert!(e.contains("fx"), "{e}");
            let e = err(residual_layer_norm(&x, &x, 1.0, &long, &ok, 1e-5));
            assert!(e.contains("weight"), "{e}");
            let e = err(residual_layer_norm(&x, &x, 1.0, &ok, &long, 1e-5));
            assert!(e.contains("bias"), "{e}");
            let e = err(residual_layer_norm(&scalar, &scalar, 1.0, &ok, &ok, 1e-5));
            assert!(e.contains("scalar"), "{e}");
        });
    }
    assert!(residual_layer_norm_composed(&x, &fx_bad, 1.0, &ok, &ok, 1e-5).is_err());
    assert!(residual_layer_norm_composed(&x, &x, 1.0, &long, &ok, 1e-5).is_err());
}

/// Fused against composed (scale, sum, fused LayerNorm) at the training sizes, forward and
/// forward + backward (upstream gradient of ones), best of several runs: `cargo test --release
/// -p torchscale-kernels --test residual_norm -- --ignored --nocapture`, with `--features
/// mimalloc` for the training binaries' allocator.
#[test]
#[ignore]
fn timing() {
    use std::time::Instant;
    #[cfg(feature = "mimalloc")]
    torchscale_kernels::alloc::keep_freed_memory();
    for (rows, c) in [(2048, 256), (2048, 512)] {
        let x = var(50, &[rows, c], 1.0, DType::F32);
        let fx = var(51, &[rows, c], 1.0, DType::F32);
        let w = var(52, &[c], 0.5, DType::F32);
        let b = var(53, &[c], 0.5, DType::F32);
        for alpha in [1.0, 1.7] {
            let best_ms = |fused: bool, backward: bool| -> f64 {
                let step = || {
                    let y = if fused {
                        residual_layer_norm(&x, &fx, alpha, &w, &b, 1e-5)
                    } else {
                        residual_layer_norm_composed(&x, &fx, alpha, &w, &b, 1e-5)
                    }
                    .unwrap();
                    if backward {
                        let _ = y.backward().unwrap();
                    }
                };
                step();
                (0..30)
                    .map(|_| {
                        let start = Instant::now();
                        step();
                        start.elapsed().as_secs_f64() * 1e3
                    })
                    .fold(f64::MAX, f64::min)
            };
            let mut best = [f64::MAX; 4];
            for _ in 0..3 {
                for (i, (fused, backward)) in
                    [(true, false), (false, false), (true, true), (false, true)]
                        .into_iter()
                        .enumerate()
                {
                    best[i] = best[i].min(best_ms(fused, backward));
                }
            }
            for (what, f, c_ms) in [("fwd", best[0], best[1]), ("fwd+bwd", best[2], best[3])] {
                println!(
                    "residual_layer_norm {rows}x{c} alpha {alpha} {what}: fused {f:.3} ms, \
                     composed {c_ms:.3} ms, {:.2}x",
                    c_ms / f
                );
            }
        }
    }
}
