//! The `GradClipper` trait.

use candle_core::backprop::GradStore;
use candle_core::Var;

use crate::Result;

/// What a clipper did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipReport {
    /// The norm before clipping (SparseClip: the sparse-aware norm).
    pub total_norm: f64,
    /// The coefficient applied, `min(1, max_norm / (total_norm + 1e-6))`.
    pub coef: f64,
    /// Whether gradients were scaled (coef < 1).
    pub clipped: bool,
}

/// Clips the gradients of `dense` and `expert` parameters in `grads`, in place.
pub trait GradClipper {
    /// Clips; `expert` lists the parameters the MoE layers own.
    fn clip(&self, grads: &mut GradStore, dense: &[Var], expert: &[Var]) -> Result<ClipReport>;
}
