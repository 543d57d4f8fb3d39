//! The fused grouped linear against its composed version (narrow / matmul / cat): values and the
//! gradients of input, weights and biases, for random group sizes with empty groups.

mod common;

// The training binaries' allocator, for the timing (`--features mimalloc`).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: torchscale_kernels::alloc::Allocator = torchscale_kernels::alloc::Allocator {};

use candle_core::{DType, Tensor};
use common::{check, randn, var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use torchscale_kernels::{
    grouped_layer_norm, grouped_linear, grouped_linear_composed, layer_norm, with_fused,
};

/// `groups` random group sizes in `0..=max`, about a quarter of them forced empty.
fn random_counts(seed: u64, groups: usize, max: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..groups)
        .map(|_| {
            if rng.random_bool(0.25) {
                0
            } else {
                rng.random_range(0..=max)
            }
        })
        .collect()
}

#[test]
fn matches_composed_f32_random_counts() {
    let (i, o) = (24, 20);
    for (seed, groups, max) in [(1, 1, 40), (2, 8, 30), (3, 8, 3), (4, 64, 9), (5, 64, 1)] {
        let mut counts = random_counts(seed, groups, max);
        // At least one non-empty group and (with several) one empty one, whatever the draw.
        if groups > 1 {
            counts[0] = 0;
        }
        counts[groups - 1] = counts[groups - 1].max(2);
        let k: usize = counts.iter().sum();
        let x = var(10 + seed, &[k, i], 1.0, DType::F32);
        let w = var(20 + seed, &[groups, o, i], 0.3, DType::F32);
        let b = var(30 + seed, &[groups, o], 0.3, DType::F32);
        let what = format!("E={groups} counts={counts:?}");
        check(&format!("{what} with bias"), &[&x, &w, &b], 1e-5, || {
            grouped_linear(&x, &w, Some(&b), &counts)
        });
        check(&format!("{what} without bias"), &[&x, &w], 1e-5, || {
            grouped_linear(&x, &w, None, &counts)
        });
    }
}

#[test]
fn large_enough_to_split_over_threads() {
    // Many groups (split by group) and a few big ones (each product splitting itself).
    for (seed, groups, max) in [(6, 64, 40), (7, 4, 300)] {
        let counts = random_counts(seed, groups, max);
        let k: usize = counts.iter().sum();
        let x = var(40 + seed, &[k, 96], 1.0, DType::F32);
        let w = var(50 + seed, &[groups, 80, 96], 0.1, DType::F32);
        let b = var(60 + seed, &[groups, 80], 0.1, DType::F32);
        check(&format!("threaded E={groups}"), &[&x, &w, &b], 1e-5, || {
            grouped_linear(&x, &w, Some(&b), &counts)
        });
    }
}

#[test]
fn empty_groups_get_zero_weight_and_bias_gradients() {
    let counts = [3, 0, 4, 0];
    let x = var(70, &[7, 5], 1.0, DType::F32);
    let w = var(71, &[4, 6, 5], 0.3, DType::F32);
    let b = var(72, &[4, 6], 0.3, DType::F32);
    for fused in [true, false] {
        let grads = with_fused(fused, || {
            grouped_linear(&x, &w, Some(&b), &counts)?
                .sqr()?
                .sum_all()?
                .backward()
        })
        .unwrap();
        let dw = grads.get(&w).unwrap();
        let db = grads.get(&b).unwrap();
        for (e, &n) in counts.iter().enumerate() {
            let dw_e = dw.get(e).unwrap().abs().unwrap().sum_all().unwrap();
            let db_e = db.get(e).unwrap().abs().unwrap().sum_all().unwrap();
            let (dw_e, db_e) = (
                dw_e.to_scalar::<f32>().unwrap(),
                db_e.to_scalar::<f32>().unwrap(),
            );
            if n == 0 {
                assert_eq!((dw_e, db_e), (0.0, 0.0), "fused={fused}, group {e}");
            } else {
                assert!(dw_e > 0.0 && db_e > 0.0, "fused={fused}, group {e}");
            }
        }
    }
}

#[test]
fn every_group_empty_gives_no_rows() {
    let x = randn(73, &[0, 5], 1.0, DType::F32);
    let w = randn(74, &[3, 6, 5], 1.0, DType::F32);
    let b = randn(75, &[3, 6], 1.0, DType::F32);
    for fused in [true, false] {
        let y = with_fused(fused, || grouped_linear(&x, &w, Some(&b), &[0, 0, 0])).unwrap();
        assert_eq!(y.dims(), &[0, 6]);
    }
}

#[test]
fn non_contiguous_inputs() {
    let counts = [2, 0, 5, 2];
    let x = var(76, &[8, 9], 1.0, DType::F32);
    let w = var(77, &[4, 8, 7], 0.3, DType::F32);
    // x^T: [9, 8]; w transposed in its last two dimensions: [4, 7, 8].
    check("grouped linear of x^T, w^T", &[&x, &w], 1e-5, || {
        grouped_linear(&x.t()?, &w.transpose(1, 2)?, None, &counts)
    });
}

#[test]
fn half_precision_inputs() {
    for dt in [DType::F16, DType::BF16] {
        let counts = [5, 0, 11, 3];
        let x = var(78, &[19, 16], 1.0, dt);
        let w = var(79, &[4, 8, 16], 0.25, dt);
        let b = var(80, &[4, 8], 0.25, dt);
        // Both paths round to the half type; the fused one accumulates in f32.
        check(
            &format!("grouped linear {dt:?}"),
            &[&x, &w, &b],
            2e-2,
            || grouped_linear(&x, &w, Some(&b), &counts),
        );
    }
}

#[test]
fn f64_takes_the_composed_path() {
    let counts = [2, 3];
    let x = randn(81, &[5, 4], 1.0, DType::F64);
    let w = randn(82, &[2, 3, 4], 1.0, DType::F64);
    let y = grouped_linear(&x, &w, None, &counts).unwrap();
    let r = grouped_linear_composed(&x, &w, None, &counts).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    let d = (y - r).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(d.to_scalar::<f64>().unwrap(), 0.0);
}

#[test]
fn frozen_weight_gets_no_gradient() {
    let x = var(83, &[5, 4], 1.0, DType::F32);
    let w = randn(84, &[2, 3, 4], 1.0, DType::F32);
    let y = grouped_linear(&x, &w, None, &[1, 4]).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&w).is_none());
    assert!(g.get(&x).is_some());
}

fn error_of(f: impl Fn() -> candle_core::Result<Tensor>) -> String {
    let fused = with_fused(true, &f).unwrap_err().to_string();
    let composed = with_fused(false, &f).unwrap_err().to_string();
    // The same check on both paths; first lines only (a backtrace may follow).
    let first = |s: &str| s.lines().next().unwrap_or_default().to_string();
    assert_eq!(first(&fused), first(&composed));
    first(&fused)
}

#[test]
fn bad_counts_and_shapes_are_errors() {
    let x = randn(85, &[5, 4], 1.0, DType::F32);
    let w = randn(86, &[3, 6, 4], 1.0, DType::F32);
    let b = randn(87, &[3, 6], 1.0, DType::F32);
    let e = error_of(|| grouped_linear(&x, &w, Some(&b), &[2, 3]));
    assert!(e.contains("counts") && e.contains("[3, 6, 4]"), "{e}");
    let e = error_of(|| grouped_linear(&x, &w, Some(&b), &[2, 3, 1]));
    assert!(e.contains("sum to 6") && e.contains("[5, 4]"), "{e}");
    let e = error_of(|| grouped_linear(&x, &w, Some(&b), &[usize::MAX, 3, 0]));
    assert!(e.contains("counts"), "{e}");
    let e = error_of(|| grouped_linear(&x, &w, Some(&w), &[2, 3, 0]));
    assert!(e.contains("bias b"), "{e}");
    let e = error_of(|| grouped_linear(&x, &b, None, &[2, 3, 0]));
    assert!(e.contains("weight w"), "{e}");
    let e = error_of(|| grouped_linear(&x.t().unwrap(), &w, None, &[2, 1, 1]));
    assert!(e.contains("input x"), "{e}");
    let x3 = randn(88, &[1, 5, 4], 1.0, DType::F32);
    let e = error_of(|| grouped_linear(&x3, &w, None, &[2, 3, 0]));
    assert!(e.contains("input x"), "{e}");
}

#[test]
fn layer_norm_matches_composed_random_counts() {
    // Widths on both row kernels (narrow AVX-512 rows up to 128, wide rows above).
    for (seed, groups, max, d) in [
        (1, 1, 30, 48),
        (2, 8, 20, 160),
        (3, 64, 6, 24),
        (4, 64, 40, 200),
    ] {
        let mut counts = random_counts(seed, groups, max);
        if groups > 1 {
            counts[0] = 0;
        }
        counts[groups - 1] = counts[groups - 1].max(2);
        let k: usize = counts.iter().sum();
        let x = var(110 + seed, &[k, d], 2.0, DType::F32);
        let w = var(120 + seed, &[groups, d], 1.0, DType::F32);
        let b = var(130 + seed, &[groups, d], 1.0, DType::F32);
        check(
            &format!("grouped LN E={groups} d={d} counts={counts:?}"),
            &[&x, &w, &b],
            1e-5,
            || grouped_layer_norm(&x, &w, &b, 1e-5, &counts),
        );
    }
}

#[test]
fn layer_norm_groups_split_over_threads() {
    // Groups larger than a thread's share of the rows are cut into blocks whose `dw` / `db`
    // partials are summed.
    let counts = [1500, 0, 700];
    let x = var(155, &[2200, 64], 1.0, DType::F32);
    let w = var(156, &[3, 64], 1.0, DType::F32);
    let b = var(157, &[3, 64], 1.0, DType::F32);
    check("grouped LN, big groups", &[&x, &w, &b], 1e-5, || {
        grouped_layer_norm(&x, &w, &b, 1e-5, &counts)
    });
}

#[test]
fn layer_norm_is_each_groups_own_layer_norm() {
    let counts = [4, 0, 7, 1];
    let x = randn(140, &[12, 40], 1.0, DType::F32);
    let w = randn(141, &[4, 40], 1.0, DType::F32);
    let b = randn(142, &[4, 40], 1.0, DType::F32);
    let y = grouped_layer_norm(&x, &w, &b, 1e-5, &counts).unwrap();
    let mut off = 0;
    for (e, &n) in counts.iter().enumerate() {
        if n > 0 {
            let xe = x.narrow(0, off, n).unwrap();
            let want = layer_norm(&xe, &w.get(e).unwrap(), &b.get(e).unwrap(), 1e-5).unwrap();
            common::assert_close(
                &format!("group {e}"),
                &y.narrow(0, off, n).unwrap(),
                &want,
                1e-6,
            );
        }
        off += n;
    }
}

#[test]
fn layer_norm_empty_groups_get_zero_gradients() {
    let counts = [0, 5, 0, 3];
    let x = var(143, &[8, 20], 1.0, DType::F32);
    let w = var(144, &[4, 20], 1.0, DType::F32);
    let b = var(145, &[4, 20], 1.0, DType::F32);
    for fused in [true, false] {
        let grads = with_fused(fused, || {
            grouped_layer_norm(&x, &w, &b, 1e-5, &counts)?
                .sqr()?
                .sum_all()?
                .backward()
        })
        .unwrap();
        for t in [&w, &b] {
            let g = grads.get(t).unwrap();
            for (e, &n) in counts.iter().enumerate() {
                let s = g.get(e).unwrap().abs().unwrap().sum_all().unwrap();
                let s = s.to_scalar::<f32>().unwrap();
                assert_eq!(s == 0.0, n == 0, "fused={fused}, group {e}: {s}");
            }
        }
    }
}

#[test]
fn layer_norm_half_precision_and_f32_affine() {
    let counts = [6, 0, 9];
    for dt in [DType::F16, DType::BF16] {
        let x = var(146, &[15, 32], 1.0, dt);
        let w = var(147, &[3, 32], 1.0, dt);
        let b = var(148, &[3, 32], 1.0, dt);
        check(&format!("grouped LN {dt:?}"), &[&x, &w, &b], 2e-2, || {
            grouped_layer_norm(&x, &w, &b, 1e-5, &counts)
        });
        // f32 affine under half activations, as the norms are kept.
        let w = var(149, &[3, 32], 1.0, DType::F32);
        let b = var(150, &[3, 32], 1.0, DType::F32);
        check(
            &format!("grouped LN {dt:?}, f32 affine"),
            &[&x, &w, &b],
            2e-2,
            || grouped_layer_norm(&x, &w, &b, 1e-5, &counts),
        );
    }
}

#[test]
fn layer_norm_bad_counts_and_shapes_are_errors() {
    let x = randn(151, &[5, 4], 1.0, DType::F32);
    let w = randn(152, &[3, 4], 1.0, DType::F32);
    let e = error_of(|| grouped_layer_norm(&x, &w, &w, 1e-5, &[2, 3]));
    assert!(e.contains("counts") && e.contains("[3, 4]"), "{e}");
    let e = error_of(|| grouped_layer_norm(&x, &w, &w, 1e-5, &[2, 2, 2]));
    assert!(e.contains("sum to 6"), "{e}");
    let e = error_of(|| grouped_layer_norm(&x, &w, &w, 1e-5, &[usize::MAX, 2, 0]));
    assert!(e.contains("counts"), "{e}");
    let b = randn(153, &[3, 5], 1.0, DType::F32);
    let e = error_of(|| grouped_layer_norm(&x, &w, &b, 1e-5, &[2, 3, 0]));
    assert!(e.contains("bias"), "{e}");
    let e = error_of(|| grouped_layer_norm(&x.t().unwrap(), &w, &w, 1e-5, &[2, 1, 1]));
    assert!(e.contains("input x"), "{e}");
    let flat = randn(154, &[4], 1.0, DType::F32);
    let e = error_of(|| grouped_layer_norm(&x, &flat, &flat, 1e-5, &[2, 3, 0]));
    assert!(e.contains("weight"), "{e}");
}

/// Forward + backward of one expert projection at MoE sizes (2048 rows, 256 -> 1024, 8 and 64
/// groups of equal size), on a rayon worker as a training step runs: the weights kept per group
/// as the experts keep them (stacked at every call, then [`grouped_linear`]), the weights held
/// already stacked in one variable, and a loop of the fused `linear` over `narrow`ed rows, then
/// `cat`. `CANDLE_NUM_THREADS=1 cargo test --release -p torchscale-kernels --features mimalloc
/// --test grouped -- --ignored --nocapture` (the training binaries' allocator).
#[test]
#[ignore = "timing, not a check; run by hand"]
fn grouped_timing() {
    use candle_core::Var;
    use std::time::Instant;
    #[cfg(feature = "mimalloc")]
    torchscale_kernels::alloc::keep_freed_memory();
    let (k, i, o) = (2048, 256, 1024);
    for groups in [8, 64] {
        let counts = vec![k / groups; groups];
        let x = var(90, &[k, i], 1.0, DType::F32);
        let ws: Vec<Var> = (0..groups)
            .map(|e| var(100 + e as u64, &[o, i], 0.05, DType::F32))
            .collect();
        let stack = || {
            let parts: Vec<&Tensor> = ws.iter().map(|w| w.as_tensor()).collect();
            Tensor::stack(&parts, 0)
        };
        let stacked = Var::from_tensor(&stack().unwrap()).unwrap();
        // The fastest of 8 runs (after one warm-up), on a rayon worker.
        let time = |f: &(dyn Fn() -> candle_core::Result<()> + Sync)| {
            torchscale_kernels::runtime::in_pool(|| {
                f().unwrap();
                (0..8)
                    .map(|_| {
                        let t = Instant::now();
                        f().unwrap();
                        t.elapsed().as_secs_f64() * 1e3
                    })
                    .fold(f64::MAX, f64::min)
            })
        };
        let t_stacking = time(&|| {
            let y = grouped_linear(&x, &stack()?, None, &counts)?;
            y.sum_all()?.backward().map(|_| ())
        });
        let t_stacked = time(&|| {
            let y = grouped_linear(&x, &stacked, None, &counts)?;
            y.sum_all()?.backward().map(|_| ())
        });
        let t_loop = time(&|| {
            let mut outs = Vec::new();
            for (e, w) in ws.iter().enumerate() {
                let xe = x.narrow(0, e * k / groups, k / groups)?;
                outs.push(torchscale_kernels::linear(&xe, w, None)?);
            }
            Tensor::cat(&outs, 0)?.sum_all()?.backward().map(|_| ())
        });
        println!(
            "E={groups:3}: loop {t_loop:6.1} ms; grouped, stacked per call {t_stacking:6.1} ms \
             (loop/grouped {:.2}); grouped, weights held stacked {t_stacked:6.1} ms \
             (loop/grouped {:.2})",
            t_loop / t_stacking,
            t_loop / t_stacked
        );
    }
}
