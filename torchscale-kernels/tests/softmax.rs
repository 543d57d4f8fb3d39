//! The fused last-dim softmax against candle_nn's composed softmax: values and input gradients,
//! including `-inf` entries and rows of only `-inf` (zeros, not NaN).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{check, randn, var};
use torchscale_kernels::{softmax_last_dim, softmax_last_dim_composed, with_fused};

#[test]
fn matches_composed_f32() {
    for d in [1, 7, 64, 513] {
        for lead in [vec![3], vec![2, 3], vec![2, 1, 3]] {
            let mut dims = lead.clone();
            dims.push(d);
            let x = var(1, &dims, 2.0, DType::F32);
            check(&format!("softmax {dims:?}"), &[&x], 1e-5, || {
                softmax_last_dim(&x)
            });
        }
    }
}

#[test]
fn large_logits_and_threads() {
    // Logits in the hundreds: the max subtraction keeps exp in range.
    let x = var(2, &[4, 33, 517], 100.0, DType::F32);
    check("threaded softmax", &[&x], 1e-5, || softmax_last_dim(&x));
}

#[test]
fn non_contiguous_input() {
    let x = var(3, &[37, 6], 1.0, DType::F32);
    check("softmax of x^T", &[&x], 1e-5, || softmax_last_dim(&x.t()?));
    check("softmax of a slice", &[&x], 1e-5, || {
        softmax_last_dim(&x.narrow(1, 1, 4)?)
    });
}

#[test]
fn half_precision_inputs() {
    for dt in [DType::F16, DType::BF16] {
        let x = var(4, &[3, 5, 71], 2.0, dt);
        check(&format!("softmax {dt:?}"), &[&x], 2e-2, || {
            softmax_last_dim(&x)
        });
    }
}

#[test]
fn minus_infinity_entries() {
    let (rows, d) = (5, 37);
    let mut v = randn(5, &[rows, d], 1.0, DType::F32)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (i, x) in v.iter_mut().enumerate() {
        // Masked positions in every row, row 2 masked entirely.
        if i % 3 == 0 || i / d == 2 {
            *x = f32::NEG_INFINITY;
        }
    }
    let x = Var::from_tensor(&Tensor::from_vec(v, (rows, d), &Device::Cpu).unwrap()).unwrap();
    check("softmax with -inf", &[&x], 1e-5, || softmax_last_dim(&x));
    for on in [true, false] {
        let y = with_fused(on, || softmax_last_dim(&x)).unwrap();
        let y = y.to_vec2::<f32>().unwrap();
        assert!(y[2].iter().all(|&p| p == 0.0), "all -inf row gives zeros");
        assert_eq!(y[0][0], 0.0);
        assert!((y[0].iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}

/// Rows of only -inf (fully masked attention rows) give zeros and a zero gradient on both paths,
/// narrow and wide rows alike, and leave every other row bit for bit as candle_nn computes it.
#[test]
fn all_minus_infinity_rows_give_zeros_and_zero_gradients() {
    for d in [1, 5, 64, 300] {
        let rows = 6;
        let mut v = randn(7, &[rows, d], 1.0, DType::F32)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (i, x) in v.iter_mut().enumerate() {
            if i / d == 1 || i / d == 4 || (i % 2 == 0 && d > 1) {
                *x = f32::NEG_INFINITY;
            }
        }
        let x = Var::from_tensor(&Tensor::from_vec(v, (rows, d), &Device::Cpu).unwrap()).unwrap();
        check(&format!("dead rows d {d}"), &[&x], 1e-5, || {
            softmax_last_dim(&x)
        });
        let reference = candle_nn::ops::softmax(x.as_tensor(), candle_core::D::Minus1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for on in [true, false] {
            let y = with_fused(on, || softmax_last_dim(&x)).unwrap();
            let w = randn(8, &[rows, d], 1.0, DType::F32);
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g = g.get(&x).unwrap().to_vec2::<f32>().unwrap();
            let y = y.to_vec2::<f32>().unwrap();
            for r in 0..rows {
                if r == 1 || r == 4 {
                    assert!(y[r].iter().all(|&p| p == 0.0), "fused {on} d {d} row {r}");
                    assert!(g[r].iter().all(|&p| p == 0.0), "fused {on} d {d} grad {r}");
                } else {
                    assert!(g[r].iter().all(|p| p.is_finite()));
                    if !on {
                        // The composed path is candle_nn's on every other row.
                        assert_eq!(y[r], reference[r], "d {d} row {r}");
                    }
                }
            }
        }
    }
}

/// A NaN entry still poisons its row (only all -inf rows are special).
#[test]
fn nan_rows_stay_nan() {
    let x = Tensor::new(&[[0.5f32, f32::NAN, 1.0], [1.0, 2.0, 3.0]], &Device::Cpu).unwrap();
    for on in [true, false] {
        let y = with_fused(on, || softmax_last_dim(&x)).unwrap();
        let y = y.to_vec2::<f32>().unwrap();
        assert!(y[0].iter().all(|p| p.is_nan()), "fused {on}: {y:?}");
        assert!(y[1].iter().all(|p| p.is_finite()));
    }
}

#[test]
fn rows_sum_to_one() {
    let x = randn(6, &[64, 300], 3.0, DType::F32);
    let sums = softmax_last_dim(&x)
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
}

#[test]
fn f64_stays_composed() {
    let x = var(7, &[3, 11], 1.0, DType::F64);
    check("softmax f64", &[&x], 1e-12, || softmax_last_dim(&x));
}

#[test]
fn constant_input_gets_no_gradient_and_scalars_are_errors() {
    let x = randn(8, &[2, 5], 1.0, DType::F32);
    let w = var(9, &[2, 5], 1.0, DType::F32);
    let y = (softmax_last_dim(&x).unwrap() * w.as_tensor()).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).is_none());
    let scalar = Tensor::new(1f32, &Device::Cpu).unwrap();
    for on in [true, false] {
        with_fused(on, || assert!(softmax_last_dim(&scalar).is_err()));
    }
    assert!(softmax_last_dim_composed(&scalar).is_err());
}
