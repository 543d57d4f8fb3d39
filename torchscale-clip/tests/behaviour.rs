//! Edge cases: no clipping, missing gradients, duplicates, non-finite norms, bad config.

use candle_core::{Device, Tensor, Var};
use torchscale_clip::{GlobalNorm, SparseClip};
use torchscale_core::GradClipper;

/// Two parameters with gradients [3, 4] and [0, 12] (norms 5 and 12, global 13).
fn setup() -> (Var, Var, candle_core::backprop::GradStore) {
    let dev = Device::Cpu;
    let a = Var::new(&[1f32, 1.0], &dev).unwrap();
    let b = Var::new(&[1f32, 1.0], &dev).unwrap();
    let ga = Tensor::new(&[3f32, 4.0], &dev).unwrap();
    let gb = Tensor::new(&[0f32, 12.0], &dev).unwrap();
    let loss = ((a.as_tensor() * ga).unwrap().sum_all().unwrap()
        + (b.as_tensor() * gb).unwrap().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    (a, b, grads)
}

fn v(grads: &candle_core::backprop::GradStore, x: &Var) -> Vec<f32> {
    grads.get(x).unwrap().to_vec1().unwrap()
}

#[test]
fn global_norm_clips_to_max_norm() {
    let (a, b, mut g) = setup();
    let r = GlobalNorm::new(6.5)
        .clip(&mut g, &[a.clone(), b.clone()], &[])
        .unwrap();
    assert!((r.total_norm - 13.0).abs() < 1e-5);
    let want = 6.5 / (13.0 + 1e-6);
    assert!((r.coef - want).abs() < 1e-6 && r.clipped);
    let ga = v(&g, &a);
    assert!((ga[1] as f64 - 4.0 * want).abs() < 1e-5);
}

#[test]
fn below_max_norm_is_untouched() {
    let (a, b, mut g) = setup();
    let r = GlobalNorm::new(100.0)
        .clip(&mut g, std::slice::from_ref(&a), std::slice::from_ref(&b))
        .unwrap();
    assert_eq!((r.coef, r.clipped), (1.0, false));
    assert_eq!(v(&g, &a), vec![3.0, 4.0]);
}

#[test]
fn max_norm_zero_only_measures() {
    let (a, b, mut g) = setup();
    let r = SparseClip::new(0.0, 4, 1)
        .clip(&mut g, std::slice::from_ref(&a), std::slice::from_ref(&b))
        .unwrap();
    // sqrt(25 + 144 / 4) = sqrt(61)
    assert!((r.total_norm - 61f64.sqrt()).abs() < 1e-5);
    assert!(!r.clipped);
    assert_eq!(v(&g, &b), vec![0.0, 12.0]);
}

#[test]
fn world_size_above_experts_divides_by_world() {
    let (a, b, mut g) = setup();
    // max(W=9, E=4) = 9: sqrt(25 + 144 / 9) = sqrt(41)
    let r = SparseClip::new(0.0, 4, 9).clip(&mut g, &[a], &[b]).unwrap();
    assert!((r.total_norm - 41f64.sqrt()).abs() < 1e-5);
}

#[test]
fn missing_gradient_and_duplicates_are_skipped() {
    let (a, b, mut g) = setup();
    let orphan = Var::new(&[100f32], &Device::Cpu).unwrap();
    let r = GlobalNorm::new(0.0)
        .clip(&mut g, &[a.clone(), orphan, a.clone()], &[b.clone(), a])
        .unwrap();
    assert!((r.total_norm - 13.0).abs() < 1e-5);
}

#[test]
fn non_finite_norm_leaves_grads() {
    let (a, b, mut g) = setup();
    g.insert(&a, Tensor::new(&[f32::NAN, 1.0], &Device::Cpu).unwrap());
    let r = GlobalNorm::new(1.0)
        .clip(&mut g, &[a], std::slice::from_ref(&b))
        .unwrap();
    assert!(r.total_norm.is_nan() && !r.clipped && r.coef == 1.0);
    assert_eq!(v(&g, &b), vec![0.0, 12.0]);
    g.insert(
        &b,
        Tensor::new(&[f32::INFINITY, 1.0], &Device::Cpu).unwrap(),
    );
    let r = SparseClip::new(1.0, 2, 1).clip(&mut g, &[], &[b]).unwrap();
    assert!(r.total_norm.is_infinite() && !r.clipped);
}

#[test]
fn zero_experts_and_world_is_a_config_error() {
    let (a, b, mut g) = setup();
    let e = SparseClip::new(1.0, 0, 0)
        .clip(&mut g, &[a], &[b])
        .unwrap_err();
    assert!(e.to_string().contains("moe_expert_count"), "{e}");
}
