//! AdamW against hand-computed updates, the decay groups and the state round trip; huge step
//! counts against an f64 reference; refused (overflowing) updates, bad states and bad settings.

use std::cell::Cell;

use super::*;
use candle_core::Device;
use torchscale_kernels::with_fused;

thread_local! {
    /// Runs the fused device path (in place on copies first) on CPU tensors, in this thread.
    pub(super) static DEVICE_PATH_ON_CPU: Cell<bool> = const { Cell::new(false) };
}

/// A store where each var's gradient is the given tensor (loss = Σ var·g).
fn grads(pairs: &[(&Var, Tensor)]) -> GradStore {
    let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
    for (v, g) in pairs {
        loss = (loss + (v.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
    }
    loss.backward().unwrap()
}

fn t(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn vals(v: &Var) -> Vec<f32> {
    v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
}

fn cfg(lr: f64, wd: f64) -> AdamWConfig {
    AdamWConfig {
        lr,
        weight_decay: wd,
        ..AdamWConfig::default()
    }
}

#[test]
fn two_steps_by_hand() {
    let w = Var::from_tensor(&t(&[1.0, -2.0]).reshape((1, 2)).unwrap()).unwrap();
    let mut opt = AdamW::new(vec![("fc1.weight".into(), w.clone())], cfg(0.1, 0.01)).unwrap();
    assert_eq!(opt.decays("fc1.weight"), Some(true));

    // Step 1, g = [0.5, -0.25]: m̂ = g, v̂ = g², so the Adam step is lr·sign(g) (up to eps);
    // decay first: [1, -2]·(1 − 0.1·0.01) = [0.999, −1.998].
    opt.step(&grads(&[(&w, t(&[0.5, -0.25]).reshape((1, 2)).unwrap())]))
        .unwrap();
    let p = vals(&w);
    assert!(
        (p[0] - 0.899).abs() < 1e-6 && (p[1] + 1.898).abs() < 1e-6,
        "{p:?}"
    );

    // Step 2, g = [0.1, 0.2]:
    // m = 0.9·[0.05, −0.025] + 0.1·g = [0.055, −0.0025]
    // v = 0.98·[0.005, 0.00125] + 0.02·g² = [0.0051, 0.002025]
    // p ← p·0.999 − 0.1/(1 − 0.9²) · m / (sqrt(v)/sqrt(1 − 0.98²) + 1e-8)
    opt.step(&grads(&[(&w, t(&[0.1, 0.2]).reshape((1, 2)).unwrap())]))
        .unwrap();
    let (m, v, prev) = (
        [0.055f64, -0.0025],
        [0.0051f64, 0.002025],
        [0.899f64, -1.898],
    );
    let bc2 = (1.0f64 - 0.98 * 0.98).sqrt();
    for i in 0..2 {
        let want = prev[i] * 0.999 - 0.1 / 0.19 * m[i] / (v[i].sqrt() / bc2 + 1e-8);
        assert!(
            (vals(&w)[i] as f64 - want).abs() < 2e-6,
            "{i}: {} vs {want}",
            vals(&w)[i]
        );
    }
    assert_eq!(opt.num_updates(), 2);
}

#[test]
fn decay_skips_biases_and_norms() {
    let w = Var::from_tensor(&t(&[1.0, 2.0, 3.0, 4.0]).reshape((2, 2)).unwrap()).unwrap();
    let b = Var::from_tensor(&t(&[1.0, 2.0])).unwrap();
    let ln = Var::from_tensor(&t(&[1.0, 1.0])).unwrap();
    let params = vec![
        ("layers.0.fc1.weight".to_string(), w.clone()),
        ("layers.0.fc1.bias".into(), b.clone()),
        ("layers.0.final_layer_norm.weight".into(), ln.clone()),
    ];
    let mut opt = AdamW::new(params, cfg(0.5, 0.1)).unwrap();
    assert_eq!(opt.decays("layers.0.fc1.bias"), Some(false));
    assert_eq!(opt.decays("layers.0.final_layer_norm.weight"), Some(false));
    // Zero gradients: the Adam term is 0 / (0 + eps) = 0, only the decay moves a parameter.
    let zero = |v: &Var| v.as_tensor().zeros_like().unwrap();
    opt.step(&grads(&[(&w, zero(&w)), (&b, zero(&b)), (&ln, zero(&ln))]))
        .unwrap();
    // 1 − 0.5·0.1 = 0.95
    assert_eq!(vals(&w), vec![0.95, 1.9, 2.85, 3.8]);
    assert_eq!(vals(&b), vec![1.0, 2.0]);
    assert_eq!(vals(&ln), vec![1.0, 1.0]);
}

#[test]
fn default_rule_by_name_and_rank() {
    assert!(default_decay(
        "encoder.layers.0.self_attn.k_proj.weight",
        &[8, 8]
    ));
    assert!(default_decay("encoder.embed_tokens.weight", &[100, 8]));
    assert!(!default_decay(
        "encoder.layers.0.self_attn.k_proj.bias",
        &[8]
    ));
    assert!(!default_decay(
        "decoder.layers.3.ffn.ffn_layernorm.weight",
        &[8]
    ));
    assert!(!default_decay("x.inner_attn_ln.weight", &[2, 8]));
    assert!(!default_decay("x.self_attn_layer_norm.weight", &[2, 8]));
    assert!(default_decay("x.kln.weight", &[2, 8]));
}

#[test]
fn missing_gradient_is_not_updated() {
    let a = Var::from_tensor(&t(&[1.0, 1.0]).reshape((1, 2)).unwrap()).unwrap();
    let b = Var::from_tensor(&t(&[1.0, 1.0]).reshape((1, 2)).unwrap()).unwrap();
    let mut opt = AdamW::new(
        vec![
            ("a.weight".into(), a.clone()),
            ("b.weight".into(), b.clone()),
        ],
        cfg(0.1, 0.1),
    )
    .unwrap();
    opt.step(&grads(&[(&a, t(&[1.0, 1.0]).reshape((1, 2)).unwrap())]))
        .unwrap();
    assert_eq!(vals(&b), vec![1.0, 1.0]);
    assert_ne!(vals(&a), vec![1.0, 1.0]);
    let state = opt.state().unwrap();
    assert_eq!(state["step.a.weight"].to_vec1::<i64>().unwrap(), vec![1]);
    assert_eq!(state["step.b.weight"].to_vec1::<i64>().unwrap(), vec![0]);
}

#[test]
fn state_roundtrip_resumes_exactly() {
    let init = t(&[0.3, -0.7, 1.1, 0.2]).reshape((2, 2)).unwrap();
    let g1 = t(&[0.5, -1.0, 0.25, 2.0]).reshape((2, 2)).unwrap();
    let g2 = t(&[-0.1, 0.4, 0.3, -0.6]).reshape((2, 2)).unwrap();
    let a = Var::from_tensor(&init).unwrap();
    let mut opt_a = AdamW::new(vec![("w.weight".into(), a.clone())], cfg(1e-2, 0.01)).unwrap();
    opt_a.step(&grads(&[(&a, g1)])).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("adamw.safetensors");
    opt_a.save(&path).unwrap();

    // A fresh optimizer on a copy of the parameters, with the saved state.
    let b = Var::from_tensor(&a.as_tensor().copy().unwrap()).unwrap();
    let mut opt_b = AdamW::new(vec![("w.weight".into(), b.clone())], cfg(1e-2, 0.01)).unwrap();
    opt_b.load(&path).unwrap();
    assert_eq!(opt_b.num_updates(), 1);
    // Without the state the next step differs (bias correction restarts), so the check can fail.
    let c = Var::from_tensor(&a.as_tensor().copy().unwrap()).unwrap();
    let mut opt_c = AdamW::new(vec![("w.weight".into(), c.clone())], cfg(1e-2, 0.01)).unwrap();

    opt_a.step(&grads(&[(&a, g2.clone())])).unwrap();
    opt_b.step(&grads(&[(&b, g2.clone())])).unwrap();
    opt_c.step(&grads(&[(&c, g2)])).unwrap();
    assert_eq!(vals(&a), vals(&b));
    assert_ne!(vals(&a), vals(&c));
}

#[test]
fn load_state_rejects_bad_files() {
    let w = Var::from_tensor(&t(&[1.0, 2.0])).unwrap();
    let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg(0.1, 0.0)).unwrap();
    let good = opt.state().unwrap();
    let mut missing = good.clone();
    missing.remove("exp_avg_sq.w");
    assert!(
        matches!(opt.load_state(&missing), Err(Error::MissingTensor { key }) if key == "exp_avg_sq.w")
    );
    let mut extra = good.clone();
    extra.insert("exp_avg.other".into(), t(&[1.0]));
    assert!(matches!(
        opt.load_state(&extra),
        Err(Error::UnexpectedTensor { .. })
    ));
    let mut shape = good;
    shape.insert("exp_avg.w".into(), t(&[1.0, 2.0, 3.0]));
    assert!(matches!(
        opt.load_state(&shape),
        Err(Error::TensorShape { .. })
    ));
    let dup = AdamW::new(
        vec![("w".into(), w.clone()), ("w".into(), w)],
        cfg(0.1, 0.0),
    );
    assert!(matches!(dup, Err(Error::Invalid { .. })));
}

/// Three parameters (decay, bias, norm) with seeded values, and three seeded gradient sets.
fn model() -> (Vec<(String, Tensor)>, Vec<Vec<Tensor>>) {
    let dev = Device::Cpu;
    let shapes: [(&str, &[usize]); 3] = [
        ("l.fc.weight", &[5, 7]),
        ("l.fc.bias", &[7]),
        ("l.layer_norm.weight", &[7]),
    ];
    let init = shapes
        .iter()
        .map(|(n, d)| (n.to_string(), Tensor::randn(0f32, 1.0, *d, &dev).unwrap()))
        .collect();
    let grads = (0..3)
        .map(|_| {
            shapes
                .iter()
                .map(|(_, d)| Tensor::randn(0f32, 0.5, *d, &dev).unwrap())
                .collect()
        })
        .collect();
    (init, grads)
}

/// An optimizer over fresh copies of `init`.
fn opt_on(init: &[(String, Tensor)]) -> (AdamW, Vec<Var>) {
    let vars: Vec<Var> = init
        .iter()
        .map(|(_, t)| Var::from_tensor(&t.copy().unwrap()).unwrap())
        .collect();
    let params = init
        .iter()
        .zip(&vars)
        .map(|((n, _), v)| (n.clone(), v.clone()))
        .collect();
    (AdamW::new(params, cfg(1e-2, 0.1)).unwrap(), vars)
}

fn step_with(opt: &mut AdamW, vars: &[Var], g: &[Tensor], fused: bool) {
    let pairs: Vec<(&Var, Tensor)> = vars.iter().zip(g.iter().cloned()).collect();
    with_fused(fused, || opt.step(&grads(&pairs))).unwrap();
}

/// Asserts `|a - b| <= 1e-6 * max(1, |b|)` element-wise.
fn close(what: &str, a: &Tensor, b: &Tensor) {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-6 * y.abs().max(1.0),
            "{what}: {x} vs {y}"
        );
    }
}

fn same_state(a: &AdamW, b: &AdamW) {
    let (sa, sb) = (a.state().unwrap(), b.state().unwrap());
    assert_eq!(sa.len(), sb.len());
    for (k, t) in &sa {
        if k.starts_with("step.") || k == "num_updates" {
            assert_eq!(
                t.to_vec1::<i64>().unwrap(),
                sb[k].to_vec1::<i64>().unwrap(),
                "{k}"
            );
        } else {
            close(k, t, &sb[k]);
        }
    }
}

#[test]
fn fused_matches_composed_over_three_steps() {
    let (init, gs) = model();
    let (mut fused, fv) = opt_on(&init);
    let (mut composed, cv) = opt_on(&init);
    assert_eq!(fused.decays("l.fc.weight"), Some(true));
    assert_eq!(fused.decays("l.fc.bias"), Some(false));
    for g in &gs {
        step_with(&mut fused, &fv, g, true);
        step_with(&mut composed, &cv, g, false);
    }
    for ((f, c), (name, _)) in fv.iter().zip(&cv).zip(&init) {
        close(name, f.as_tensor(), c.as_tensor());
    }
    same_state(&fused, &composed);
    // Switching paths mid-run continues the same trajectory.
    step_with(&mut fused, &fv, &gs[0], false);
    step_with(&mut composed, &cv, &gs[0], true);
    for (f, c) in fv.iter().zip(&cv) {
        close("after switching", f.as_tensor(), c.as_tensor());
    }
    same_state(&fused, &composed);
}

#[test]
fn state_roundtrip_after_fused_steps() {
    let (init, gs) = model();
    for (write_fused, read_fused) in [(true, true), (true, false), (false, true)] {
        let (mut a, av) = opt_on(&init);
        step_with(&mut a, &av, &gs[0], write_fused);
        step_with(&mut a, &av, &gs[1], write_fused);
        let state = a.state().unwrap();
        assert_eq!(state.len(), 3 * 3 + 1);
        assert_eq!(state["exp_avg.l.fc.weight"].dims(), &[5, 7]);
        assert_eq!(state["exp_avg_sq.l.fc.bias"].dtype(), DType::F32);
        assert_eq!(state["step.l.fc.bias"].to_vec1::<i64>().unwrap(), vec![2]);
        // A fresh optimizer on the current parameters with the saved state.
        let now: Vec<(String, Tensor)> = init
            .iter()
            .zip(&av)
            .map(|((n, _), v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let (mut b, bv) = opt_on(&now);
        b.load_state(&state).unwrap();
        same_state(&a, &b);
        step_with(&mut a, &av, &gs[2], write_fused);
        step_with(&mut b, &bv, &gs[2], read_fused);
        for (x, y) in av.iter().zip(&bv) {
            close("resumed", x.as_tensor(), y.as_tensor());
        }
        same_state(&a, &b);
    }
}

#[test]
fn fused_half_precision_parameters() {
    let dev = Device::Cpu;
    for dt in [DType::F16, DType::BF16] {
        let init = Tensor::randn(0f32, 1.0, (4, 9), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let g = Tensor::randn(0f32, 1.0, (4, 9), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let run = |fused: bool| {
            let w = Var::from_tensor(&init.copy().unwrap()).unwrap();
            let mut opt = AdamW::new(vec![("w.weight".into(), w.clone())], cfg(1e-2, 0.1)).unwrap();
            let mut store = GradStore::default();
            store.insert(w.as_tensor(), g.clone());
            for _ in 0..2 {
                with_fused(fused, || opt.step(&store)).unwrap();
            }
            assert_eq!(w.dtype(), dt);
            w.as_tensor().to_dtype(DType::F32).unwrap()
        };
        close(&format!("{dt:?}"), &run(true), &run(false));
    }
}

#[test]
fn non_finite_rate_is_refused_before_any_update() {
    let w = Var::from_tensor(&t(&[1.0, 2.0]).reshape((1, 2)).unwrap()).unwrap();
    let mut opt = AdamW::new(vec![("w.weight".into(), w.clone())], cfg(0.1, 0.0)).unwrap();
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1e-3] {
        assert!(
            matches!(opt.set_lr(bad), Err(Error::Config { field, .. }) if field == "lr"),
            "{bad}"
        );
    }
    assert_eq!(opt.lr(), 0.1);
    assert_eq!(vals(&w), vec![1.0, 2.0]);
    assert_eq!(opt.num_updates(), 0);
    opt.set_lr(0.0).unwrap();
    assert_eq!(opt.lr(), 0.0);
}

#[test]
fn bad_settings_are_config_errors_naming_the_field() {
    let w = Var::from_tensor(&t(&[1.0, 2.0])).unwrap();
    let base = AdamWConfig::default();
    let cases = [
        (
            AdamWConfig {
                lr: f64::INFINITY,
                ..base
            },
            "lr",
        ),
        (
            AdamWConfig {
                lr: f64::NAN,
                ..base
            },
            "lr",
        ),
        (AdamWConfig { lr: -1.0, ..base }, "lr"),
        (AdamWConfig { beta1: 1.0, ..base }, "adam_betas"),
        (AdamWConfig { beta2: 1.0, ..base }, "adam_betas"),
        (
            AdamWConfig {
                beta2: f64::NAN,
                ..base
            },
            "adam_betas",
        ),
        (
            AdamWConfig {
                beta1: -0.1,
                ..base
            },
            "adam_betas",
        ),
        (AdamWConfig { eps: -1e-8, ..base }, "adam_eps"),
        (
            AdamWConfig {
                eps: f64::NAN,
                ..base
            },
            "adam_eps",
        ),
        (
            AdamWConfig {
                eps: f64::INFINITY,
                ..base
            },
            "adam_eps",
        ),
        (
            AdamWConfig {
                weight_decay: f64::INFINITY,
                ..base
            },
            "weight_decay",
        ),
        (
            AdamWConfig {
                weight_decay: -0.1,
                ..base
            },
            "weight_decay",
        ),
    ];
    for (c, want) in cases {
        match AdamW::new(vec![("w".into(), w.clone())], c) {
            Err(Error::Config { field, .. }) => assert_eq!(field, want, "{c:?}"),
            other => panic!("{c:?}: {other:?}"),
        }
    }
    AdamW::new(vec![("w".into(), w)], AdamWConfig { eps: 0.0, ..base }).unwrap();
}

/// PyTorch's `torch.optim.AdamW` step (`_single_tensor_adamw`) in f64: decay, lerp first moment,
/// second moment, `step_size = lr / (1 - b1^t)`, `denom = sqrt(v) / sqrt(1 - b2^t) + eps`.
fn torch_adamw_f64(
    p: &[f64],
    g: &[f64],
    m: &[f64],
    v: &[f64],
    c: &AdamWConfig,
    t: u64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let t = t as f64;
    let bc1 = 1.0 - c.beta1.powf(t);
    let bc2 = 1.0 - c.beta2.powf(t);
    let step_size = c.lr / bc1;
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..p.len() {
        let x = p[i] * (1.0 - c.lr * c.weight_decay);
        let mn = m[i] + (g[i] - m[i]) * (1.0 - c.beta1);
        let vn = v[i] * c.beta2 + (1.0 - c.beta2) * g[i] * g[i];
        let denom = vn.sqrt() / bc2.sqrt() + c.eps;
        out.0.push(x - step_size * mn / denom);
        out.1.push(mn);
        out.2.push(vn);
    }
    out
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn huge_step_counts_match_an_f64_reference() {
    let p0 = [0.5f32, -1.25, 2.0, 0.03, -0.7, 1.5];
    let g = [0.2f32, -0.4, 0.05, 1.0, -0.01, 0.3];
    let m0 = [0.1f32, -0.2, 0.03, 0.5, 0.0, -0.05];
    let v0 = [0.01f32, 0.04, 0.002, 0.3, 1e-6, 0.02];
    let c = cfg(1e-2, 0.1);
    // The count in the state; the update is number `saved + 1` (2^31 wraps an i32 exponent).
    for saved in [(1u64 << 31) - 1, 1 << 31, 1 << 40] {
        for (fused, device) in [(true, false), (false, false), (true, true)] {
            let w = Var::from_tensor(&t(&p0).reshape((2, 3)).unwrap()).unwrap();
            let mut opt = AdamW::new(vec![("w.weight".into(), w.clone())], c).unwrap();
            let mut state = opt.state().unwrap();
            let shaped = |x: &[f32]| t(x).reshape((2, 3)).unwrap();
            state.insert("exp_avg.w.weight".into(), shaped(&m0));
            state.insert("exp_avg_sq.w.weight".into(), shaped(&v0));
            let count = Tensor::new(&[saved as i64], &Device::Cpu).unwrap();
            state.insert("step.w.weight".into(), count.clone());
            state.insert("num_updates".into(), count);
            opt.load_state(&state).unwrap();
            DEVICE_PATH_ON_CPU.with(|d| d.set(device));
            let r = with_fused(fused, || opt.step(&grads(&[(&w, shaped(&g))])));
            DEVICE_PATH_ON_CPU.with(|d| d.set(false));
            assert_eq!(r.unwrap(), None);
            let f = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
            let (pw, mw, vw) = torch_adamw_f64(&f(&p0), &f(&g), &f(&m0), &f(&v0), &c, saved + 1);
            let state = opt.state().unwrap();
            let what = format!("step {saved} fused {fused} device {device}");
            for (name, got, want) in [
                ("param", f64s(w.as_tensor()), pw),
                ("exp_avg", f64s(&state["exp_avg.w.weight"]), mw),
                ("exp_avg_sq", f64s(&state["exp_avg_sq.w.weight"]), vw),
            ] {
                for (a, b) in got.iter().zip(&want) {
                    assert!(a.is_finite(), "{what} {name}: {a}");
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                        "{what} {name}: {a} vs {b}"
                    );
                }
            }
            assert_eq!(
                state["step.w.weight"].to_vec1::<i64>().unwrap(),
                vec![saved as i64 + 1]
            );
            assert_eq!(opt.num_updates(), saved + 1);
        }
    }
}

/// Every value of the parameters and the state, as bits.
fn snapshot(opt: &AdamW, vars: &[Var]) -> Vec<(String, Vec<u32>)> {
    let bits = |t: &Tensor| -> Vec<u32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    let mut out: Vec<(String, Vec<u32>)> = opt
        .state()
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let b = if t.dtype() == DType::I64 {
                t.to_vec1::<i64>()
                    .unwrap()
                    .iter()
                    .map(|x| *x as u32)
                    .collect()
            } else {
                bits(&t)
            };
            (k, b)
        })
        .collect();
    out.extend(
        vars.iter()
            .enumerate()
            .map(|(i, v)| (format!("param {i}"), bits(v.as_tensor()))),
    );
    out.sort();
    out
}

#[test]
fn an_overflowing_update_changes_nothing() {
    // (dtype, the second parameter's values, the rate that overflows it): an f16 parameter
    // pushed past 65504, and an f32 one at f32::MAX pushed past it.
    let cases = [
        (DType::F16, [1.0f32, -2.0, 0.5, 3.0], 1e6),
        (DType::F32, [f32::MAX, -2.0, 0.5, 3.0], 1e35),
    ];
    for (dt, big, huge_lr) in cases {
        for (fused, device) in [(true, false), (false, false), (true, true)] {
            let what = format!("{dt:?} fused {fused} device {device}");
            let mk = |x: &[f32], dt: DType| {
                Var::from_tensor(&t(x).reshape((2, 2)).unwrap().to_dtype(dt).unwrap()).unwrap()
            };
            // The first parameter (f32) stays finite even at the huge rate: all or nothing means
            // its update is refused too.
            let (a, b) = (mk(&[0.1, 0.2, 0.3, 0.4], DType::F32), mk(&big, dt));
            let vars = [a.clone(), b.clone()];
            let mut opt = AdamW::new(
                vec![
                    ("a.weight".into(), a.clone()),
                    ("b.weight".into(), b.clone()),
                ],
                cfg(1e-3, 0.01),
            )
            .unwrap();
            // g pushes b[0] upwards (towards +inf) and the others anywhere.
            let g = |s: f32, v: &Var| {
                t(&[-s, 0.5, -0.25, 1.0])
                    .reshape((2, 2))
                    .unwrap()
                    .to_dtype(v.dtype())
                    .unwrap()
            };
            let mut gs = GradStore::default();
            gs.insert(a.as_tensor(), g(0.1, &a));
            gs.insert(b.as_tensor(), g(1.0, &b));
            DEVICE_PATH_ON_CPU.with(|d| d.set(device));
            let run = |opt: &mut AdamW| with_fused(fused, || opt.step(&gs)).unwrap();
            assert_eq!(run(&mut opt), None, "{what}: a normal step");
            let before = snapshot(&opt, &vars);
            opt.set_lr(huge_lr).unwrap();
            assert_eq!(
                run(&mut opt),
                Some(SkipReason::Update {
                    name: "b.weight".into()
                }),
                "{what}"
            );
            assert_eq!(snapshot(&opt, &vars), before, "{what}: something changed");
            assert_eq!(opt.num_updates(), 1, "{what}");
            // Back to a sane rate, the run goes on from the same state.
            opt.set_lr(1e-3).unwrap();
            assert_eq!(run(&mut opt), None, "{what}");
            DEVICE_PATH_ON_CPU.with(|d| d.set(false));
            assert_eq!(opt.num_updates(), 2);
            assert_ne!(snapshot(&opt, &vars), before);
        }
    }
}

#[test]
fn the_agreement_decides() {
    let w = Var::from_tensor(&t(&[1.0, 2.0])).unwrap();
    let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg(0.1, 0.0)).unwrap();
    let gs = grads(&[(&w, t(&[1.0, 1.0]))]);
    // Another rank refused: nothing changes here either.
    let r = opt
        .step_agreed(&gs, |local| {
            assert_eq!(local, None);
            Ok(Some(SkipReason::OtherRank { rank: 3 }))
        })
        .unwrap();
    assert_eq!(r, Some(SkipReason::OtherRank { rank: 3 }));
    assert_eq!(vals(&w), vec![1.0, 2.0]);
    assert_eq!(opt.num_updates(), 0);
    assert_eq!(opt.step(&gs).unwrap(), None);
    assert_ne!(vals(&w), vec![1.0, 2.0]);
}

#[test]
fn bad_values_in_a_loaded_state_are_errors_naming_the_key() {
    let w = Var::from_tensor(&t(&[1.0, 2.0])).unwrap();
    let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg(0.1, 0.0)).unwrap();
    opt.step(&grads(&[(&w, t(&[0.5, -0.5]))])).unwrap();
    let good = opt.state().unwrap();
    let before = snapshot(&opt, std::slice::from_ref(&w));
    let cases: [(&str, Tensor); 6] = [
        ("exp_avg.w", t(&[f32::NAN, 0.0])),
        ("exp_avg.w", t(&[0.0, f32::NEG_INFINITY])),
        ("exp_avg_sq.w", t(&[f32::INFINITY, 0.0])),
        ("exp_avg_sq.w", t(&[0.0, -1e-3])),
        ("step.w", Tensor::new(&[-1i64], &Device::Cpu).unwrap()),
        ("num_updates", Tensor::new(&[-5i64], &Device::Cpu).unwrap()),
    ];
    for (key, bad) in cases {
        let mut state = good.clone();
        state.insert(key.to_string(), bad.clone());
        match opt.load_state(&state) {
            Err(Error::TensorValue { key: k, .. }) => assert_eq!(k, key, "{bad}"),
            other => panic!("{key}: {other:?}"),
        }
        assert_eq!(snapshot(&opt, std::slice::from_ref(&w)), before, "{key}");
    }
    // Through a file too.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("adamw.safetensors");
    let mut state = good;
    state.insert("exp_avg.w".into(), t(&[f32::NAN, 1.0]));
    candle_core::safetensors::save(&state, &path).unwrap();
    let err = opt.load(&path).unwrap_err();
    assert!(err.to_string().contains("`exp_avg.w`"), "{err}");
}
