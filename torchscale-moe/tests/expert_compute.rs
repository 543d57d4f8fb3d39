//! The two expert computations of a single-process layer give the same layer: outputs, balance
//! losses and every gradient (gate and experts) of the grouped products equal the per-expert
//! loop's, for capacity, dropless and expert-choice routing, with and without Sub-LN's inner
//! norm. The setting is process-wide, so this file is its own test binary.

use candle_core::{DType, Device, Tensor};
use torchscale_core::init::ParamStore;
use torchscale_moe::prelude::*;
use torchscale_moe::{set_expert_compute, ExpertCompute};

fn run(cfg: &MoeConfig, compute: ExpertCompute) -> (Vec<f32>, Vec<(String, Vec<f32>)>) {
    set_expert_compute(compute);
    let store = ParamStore::new(3);
    let layer = MoeLayer::new(
        cfg.clone(),
        1.0,
        store.var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1.0, (96, cfg.embed_dim), &Device::Cpu).unwrap();
    // The same input for both runs: a fixed pattern rather than a draw.
    let x = (x.zeros_like().unwrap()
        + Tensor::arange(0f32, (96 * cfg.embed_dim) as f32, &Device::Cpu)
            .unwrap()
            .reshape((96, cfg.embed_dim))
            .unwrap()
            .affine(0.37, 0.0)
            .unwrap()
            .sin()
            .unwrap())
    .unwrap();
    let out = layer
        .forward(
            &x,
            &RouteOptions {
                train: true,
                seed: Some(5),
                ..Default::default()
            },
        )
        .unwrap();
    let w = Tensor::arange(0f32, (96 * cfg.embed_dim) as f32, &Device::Cpu)
        .unwrap()
        .reshape((96, cfg.embed_dim))
        .unwrap()
        .cos()
        .unwrap();
    let loss = ((out.output * w).unwrap().sum_all().unwrap() + out.balance_loss).unwrap();
    let grads = loss.backward().unwrap();
    let mut g = Vec::new();
    for (name, var) in store.named_vars() {
        // An expert no token reached has no gradient in the loop and a zero one in the grouped
        // products: both are zeros here.
        let grad = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            None => vec![0.0; var.elem_count()],
        };
        g.push((name, grad));
    }
    let y = loss
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    (vec![y], g)
}

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let scale = a.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * scale,
            "{what}[{i}]: loop {x} vs grouped {y}"
        );
    }
}

#[test]
fn grouped_experts_equal_the_loop_for_every_router() {
    let routers = [
        RouterChoice::Capacity,
        RouterChoice::Dropless { k: 2 },
        RouterChoice::ExpertChoice {
            capacity_factor: 1.5,
        },
    ];
    for router in routers {
        for inner_norm in [false, true] {
            let cfg = MoeConfig {
                embed_dim: 16,
                ffn_dim: 24,
                num_experts: 8,
                use_xmoe: true,
                inner_norm,
                router: router.clone(),
                ..Default::default()
            }
            .validated()
            .unwrap();
            let (l0, g0) = run(&cfg, ExpertCompute::Loop);
            let (l1, g1) = run(&cfg, ExpertCompute::Grouped);
            let what = format!("{router:?} inner_norm={inner_norm}");
            close(&l0, &l1, &format!("loss {what}"));
            assert_eq!(g0.len(), g1.len());
            for ((n0, a), (n1, b)) in g0.iter().zip(&g1) {
                assert_eq!(n0, n1);
                if n0.starts_with("gate") {
                    assert!(
                        a.iter().any(|v| *v != 0.0),
                        "zero gradient for {n0} ({what})"
                    );
                }
                close(a, b, &format!("{n0} {what}"));
            }
        }
    }
    set_expert_compute(ExpertCompute::Loop);
}
