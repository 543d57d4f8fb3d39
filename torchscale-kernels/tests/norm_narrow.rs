//! The narrow-row LayerNorm kernels (rows up to 128 wide, 16 rows per block on AVX-512) and the
//! residual LayerNorm that reuses them, against the composed versions: widths on both sides of
//! every 16-lane boundary and of the narrow limit, row counts that leave partial blocks, frozen
//! parts, offsets, half precision and strided inputs.

mod common;

use candle_core::{DType, Tensor};
use common::{check, var};
use torchscale_kernels::{layer_norm, residual_layer_norm};

/// Widths around each register boundary, the model's 64, and both sides of the 128 limit.
const WIDTHS: [usize; 14] = [1, 5, 15, 16, 17, 31, 33, 48, 63, 64, 65, 100, 128, 129];
/// Row counts: a single row, partial blocks of 16, several blocks, and several steps of the
/// residual kernels (32 rows).
const ROWS: [usize; 6] = [1, 15, 16, 17, 33, 70];

#[test]
fn layer_norm_narrow_widths_and_rows() {
    for d in WIDTHS {
        let w = var(2, &[d], 0.5, DType::F32);
        let b = var(3, &[d], 0.5, DType::F32);
        for rows in ROWS {
            let x = var(1, &[rows, d], 1.0, DType::F32);
            check(
                &format!("layer_norm [{rows}, {d}]"),
                &[&x, &w, &b],
                1e-5,
                || layer_norm(&x, &w, &b, 1e-5),
            );
        }
    }
}

#[test]
fn residual_narrow_widths_rows_and_alphas() {
    for d in WIDTHS {
        let w = var(12, &[d], 0.5, DType::F32);
        let b = var(13, &[d], 0.5, DType::F32);
        for rows in [1, 17, 70] {
            let x = var(10, &[rows, d], 1.0, DType::F32);
            let fx = var(11, &[rows, d], 0.7, DType::F32);
            for alpha in [1.0, 1.7] {
                check(
                    &format!("residual [{rows}, {d}] alpha {alpha}"),
                    &[&x, &fx, &w, &b],
                    1e-5,
                    || residual_layer_norm(&x, &fx, alpha, &w, &b, 1e-5),
                );
            }
        }
    }
}

#[test]
fn model_shape_and_threaded() {
    // The 48 x 64 decoder's [8, 32, 64], and a size that splits over threads.
    for dims in [[8, 32, 64], [64, 80, 65]] {
        let x = var(20, &dims, 1.0, DType::F32);
        let fx = var(21, &dims, 1.0, DType::F32);
        let w = var(22, &[dims[2]], 0.5, DType::F32);
        let b = var(23, &[dims[2]], 0.5, DType::F32);
        check(&format!("layer_norm {dims:?}"), &[&x, &w, &b], 1e-5, || {
            layer_norm(&x, &w, &b, 1e-5)
        });
        check(
            &format!("residual {dims:?}"),
            &[&x, &fx, &w, &b],
            1e-5,
            || residual_layer_norm(&x, &fx, 1.3, &w, &b, 1e-5),
        );
    }
}

#[test]
fn frozen_parts() {
    for d in [33, 64] {
        let x = var(30, &[40, d], 1.0, DType::F32);
        let fx = var(31, &[40, d], 1.0, DType::F32);
        let w = var(32, &[d], 0.5, DType::F32);
        let b = var(33, &[d], 0.5, DType::F32);
        let (xc, fxc) = (x.as_tensor().clone(), fx.as_tensor().clone());
        let (wc, bc) = (w.as_tensor().clone(), b.as_tensor().clone());
        // Input gradient only; weight and bias only.
        check(&format!("dx only {d}"), &[&x], 1e-5, || {
            layer_norm(&x, &wc, &bc, 1e-5)
        });
        check(&format!("dw, db only {d}"), &[&w, &b], 1e-5, || {
            layer_norm(&xc, &w, &b, 1e-5)
        });
        // Residual: x alone (alpha ds), fx alone, both with alpha != 1 (a separate dx), and
        // neither (only the affine gradients).
        for alpha in [1.0, 1.7] {
            check(&format!("residual x only {d} {alpha}"), &[&x], 1e-5, || {
                residual_layer_norm(&x, &fxc, alpha, &wc, &bc, 1e-5)
            });
            check(
                &format!("residual fx only {d} {alpha}"),
                &[&fx],
                1e-5,
                || residual_layer_norm(&xc, &fx, alpha, &wc, &bc, 1e-5),
            );
            check(
                &format!("residual x, fx {d} {alpha}"),
                &[&x, &fx],
                1e-5,
                || residual_layer_norm(&x, &fx, alpha, &wc, &bc, 1e-5),
            );
            check(
                &format!("residual affine only {d} {alpha}"),
                &[&w, &b],
                1e-5,
                || residual_layer_norm(&xc, &fxc, alpha, &w, &b, 1e-5),
            );
        }
    }
}

#[test]
fn offset_rows_keep_two_pass_accuracy() {
    // A large common offset: one-pass statistics would lose the variance.
    for d in [17, 64] {
        let x = (var(40, &[33, d], 1.0, DType::F32).as_tensor() + 1000.0).unwrap();
        let x = candle_core::Var::from_tensor(&x).unwrap();
        let w = var(41, &[d], 0.5, DType::F32);
        let b = var(42, &[d], 0.5, DType::F32);
        check(&format!("offset {d}"), &[&x, &w, &b], 1e-3, || {
            layer_norm(&x, &w, &b, 1e-5)
        });
    }
}

#[test]
fn half_precision_and_strided() {
    for dt in [DType::F16, DType::BF16] {
        for d in [33, 64, 65] {
            let x = var(50, &[3, 17, d], 1.0, dt);
            let fx = var(51, &[3, 17, d], 1.0, dt);
            let w = var(52, &[d], 0.5, DType::F32);
            let b = var(53, &[d], 0.5, DType::F32);
            check(
                &format!("layer_norm {dt:?} {d}"),
                &[&x, &w, &b],
                2e-2,
                || layer_norm(&x, &w, &b, 1e-5),
            );
            check(
                &format!("residual {dt:?} {d}"),
                &[&x, &fx, &w, &b],
                2e-2,
                || residual_layer_norm(&x, &fx, 1.7, &w, &b, 1e-5),
            );
        }
    }
    // Rows of 33 read across a transpose (a gathered copy), in f32.
    let x = var(54, &[33, 40], 1.0, DType::F32);
    let fx = var(55, &[40, 33], 1.0, DType::F32);
    let w = var(56, &[33], 0.5, DType::F32);
    let b = var(57, &[33], 0.5, DType::F32);
    check("layer_norm x^T", &[&x, &w, &b], 1e-5, || {
        layer_norm(&x.t()?, &w, &b, 1e-5)
    });
    check("residual x^T", &[&x, &fx, &w, &b], 1e-5, || {
        residual_layer_norm(&x.t()?, &fx, 1.2, &w, &b, 1e-5)
    });
}

#[test]
fn backward_twice_and_nan_rows() {
    // The saved statistics serve two backward passes; a NaN in a row stays in that row.
    let d = 48;
    let mut v = vec![0.5f32; 20 * d];
    v[3 * d + 7] = f32::NAN;
    let x = Tensor::from_vec(v, (20, d), &candle_core::Device::Cpu).unwrap();
    let x = candle_core::Var::from_tensor(
        &(x + var(60, &[20, d], 1.0, DType::F32).as_tensor()).unwrap(),
    )
    .unwrap();
    let w = var(61, &[d], 0.5, DType::F32);
    let b = var(62, &[d], 0.5, DType::F32);
    let y = layer_norm(&x, &w, &b, 1e-5).unwrap();
    let rows = y.to_vec2::<f32>().unwrap();
    for (r, row) in rows.iter().enumerate() {
        assert_eq!(row.iter().all(|v| v.is_nan()), r == 3, "row {r}");
    }
    let loss = y.narrow(0, 4, 16).unwrap().sum_all().unwrap();
    let g1 = loss.backward().unwrap();
    let g2 = loss.backward().unwrap();
    let (a, c) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
    let diff = (a - c)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
}
