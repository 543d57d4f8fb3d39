//! [`ExpertParallel`]: a clipper for runs whose experts are spread over ranks (expert-parallel
//! MoE), where each rank holds the gradients of its own experts only.
//!
//! The dense gradients are replicated (identical on every rank once the trainer has
//! all-reduced them), so their part of the squared norm is computed locally; the experts' part
//! is summed over ranks with one all-reduce. Every rank then has the norm, and the coefficient,
//! that one process holding every expert's gradient would compute.

use std::collections::HashSet;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use torchscale_core::{ClipReport, Collective, GradClipper, Result};

use crate::norm::{clip_coef, per_tensor_norms, present, scale, sq_norm_of};
use crate::sparse_clip::ExpertGrads;
use crate::{GlobalNorm, SparseClip};

/// `clip` with the expert part of its squared norm all-reduced over `comm`'s ranks.
///
/// Every rank must call [`GradClipper::clip`] at the same point (it runs one all-reduce), even a
/// rank whose experts got no gradient. A NaN or infinite expert norm on any rank makes the norm
/// non-finite on every rank, so that all of them skip the step together.
#[derive(Debug, Clone)]
pub struct ExpertParallel<C> {
    /// The clipping rule ([`SparseClip`] or [`GlobalNorm`]).
    pub clip: C,
    /// The ranks that share the experts.
    pub comm: Arc<dyn Collective>,
}

impl<C> ExpertParallel<C> {
    /// `clip` over the ranks of `comm`.
    pub fn new(clip: C, comm: Arc<dyn Collective>) -> Self {
        Self { clip, comm }
    }

    /// The sum over ranks of `local_sq` (this rank's squared expert norm), in f32, reduced on
    /// `dev` (the gradients' device: NCCL reduces device memory, MPI host memory).
    fn sum_over_ranks(&self, local_sq: f32, dev: &Device) -> Result<f32> {
        let t = Tensor::new(&[local_sq], dev)?;
        Ok(self.comm.all_reduce_sum(&t)?.to_vec1::<f32>()?[0])
    }
}

/// The device of the first gradient listed (CPU when there is none).
fn device_of(lists: [&[(candle_core::TensorId, Tensor)]; 2]) -> Device {
    lists
        .iter()
        .flat_map(|l| l.first())
        .map(|(_, g)| g.device().clone())
        .next()
        .unwrap_or(Device::Cpu)
}

/// The squared L2 norm of the listed gradients (`divisor` divides each first), 0 for none.
fn sq_norm(tensors: &[(candle_core::TensorId, Tensor)], divisor: Option<f32>) -> Result<f32> {
    match per_tensor_norms(tensors, divisor)? {
        Some(n) => sq_norm_of(&n),
        None => Ok(0.0),
    }
}

impl GradClipper for ExpertParallel<SparseClip> {
    fn clip(&self, grads: &mut GradStore, dense: &[Var], expert: &[Var]) -> Result<ClipReport> {
        let denom = self.clip.expert_denominator()?;
        let mut seen = HashSet::new();
        let experts = present(grads, expert, &mut seen);
        let dense = present(grads, dense, &mut seen);
        let dense_sq = sq_norm(&dense, None)?;
        let dev = device_of([&dense, &experts]);
        let expert_sq = self.sum_over_ranks(sq_norm(&experts, Some(denom as f32))?, &dev)?;
        let total = (dense_sq + expert_sq).sqrt();
        let coef = clip_coef(self.clip.max_norm, total);
        if let Some(c) = coef.filter(|c| *c < 1.0) {
            scale(grads, &dense, c)?;
            if self.clip.expert_grads == ExpertGrads::Clip {
                scale(grads, &experts, c)?;
            }
        }
        Ok(crate::report(total, coef))
    }
}

impl GradClipper for ExpertParallel<GlobalNorm> {
    fn clip(&self, grads: &mut GradStore, dense: &[Var], expert: &[Var]) -> Result<ClipReport> {
        let mut seen = HashSet::new();
        let experts = present(grads, expert, &mut seen);
        let dense = present(grads, dense, &mut seen);
        let dev = device_of([&dense, &experts]);
        let expert_sq = self.sum_over_ranks(sq_norm(&experts, None)?, &dev)?;
        let total = (sq_norm(&dense, None)? + expert_sq).sqrt();
        let coef = clip_coef(self.clip.max_norm, total);
        if let Some(c) = coef.filter(|c| *c < 1.0) {
            scale(grads, &dense, c)?;
            scale(grads, &experts, c)?;
        }
        Ok(crate::report(total, coef))
    }
}
