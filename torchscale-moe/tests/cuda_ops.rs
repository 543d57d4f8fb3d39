//! The index ops' host path (the same custom ops the GPU runs, through `cpu_fwd` and `bwd`)
//! against the layer's `DispatchPlan` path, and the mixed-precision builder. Runs without a GPU.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use torchscale_core::init::ParamStore;
use torchscale_core::{RouteOptions, Router};
use torchscale_moe::cuda::{combine, dispatch, mixed, DispatchIndex, Layout};
use torchscale_moe::{DispatchPlan, MoeConfig, MoeLayer, MoeRouter, SecondExpertPolicy};

fn randn(seed: u64, shape: (usize, usize)) -> Tensor {
    use rand::SeedableRng;
    let mut g = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| torchscale_core::init::std_normal(&mut g) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// 37 tokens, 5 experts, eval capacity 3 (overflow: 74 choices for 15 slots).
fn routing(policy: SecondExpertPolicy) -> (torchscale_core::Routing, Tensor) {
    let cfg = MoeConfig {
        embed_dim: 7,
        ffn_dim: 9,
        num_experts: 5,
        second_expert_policy: policy,
        eval_capacity_token_fraction: 0.07,
        ..Default::default()
    }
    .validated()
    .unwrap();
    let store = ParamStore::new(3);
    let router =
        MoeRouter::new(&cfg, store.var_builder(DType::F32, &Device::Cpu).pp("gate")).unwrap();
    let x = randn(4, (37, 7));
    let r = router
        .route(
            &x,
            &RouteOptions {
                train: false,
                seed: Some(5),
                ..Default::default()
            },
        )
        .unwrap();
    (r, x)
}

#[test]
fn capacity_dispatch_equals_the_plan_buffer_and_drops_overflow() {
    let (r, x) = routing(SecondExpertPolicy::All);
    assert_eq!(r.capacity, 3);
    let plan = DispatchPlan::new(&r).unwrap();
    let ix = Arc::new(DispatchIndex::from_routing(&r, Layout::Capacity, &Device::Cpu).unwrap());
    assert_eq!(ix.num_rows, 15);
    let buf = dispatch(&x, &ix).unwrap();
    assert_eq!(max_abs_diff(&buf, &plan.gather_buffer(&x).unwrap()), 0.0);
    // Overflow drops choices: fewer kept than choices, every kept row filled once.
    assert!(plan.num_kept() < 74 && plan.num_kept() <= 15);
}

#[test]
fn compact_combine_equals_the_plan_combine_with_gradients() {
    for policy in [
        SecondExpertPolicy::All,
        SecondExpertPolicy::Random,
        SecondExpertPolicy::Sampling,
    ] {
        let (r, x) = routing(policy);
        let plan = DispatchPlan::new(&r).unwrap();
        let ix = Arc::new(DispatchIndex::from_routing(&r, Layout::Compact, &Device::Cpu).unwrap());
        assert_eq!(ix.num_rows, plan.num_kept());
        let xv = Var::from_tensor(&x).unwrap();
        let gate = Var::from_tensor(&r.gate.detach()).unwrap();
        let w = randn(9, (37, 7));
        // A row-wise nonlinearity between dispatch and combine, as an expert would be.
        let ours = combine(&dispatch(&xv, &ix).unwrap().tanh().unwrap(), &gate, &ix).unwrap();
        let theirs = plan
            .combine(&plan.gather_compact(&xv).unwrap().tanh().unwrap(), &gate)
            .unwrap();
        assert!(max_abs_diff(&ours, &theirs) < 1e-6, "{policy:?}");
        let g1 = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [xv.as_tensor(), gate.as_tensor()] {
            let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            assert!(
                max_abs_diff(a, b) < 1e-5,
                "{policy:?}: {}",
                max_abs_diff(a, b)
            );
            assert!(
                b.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            );
        }
    }
}

#[test]
fn bf16_ops_stay_within_bf16_rounding() {
    let (r, x) = routing(SecondExpertPolicy::All);
    let ix = Arc::new(DispatchIndex::from_routing(&r, Layout::Compact, &Device::Cpu).unwrap());
    let full = combine(&dispatch(&x, &ix).unwrap(), &r.gate, &ix).unwrap();
    let xb = x.to_dtype(DType::BF16).unwrap();
    let half = combine(&dispatch(&xb, &ix).unwrap(), &r.gate, &ix).unwrap();
    let half = half.to_dtype(DType::F32).unwrap();
    let scale = full
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(max_abs_diff(&half, &full) <= 1e-2 * scale);
}

#[test]
fn mixed_precision_keeps_f32_masters_and_gives_them_gradients() {
    let cfg = MoeConfig {
        embed_dim: 8,
        ffn_dim: 12,
        num_experts: 2,
        inner_norm: true,
        ..Default::default()
    }
    .validated()
    .unwrap();
    let store = ParamStore::new(1);
    let vb = mixed::mixed_var_builder(&store, DType::BF16, &Device::Cpu);
    let layer = MoeLayer::new(cfg, 1.0, vb).unwrap();
    let x = randn(2, (10, 8)).to_dtype(DType::BF16).unwrap();
    let out = layer
        .forward(
            &x,
            &RouteOptions {
                train: true,
                seed: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(out.output.dtype(), DType::BF16);
    let loss = (out
        .output
        .to_dtype(DType::F32)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        + out.balance_loss.to_dtype(DType::F32).unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in store.named_vars() {
        assert_eq!(var.dtype(), DType::F32, "{name}");
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(g.dtype(), DType::F32);
    }
    assert!(
        mixed::keeps_f32("experts.0.ffn_layernorm.weight")
            && !mixed::keeps_f32("experts.0.fc1.weight")
    );
}
