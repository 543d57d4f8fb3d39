//! The fused label-smoothed cross entropy against its composed candle version: both sums and the
//! gradient of the logits, with and without smoothing and padding.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_close, check, randn, var};
use torchscale_kernels::cross_entropy::{label_smoothed_ce, label_smoothed_ce_composed};
use torchscale_kernels::with_fused;

/// Seeded targets in `0..v`, every `pad_every`-th one replaced by `pad`.
fn targets(seed: u32, n: usize, v: usize, pad: Option<(u32, usize)>) -> Vec<u32> {
    (0..n)
        .map(|i| match pad {
            Some((p, every)) if i % every == 1 => p,
            _ => ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 7) % v as u32,
        })
        .collect()
}

#[test]
fn matches_composed_f32() {
    for (n, v) in [(1, 2), (7, 13), (33, 101), (5, 1000)] {
        for eps in [0.0, 0.1] {
            for pad in [None, Some((1, 3))] {
                let x = var(1, &[n, v], 2.0, DType::F32);
                let t = targets(3, n, v, pad);
                check(
                    &format!("ce {n}x{v} eps {eps} pad {pad:?}"),
                    &[&x],
                    1e-5,
                    || label_smoothed_ce(&x, &t, eps, pad.map(|p| p.0)),
                );
            }
        }
    }
}

#[test]
fn large_enough_to_thread() {
    let x = var(2, &[64, 3001], 3.0, DType::F32);
    let t = targets(5, 64, 3001, Some((7, 5)));
    for eps in [0.0, 0.1] {
        check(&format!("threaded ce eps {eps}"), &[&x], 1e-5, || {
            label_smoothed_ce(&x, &t, eps, Some(7))
        });
    }
}

#[test]
fn non_contiguous_logits() {
    let x = var(3, &[17, 9], 1.0, DType::F32);
    let t = targets(1, 9, 17, None);
    check("ce of x^T", &[&x], 1e-5, || {
        label_smoothed_ce(&x.t()?, &t, 0.1, None)
    });
}

#[test]
fn double_precision_logits() {
    let x = var(10, &[5, 23], 2.0, DType::F64);
    let t = targets(4, 5, 23, Some((2, 3)));
    check("ce f64", &[&x], 1e-5, || {
        label_smoothed_ce(&x, &t, 0.1, Some(2))
    });
}

#[test]
fn half_precision_logits() {
    for dt in [DType::F16, DType::BF16] {
        let x = var(4, &[6, 37], 2.0, dt);
        let t = targets(2, 6, 37, Some((0, 4)));
        check(&format!("ce {dt:?}"), &[&x], 1e-2, || {
            label_smoothed_ce(&x, &t, 0.1, Some(0))
        });
    }
}

#[test]
fn extreme_logits_stay_finite_and_nan_propagates() {
    let dev = Device::Cpu;
    // Huge and tiny values: the row max keeps exp in range.
    let x = Var::new(&[[-1e30f32, 80.0, -80.0, 0.0], [1e4, -1e4, 3.0, 1e4]], &dev).unwrap();
    for eps in [0.0, 0.1] {
        check(&format!("extreme logits eps {eps}"), &[&x], 1e-5, || {
            label_smoothed_ce(&x, &[1, 0], eps, None)
        });
    }
    // A masked class (-inf) without smoothing: only the target's log-probability counts.
    let x = Tensor::new(&[[f32::NEG_INFINITY, 0.0, 0.0]], &dev).unwrap();
    let y = label_smoothed_ce(&x, &[1], 0.0, None).unwrap();
    let want = std::f32::consts::LN_2;
    assert!(y
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| (v - want).abs() < 1e-6));
    let x = Tensor::new(&[[0.0f32, f32::NAN, 1.0]], &dev).unwrap();
    for eps in [0.0, 0.1] {
        let y = label_smoothed_ce(&x, &[0], eps, None).unwrap();
        assert!(y.to_vec1::<f32>().unwrap().iter().all(|v| v.is_nan()));
    }
}

#[test]
fn all_rows_ignored_give_zero() {
    let x = var(5, &[3, 8], 1.0, DType::F32);
    let y = label_smoothed_ce(&x, &[2, 2, 2], 0.1, Some(2)).unwrap();
    assert_eq!(y.to_vec1::<f32>().unwrap(), vec![0.0, 0.0]);
    let g = y.sum_all().unwrap().backward().unwrap();
    let g = g
        .get(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(g.iter().all(|v| *v == 0.0));
}

#[test]
fn frozen_logits_build_no_gradient() {
    let x = randn(6, &[4, 5], 1.0, DType::F32);
    let y = label_smoothed_ce(&x, &[0, 1, 2, 3], 0.1, None).unwrap();
    let yc = label_smoothed_ce_composed(&x, &[0, 1, 2, 3], 0.1, None).unwrap();
    assert_close("constant logits", &y, &yc, 1e-5);
    assert!(y.sum_all().unwrap().backward().unwrap().get(&x).is_none());
}

#[test]
fn bad_arguments_are_errors() {
    let x = randn(7, &[3, 4], 1.0, DType::F32);
    for fused in [true, false] {
        with_fused(fused, || {
            assert!(label_smoothed_ce(&x, &[0, 1], 0.1, None).is_err());
            assert!(label_smoothed_ce(&x, &[0, 1, 4], 0.1, None).is_err());
            assert!(label_smoothed_ce(&x, &[0, 1, 4], 0.1, Some(4)).is_ok());
            assert!(label_smoothed_ce(&x, &[0, 1, 2], 1.0, None).is_err());
            assert!(label_smoothed_ce(&x, &[0, 1, 2], f64::NAN, None).is_err());
            assert!(label_smoothed_ce(&x.reshape(12).unwrap(), &[0], 0.1, None).is_err());
            let one = randn(8, &[2, 1], 1.0, DType::F32);
            assert!(label_smoothed_ce(&one, &[0, 0], 0.1, None).is_err());
            assert!(label_smoothed_ce(&one, &[0, 0], 0.0, None).is_ok());
        });
    }
}

/// Times the fused and composed versions at the realistic size (N = 2048, V = 32000).
/// `cargo test --release -p torchscale-kernels --test cross_entropy -- --ignored --nocapture`
#[test]
#[ignore]
fn timing() {
    let (n, v) = (2048, 32000);
    let x = var(9, &[n, v], 3.0, DType::F32);
    let t = targets(1, n, v, Some((1, 50)));
    let time = |f: &dyn Fn()| {
        f();
        let start = std::time::Instant::now();
        let reps = 5;
        for _ in 0..reps {
            f();
        }
        start.elapsed().as_secs_f64() * 1e3 / reps as f64
    };
    for eps in [0.0, 0.1] {
        let mut ms = Vec::new();
        for fused in [true, false] {
            let fwd = time(&|| {
                with_fused(fused, || label_smoothed_ce(&x, &t, eps, Some(1))).unwrap();
            });
            let y = with_fused(fused, || label_smoothed_ce(&x, &t, eps, Some(1))).unwrap();
            let loss = y.sum_all().unwrap();
            // candle's backward (kernel plus candle's accumulation of the [N, V] gradient).
            let bwd = time(&|| {
                loss.backward().unwrap();
            });
            ms.push((fwd, bwd));
        }
        let (f, c) = (ms[0], ms[1]);
        println!(
            "eps {eps}: forward fused {:.1} ms composed {:.1} ms ({:.1}x); backward fused {:.1} ms \
             composed {:.1} ms ({:.1}x); forward+backward {:.1}x",
            f.0,
            c.0,
            c.0 / f.0,
            f.1,
            c.1,
            c.1 / f.1,
            (c.0 + c.1) / (f.0 + f.1)
        );
    }
}
