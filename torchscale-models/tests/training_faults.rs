//! Catalogue: faults in training. Each row is an optimizer or trainer given a bad setting, a bad
//! loaded state or a bad batch — an infinite learning rate, NaN moments, a step count of 2^31,
//! a fully padded row, a NaN gradient — with the typed error it must give (the variant and the
//! field or key it names), or the success it must have (finite values, a step skipped whole).

mod catalogue;
mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use catalogue::{accepted, check, refused, Case};
use common::{store, tiny_decoder, tokens};
use torchscale_core::Result;
use torchscale_models::build::BuildOptions;
use torchscale_models::data::PAD;
use torchscale_models::decoder::{Decoder, DecoderInputs};
use torchscale_models::lm::{LanguageModel, LossConfig};
use torchscale_models::train::{
    label_smoothed_cross_entropy, AdamW, AdamWConfig, ClipMode, Schedule, SkipReason, Trainer,
    TrainerConfig,
};

const CPU: Device = Device::Cpu;

/// Two named parameters, `w` `[2, 3]` and `b` `[3]`.
fn params() -> Vec<(String, Var)> {
    let w = Tensor::new(&[[0.5f32, -0.25, 1.0], [2.0, 0.0, -1.5]], &CPU).unwrap();
    let b = Tensor::new(&[0.1f32, 0.2, 0.3], &CPU).unwrap();
    vec![
        ("w".into(), Var::from_tensor(&w).unwrap()),
        ("b".into(), Var::from_tensor(&b).unwrap()),
    ]
}

/// Gradients of `sum(w * gw) + sum(b)` for the parameters of `p`.
fn grads(p: &[(String, Var)], gw: f32) -> candle_core::backprop::GradStore {
    let scale = Tensor::full(gw, (2, 3), &CPU).unwrap();
    let loss = (p[0].1.as_tensor() * scale)
        .unwrap()
        .sum_all()
        .unwrap()
        .add(&p[1].1.as_tensor().sum_all().unwrap())
        .unwrap();
    loss.backward().unwrap()
}

fn values(p: &[(String, Var)]) -> Vec<Vec<f32>> {
    p.iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

fn finite(p: &[(String, Var)]) -> bool {
    values(p).iter().flatten().all(|x| x.is_finite())
}

/// The state of a fresh optimizer over [`params`] after one step, with `f` applied.
fn state_with(f: impl FnOnce(&mut HashMap<String, Tensor>)) -> Result<HashMap<String, Tensor>> {
    let p = params();
    let mut opt = AdamW::new(p.clone(), AdamWConfig::default())?;
    opt.step(&grads(&p, 1.0))?;
    let mut s = opt.state()?;
    f(&mut s);
    Ok(s)
}

/// A row loading a state changed by `f` into a fresh optimizer.
fn state_row(
    name: &'static str,
    input: &'static str,
    variant: &'static str,
    words: &'static [&'static str],
    f: impl FnOnce(&mut HashMap<String, Tensor>) + 'static,
) -> Case {
    refused(name, input, variant, words, move || {
        let s = state_with(f)?;
        let p = params();
        let before = values(&p);
        let mut opt = AdamW::new(p.clone(), AdamWConfig::default())?;
        let r = opt.load_state(&s);
        assert_eq!(opt.num_updates(), 0, "a refused state changed the count");
        opt.step(&grads(&p, 1.0))?;
        assert!(finite(&p) && values(&p) != before);
        r
    })
}

fn set(s: &mut HashMap<String, Tensor>, key: &str, v: Tensor) {
    s.insert(key.to_string(), v);
}

#[test]
fn optimizer_settings_and_states() {
    let cases = vec![
        refused(
            "lr = inf",
            "AdamW::new(lr = inf)",
            "Config",
            &["lr"],
            || {
                let cfg = AdamWConfig {
                    lr: f64::INFINITY,
                    ..AdamWConfig::default()
                };
                AdamW::new(params(), cfg).map(|_| ())
            },
        ),
        refused(
            "set_lr(NaN)",
            "AdamW::set_lr(NaN) after lr = 1e-3",
            "Config",
            &["lr"],
            || {
                let mut opt = AdamW::new(params(), AdamWConfig::default())?;
                let before = opt.lr();
                let r = opt.set_lr(f64::NAN);
                assert_eq!(opt.lr(), before, "a refused rate was kept");
                r
            },
        ),
        refused(
            "beta1 = 1",
            "AdamW::new(betas = (1, 0.98))",
            "Config",
            &["adam_betas"],
            || {
                let cfg = AdamWConfig {
                    beta1: 1.0,
                    ..AdamWConfig::default()
                };
                AdamW::new(params(), cfg).map(|_| ())
            },
        ),
        refused(
            "eps < 0",
            "AdamW::new(eps = -1e-8)",
            "Config",
            &["adam_eps"],
            || {
                let cfg = AdamWConfig {
                    eps: -1e-8,
                    ..AdamWConfig::default()
                };
                AdamW::new(params(), cfg).map(|_| ())
            },
        ),
        refused(
            "a schedule giving lr = inf",
            "Trainer with Schedule::Constant(inf), one step",
            "Config",
            &["lr"],
            || {
                let lm = LanguageModel::new(tiny_decoder().with_max_positions(32), 0)?;
                let mut t = Trainer::new(
                    &lm.store,
                    &[],
                    TrainerConfig::default(),
                    AdamWConfig::default(),
                    Schedule::Constant(f64::INFINITY),
                )?;
                let snapshot = || -> Vec<Vec<f32>> {
                    lm.store
                        .named_vars()
                        .iter()
                        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                        .collect()
                };
                let before = snapshot();
                let r = train(&lm, &mut t);
                assert_eq!(before, snapshot(), "a refused rate changed the parameters");
                r.map(|_| ())
            },
        ),
        state_row(
            "NaN moments in a loaded state",
            "exp_avg.w = [[NaN, ...]]",
            "TensorValue",
            &["exp_avg.w"],
            |s| {
                set(
                    s,
                    "exp_avg.w",
                    Tensor::full(f32::NAN, (2, 3), &CPU).unwrap(),
                )
            },
        ),
        state_row(
            "an infinite second moment",
            "exp_avg_sq.b = [inf, inf, inf]",
            "TensorValue",
            &["exp_avg_sq.b"],
            |s| {
                set(
                    s,
                    "exp_avg_sq.b",
                    Tensor::full(f32::INFINITY, 3, &CPU).unwrap(),
                )
            },
        ),
        state_row(
            "a negative second moment",
            "exp_avg_sq.w = [[-1, ...]]",
            "TensorValue",
            &["exp_avg_sq.w"],
            |s| {
                set(
                    s,
                    "exp_avg_sq.w",
                    Tensor::full(-1f32, (2, 3), &CPU).unwrap(),
                )
            },
        ),
        state_row(
            "a negative step count",
            "step.b = -5",
            "TensorValue",
            &["step.b"],
            |s| set(s, "step.b", Tensor::new(&[-5i64], &CPU).unwrap()),
        ),
        state_row(
            "a moment of the wrong shape",
            "exp_avg.w is [3, 2]",
            "TensorShape",
            &["exp_avg.w"],
            |s| {
                set(
                    s,
                    "exp_avg.w",
                    Tensor::zeros((3, 2), DType::F32, &CPU).unwrap(),
                )
            },
        ),
        state_row(
            "a key of no parameter",
            "exp_avg.ghost added",
            "UnexpectedTensor",
            &["exp_avg.ghost"],
            |s| {
                set(
                    s,
                    "exp_avg.ghost",
                    Tensor::zeros(1, DType::F32, &CPU).unwrap(),
                )
            },
        ),
        accepted(
            "AdamW at step 2^31",
            "a state whose step counts and num_updates are 2^31, then one step",
            || {
                let s = state_with(|s| {
                    let n = Tensor::new(&[1i64 << 31], &CPU).unwrap();
                    for k in ["step.w", "step.b", "num_updates"] {
                        set(s, k, n.clone());
                    }
                })?;
                let p = params();
                let before = values(&p);
                let mut opt = AdamW::new(p.clone(), AdamWConfig::default())?;
                opt.load_state(&s)?;
                let skipped = opt.step(&grads(&p, 1.0))?;
                assert_eq!(skipped, None, "the step was refused");
                assert!(finite(&p), "non-finite parameters: {:?}", values(&p));
                assert_ne!(values(&p), before, "the step changed nothing");
                assert_eq!(opt.num_updates(), (1 << 31) + 1);
                let m: Vec<f32> = opt.state()?["exp_avg_sq.w"].flatten_all()?.to_vec1()?;
                assert!(m.iter().all(|x| x.is_finite()), "{m:?}");
                Ok(())
            },
        ),
        accepted(
            "a NaN gradient",
            "one step whose gradient of w is NaN (b's is fine)",
            || {
                let p = params();
                let mut opt = AdamW::new(p.clone(), AdamWConfig::default())?;
                opt.step(&grads(&p, 1.0))?;
                let before = (values(&p), opt.num_updates());
                let skipped = opt.step(&grads(&p, f32::NAN))?;
                assert!(
                    matches!(&skipped, Some(SkipReason::Update { name }) if name == "w"),
                    "{skipped:?}"
                );
                assert_eq!(
                    (values(&p), opt.num_updates()),
                    before,
                    "a refused step wrote"
                );
                Ok(())
            },
        ),
    ];
    check("training_faults (optimizer)", cases);
}

#[test]
fn padding_and_trainer_states() {
    let cases = vec![
        accepted(
            "a fully padded row",
            "Decoder::forward(tokens [2, 5], self_attn_padding_mask: row 1 all padded), then the \
             loss with row 1's targets all PAD and its gradients",
            || {
                let (s, vb) = store(0);
                let m = Decoder::new(&tiny_decoder(), &BuildOptions::default(), vb)?;
                let mask = Tensor::new(&[[0u8, 0, 0, 0, 0], [1, 1, 1, 1, 1]], &CPU)?;
                let inp = DecoderInputs {
                    self_attn_padding_mask: Some(&mask),
                    ..Default::default()
                };
                let x = m.forward(&tokens(2, 5, 20), &inp)?.x;
                let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
                assert!(xs.iter().all(|v| v.is_finite()), "non-finite logits");
                let target = Tensor::new(&[[5u32, 6, 7, 8, 9], [PAD; 5]], &CPU)?;
                let ce = label_smoothed_cross_entropy(&x, &target, 0.1, Some(PAD))?;
                let loss = ce.loss_sum.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                assert!(loss.is_finite(), "loss {loss}");
                assert_eq!(ce.ntokens, 5);
                let g = ce.loss_sum.backward()?;
                for (name, v) in s.named_vars() {
                    if let Some(g) = g.get(v.as_tensor()) {
                        let gs: Vec<f32> = g.flatten_all()?.to_vec1()?;
                        assert!(gs.iter().all(|x| x.is_finite()), "gradient of {name}");
                    }
                }
                Ok(())
            },
        ),
        accepted(
            "a trainer resumed at step 2^31",
            "LanguageModel trainer state with trainer.step, step.* and num_updates = 2^31, then \
             one training step",
            || {
                let lm = LanguageModel::new(tiny_decoder().with_max_positions(32), 0)?;
                let mut t = trainer(&lm)?;
                train(&lm, &mut t)?;
                let mut state = t.state()?;
                let n = Tensor::new(&[1i64 << 31], &CPU)?;
                for k in state.keys().cloned().collect::<Vec<_>>() {
                    if k.starts_with("step.") || k == "num_updates" || k == "trainer.step" {
                        state.insert(k, n.clone());
                    }
                }
                let mut t = trainer(&lm)?;
                t.load_state(&state)?;
                let r = train(&lm, &mut t)?;
                assert_eq!(r, None, "the step was skipped");
                for (name, v) in lm.store.named_vars() {
                    let xs: Vec<f32> = v.as_tensor().flatten_all()?.to_vec1()?;
                    assert!(xs.iter().all(|x| x.is_finite()), "{name}");
                }
                Ok(())
            },
        ),
        refused(
            "a trainer state with a negative step",
            "trainer.step = -1",
            "TensorValue",
            &["trainer.step"],
            || {
                let lm = LanguageModel::new(tiny_decoder().with_max_positions(32), 0)?;
                let t = trainer(&lm)?;
                let mut state = t.state()?;
                state.insert("trainer.step".into(), Tensor::new(&[-1i64], &CPU)?);
                trainer(&lm)?.load_state(&state)
            },
        ),
        refused(
            "a trainer state of another model",
            "the state of a 2-layer model loaded into a trainer of a 1-layer one",
            "UnexpectedTensor",
            &["layers.1"],
            || {
                let two = LanguageModel::new(tiny_decoder().with_max_positions(32), 0)?;
                let one =
                    LanguageModel::new(tiny_decoder().with_layers(1).with_max_positions(32), 0)?;
                let state = trainer(&two)?.state()?;
                trainer(&one)?.load_state(&state)
            },
        ),
    ];
    check("training_faults (trainer)", cases);
}

fn trainer(lm: &LanguageModel) -> Result<Trainer> {
    Trainer::new(
        &lm.store,
        &lm.model.expert_parameters(),
        TrainerConfig {
            clip: ClipMode::GlobalNorm(1.0),
            ..TrainerConfig::default()
        },
        AdamWConfig::default(),
        Schedule::Constant(1e-3),
    )
}

fn train(lm: &LanguageModel, t: &mut Trainer) -> Result<Option<SkipReason>> {
    let input = tokens(2, 6, 20);
    let target = tokens(2, 6, 20);
    let r = t.step(1, |ctx| {
        lm.micro_batch(&input, &target, true, &LossConfig::default(), ctx.seed)
    })?;
    Ok(r.skipped)
}
