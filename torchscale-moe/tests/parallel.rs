//! Expert parallelism simulated with threads: W ranks, each owning E / W experts, give the same
//! outputs and gradients as one rank holding every expert.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use torchscale_core::init::ParamStore;
use torchscale_core::RouteOptions;
use torchscale_moe::{ExpertComm, InProcessGroup, MoeConfig, MoeLayer, SingleProcess};

/// Seeded N(0, 1) draws (candle's own `randn` is unseeded).
fn randn(seed: u64, shape: (usize, usize)) -> Tensor {
    use rand::SeedableRng;
    let mut g = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| torchscale_core::init::std_normal(&mut g) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn cfg(top1: bool) -> MoeConfig {
    MoeConfig {
        embed_dim: 8,
        ffn_dim: 12,
        num_experts: 4,
        top1,
        use_xmoe: true,
        inner_norm: true,
        ..Default::default()
    }
    .validated()
    .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn ranks_match_the_single_process_layer() {
    let dev = Device::Cpu;
    for (world, top1, train) in [(2, false, true), (4, false, false), (2, true, true)] {
        let store = ParamStore::new(13);
        let vb = store.var_builder(DType::F32, &dev);
        let single = MoeLayer::new(cfg(top1), 1.0, vb.clone()).unwrap();
        let group = InProcessGroup::new(world);
        let ranks: Vec<MoeLayer> = group
            .iter()
            .map(|g| {
                let comm: Arc<dyn ExpertComm> = Arc::new(g.clone());
                MoeLayer::new_parallel(cfg(top1), 1.0, vb.clone(), comm).unwrap()
            })
            .collect();
        assert_eq!(ranks[1].local_experts(), 4 / world..2 * 4 / world);
        let xs: Vec<Tensor> = (0..world).map(|r| randn(r as u64, (20, 8))).collect();
        let opts = |r: usize| RouteOptions {
            train,
            seed: Some(100 + r as u64),
            ..Default::default()
        };
        let outs: Vec<Tensor> = std::thread::scope(|sc| {
            let hs: Vec<_> = ranks
                .iter()
                .zip(&xs)
                .enumerate()
                .map(|(r, (layer, x))| sc.spawn(move || layer.forward(x, &opts(r)).unwrap().output))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut single_outs = Vec::new();
        for (r, x) in xs.iter().enumerate() {
            let want = single.forward(x, &opts(r)).unwrap().output;
            let d = max_diff(&outs[r], &want);
            assert!(d < 1e-6, "world {world} rank {r}: max diff {d}");
            single_outs.push(want);
        }
        // Gradients through the all-to-all (the in-process group hands over the tensors
        // themselves) equal the single-process ones.
        let wts: Vec<Tensor> = (0..world).map(|r| randn(r as u64, (20, 8))).collect();
        let total = |os: &[Tensor]| {
            os.iter()
                .zip(&wts)
                .map(|(o, w)| (o * w).unwrap().sum_all().unwrap())
                .reduce(|a, b| (a + b).unwrap())
                .unwrap()
        };
        let gp = total(&outs).backward().unwrap();
        let gs = total(&single_outs).backward().unwrap();
        for (name, var) in store.named_vars() {
            match (gp.get(var.as_tensor()), gs.get(var.as_tensor())) {
                (Some(a), Some(b)) => assert!(max_diff(a, b) < 1e-5, "{name}"),
                (None, None) => {}
                _ => panic!("{name}: gradient on one path only"),
            }
        }
    }
}

#[test]
fn single_process_comm_is_the_plain_layer() {
    let dev = Device::Cpu;
    let store = ParamStore::new(3);
    let vb = store.var_builder(DType::F32, &dev);
    let plain = MoeLayer::new(cfg(false), 1.0, vb.clone()).unwrap();
    let one = MoeLayer::new_parallel(cfg(false), 1.0, vb, Arc::new(SingleProcess)).unwrap();
    let x = randn(9, (10, 8));
    let o = RouteOptions {
        seed: Some(1),
        ..Default::default()
    };
    let d = max_diff(
        &plain.forward(&x, &o).unwrap().output,
        &one.forward(&x, &o).unwrap().output,
    );
    assert_eq!(d, 0.0);
    // Experts that do not divide over the ranks are a config error.
    let bad = MoeLayer::new_parallel(
        cfg(false),
        1.0,
        ParamStore::new(0).var_builder(DType::F32, &dev),
        Arc::new(InProcessGroup::new(3).remove(0)),
    );
    assert!(bad.unwrap_err().to_string().contains("moe_expert_count"));
}
