//! The fused `gelu(x @ w^T + b)` against the fused linear then the fused GELU (and, with the
//! kernels off, candle_nn's Linear then candle's GELU): values and gradients of x, w and b.

mod common;

// The training binaries' allocator, for the timing (`--features mimalloc`).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: torchscale_kernels::alloc::Allocator = torchscale_kernels::alloc::Allocator {};

use candle_core::{DType, Tensor, Var};
use common::{assert_close, check, randn, var};
use torchscale_kernels::{gelu_erf, linear, linear_gelu, linear_gelu_composed, with_fused};

#[test]
fn matches_composed_f32_with_and_without_bias() {
    for dims in [vec![7, 13], vec![3, 5, 13], vec![2, 2, 3, 13], vec![1, 13]] {
        let x = var(1, &dims, 1.0, DType::F32);
        let w = var(2, &[11, 13], 0.5, DType::F32);
        let b = var(3, &[11], 0.5, DType::F32);
        check(
            &format!("linear_gelu+bias {dims:?}"),
            &[&x, &w, &b],
            1e-5,
            || linear_gelu(&x, &w, Some(&b)),
        );
        check(&format!("linear_gelu {dims:?}"), &[&x, &w], 1e-5, || {
            linear_gelu(&x, &w, None)
        });
    }
}

#[test]
fn large_enough_to_thread() {
    let x = var(4, &[4, 97, 129], 1.0, DType::F32);
    let w = var(5, &[193, 129], 0.1, DType::F32);
    let b = var(6, &[193], 0.3, DType::F32);
    check("threaded linear_gelu", &[&x, &w, &b], 1e-5, || {
        linear_gelu(&x, &w, Some(&b))
    });
}

#[test]
fn non_contiguous_inputs() {
    let x = var(7, &[9, 6], 1.0, DType::F32);
    let w = var(8, &[9, 5], 0.3, DType::F32);
    let b = var(9, &[5], 0.3, DType::F32);
    check("linear_gelu of x^T, w^T", &[&x, &w, &b], 1e-5, || {
        linear_gelu(&x.t()?, &w.t()?, Some(&b))
    });
    let w = var(10, &[5, 6], 0.3, DType::F32);
    check("linear_gelu of a row slice", &[&x, &w], 1e-5, || {
        linear_gelu(&x.narrow(0, 2, 5)?, &w, None)
    });
}

#[test]
fn half_precision_inputs() {
    // The composed path rounds the pre-activation and every partial sum of the bias gradient to the
    // half type, the fused one keeps f32: both are held to the f32 computation on the same
    // (rounded) inputs instead, the fused one at the half type's output precision.
    for (dt, tol) in [(DType::F16, 2e-3), (DType::BF16, 1e-2)] {
        let x = var(11, &[4, 6, 17], 1.0, dt);
        let w = var(12, &[9, 17], 0.25, dt);
        let b = var(13, &[9], 0.25, dt);
        let up = |v: &candle_core::Var| Var::from_tensor(&v.to_dtype(DType::F32).unwrap()).unwrap();
        let (x32, w32, b32) = (up(&x), up(&w), up(&b));
        for bias in [true, false] {
            let what = format!("linear_gelu {dt:?} bias {bias}");
            let run = |x: &Tensor, w: &Tensor, b: &Tensor, wrt: &[&Tensor], fused: bool| {
                with_fused(fused, || {
                    let y = linear_gelu(x, w, bias.then_some(b)).unwrap();
                    let probe = randn(99, y.dims(), 1.0, DType::F32);
                    let loss = (y.to_dtype(DType::F32).unwrap() * probe).unwrap();
                    let grads = loss.sum_all().unwrap().backward().unwrap();
                    let g: Vec<Tensor> =
                        wrt.iter().map(|t| grads.get(t).unwrap().clone()).collect();
                    (y, g)
                })
            };
            let (yh, gh) = run(
                &x,
                &w,
                &b,
                &[x.as_tensor(), w.as_tensor(), b.as_tensor()][..2 + bias as usize],
                true,
            );
            let (yr, gr) = run(
                &x32,
                &w32,
                &b32,
                &[x32.as_tensor(), w32.as_tensor(), b32.as_tensor()][..2 + bias as usize],
                false,
            );
            assert_eq!(yh.dtype(), dt, "{what}: output dtype");
            assert_close(&format!("{what} forward"), &yh, &yr, tol);
            for (i, (g, r)) in gh.iter().zip(&gr).enumerate() {
                assert_eq!(g.dtype(), dt, "{what}: gradient {i} dtype");
                assert_close(&format!("{what} gradient {i}"), g, r, tol);
            }
        }
    }
}

#[test]
fn f64_and_mixed_dtypes_stay_composed() {
    let x = var(14, &[3, 8], 1.0, DType::F64);
    let w = var(15, &[5, 8], 0.3, DType::F64);
    let b = var(16, &[5], 0.3, DType::F64);
    check("linear_gelu f64", &[&x, &w, &b], 1e-12, || {
        linear_gelu(&x, &w, Some(&b))
    });
    let y = linear_gelu(&x, &w, Some(&b)).unwrap();
    let want = gelu_erf(&linear(&x, &w, Some(&b)).unwrap()).unwrap();
    assert_close("f64 equals composed", &y, &want, 0.0);
}

#[test]
fn frozen_parts_get_no_gradient() {
    let x = var(17, &[3, 4], 1.0, DType::F32);
    let w = randn(18, &[2, 4], 1.0, DType::F32);
    let b = var(19, &[2], 1.0, DType::F32);
    check("constant weight", &[&x, &b], 1e-5, || {
        linear_gelu(&x, &w, Some(&b))
    });
    let g = linear_gelu(&x, &w, Some(&b))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(&w).is_none());
    let xc = randn(20, &[3, 4], 1.0, DType::F32);
    let wv = var(21, &[2, 4], 1.0, DType::F32);
    let bc = randn(22, &[2], 1.0, DType::F32);
    check("constant input and bias", &[&wv], 1e-5, || {
        linear_gelu(&xc, &wv, Some(&bc))
    });
    let g = linear_gelu(&xc, &wv, Some(&bc))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(&xc).is_none() && g.get(&bc).is_none());
}

#[test]
fn backward_twice_reuses_the_pre_activation() {
    let x = var(23, &[5, 13], 1.0, DType::F32);
    let w = var(24, &[7, 13], 0.5, DType::F32);
    let b = var(25, &[7], 0.5, DType::F32);
    let y = linear_gelu(&x, &w, Some(&b))
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let g1 = y.backward().unwrap();
    let g2 = y.backward().unwrap();
    for t in [&x, &w, &b] {
        assert_close(
            "second backward",
            g2.get(t).unwrap(),
            g1.get(t).unwrap(),
            0.0,
        );
    }
}

/// An in-dim of 0 gives `gelu(b)` on every row (and a bias gradient summed over the rows); no
/// rows or no outputs give empty results.
#[test]
fn empty_products() {
    let x = var(31, &[3, 0], 1.0, DType::F32);
    let w = var(32, &[4, 0], 1.0, DType::F32);
    let b = var(33, &[4], 1.0, DType::F32);
    check("in-dim 0", &[&x, &w, &b], 1e-6, || {
        linear_gelu(&x, &w, Some(&b))
    });
    let y = linear_gelu(&x, &w, Some(&b)).unwrap();
    let want = gelu_erf(&b.broadcast_as((3, 4)).unwrap()).unwrap();
    assert_close("gelu(b) rows", &y, &want, 1e-6);
    let x = var(34, &[0, 5], 1.0, DType::F32);
    let w = var(35, &[4, 5], 1.0, DType::F32);
    assert_eq!(linear_gelu(&x, &w, None).unwrap().dims(), &[0, 4]);
    let x = var(36, &[2, 5], 1.0, DType::F32);
    let w = var(37, &[0, 5], 1.0, DType::F32);
    assert_eq!(linear_gelu(&x, &w, None).unwrap().dims(), &[2, 0]);
}

#[test]
fn wrong_shapes_are_errors() {
    let x = randn(26, &[3, 4], 1.0, DType::F32);
    let w_bad_in = randn(27, &[2, 5], 1.0, DType::F32);
    let w_3d = randn(28, &[1, 2, 4], 1.0, DType::F32);
    let w = randn(29, &[2, 4], 1.0, DType::F32);
    let b_bad = randn(30, &[3], 1.0, DType::F32);
    let err = |r: candle_core::Result<Tensor>| r.err().map(|e| e.to_string()).unwrap_or_default();
    for on in [true, false] {
        with_fused(on, || {
            let e = err(linear_gelu(&x, &w_bad_in, None));
            assert!(e.contains("input x"), "{e}");
            let e = err(linear_gelu(&x, &w_3d, None));
            assert!(e.contains("weight w"), "{e}");
            let e = err(linear_gelu(&x, &w, Some(&b_bad)));
            assert!(e.contains("bias b"), "{e}");
        });
    }
    assert!(linear_gelu_composed(&x, &w_bad_in, None).is_err());
}

/// Fused against composed (fused linear, then fused GELU) at the FFN sizes, forward and forward +
/// backward (upstream gradient of ones), and the GELU alone on one thread, best of several runs:
/// `cargo test --release -p torchscale-kernels --test linear_act -- --ignored --nocapture`, with
/// `--features mimalloc` for the training binaries' allocator.
#[test]
#[ignore]
fn timing() {
    use std::time::Instant;
    #[cfg(feature = "mimalloc")]
    torchscale_kernels::alloc::keep_freed_memory();
    fn best_ms(iters: usize, f: &dyn Fn()) -> f64 {
        f();
        (0..iters)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed().as_secs_f64() * 1e3
            })
            .fold(f64::MAX, f64::min)
    }
    for (rows, inp, out) in [(2048, 256, 1024), (256, 64, 256)] {
        let x = var(40, &[rows, inp], 1.0, DType::F32);
        let w = var(41, &[out, inp], 0.1, DType::F32);
        let b = var(42, &[out], 0.1, DType::F32);
        let iters = if rows > 1000 { 20 } else { 200 };
        let run = |fused: bool, backward: bool| {
            let y = if fused {
                linear_gelu(&x, &w, Some(&b))
            } else {
                linear_gelu_composed(&x, &w, Some(&b))
            }
            .unwrap();
            if backward {
                let _ = y.backward().unwrap();
            }
        };
        let mut best = [f64::MAX; 4];
        for _ in 0..3 {
            for (i, (fused, backward)) in
                [(true, false), (false, false), (true, true), (false, true)]
                    .into_iter()
                    .enumerate()
            {
                best[i] = best[i].min(best_ms(iters, &|| run(fused, backward)));
            }
        }
        for (what, f, c) in [("fwd", best[0], best[1]), ("fwd+bwd", best[2], best[3])] {
            println!(
                "linear_gelu x [{rows}, {inp}] w [{out}, {inp}] {what}: fused {f:.3} ms, \
                 composed {c:.3} ms, {:.2}x",
                c / f
            );
        }
    }
    let x = randn(44, &[64, 1024], 2.0, DType::F32);
    let xv = candle_core::Var::from_tensor(&x).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| {
        let fwd = best_ms(300, &|| {
            gelu_erf(&x).unwrap();
        });
        let both = best_ms(300, &|| {
            let _ = gelu_erf(&xv)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
        });
        println!(
            "gelu_erf 64K f32, one thread: fwd {:.1} us, fwd+bwd {:.1} us",
            fwd * 1e3,
            both * 1e3
        );
    });
}
