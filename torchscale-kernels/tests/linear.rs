//! The fused linear against candle_nn's Linear: values and gradients of input, weight and bias.

mod common;

use candle_core::DType;
use common::{check, randn, var};
use torchscale_kernels::linear;

#[test]
fn matches_composed_f32_with_and_without_bias() {
    for dims in [vec![7, 13], vec![3, 5, 13], vec![2, 2, 3, 13]] {
        let x = var(1, &dims, 1.0, DType::F32);
        let w = var(2, &[11, 13], 0.3, DType::F32);
        let b = var(3, &[11], 0.3, DType::F32);
        check(
            &format!("linear+bias {dims:?}"),
            &[&x, &w, &b],
            1e-5,
            || linear(&x, &w, Some(&b)),
        );
        check(&format!("linear {dims:?}"), &[&x, &w], 1e-5, || {
            linear(&x, &w, None)
        });
    }
}

#[test]
fn large_enough_to_thread() {
    let x = var(4, &[4, 96, 128], 1.0, DType::F32);
    let w = var(5, &[192, 128], 0.1, DType::F32);
    let b = var(6, &[192], 0.1, DType::F32);
    check("threaded linear", &[&x, &w, &b], 1e-5, || {
        linear(&x, &w, Some(&b))
    });
}

#[test]
fn non_contiguous_input() {
    let x = var(7, &[9, 6], 1.0, DType::F32);
    let w = var(8, &[5, 9], 0.3, DType::F32);
    check("linear of x^T", &[&x, &w], 1e-5, || {
        linear(&x.t()?, &w, None)
    });
}

#[test]
fn half_precision_inputs() {
    for dt in [DType::F16, DType::BF16] {
        let x = var(9, &[4, 6, 16], 1.0, dt);
        let w = var(10, &[8, 16], 0.25, dt);
        let b = var(11, &[8], 0.25, dt);
        // Both paths round to the half type; the fused one accumulates in f32.
        check(&format!("linear {dt:?}"), &[&x, &w, &b], 2e-2, || {
            linear(&x, &w, Some(&b))
        });
    }
}

#[test]
fn frozen_weight_gets_no_gradient() {
    let x = var(12, &[3, 4], 1.0, DType::F32);
    let w = randn(13, &[2, 4], 1.0, DType::F32);
    let y = linear(&x, &w, None).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&w).is_none());
    assert!(g.get(&x).is_some());
}

#[test]
fn wrong_shapes_are_errors() {
    let x = randn(14, &[3, 4], 1.0, DType::F32);
    let w = randn(15, &[2, 5], 1.0, DType::F32);
    assert!(linear(&x, &w, None).is_err());
    let w = randn(16, &[2, 4], 1.0, DType::F32);
    let b = randn(17, &[3], 1.0, DType::F32);
    assert!(linear(&x, &w, Some(&b)).is_err());
}
