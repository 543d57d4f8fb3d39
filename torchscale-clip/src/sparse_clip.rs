//! `SparseClip`: the MoE-aware clipping of torchscale's fairseq example (SPEC section 5).

use std::collections::HashSet;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use torchscale_core::{ClipReport, Error, GradClipper, Result};

use crate::norm::{clip_coef, norm_of, per_tensor_norms, present, scale};

/// What [`SparseClip`] does to the expert gradients once the coefficient is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertGrads {
    /// Scale expert gradients by the coefficient, like the dense ones (the method's intent).
    #[default]
    Clip,
    /// Leave expert gradients untouched, as torchscale's published code does (it clips a copy).
    Unchanged,
}

/// Sparse-aware clipping: expert gradients count `1 / max(world_size, num_experts)` towards the
/// squared norm, so that adding experts does not over-clip the dense part.
///
/// `total = sqrt(||g_dense||^2 + ||g_expert / sqrt(max(W, E))||^2)`, each norm a norm of per-tensor
/// norms in f32; `coef = min(1, max_norm / (total + 1e-6))`; no clipping when `max_norm <= 0`.
/// Dense gradients are multiplied by `coef`; expert gradients too unless
/// [`ExpertGrads::Unchanged`] (see [`SparseClip::torchscale_compat`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SparseClip {
    /// The largest allowed norm; `<= 0` disables clipping.
    pub max_norm: f64,
    /// Number of experts per MoE layer (`moe_expert_count`).
    pub num_experts: usize,
    /// Number of data-parallel ranks (1 on a single device).
    pub world_size: usize,
    /// Whether expert gradients are scaled.
    pub expert_grads: ExpertGrads,
}

impl SparseClip {
    /// The intended behaviour: every gradient, expert ones included, is scaled by the coefficient.
    pub fn new(max_norm: f64, num_experts: usize, world_size: usize) -> Self {
        Self {
            max_norm,
            num_experts,
            world_size,
            expert_grads: ExpertGrads::Clip,
        }
    }

    /// Bit-for-bit torchscale 0.3.0: the same norm and coefficient, but expert gradients are left
    /// unchanged (torchscale divides and clips a copy of them, never the real gradients).
    pub fn torchscale_compat(max_norm: f64, num_experts: usize, world_size: usize) -> Self {
        Self {
            expert_grads: ExpertGrads::Unchanged,
            ..Self::new(max_norm, num_experts, world_size)
        }
    }

    /// `sqrt(max(world_size, num_experts))`, the divisor of each expert gradient.
    pub fn expert_denominator(&self) -> Result<f64> {
        let m = self.world_size.max(self.num_experts);
        if m == 0 {
            return Err(Error::config(
                "moe_expert_count",
                "SparseClip needs num_experts or world_size >= 1",
            ));
        }
        Ok((m as f64).sqrt())
    }
}

impl GradClipper for SparseClip {
    fn clip(&self, grads: &mut GradStore, dense: &[Var], expert: &[Var]) -> Result<ClipReport> {
        let denom = self.expert_denominator()?;
        // Experts first so that a parameter in both lists counts as an expert, as torchscale's
        // partition tests the `expert` flag before anything else.
        let mut seen = HashSet::new();
        let experts = present(grads, expert, &mut seen);
        let dense = present(grads, dense, &mut seen);
        let part = |t: Option<Tensor>| -> Result<f32> { t.map_or(Ok(0.0), |n| norm_of(&n)) };
        let dense_norm = part(per_tensor_norms(&dense, None)?)?;
        let expert_norm = part(per_tensor_norms(&experts, Some(denom as f32))?)?;
        let total = (dense_norm * dense_norm + expert_norm * expert_norm).sqrt();
        let coef = clip_coef(self.max_norm, total);
        if let Some(c) = coef.filter(|c| *c < 1.0) {
            scale(grads, &dense, c)?;
            if self.expert_grads == ExpertGrads::Clip {
                scale(grads, &experts, c)?;
            }
        }
        Ok(crate::report(total, coef))
    }
}
