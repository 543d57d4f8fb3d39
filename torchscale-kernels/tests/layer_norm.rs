//! The fused LayerNorm against the composed one: values and the gradients of input, weight and
//! bias, over widths, leading shapes, eps, layouts and dtypes.

mod common;

use candle_core::{DType, Tensor};
use common::{assert_close, check, randn, var};
use torchscale_kernels::{layer_norm, layer_norm_composed, with_fused};

#[test]
fn matches_composed_f32() {
    for d in [1, 7, 64, 513] {
        for lead in [vec![3], vec![2, 3], vec![2, 1, 3]] {
            let mut dims = lead.clone();
            dims.push(d);
            let x = var(1, &dims, 1.0, DType::F32);
            let w = var(2, &[d], 0.5, DType::F32);
            let b = var(3, &[d], 0.5, DType::F32);
            for eps in [1e-5, 1e-6, 0.1] {
                check(
                    &format!("layer_norm {dims:?} eps {eps}"),
                    &[&x, &w, &b],
                    1e-5,
                    || layer_norm(&x, &w, &b, eps),
                );
            }
        }
    }
}

#[test]
fn large_enough_to_thread() {
    let x = var(4, &[4, 40, 515], 1.0, DType::F32);
    let w = var(5, &[515], 0.5, DType::F32);
    let b = var(6, &[515], 0.5, DType::F32);
    check("threaded layer_norm", &[&x, &w, &b], 1e-5, || {
        layer_norm(&x, &w, &b, 1e-5)
    });
}

#[test]
fn non_contiguous_input() {
    let x = var(7, &[33, 10], 1.0, DType::F32);
    let w = var(8, &[10], 0.5, DType::F32);
    let b = var(9, &[10], 0.5, DType::F32);
    // [33, 10] viewed as [10, 33] normalises over the strided dimension.
    let w33 = var(10, &[33], 0.5, DType::F32);
    let b33 = var(11, &[33], 0.5, DType::F32);
    check("layer_norm of x^T", &[&x, &w33, &b33], 1e-5, || {
        layer_norm(&x.t()?, &w33, &b33, 1e-5)
    });
    check("layer_norm of a column slice", &[&x, &w, &b], 1e-5, || {
        layer_norm(&x.narrow(0, 3, 20)?, &w, &b, 1e-5)
    });
}

#[test]
fn half_precision_inputs() {
    for dt in [DType::F16, DType::BF16] {
        let x = var(12, &[3, 5, 67], 1.0, dt);
        let w = var(13, &[67], 0.5, dt);
        let b = var(14, &[67], 0.5, dt);
        check(&format!("layer_norm {dt:?}"), &[&x, &w, &b], 2e-2, || {
            layer_norm(&x, &w, &b, 1e-5)
        });
        // Mixed precision: f32 weight and bias under half activations.
        let w = var(15, &[67], 0.5, DType::F32);
        let b = var(16, &[67], 0.5, DType::F32);
        check(
            &format!("layer_norm {dt:?} with f32 affine"),
            &[&x, &w, &b],
            2e-2,
            || layer_norm(&x, &w, &b, 1e-5),
        );
        let y = layer_norm(&x, &w, &b, 1e-5).unwrap();
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
    }
}

#[test]
fn frozen_parts_get_no_gradient() {
    let x = var(17, &[4, 9], 1.0, DType::F32);
    let w = randn(18, &[9], 0.5, DType::F32);
    let b = var(19, &[9], 0.5, DType::F32);
    check("layer_norm with a constant weight", &[&x, &b], 1e-5, || {
        layer_norm(&x, &w, &b, 1e-5)
    });
    let grads = layer_norm(&x, &w, &b, 1e-5)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(&w).is_none());

    let x = randn(20, &[4, 9], 1.0, DType::F32);
    let w = var(21, &[9], 0.5, DType::F32);
    check("layer_norm of a constant input", &[&w, &b], 1e-5, || {
        layer_norm(&x, &w, &b, 1e-5)
    });
    let grads = layer_norm(&x, &w, &b, 1e-5)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(&x).is_none());
}

/// A large common offset: the two-pass statistics keep the fused kernel as close to an f64
/// reference as the composed f32 version is.
#[test]
fn as_accurate_as_composed_under_an_offset() {
    let x = (randn(22, &[16, 257], 1.0, DType::F32) + 1000.0).unwrap();
    let w = randn(23, &[257], 0.5, DType::F32);
    let b = randn(24, &[257], 0.5, DType::F32);
    let f64_ref = layer_norm_composed(
        &x.to_dtype(DType::F64).unwrap(),
        &w.to_dtype(DType::F64).unwrap(),
        &b.to_dtype(DType::F64).unwrap(),
        1e-5,
    )
    .unwrap();
    let err = |y: Tensor| {
        (y.to_dtype(DType::F64).unwrap() - &f64_ref)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let fused = err(layer_norm(&x, &w, &b, 1e-5).unwrap());
    let composed = err(layer_norm_composed(&x, &w, &b, 1e-5).unwrap());
    assert!(
        fused <= 2.0 * composed + 1e-6,
        "fused {fused:e} vs composed {composed:e}"
    );
}

#[test]
fn f64_stays_composed() {
    let x = var(25, &[3, 11], 1.0, DType::F64);
    let w = var(26, &[11], 0.5, DType::F64);
    let b = var(27, &[11], 0.5, DType::F64);
    check("layer_norm f64", &[&x, &w, &b], 1e-12, || {
        layer_norm(&x, &w, &b, 1e-5)
    });
}

#[test]
fn backward_twice_reuses_the_statistics() {
    let x = var(28, &[5, 13], 1.0, DType::F32);
    let w = var(29, &[13], 0.5, DType::F32);
    let b = var(30, &[13], 0.5, DType::F32);
    let y = layer_norm(&x, &w, &b, 1e-5).unwrap().sum_all().unwrap();
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

#[test]
fn wrong_shapes_are_errors() {
    let x = randn(31, &[3, 4], 1.0, DType::F32);
    let ok = randn(32, &[4], 1.0, DType::F32);
    let long = randn(33, &[5], 1.0, DType::F32);
    let square = randn(34, &[4, 4], 1.0, DType::F32);
    for on in [true, false] {
        with_fused(on, || {
            assert!(layer_norm(&x, &long, &ok, 1e-5).is_err());
            assert!(layer_norm(&x, &ok, &long, 1e-5).is_err());
            assert!(layer_norm(&x, &square, &ok, 1e-5).is_err());
            let scalar = Tensor::new(1f32, x.device()).unwrap();
            assert!(layer_norm(&scalar, &ok, &ok, 1e-5).is_err());
        });
    }
}
