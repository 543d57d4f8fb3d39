//! ZeRO-1's all-or-nothing step across ranks (threads of a `LocalGroup`) and its state checks.

use super::*;
use candle_core::backprop::GradStore;
use torchscale_core::collective::SingleProcess;
use torchscale_core::local_group::LocalGroup;

fn var(x: &[f32], dtype: DType) -> Var {
    Var::from_tensor(
        &Tensor::new(x, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    )
    .unwrap()
}

fn bits(v: &Var) -> Vec<u32> {
    v.as_tensor()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn cfg() -> AdamWConfig {
    AdamWConfig {
        lr: 1e-3,
        ..AdamWConfig::default()
    }
}

/// Two parameters of 4 values: on two ranks `a` is rank 0's slice and `b` rank 1's. `b` is f16,
/// so a rate of 1e6 overflows it while `a` (f32) stays finite. Returns the refused step's
/// verdict and the updates counted.
fn run_rank(comm: Arc<dyn Collective>) -> Result<(Option<SkipReason>, u64)> {
    let a = var(&[0.1, 0.2, 0.3, 0.4], DType::F32);
    let b = var(&[1.0, -2.0, 0.5, 3.0], DType::F16);
    let mut opt = ZeroAdamW::new(
        vec![("a".into(), a.clone()), ("b".into(), b.clone())],
        cfg(),
        comm,
    )?;
    let mut g = GradStore::default();
    g.insert(
        a.as_tensor(),
        Tensor::new(&[0.5f32, -0.5, 0.25, 1.0], &Device::Cpu)?,
    );
    g.insert(
        b.as_tensor(),
        Tensor::new(&[1f32, -1.0, 0.5, 2.0], &Device::Cpu)?,
    );
    assert_eq!(opt.step(&g)?, None);
    let state = opt.state()?;
    let (pa, pb) = (bits(&a), bits(&b));
    opt.set_lr(1e6)?;
    let refused = opt.step(&g)?;
    // Unchanged, parameters and (gathered) state alike.
    assert_eq!((bits(&a), bits(&b)), (pa, pb));
    let after = opt.state()?;
    for (k, t) in &state {
        let same = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?
            == after[k]
                .flatten_all()?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
        assert!(same, "{k} changed");
    }
    Ok((refused, opt.num_updates()))
}

#[test]
fn a_refused_update_on_one_rank_is_refused_on_all() {
    let want = Some(SkipReason::Update { name: "b".into() });
    let (r, n) = run_rank(Arc::new(SingleProcess)).unwrap();
    assert_eq!((r, n), (want.clone(), 1));
    let out: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = LocalGroup::new(2)
            .into_iter()
            .map(|g| s.spawn(move || run_rank(Arc::new(g))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, o) in out.into_iter().enumerate() {
        let (r, n) = o.unwrap();
        assert_eq!((r, n), (want.clone(), 1), "rank {rank}");
    }
}

#[test]
fn bad_moments_and_rates_are_refused() {
    let a = var(&[0.1, 0.2], DType::F32);
    let mut opt = ZeroAdamW::new(vec![("a".into(), a)], cfg(), Arc::new(SingleProcess)).unwrap();
    let good = opt.state().unwrap();
    for (key, bad) in [
        ("exp_avg.a", [f32::NAN, 0.0]),
        ("exp_avg_sq.a", [0.0, -1.0]),
        ("exp_avg_sq.a", [f32::INFINITY, 0.0]),
    ] {
        let mut state = good.clone();
        state.insert(key.into(), Tensor::new(&bad, &Device::Cpu).unwrap());
        match opt.load_state(&state) {
            Err(Error::TensorValue { key: k, .. }) => assert_eq!(k, key),
            other => panic!("{key}: {other:?}"),
        }
    }
    assert!(matches!(opt.set_lr(f64::INFINITY), Err(Error::Config { field, .. }) if field == "lr"));
    assert_eq!(opt.config().lr, 1e-3);
    let bad_cfg = AdamWConfig {
        beta1: 1.0,
        ..cfg()
    };
    let a = var(&[0.1], DType::F32);
    assert!(matches!(
        ZeroAdamW::new(vec![("a".into(), a)], bad_cfg, Arc::new(SingleProcess)),
        Err(Error::Config { field, .. }) if field == "adam_betas"
    ));
}
