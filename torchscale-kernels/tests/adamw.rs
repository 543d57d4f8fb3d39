//! The in-place AdamW update against the composed candle update: parameters and both moments
//! over several steps, every parameter dtype, strided gradients, huge step counts and bad input.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_close, randn};
use torchscale_kernels::adamw::{adamw_check, adamw_composed, adamw_update, AdamWStep};

fn hp(weight_decay: f64, step: u64) -> AdamWStep {
    AdamWStep {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-8,
        weight_decay,
        step,
    }
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Runs `steps` updates both ways from the same start and compares parameter and moments.
fn compare(dims: &[usize], dtype: DType, wd: f64, steps: u64, first_step: u64, tol: f64) {
    let p0 = randn(1, dims, 1.0, dtype);
    let fused = Var::from_tensor(&p0.copy().unwrap()).unwrap();
    let mut composed = p0;
    let n = fused.elem_count();
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    let mut mc = Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
    let mut vc = mc.clone();
    for k in 0..steps {
        let g = randn(10 + k, dims, 0.5, dtype);
        let s = hp(wd, first_step + k);
        adamw_update(fused.as_tensor(), &g, &mut m, &mut v, &s).unwrap();
        (composed, mc, vc) = adamw_composed(&composed, &g, &mc, &vc, &s).unwrap();
    }
    let what = format!("{dims:?} {dtype:?} wd {wd} step {first_step}");
    assert_eq!(fused.dtype(), composed.dtype());
    assert_close(&format!("{what} param"), fused.as_tensor(), &composed, tol);
    let host = |x: Vec<f32>| Tensor::from_vec(x, dims, &Device::Cpu).unwrap();
    assert_close(&format!("{what} exp_avg"), &host(m), &mc, tol);
    assert_close(&format!("{what} exp_avg_sq"), &host(v), &vc, tol);
}

#[test]
fn matches_composed_f32() {
    for dims in [vec![1], vec![7], vec![13, 11], vec![3, 5, 67]] {
        for wd in [0.0, 0.1] {
            compare(&dims, DType::F32, wd, 3, 1, 1e-6);
        }
    }
}

#[test]
fn large_enough_to_thread() {
    compare(&[301, 419], DType::F32, 0.01, 3, 1, 1e-6);
}

#[test]
fn same_bits_as_composed() {
    // Same operations on the same f32 constants: identical up to the sign of zero.
    let dims = [5, 37];
    let p = Var::from_tensor(&randn(2, &dims, 1.0, DType::F32)).unwrap();
    let g = randn(3, &dims, 1.0, DType::F32);
    let (mut m, mut v) = (vec![0f32; 185], vec![0f32; 185]);
    let zeros = Tensor::zeros(&dims, DType::F32, &Device::Cpu).unwrap();
    let (pc, mc, vc) = adamw_composed(p.as_tensor(), &g, &zeros, &zeros, &hp(0.1, 1)).unwrap();
    adamw_update(p.as_tensor(), &g, &mut m, &mut v, &hp(0.1, 1)).unwrap();
    assert_eq!(to_vec(p.as_tensor()), to_vec(&pc));
    assert_eq!(m, to_vec(&mc));
    assert_eq!(v, to_vec(&vc));
}

#[test]
fn half_precision_parameters() {
    for dt in [DType::F16, DType::BF16] {
        compare(&[9, 33], dt, 0.1, 3, 1, 1e-2);
    }
}

#[test]
fn huge_step_counts() {
    // 2^31 would wrap an i32 exponent; past 2^53 the f64 step rounds, harmlessly.
    for step in [1u64 << 31, (1 << 40) + 3, u64::MAX - 5] {
        compare(&[4, 6], DType::F32, 0.1, 2, step, 1e-6);
        let (bc1, bc2) = hp(0.0, step).bias_corrections();
        assert_eq!((bc1, bc2), (1.0, 1.0));
    }
}

#[test]
fn strided_and_other_dtype_gradients() {
    let p0 = randn(4, &[6, 9], 1.0, DType::F32);
    let g = randn(5, &[9, 6], 1.0, DType::F32).t().unwrap();
    let g16 = randn(6, &[6, 9], 1.0, DType::F16);
    for g in [g, g16] {
        let p = Var::from_tensor(&p0.copy().unwrap()).unwrap();
        let (mut m, mut v) = (vec![0.1f32; 54], vec![0.2f32; 54]);
        let mc = Tensor::full(0.1f32, (6, 9), &Device::Cpu).unwrap();
        let vc = Tensor::full(0.2f32, (6, 9), &Device::Cpu).unwrap();
        adamw_update(p.as_tensor(), &g, &mut m, &mut v, &hp(0.1, 2)).unwrap();
        let (pc, mc, vc) = adamw_composed(&p0, &g, &mc, &vc, &hp(0.1, 2)).unwrap();
        assert_close("strided param", p.as_tensor(), &pc, 1e-6);
        let host = |x: Vec<f32>| Tensor::from_vec(x, (6, 9), &Device::Cpu).unwrap();
        assert_close("strided exp_avg", &host(m), &mc, 1e-6);
        assert_close("strided exp_avg_sq", &host(v), &vc, 1e-6);
    }
}

#[test]
fn updates_every_view_of_the_parameter() {
    // In place: another handle on the same storage sees the new values.
    let p = Var::from_tensor(&Tensor::ones(4, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let alias = p.as_tensor().clone();
    let g = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
    let (mut m, mut v) = (vec![0f32; 4], vec![0f32; 4]);
    adamw_update(p.as_tensor(), &g, &mut m, &mut v, &hp(0.0, 1)).unwrap();
    assert!(to_vec(&alias).iter().all(|x| (x - 0.99).abs() < 1e-6));
}

#[test]
fn bad_arguments_are_errors() {
    let dev = Device::Cpu;
    let p = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
    let g = Tensor::ones((2, 3), DType::F32, &dev).unwrap();
    let (mut m, mut v) = (vec![0f32; 6], vec![0f32; 6]);
    let mut run = |p: &Tensor, g: &Tensor, n: usize, s: AdamWStep| {
        let (m, v) = (&mut m[..n], &mut v[..n]);
        adamw_update(p, g, m, v, &s)
    };
    assert!(run(&p, &g, 6, hp(0.0, 0)).is_err());
    for bad in [f64::NAN, f64::INFINITY] {
        assert!(run(
            &p,
            &g,
            6,
            AdamWStep {
                lr: bad,
                ..hp(0.0, 1)
            }
        )
        .is_err());
        assert!(run(
            &p,
            &g,
            6,
            AdamWStep {
                eps: bad,
                ..hp(0.0, 1)
            }
        )
        .is_err());
        assert!(run(
            &p,
            &g,
            6,
            AdamWStep {
                beta2: bad,
                ..hp(0.0, 1)
            }
        )
        .is_err());
    }
    assert!(run(&p, &g, 5, hp(0.0, 1)).is_err());
    assert!(run(&p, &g.reshape(6).unwrap(), 6, hp(0.0, 1)).is_err());
    assert!(run(&p.t().unwrap(), &g.t().unwrap(), 6, hp(0.0, 1)).is_err());
    let ints = Tensor::zeros((2, 3), DType::U32, &dev).unwrap();
    assert!(run(&ints, &g, 6, hp(0.0, 1)).is_err());
    assert!(run(&p, &ints, 6, hp(0.0, 1)).is_err());
    assert!(adamw_composed(&p, &g, &g, &g, &hp(0.0, 0)).is_err());
    // Nothing was touched by the failed calls.
    assert!(to_vec(&p).iter().all(|x| *x == 0.0));
    assert!(m.iter().chain(&v).all(|x| *x == 0.0));
}

/// `adamw_check` against the update it predicts: true exactly when every value the update writes
/// is finite, and it writes nothing.
#[test]
fn check_predicts_a_finite_update() {
    let dev = Device::Cpu;
    // (parameter, dtype, gradient, lr, eps, expected): ordinary values, an f16 parameter pushed
    // past 65504, an f32 parameter pushed past f32::MAX, a gradient whose square overflows the
    // second moment, and 0/0 from a zero gradient with eps = 0.
    let cases: [(f32, DType, f32, f64, f64, bool); 6] = [
        (1.0, DType::F32, 0.5, 1e-2, 1e-8, true),
        (1.0, DType::F16, 0.5, 1e-2, 1e-8, true),
        (1.0, DType::F16, 0.5, 1e6, 1e-8, false),
        (f32::MAX, DType::F32, -1.0, 1e35, 1e-8, false),
        (1.0, DType::F32, 1e20, 1e-2, 1e-8, false),
        (1.0, DType::F32, 0.0, 1e-2, 0.0, false),
    ];
    for (i, (p0, dt, g0, lr, eps, want)) in cases.into_iter().enumerate() {
        // Large enough to be checked in parallel chunks; the odd value sits in the last one.
        let n = 200_003;
        let mut pv = vec![0.25f32; n];
        let mut gv = vec![0.125f32; n];
        (pv[n - 2], gv[n - 2]) = (p0, g0);
        if eps == 0.0 {
            gv[n - 2] = 0.0;
        }
        let p = Var::from_tensor(&Tensor::from_vec(pv, n, &dev).unwrap().to_dtype(dt).unwrap())
            .unwrap();
        let g = Tensor::from_vec(gv, n, &dev).unwrap().to_dtype(dt).unwrap();
        let before = to_vec(p.as_tensor());
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let s = AdamWStep {
            lr,
            eps,
            ..hp(0.0, 1)
        };
        assert_eq!(
            adamw_check(p.as_tensor(), &g, &m, &v, &s).unwrap(),
            want,
            "case {i}"
        );
        assert_eq!(to_vec(p.as_tensor()), before, "case {i}: check wrote");
        adamw_update(p.as_tensor(), &g, &mut m, &mut v, &s).unwrap();
        let finite = to_vec(p.as_tensor())
            .iter()
            .chain(&m)
            .chain(&v)
            .all(|x| x.is_finite());
        assert_eq!(
            finite, want,
            "case {i}: the update disagrees with the check"
        );
    }
    // Bad arguments are errors, as for the update.
    let p = Tensor::zeros(4, DType::F32, &dev).unwrap();
    assert!(adamw_check(&p, &p, &[0.0; 3], &[0.0; 4], &hp(0.0, 1)).is_err());
    assert!(adamw_check(&p, &p, &[0.0; 4], &[0.0; 4], &hp(0.0, 0)).is_err());
}

/// Times one update of a 54M-parameter model (12 layers of 4 × 512×512 and 2 × 2048×512 with
/// biases and norms, a 32000×512 embedding), fused against composed.
/// `cargo test --release -p torchscale-kernels --test adamw -- --ignored --nocapture`
#[test]
#[ignore]
fn timing() {
    let mut shapes = vec![vec![32000, 512]];
    for _ in 0..12 {
        shapes.extend([
            vec![512, 512],
            vec![512, 512],
            vec![512, 512],
            vec![512, 512],
        ]);
        shapes.extend([vec![2048, 512], vec![512, 2048], vec![2048]]);
        shapes.extend([
            vec![512],
            vec![512],
            vec![512],
            vec![512],
            vec![512],
            vec![512],
        ]);
    }
    let params: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, d)| randn(i as u64, d, 0.1, DType::F32))
        .collect();
    let grads: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, d)| randn(100 + i as u64, d, 0.01, DType::F32))
        .collect();
    let total: usize = params.iter().map(|p| p.elem_count()).sum();
    let mut host: Vec<(Vec<f32>, Vec<f32>)> = params
        .iter()
        .map(|p| (vec![0f32; p.elem_count()], vec![0f32; p.elem_count()]))
        .collect();
    let mut moments: Vec<(Tensor, Tensor)> = params
        .iter()
        .map(|p| (p.zeros_like().unwrap(), p.zeros_like().unwrap()))
        .collect();
    let reps = 5;
    let start = std::time::Instant::now();
    for step in 1..=reps {
        for ((p, g), (m, v)) in params.iter().zip(&grads).zip(host.iter_mut()) {
            adamw_update(p, g, m, v, &hp(0.01, step)).unwrap();
        }
    }
    let fused = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
    let start = std::time::Instant::now();
    for step in 1..=reps {
        for ((p, g), (m, v)) in params.iter().zip(&grads).zip(&host) {
            assert!(adamw_check(p, g, m, v, &hp(0.01, step)).unwrap());
        }
    }
    let check = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
    let mut params = params;
    let start = std::time::Instant::now();
    for step in 1..=reps {
        for ((p, g), (m, v)) in params.iter_mut().zip(&grads).zip(moments.iter_mut()) {
            let (np, nm, nv) = adamw_composed(p, g, m, v, &hp(0.01, step)).unwrap();
            (*p, *m, *v) = (np, nm, nv);
        }
    }
    let composed = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
    println!(
        "adamw over {total} parameters: fused {fused:.1} ms (+ {check:.1} ms finite check), \
         composed {composed:.1} ms ({:.1}x)",
        composed / fused
    );
}
