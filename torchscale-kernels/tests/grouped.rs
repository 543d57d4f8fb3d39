//! The fused grouped linear against its composed version (narrow / matmul / cat): values and the
//! gradients of input, weights and biases, for random group sizes with empty groups.

mod common;

use candle_core::{DType, Tensor};
use common::{check, randn, var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use torchscale_kernels::{grouped_linear, grouped_linear_composed, with_fused};

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
