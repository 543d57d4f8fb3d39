//! A router that lives in this example only: ST-MoE-style top-1 routing without capacity, whose
//! auxiliary loss adds the router z-loss (the squared log-partition of the gate logits, which
//! keeps them small) to the usual load-balancing loss.
//!
//! The MoE layer only reads the [`Routing`] it returns, so it runs in our layer unchanged.

use candle_core::{DType, Tensor, D};
use candle_nn::{Init, VarBuilder};
use torchscale_models::torchscale_core::router::ChoiceStatus;
use torchscale_models::torchscale_core::{
    Error, Result, RouteOptions, Router, Routing, RoutingStats,
};
use torchscale_models::torchscale_moe::balance_loss::balance_loss;

/// Weight of the z-loss inside the auxiliary loss (ST-MoE uses 1e-3).
const Z_LOSS_WEIGHT: f64 = 1e-3;

/// Top-1 routing with a linear gate `wg: [E, C]` (key `gate.wg.weight`) and no capacity.
#[derive(Debug)]
pub struct ZLossRouter {
    wg: Tensor,
    num_experts: usize,
}

impl ZLossRouter {
    /// A gate for `num_experts` experts over width `dim`, under `vb` (the layer's `gate`).
    pub fn new(dim: usize, num_experts: usize, vb: VarBuilder) -> Result<Self> {
        let std = (1.0 / dim as f64).sqrt();
        let wg = vb.pp("wg").get_with_hints(
            (num_experts, dim),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        )?;
        Ok(Self { wg, num_experts })
    }
}

impl Router for ZLossRouter {
    fn num_experts(&self) -> usize {
        self.num_experts
    }

    fn top_k(&self) -> usize {
        1
    }

    fn name(&self) -> &str {
        "z-loss top-1 (example)"
    }

    fn route(&self, x: &Tensor, opts: &RouteOptions) -> Result<Routing> {
        let (s, _) = x.dims2()?;
        let e = self.num_experts;
        let logits = x.to_dtype(DType::F32)?.matmul(&self.wg.t()?)?;
        // candle_nn's composed softmax: it has a backward, so the gate learns.
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
        let host = probs.to_vec2::<f32>()?;
        let padding: Vec<bool> = match opts.padding {
            Some(p) => p
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .into_iter()
                .map(|v| v != 0.0)
                .collect(),
            None => vec![false; s],
        };
        if padding.len() != s {
            return Err(Error::shape("padding", format!("[{s}]"), &[padding.len()]));
        }
        let (mut expert, mut slot, mut status) = (vec![0u32; s], vec![0u32; s], vec![]);
        let mut counts = vec![0usize; e];
        for (t, row) in host.iter().enumerate() {
            if padding[t] {
                status.push(ChoiceStatus::Padding);
                continue;
            }
            // First maximum on ties, as torch.argmax.
            let best = (0..e).fold(0, |b, j| if row[j] > row[b] { j } else { b });
            expert[t] = best as u32;
            slot[t] = counts[best] as u32;
            counts[best] += 1;
            status.push(ChoiceStatus::Kept);
        }
        let kept: Vec<f32> = status.iter().map(|s| s.is_kept() as u8 as f32).collect();
        let idx = Tensor::from_slice(&expert, (s, 1), x.device())?;
        let gate = (probs.gather(&idx, 1)? * Tensor::from_vec(kept, (s, 1), x.device())?)?;
        let z = logits.exp()?.sum(D::Minus1)?.log()?.sqr()?.mean_all()?;
        let balance = (balance_loss(&probs, &counts)? + (z * Z_LOSS_WEIGHT)?)?;
        let entropy = host
            .iter()
            .map(|r| {
                r.iter()
                    .filter(|&&p| p > 0.0)
                    .map(|&p| -(p as f64) * (p as f64).ln())
                    .sum::<f64>()
            })
            .sum::<f64>()
            / s.max(1) as f64;
        Ok(Routing {
            num_experts: e,
            k: 1,
            capacity: counts.iter().copied().max().unwrap_or(0).max(1),
            expert,
            slot,
            status,
            gate,
            logits,
            probs,
            runner_up: vec![0; s],
            sampled: None,
            balance_loss: balance,
            stats: RoutingStats {
                tokens_per_expert: counts.clone(),
                capacity: counts.iter().copied().max().unwrap_or(0),
                tokens_without_expert: 0,
                entropy,
                ..Default::default()
            },
        })
    }
}
