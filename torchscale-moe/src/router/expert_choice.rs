//! Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"):
//! experts pick tokens instead of tokens picking experts.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use torchscale_core::router::ChoiceStatus;
use torchscale_core::{Error, Result, RouteOptions, Router, Routing, RoutingStats};

use super::scores::{gating_dtype, kept_mask, mean_entropy, padding_flags, Scores};
use super::{argmax, xmoe, Gate};
use crate::config::MoeConfig;

/// Expert choice: `probs = softmax(logits)` `[S, E]`; each expert takes its
/// `c = ceil(capacity_factor · S / E)` most probable tokens (ties to the lower token index; `c`
/// at most `S`; padding tokens are never picked, so an expert may take fewer).
///
/// The [`Routing`] has `k = E`: choice `j` of token `s` stands for expert `j`, kept (slot = rank
/// in expert `j`'s picks) when expert `j` picked `s`, [`ChoiceStatus::NotSampled`] otherwise.
/// The combine weight is `probs[s, j]` where kept, 0 elsewhere (in the graph, so the gate is
/// trained); a token may get any number of experts, including none (its MoE output is then 0,
/// counted in [`RoutingStats::tokens_without_expert`]).
///
/// The balance loss is a zero scalar of the probabilities' dtype: every expert takes the same
/// number of tokens by construction. A token's routing depends on the other tokens of the batch,
/// so expert choice is not causal: in autoregressive decoding it lets later tokens influence
/// earlier ones. The gate is the one of `cfg` (linear or X-MoE), as for
/// [`super::MoeRouter`]. Deterministic (nothing to reseed).
#[derive(Debug)]
pub struct ExpertChoiceRouter {
    gate: Gate,
    cfg: MoeConfig,
    capacity_factor: f64,
}

impl ExpertChoiceRouter {
    /// Builds the gate of `cfg` under `vb` (the `gate` scope). Errors (naming
    /// `router.capacity_factor`) unless `capacity_factor` is finite and positive.
    pub fn new(cfg: &MoeConfig, capacity_factor: f64, vb: VarBuilder) -> Result<Self> {
        check_capacity_factor(capacity_factor, "router")?;
        Ok(Self {
            gate: Gate::new(cfg, vb)?,
            cfg: cfg.clone(),
            capacity_factor,
        })
    }

    /// The gate network.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Tokens each expert picks among `num_tokens`: `ceil(capacity_factor · S / E)`, at most
    /// `S` (and at least 1 when `S > 0`).
    pub fn capacity(&self, num_tokens: usize) -> usize {
        let c = (self.capacity_factor * num_tokens as f64 / self.cfg.num_experts as f64).ceil();
        (c as usize).clamp(num_tokens.min(1), num_tokens)
    }
}

/// Checks that a capacity factor is finite and positive, naming `{field}.capacity_factor`.
pub(crate) fn check_capacity_factor(f: f64, field: &str) -> Result<()> {
    if !(f.is_finite() && f > 0.0) {
        return Err(Error::config(
            format!("{field}.capacity_factor"),
            format!("must be finite and positive, got {f}"),
        ));
    }
    Ok(())
}

/// Host decisions: `(expert, slot, status)` per `[S, E]` choice and the picks per expert.
pub(crate) fn assign(
    probs: &[f64],
    e: usize,
    c: usize,
    padding: &[bool],
) -> (Vec<u32>, Vec<u32>, Vec<ChoiceStatus>, Vec<usize>) {
    let s = padding.len();
    let expert: Vec<u32> = (0..s * e).map(|i| (i % e) as u32).collect();
    let mut slot = vec![0u32; s * e];
    let mut status: Vec<ChoiceStatus> = (0..s * e)
        .map(|i| {
            if padding[i / e] {
                ChoiceStatus::Padding
            } else {
                ChoiceStatus::NotSampled
            }
        })
        .collect();
    let mut counts = vec![0usize; e];
    let mut cand: Vec<usize> = Vec::with_capacity(s);
    for (j, count) in counts.iter_mut().enumerate() {
        cand.clear();
        cand.extend((0..s).filter(|&t| !padding[t]));
        cand.sort_by(|&a, &b| {
            probs[b * e + j]
                .total_cmp(&probs[a * e + j])
                .then(a.cmp(&b))
        });
        for (rank, &t) in cand.iter().take(c).enumerate() {
            slot[t * e + j] = rank as u32;
            status[t * e + j] = ChoiceStatus::Kept;
            *count += 1;
        }
    }
    (expert, slot, status, counts)
}

impl Router for ExpertChoiceRouter {
    fn num_experts(&self) -> usize {
        self.cfg.num_experts
    }

    /// `E`: one choice slot per expert.
    fn top_k(&self) -> usize {
        self.cfg.num_experts
    }

    fn name(&self) -> &str {
        "expert-choice"
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

    fn route(&self, x: &Tensor, opts: &RouteOptions) -> Result<Routing> {
        let s = xmoe::check_tokens(x, self.cfg.embed_dim)?;
        if s == 0 {
            return Err(Error::shape("x", "[S, C] with S > 0", x.dims()));
        }
        let e = self.cfg.num_experts;
        let gdt = gating_dtype(x.dtype(), self.cfg.gating_use_fp32);
        let sc = Scores::new(&self.gate, x, gdt)?;
        let padding = padding_flags(opts.padding, s)?;
        let c = self.capacity(s);
        let (expert, slot, status, counts) = assign(&sc.probs_h, e, c, &padding);
        let gate = (&sc.probs * kept_mask(&status, s, e, &sc.probs)?)?;
        let runner_up = (0..s)
            .map(|t| {
                let row = &sc.logits_h[t * e..(t + 1) * e];
                argmax(row, Some(argmax(row, None))) as u32
            })
            .collect();
        let stats = RoutingStats {
            tokens_per_expert: counts,
            tokens_without_expert: (0..s)
                .filter(|&t| !padding[t] && (0..e).all(|j| !status[t * e + j].is_kept()))
                .count(),
            capacity: c,
            entropy: mean_entropy(&sc.probs_h, e),
            ..Default::default()
        };
        let balance_loss = Tensor::zeros((), sc.probs.dtype(), x.device())?;
        Ok(Routing {
            num_experts: e,
            k: e,
            capacity: c,
            expert,
            slot,
            status,
            gate,
            logits: sc.logits,
            probs: sc.probs,
            runner_up,
            sampled: None,
            balance_loss,
            stats,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ChoiceStatus::*;

    #[test]
    fn each_expert_takes_its_most_probable_tokens() {
        // 3 tokens, 2 experts, c = 2; expert 0 ties tokens 1 and 2 and takes the lower.
        let p = [0.9, 0.1, 0.4, 0.6, 0.4, 0.6];
        let (expert, slot, status, counts) = assign(&p, 2, 2, &[false; 3]);
        assert_eq!(expert, vec![0, 1, 0, 1, 0, 1]);
        assert_eq!(status, vec![Kept, NotSampled, Kept, Kept, NotSampled, Kept]);
        assert_eq!(slot, vec![0, 0, 1, 0, 0, 1]);
        assert_eq!(counts, vec![2, 2]);
    }

    #[test]
    fn padding_is_never_picked() {
        let p = [0.9, 0.1, 0.4, 0.6];
        let (_, _, status, counts) = assign(&p, 2, 2, &[true, false]);
        assert_eq!(status, vec![Padding, Padding, Kept, Kept]);
        assert_eq!(counts, vec![1, 1]);
    }

    #[test]
    fn bad_capacity_factor_names_the_field() {
        for f in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = check_capacity_factor(f, "router").unwrap_err().to_string();
            assert!(err.contains("router.capacity_factor"), "{err}");
        }
    }
}
