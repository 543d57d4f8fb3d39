//! The trainer's guard over the update itself: an overflowing update is skipped with the weights
//! and optimizer state untouched, and a bad scheduled rate is an error.

use super::*;
use candle_core::{DType, Device};
use candle_nn::Init;

/// A store with one f16 `[2, 2]` weight (decayed) and one f32 `[2]` bias.
fn store() -> ParamStore {
    let store = ParamStore::new(0);
    let cpu = Device::Cpu;
    store
        .var_builder(DType::F16, &cpu)
        .get_with_hints((2, 2), "fc.weight", Init::Const(1.0))
        .unwrap();
    store
        .var_builder(DType::F32, &cpu)
        .get_with_hints(2, "fc.bias", Init::Const(0.5))
        .unwrap();
    store
}

/// loss = Σ w·x + Σ b·y over fixed inputs.
fn micro(store: &ParamStore) -> impl FnMut(StepCtx) -> Result<MicroBatch> + '_ {
    move |_| {
        let w = store.get("fc.weight").unwrap();
        let b = store.get("fc.bias").unwrap();
        let x = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &Device::Cpu)?.to_dtype(DType::F16)?;
        let y = Tensor::new(&[1f32, -1.0], &Device::Cpu)?;
        let loss = ((w.as_tensor() * x)?.sum_all()?.to_dtype(DType::F32)?
            + (b.as_tensor() * y)?.sum_all()?)?;
        Ok(MicroBatch {
            loss_sum: loss,
            nll_sum: 1.0,
            ntokens: 1,
            grads: None,
        })
    }
}

fn values(store: &ParamStore) -> Vec<Vec<u32>> {
    store
        .vars()
        .iter()
        .map(|v| {
            v.as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect()
}

#[test]
fn an_overflowing_update_is_skipped_with_the_weights_untouched() {
    let store = store();
    let opt = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    // 1e6 pushes the f16 weight far past 65504 (the f32 bias would survive it).
    let mut t = Trainer::new(
        &store,
        &[],
        TrainerConfig::default(),
        opt,
        Schedule::Constant(1e6),
    )
    .unwrap();
    let before = values(&store);
    let state = t.state().unwrap();
    let report = t.step(1, micro(&store)).unwrap();
    assert_eq!(
        report.skipped,
        Some(SkipReason::Update {
            name: "fc.weight".into()
        })
    );
    assert!(report.grad_norm.is_finite());
    assert_eq!(values(&store), before);
    assert_eq!((t.num_updates(), t.skipped(), t.step_index()), (0, 1, 1));
    let after = t.state().unwrap();
    for (k, v) in &state {
        if k == "trainer.step" {
            continue;
        }
        let f = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        assert_eq!(f(v), f(&after[k]), "{k}");
    }
    // Too many in a row end the run with an error, as for any other skip.
    let mut t = Trainer::new(
        &store,
        &[],
        TrainerConfig {
            max_consecutive_skips: 1,
            ..TrainerConfig::default()
        },
        opt,
        Schedule::Constant(1e6),
    )
    .unwrap();
    t.step(1, micro(&store)).unwrap();
    assert!(matches!(
        t.step(1, micro(&store)),
        Err(Error::NonFinite { .. })
    ));
    assert_eq!(values(&store), before);
}

#[test]
fn a_non_finite_scheduled_rate_is_a_config_error() {
    let store = store();
    for lr in [f64::NAN, f64::INFINITY] {
        let mut t = Trainer::new(
            &store,
            &[],
            TrainerConfig::default(),
            AdamWConfig::default(),
            Schedule::Constant(lr),
        )
        .unwrap();
        let before = values(&store);
        match t.step(1, micro(&store)) {
            Err(Error::Config { field, .. }) => assert_eq!(field, "lr"),
            other => panic!("{lr}: {other:?}"),
        }
        assert_eq!(values(&store), before);
    }
    // A sane rate trains.
    let mut t = Trainer::new(
        &store,
        &[],
        TrainerConfig::default(),
        AdamWConfig::default(),
        Schedule::Constant(1e-3),
    )
    .unwrap();
    let before = values(&store);
    assert_eq!(t.step(1, micro(&store)).unwrap().skipped, None);
    assert_ne!(values(&store), before);
}
