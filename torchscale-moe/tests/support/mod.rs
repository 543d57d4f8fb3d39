//! Shared by the router tests: seeded inputs, a distance, and a router written outside the
//! crate (a fixed hash router) with the layer that runs it.

#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use torchscale_core::init::ParamStore;
use torchscale_moe::prelude::*;
use torchscale_moe::ChoiceStatus;

/// Seeded N(0, 1) draws (candle's own `randn` is unseeded).
pub fn randn(seed: u64, shape: (usize, usize)) -> Tensor {
    use rand::SeedableRng;
    let mut g = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| torchscale_core::init::std_normal(&mut g) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Largest absolute difference.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Token `s` goes to expert `s % E` in slot `s / E`; its combine weight is
/// `sigmoid(x_s · w_e)` with a trainable `w` (`proj`, `[E, C]`), so the gate learns.
#[derive(Debug)]
pub struct HashRouter {
    w: Tensor,
    e: usize,
}

impl HashRouter {
    /// `proj` under `vb` (by convention the layer's `gate` scope).
    pub fn new(c: usize, e: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let w = vb.get_with_hints(
            (e, c),
            "proj",
            Init::Randn {
                mean: 0.0,
                stdev: 0.5,
            },
        )?;
        Ok(Self { w, e })
    }
}

impl Router for HashRouter {
    fn num_experts(&self) -> usize {
        self.e
    }

    fn top_k(&self) -> usize {
        1
    }

    fn name(&self) -> &str {
        "hash"
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn route(&self, x: &Tensor, _opts: &RouteOptions) -> torchscale_moe::Result<Routing> {
        let (s, e) = (x.dim(0)?, self.e);
        let dev = x.device();
        let logits = x.matmul(&self.w.t()?)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        let expert: Vec<u32> = (0..s).map(|t| (t % e) as u32).collect();
        let idx = Tensor::from_slice(&expert, (s, 1), dev)?;
        let gate = candle_nn::ops::sigmoid(&logits.gather(&idx, 1)?)?;
        let mut tokens_per_expert = vec![0; e];
        expert
            .iter()
            .for_each(|&j| tokens_per_expert[j as usize] += 1);
        Ok(Routing {
            num_experts: e,
            k: 1,
            capacity: s.div_ceil(e),
            slot: (0..s).map(|t| (t / e) as u32).collect(),
            status: vec![ChoiceStatus::Kept; s],
            runner_up: expert.iter().map(|&j| (j + 1) % e as u32).collect(),
            expert,
            gate,
            logits,
            probs,
            sampled: None,
            balance_loss: Tensor::zeros((), DType::F32, dev)?,
            stats: RoutingStats {
                tokens_per_expert,
                capacity: s.div_ceil(e),
                ..Default::default()
            },
        })
    }
}

/// A single-process layer of `cfg` routed by a [`HashRouter`] under `gate`.
pub fn hash_layer(store: &ParamStore, cfg: MoeConfig) -> MoeLayer {
    let vb = store.var_builder(DType::F32, &Device::Cpu);
    let router = HashRouter::new(cfg.embed_dim, cfg.num_experts, vb.pp("gate")).unwrap();
    MoeLayer::with_router(cfg, Box::new(router), 1.0, vb).unwrap()
}
