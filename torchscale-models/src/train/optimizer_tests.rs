//! AdamW against hand-computed updates, the decay groups and the state round trip.

use super::*;
use candle_core::Device;
use torchscale_kernels::with_fused;

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
    opt.set_lr(f64::NAN);
    let g = grads(&[(&w, t(&[1.0, 1.0]).reshape((1, 2)).unwrap())]);
    assert!(matches!(opt.step(&g), Err(Error::Config { .. })));
    assert_eq!(vals(&w), vec![1.0, 2.0]);
    assert_eq!(opt.num_updates(), 0);
    assert_eq!(
        opt.state().unwrap()["step.w.weight"]
            .to_vec1::<i64>()
            .unwrap(),
        vec![0]
    );
}
