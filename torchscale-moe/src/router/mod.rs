//! Routing: the gate's logits, then top-1 or top-2 choices with capacity, as indices.
//!
//! The discrete decisions (argmax, slots, the random policy) are made on the host from the gate
//! probabilities; the combine weights are gathered from the probability tensor so that they stay
//! in candle's graph.

pub mod choice;
pub mod dropless;
pub mod expert_choice;
mod gate;
pub(crate) mod scores;
pub(crate) mod top1;
pub(crate) mod top2;
pub mod xmoe;

use std::sync::Mutex;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use rand::Rng;
use torchscale_core::init::{seeded_rng, SeededRng};
use torchscale_core::router::ChoiceStatus;
use torchscale_core::{Error, Result, RouteOptions, Router, Routing, RoutingStats};

pub use choice::{build_router, RouterChoice};
pub use dropless::DroplessRouter;
pub use expert_choice::ExpertChoiceRouter;
pub use gate::Gate;
pub use xmoe::XMoeGate;

use crate::balance_loss::balance_loss;
use crate::capacity::capacity;
use crate::config::{MoeConfig, SecondExpertPolicy};
use scores::{gating_dtype, gating_eps, mean_entropy, padding_flags, Scores};

/// The host-side result of top-1/top-2 assignment.
#[derive(Debug, Clone)]
pub(crate) struct Assignment {
    pub k: usize,
    pub expert: Vec<u32>,
    pub slot: Vec<u32>,
    pub status: Vec<ChoiceStatus>,
    /// First choices per expert before dropping, padding excluded (feeds `l_aux` and the
    /// second-choice offsets).
    pub first_counts: Vec<usize>,
    pub runner_up: Vec<u32>,
    pub sampled: Option<Vec<bool>>,
}

impl Assignment {
    fn new(s: usize, e: usize, k: usize) -> Self {
        Self {
            k,
            expert: vec![0; s * k],
            slot: vec![0; s * k],
            status: vec![ChoiceStatus::Padding; s * k],
            first_counts: vec![0; e],
            runner_up: vec![0; s],
            sampled: None,
        }
    }
}

/// Index of the largest entry, the first one on ties (as `torch.argmax`), skipping `exclude`.
pub(crate) fn argmax(v: &[f64], exclude: Option<usize>) -> usize {
    let mut best: Option<usize> = None;
    for (i, &x) in v.iter().enumerate() {
        if Some(i) == exclude {
            continue;
        }
        if best.is_none_or(|b| x > v[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0)
}

/// FNV-1a, to derive a distinct default seed per layer from its parameter prefix.
pub(crate) fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The ChaCha stream of second-expert draws (parameter init and dropout use streams 0 and 1).
const ROUTER_STREAM: u64 = 2;

/// torchscale's `Top1Gate` / `Top2Gate`: a [`Gate`] plus the gating rules of a [`MoeConfig`].
///
/// Keys under its `VarBuilder` (the `gate` scope): `wg.weight`, or `wg_reduction.weight` + `wg`
/// (+ `gating_t` with paper routing).
#[derive(Debug)]
pub struct MoeRouter {
    gate: Gate,
    cfg: MoeConfig,
    rng: Mutex<SeededRng>,
}

impl MoeRouter {
    /// Builds the gate of `cfg` under `vb`. The router's own generator (used when a call brings
    /// neither uniforms nor a seed) is seeded from the parameter prefix; see [`Self::reseed`].
    pub fn new(cfg: &MoeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        if !cfg.top1 && cfg.num_experts < 2 {
            return Err(Error::config(
                "moe_expert_count",
                "top-2 gating needs at least 2 experts",
            ));
        }
        let seed = fnv1a(&vb.prefix());
        Ok(Self {
            gate: Gate::new(cfg, vb)?,
            cfg: cfg.clone(),
            rng: Mutex::new(seeded_rng(seed, ROUTER_STREAM)),
        })
    }

    /// The gate network.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The configuration.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    /// Reseeds the router's own generator.
    pub fn reseed(&self, seed: u64) {
        if let Ok(mut g) = self.rng.lock() {
            *g = seeded_rng(seed, ROUTER_STREAM);
        }
    }

    /// The capacity for `num_tokens` tokens in the given mode.
    pub fn capacity(&self, num_tokens: usize, train: bool) -> usize {
        capacity(
            num_tokens,
            self.cfg.num_experts,
            self.cfg.top1,
            train,
            self.cfg.eval_capacity_token_fraction,
            self.cfg.capacity_factor,
        )
    }

    /// The uniforms the second-expert policy needs: `[S]` (random), `[S, E]` (sampling) or
    /// none.
    fn draws(&self, s: usize, opts: &RouteOptions) -> Result<Vec<f64>> {
        let e = self.cfg.num_experts;
        let n = match (self.cfg.top1, self.cfg.second_expert_policy) {
            (true, _) | (false, SecondExpertPolicy::All) => return Ok(Vec::new()),
            (false, SecondExpertPolicy::Random) => s,
            (false, SecondExpertPolicy::Sampling) => s * e,
        };
        let u = match opts.uniform {
            Some(u) => {
                if u.elem_count() != n {
                    let want = if n == s {
                        format!("[{s}]")
                    } else {
                        format!("[{s}, {e}]")
                    };
                    return Err(Error::shape("uniform", want, u.dims()));
                }
                u.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?
            }
            None => {
                let draw = |g: &mut SeededRng| (0..n).map(|_| g.random::<f64>()).collect();
                match opts.seed {
                    Some(seed) => draw(&mut seeded_rng(seed, ROUTER_STREAM)),
                    None => {
                        let mut g = self
                            .rng
                            .lock()
                            .map_err(|_| Error::invalid("rng", "generator lock poisoned"))?;
                        draw(&mut g)
                    }
                }
            }
        };
        if self.cfg.second_expert_policy == SecondExpertPolicy::Sampling {
            // Gumbel(0, 1) = -ln(-ln u), with u kept inside (0, 1).
            let tiny = f64::MIN_POSITIVE;
            Ok(u.into_iter()
                .map(|u| -(-(u.clamp(tiny, 1.0 - f64::EPSILON)).ln()).ln())
                .collect())
        } else {
            Ok(u)
        }
    }
}

impl Router for MoeRouter {
    fn num_experts(&self) -> usize {
        self.cfg.num_experts
    }

    fn name(&self) -> &str {
        match (self.cfg.use_xmoe, self.cfg.top1) {
            (true, true) => "xmoe-top1",
            (true, false) => "xmoe-top2",
            (false, true) => "gshard-top1",
            (false, false) => "gshard-top2",
        }
    }

    fn reseed(&self, seed: u64) {
        MoeRouter::reseed(self, seed);
    }

    fn prepare_step(&self) -> Result<bool> {
        self.gate.rescale_wg()
    }

    fn uniform_capacity(&self) -> bool {
        true
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn top_k(&self) -> usize {
        if self.cfg.top1 {
            1
        } else {
            2
        }
    }

    fn route(&self, x: &Tensor, opts: &RouteOptions) -> Result<Routing> {
        let s = xmoe::check_tokens(x, self.cfg.embed_dim)?;
        if s == 0 {
            return Err(Error::shape("x", "[S, C] with S > 0", x.dims()));
        }
        let e = self.cfg.num_experts;
        let gdt = gating_dtype(x.dtype(), self.cfg.gating_use_fp32);
        let Scores {
            logits,
            logits_h,
            probs,
            probs_h,
        } = Scores::new(&self.gate, x, gdt)?;
        let padding = padding_flags(opts.padding, s)?;
        let cap = self.capacity(s, opts.train);
        let eps = gating_eps(gdt);
        let a = if self.cfg.top1 {
            top1::assign(&probs_h, &logits_h, e, cap, &padding)
        } else {
            let draws = self.draws(s, opts)?;
            top2::assign(
                &probs_h,
                e,
                cap,
                &padding,
                &top2::Top2Inputs {
                    logits: &logits_h,
                    draws: &draws,
                    policy: self.cfg.second_expert_policy,
                    normalize_before: self.cfg.normalize_gate_prob_before_dropping,
                    f32_math: gdt == DType::F32,
                    eps,
                },
            )
        };
        let gate = self.combine_weights(&probs, &a, eps)?;
        let balance = balance_loss(&probs, &a.first_counts)?;
        let stats = stats(&a, e, cap, &padding, mean_entropy(&probs_h, e));
        Ok(Routing {
            num_experts: e,
            k: a.k,
            capacity: cap,
            expert: a.expert,
            slot: a.slot,
            status: a.status,
            gate,
            logits,
            probs,
            runner_up: a.runner_up,
            sampled: a.sampled,
            balance_loss: balance,
            stats,
        })
    }
}

impl MoeRouter {
    /// `[S, k]` combine weights gathered from `probs`: the raw probability for top-1; for top-2
    /// the pair renormalised to sum 1 before dropping (kept weights keep their share) or after
    /// dropping (a lone survivor gets 1), with the denominator clamped at `eps`.
    fn combine_weights(&self, probs: &Tensor, a: &Assignment, eps: f64) -> Result<Tensor> {
        let s = a.expert.len() / a.k;
        let dev = probs.device();
        let idx = Tensor::from_slice(&a.expert, (s, a.k), dev)?;
        let g = probs.gather(&idx, 1)?;
        let kept = scores::kept_mask(&a.status, s, a.k, probs)?;
        if a.k == 1 {
            return Ok((g * kept)?);
        }
        if self.cfg.normalize_gate_prob_before_dropping {
            let denom = g.sum_keepdim(1)?.maximum(eps)?;
            Ok((g.broadcast_div(&denom)? * kept)?)
        } else {
            let g = (g * kept)?;
            let denom = g.sum_keepdim(1)?.maximum(eps)?;
            Ok(g.broadcast_div(&denom)?)
        }
    }
}

fn stats(a: &Assignment, e: usize, cap: usize, padding: &[bool], entropy: f64) -> RoutingStats {
    let mut st = RoutingStats {
        tokens_per_expert: vec![0; e],
        capacity: cap,
        entropy,
        ..Default::default()
    };
    for (i, status) in a.status.iter().enumerate() {
        match status {
            ChoiceStatus::Kept => st.tokens_per_expert[a.expert[i] as usize] += 1,
            ChoiceStatus::DroppedByCapacity if i % a.k == 0 => st.dropped_first += 1,
            ChoiceStatus::DroppedByCapacity => st.dropped_second += 1,
            _ => {}
        }
    }
    st.dropped = st.dropped_first + st.dropped_second;
    st.tokens_without_expert = (0..padding.len())
        .filter(|&t| !padding[t] && (0..a.k).all(|j| !a.status[t * a.k + j].is_kept()))
        .count();
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum_and_skips_the_excluded() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0], None), 1);
        assert_eq!(argmax(&[1.0, 3.0, 3.0], Some(1)), 2);
        assert_eq!(argmax(&[5.0, 3.0], Some(0)), 1);
    }
}
