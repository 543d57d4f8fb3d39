//! The CUDA kernels against the CPU path, on a GPU. Every test is `#[ignore]`d (no GPU on the
//! build machine); `run.sh` from `cargo xtask cuda build` runs them with `--include-ignored`.
//! Outputs are NaN-poisoned before each kernel so unwritten elements show.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use torchscale_core::init::ParamStore;
use torchscale_core::{RouteOptions, Router};
use torchscale_moe::cuda::{
    combine, dispatch, draws_from_uniform, route_decisions, set_poison_outputs, status_of,
    DispatchIndex, Layout, RouteParams,
};
use torchscale_moe::{MoeConfig, MoeLayer, MoeRouter, SecondExpertPolicy};

fn gpu() -> Device {
    set_poison_outputs(true);
    Device::new_cuda(0).expect("these tests need a CUDA GPU")
}

fn randn(seed: u64, shape: (usize, usize)) -> Tensor {
    use rand::SeedableRng;
    let mut g = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| torchscale_core::init::std_normal(&mut g) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn rel_err(gpu: &Tensor, cpu: &Tensor) -> f32 {
    let g = gpu
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let c = cpu.to_dtype(DType::F32).unwrap();
    assert_eq!(
        g.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .filter(|v| v.is_nan())
            .count(),
        0
    );
    let scale = c
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-30);
    (g - c)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        / scale
}

fn cfg(top1: bool, policy: SecondExpertPolicy, e: usize) -> MoeConfig {
    MoeConfig {
        embed_dim: 24,
        ffn_dim: 40,
        num_experts: e,
        top1,
        second_expert_policy: policy,
        eval_capacity_token_fraction: 0.05,
        ..Default::default()
    }
    .validated()
    .unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_routing_decisions_equal_the_host_router() {
    let dev = gpu();
    let cases = [
        (true, SecondExpertPolicy::All, 7, 301, true),
        (false, SecondExpertPolicy::All, 5, 37, false),
        (false, SecondExpertPolicy::Random, 6, 1029, true),
        (false, SecondExpertPolicy::Sampling, 64, 515, true),
        (false, SecondExpertPolicy::All, 3, 4099, false),
    ];
    for (top1, policy, e, s, train) in cases {
        let c = cfg(top1, policy, e);
        let store = ParamStore::new(s as u64);
        let router =
            MoeRouter::new(&c, store.var_builder(DType::F32, &Device::Cpu).pp("gate")).unwrap();
        let x = randn(s as u64, (s, 24));
        let n_u = match (top1, policy) {
            (true, _) | (_, SecondExpertPolicy::All) => 0,
            (_, SecondExpertPolicy::Random) => s,
            (_, SecondExpertPolicy::Sampling) => s * e,
        };
        let u: Vec<f64> = (0..n_u)
            .map(|i| ((i * 7919) % 1000) as f64 / 1000.0 + 0.0005)
            .collect();
        let ut = Tensor::from_vec(u.clone(), n_u, &Device::Cpu).unwrap();
        let mut pad = vec![0u8; s];
        pad[s / 2] = 1;
        let padt = Tensor::from_vec(pad.clone(), s, &Device::Cpu).unwrap();
        let opts = RouteOptions {
            train,
            uniform: (n_u > 0).then_some(&ut),
            padding: Some(&padt),
            seed: None,
        };
        let r = router.route(&x, &opts).unwrap();
        let draws = draws_from_uniform(
            &u,
            if top1 {
                SecondExpertPolicy::All
            } else {
                policy
            },
            &dev,
        )
        .unwrap();
        let g = route_decisions(
            &r.probs.to_device(&dev).unwrap(),
            &r.logits.to_device(&dev).unwrap(),
            draws.as_ref(),
            Some(&padt.to_device(&dev).unwrap()),
            &RouteParams {
                k: r.k,
                capacity: r.capacity,
                policy,
                normalize_before: c.normalize_gate_prob_before_dropping,
                eps: f32::EPSILON,
            },
        )
        .unwrap();
        let host = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap()
        };
        assert_eq!(host(&g.expert), r.expert, "experts {top1} {policy:?} S {s}");
        assert_eq!(host(&g.slot), r.slot, "slots {top1} {policy:?} S {s}");
        let st: Vec<_> = host(&g.status)
            .into_iter()
            .map(|c| status_of(c).unwrap())
            .collect();
        assert_eq!(st, r.status, "status {top1} {policy:?} S {s}");
        if !train {
            assert!(r.stats.dropped > 0, "eval capacity is meant to overflow");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn dispatch_and_combine_kernels_equal_the_host_ops_with_gradients() {
    let dev = gpu();
    let c = cfg(false, SecondExpertPolicy::All, 5);
    let router = MoeRouter::new(
        &c,
        ParamStore::new(1)
            .var_builder(DType::F32, &Device::Cpu)
            .pp("gate"),
    )
    .unwrap();
    for (s, width) in [(37usize, 24usize), (513, 24)] {
        let x24 = randn(3, (s, 24));
        let r = router
            .route(
                &x24,
                &RouteOptions {
                    train: false,
                    ..Default::default()
                },
            )
            .unwrap();
        let x = randn(4, (s, width));
        let w = randn(5, (s, width));
        for layout in [Layout::Capacity, Layout::Compact] {
            for (dt, tol) in [
                (DType::F32, 1e-5f32),
                (DType::BF16, 1e-2),
                (DType::F16, 1e-2),
            ] {
                let run = |d: &Device| {
                    let ix = Arc::new(DispatchIndex::from_routing(&r, layout, d).unwrap());
                    let xv =
                        Var::from_tensor(&x.to_dtype(dt).unwrap().to_device(d).unwrap()).unwrap();
                    let gv = Var::from_tensor(
                        &r.gate.detach().to_dtype(dt).unwrap().to_device(d).unwrap(),
                    )
                    .unwrap();
                    let buf = dispatch(&xv, &ix).unwrap();
                    let out = combine(&buf.sqr().unwrap(), &gv, &ix).unwrap();
                    let loss = (out.to_dtype(DType::F32).unwrap() * w.to_device(d).unwrap())
                        .unwrap()
                        .sum_all()
                        .unwrap();
                    let gr = loss.backward().unwrap();
                    let gx = gr.get(xv.as_tensor()).unwrap().clone();
                    let gg = gr.get(gv.as_tensor()).unwrap().clone();
                    (buf, out, gx, gg)
                };
                let (cb, co, cx, cg) = run(&Device::Cpu);
                let (gb, go, gx, gg) = run(&dev);
                for (name, a, b) in [
                    ("buf", gb, cb),
                    ("out", go, co),
                    ("dx", gx, cx),
                    ("dgate", gg, cg),
                ] {
                    let e = rel_err(&a, &b);
                    assert!(e <= tol, "{name} {dt:?} {layout:?} S {s}: rel err {e}");
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn moe_layer_on_gpu_matches_cpu_and_trains_the_same() {
    let dev = gpu();
    let c = MoeConfig {
        embed_dim: 16,
        ffn_dim: 32,
        num_experts: 4,
        use_xmoe: true,
        inner_norm: true,
        ..Default::default()
    }
    .validated()
    .unwrap();
    let store = ParamStore::new(7);
    let cpu_layer =
        MoeLayer::new(c.clone(), 1.0, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    let gpu_vars: Vec<(String, Var)> = store
        .named_vars()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                Var::from_tensor(&v.as_tensor().to_device(&dev).unwrap()).unwrap(),
            )
        })
        .collect();
    let map: std::collections::HashMap<String, Tensor> = gpu_vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let gpu_layer = MoeLayer::new(
        c,
        1.0,
        candle_nn::VarBuilder::from_tensors(map, DType::F32, &dev),
    )
    .unwrap();
    let cpu_vars: Vec<Var> = store.named_vars().into_iter().map(|(_, v)| v).collect();
    let x = randn(11, (61, 16));
    let target = randn(12, (61, 16));
    let lr = 0.05;
    for step in 0..5u64 {
        let opts = RouteOptions {
            train: true,
            seed: Some(step),
            ..Default::default()
        };
        let mut losses = Vec::new();
        for (layer, vars, d) in [
            (&cpu_layer, cpu_vars.clone(), Device::Cpu),
            (
                &gpu_layer,
                gpu_vars.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(),
                dev.clone(),
            ),
        ] {
            let out = layer.forward(&x.to_device(&d).unwrap(), &opts).unwrap();
            let loss = ((out.output - target.to_device(&d).unwrap())
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                + (out.balance_loss * 0.01).unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            for v in &vars {
                let g = grads
                    .get(v.as_tensor())
                    .expect("every parameter gets a gradient");
                v.set(&(v.as_tensor() - (g * lr).unwrap()).unwrap())
                    .unwrap();
            }
            losses.push(
                loss.to_device(&Device::Cpu)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
            );
        }
        let rel = (losses[0] - losses[1]).abs() / losses[0].abs();
        assert!(
            rel < 1e-4,
            "step {step}: cpu {} gpu {}",
            losses[0],
            losses[1]
        );
    }
}
