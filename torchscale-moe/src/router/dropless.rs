//! Dropless top-k routing (MegaBlocks, Gale et al. 2022): every token goes to its `k` most
//! probable experts and nothing is dropped; each expert's batch is exactly its tokens.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use torchscale_core::router::ChoiceStatus;
use torchscale_core::{Error, Result, RouteOptions, Router, Routing, RoutingStats};

use super::scores::{gating_dtype, gating_eps, kept_mask, mean_entropy, padding_flags, Scores};
use super::{argmax, xmoe, Assignment, Gate};
use crate::balance_loss::balance_loss;
use crate::config::MoeConfig;

/// Dropless top-k: any `k` in `1..=E`, no capacity.
///
/// The gate is the one of `cfg` (linear, or X-MoE's cosine gate with `use_xmoe`; keys as for
/// [`super::MoeRouter`]), gating in f32 per `gating_use_fp32`. Choice `j` of a token is its
/// `j`-th most probable expert (ties to the lower expert index); every non-padding choice is
/// kept, slots are handed out per expert in token order, so [`Routing::capacity`] is the largest
/// per-expert count (at least 1). Combine weights are the top-k probabilities renormalised to
/// sum 1 for `k >= 2` (as GShard top-2), the raw probability for `k = 1`; the balance loss is
/// GShard's ([`balance_loss`]) on the first choices. Deterministic (nothing to reseed).
#[derive(Debug)]
pub struct DroplessRouter {
    gate: Gate,
    cfg: MoeConfig,
    k: usize,
    name: String,
}

impl DroplessRouter {
    /// Builds the gate of `cfg` under `vb` (the `gate` scope) for top-`k` routing. Errors
    /// (naming `router.k`) unless `1 <= k <= cfg.num_experts`.
    pub fn new(cfg: &MoeConfig, k: usize, vb: VarBuilder) -> Result<Self> {
        check_k(k, cfg.num_experts, "router")?;
        Ok(Self {
            gate: Gate::new(cfg, vb)?,
            cfg: cfg.clone(),
            k,
            name: format!("dropless-top{k}"),
        })
    }

    /// The gate network.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }
}

/// Checks `1 <= k <= num_experts`, naming `{field}.k`.
pub(crate) fn check_k(k: usize, num_experts: usize, field: &str) -> Result<()> {
    if k == 0 || k > num_experts {
        return Err(Error::config(
            format!("{field}.k"),
            format!("must be in 1..={num_experts} (the number of experts), got {k}"),
        ));
    }
    Ok(())
}

/// Top-`k` experts of every token by probability, slots in token order per expert; returns the
/// assignment and the kept choices per expert.
pub(crate) fn assign(
    probs: &[f64],
    logits: &[f64],
    e: usize,
    k: usize,
    padding: &[bool],
) -> (Assignment, Vec<usize>) {
    let s = padding.len();
    let mut out = Assignment::new(s, e, k);
    let mut counts = vec![0usize; e];
    let mut order: Vec<usize> = Vec::with_capacity(e);
    for t in 0..s {
        let row = &probs[t * e..(t + 1) * e];
        order.clear();
        order.extend(0..e);
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        out.runner_up[t] = argmax(&logits[t * e..(t + 1) * e], Some(order[0])) as u32;
        for (j, &ex) in order.iter().take(k).enumerate() {
            let i = t * k + j;
            out.expert[i] = ex as u32;
            if padding[t] {
                continue;
            }
            if j == 0 {
                out.first_counts[ex] += 1;
            }
            out.slot[i] = counts[ex] as u32;
            counts[ex] += 1;
            out.status[i] = ChoiceStatus::Kept;
        }
    }
    (out, counts)
}

impl Router for DroplessRouter {
    fn num_experts(&self) -> usize {
        self.cfg.num_experts
    }

    fn top_k(&self) -> usize {
        self.k
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn prepare_step(&self) -> Result<bool> {
        self.gate.rescale_wg()
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn route(&self, x: &Tensor, opts: &RouteOptions) -> Result<Routing> {
        let s = xmoe::check_tokens(x, self.cfg.embed_dim)?;
        if s == 0 {
            return Err(Error::shape("x", "[S, C] with S > 0", x.dims()));
        }
        let (e, k) = (self.cfg.num_experts, self.k);
        let gdt = gating_dtype(x.dtype(), self.cfg.gating_use_fp32);
        let sc = Scores::new(&self.gate, x, gdt)?;
        let padding = padding_flags(opts.padding, s)?;
        let (a, counts) = assign(&sc.probs_h, &sc.logits_h, e, k, &padding);
        let cap = counts.iter().copied().max().unwrap_or(0).max(1);
        let idx = Tensor::from_slice(&a.expert, (s, k), x.device())?;
        let g = (sc.probs.gather(&idx, 1)? * kept_mask(&a.status, s, k, &sc.probs)?)?;
        let gate = if k == 1 {
            g
        } else {
            let denom = g.sum_keepdim(1)?.maximum(gating_eps(gdt))?;
            g.broadcast_div(&denom)?
        };
        let balance = balance_loss(&sc.probs, &a.first_counts)?;
        let stats = RoutingStats {
            tokens_per_expert: counts,
            capacity: cap,
            entropy: mean_entropy(&sc.probs_h, e),
            ..Default::default()
        };
        Ok(Routing {
            num_experts: e,
            k,
            capacity: cap,
            expert: a.expert,
            slot: a.slot,
            status: a.status,
            gate,
            logits: sc.logits,
            probs: sc.probs,
            runner_up: a.runner_up,
            sampled: None,
            balance_loss: balance,
            stats,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ChoiceStatus::*;

    #[test]
    fn top_k_in_probability_order_with_sequential_slots() {
        // 3 tokens, 3 experts, k = 2; ties go to the lower expert.
        let p = [0.5, 0.3, 0.2, 0.2, 0.4, 0.4, 0.1, 0.1, 0.8];
        let (a, counts) = assign(&p, &p, 3, 2, &[false; 3]);
        assert_eq!(a.expert, vec![0, 1, 1, 2, 2, 0]);
        assert_eq!(a.slot, vec![0, 0, 1, 0, 1, 1]);
        assert!(a.status.iter().all(|s| *s == Kept));
        assert_eq!(counts, vec![2, 2, 2]);
        assert_eq!(a.first_counts, vec![1, 1, 1]);
    }

    #[test]
    fn padding_is_never_routed() {
        let p = [0.5, 0.5, 0.9, 0.1];
        let (a, counts) = assign(&p, &p, 2, 2, &[true, false]);
        assert_eq!(a.status, vec![Padding, Padding, Kept, Kept]);
        assert_eq!(counts, vec![1, 1]);
        assert_eq!(a.slot, vec![0, 0, 0, 0]);
    }

    #[test]
    fn k_outside_one_to_e_names_the_field() {
        let err = check_k(0, 4, "router").unwrap_err().to_string();
        assert!(err.contains("router.k"), "{err}");
        assert!(check_k(5, 4, "router").is_err());
        assert!(check_k(4, 4, "router").is_ok());
    }
}
