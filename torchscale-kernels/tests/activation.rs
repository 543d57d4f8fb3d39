//! The fused exact GELU against candle's `gelu_erf`, and against an f64 reference.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{check, randn, var};
use torchscale_kernels::gelu_erf;

#[test]
fn matches_composed_f32() {
    for dims in [vec![1], vec![7], vec![3, 65], vec![2, 3, 13]] {
        let x = var(1, &dims, 2.0, DType::F32);
        check(&format!("gelu {dims:?}"), &[&x], 1e-5, || gelu_erf(&x));
    }
}

#[test]
fn large_enough_to_thread() {
    let x = var(2, &[3, 101, 257], 3.0, DType::F32);
    check("threaded gelu", &[&x], 1e-5, || gelu_erf(&x));
}

#[test]
fn non_contiguous_input() {
    let x = var(3, &[19, 12], 2.0, DType::F32);
    check("gelu of x^T", &[&x], 1e-5, || gelu_erf(&x.t()?));
}

#[test]
fn half_precision_inputs() {
    for dt in [DType::F16, DType::BF16] {
        let x = var(4, &[3, 5, 33], 2.0, dt);
        check(&format!("gelu {dt:?}"), &[&x], 2e-2, || gelu_erf(&x));
    }
}

#[test]
fn zero_and_large_magnitudes() {
    let v = vec![
        0f32, -0.0, 10.0, -10.0, 9.5, -9.5, 30.0, -30.0, 1e-20, -1e-20,
    ];
    let x = Var::from_tensor(&Tensor::new(v.as_slice(), &Device::Cpu).unwrap()).unwrap();
    check("gelu at 0 and +-10", &[&x], 1e-6, || gelu_erf(&x));
    let y = gelu_erf(&x).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(&y[..4], &[0.0, 0.0, 10.0, 0.0]);
    let g = gelu_erf(&x).unwrap().sum_all().unwrap().backward().unwrap();
    let g = g.get(&x).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(&g[..3], &[0.5, 0.5, 1.0]);
    assert!(g[3].abs() < 1e-20);
}

/// Value and derivative against f64 over a dense grid of [-10, 10].
#[test]
fn accurate_against_f64() {
    let x: Vec<f32> = (-200_000..=200_000).map(|i| i as f32 * 5e-5).collect();
    let xv = Var::from_tensor(&Tensor::new(x.as_slice(), &Device::Cpu).unwrap()).unwrap();
    let y = gelu_erf(&xv).unwrap();
    let dy = y.sum_all().unwrap().backward().unwrap();
    let dy = dy.get(&xv).unwrap().to_vec1::<f32>().unwrap();
    let y = y.to_vec1::<f32>().unwrap();
    let x64 = Tensor::new(
        x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
        &Device::Cpu,
    )
    .unwrap();
    let erf = (&x64 * std::f64::consts::FRAC_1_SQRT_2)
        .unwrap()
        .erf()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let (mut ey, mut ed) = (0f64, 0f64);
    for (i, &v) in x.iter().enumerate() {
        let v = f64::from(v);
        let cdf = 0.5 * (1.0 + erf[i]);
        let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
        ey = ey.max((f64::from(y[i]) - v * cdf).abs() / v.abs().max(1.0));
        ed = ed.max((f64::from(dy[i]) - (cdf + v * pdf)).abs());
    }
    assert!(ey < 5e-7, "gelu relative error {ey:e}");
    assert!(ed < 5e-7, "gelu derivative error {ed:e}");
}

#[test]
fn f64_stays_composed_and_constants_get_no_gradient() {
    let x = var(5, &[4, 9], 2.0, DType::F64);
    check("gelu f64", &[&x], 1e-12, || gelu_erf(&x));
    let c = randn(6, &[4, 9], 2.0, DType::F32);
    let w = var(7, &[4, 9], 1.0, DType::F32);
    let y = (gelu_erf(&c).unwrap() * w.as_tensor()).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&c).is_none());
    assert!(grads.get(&w).is_some());
}
