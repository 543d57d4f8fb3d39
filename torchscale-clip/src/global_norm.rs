//! `GlobalNorm`: PyTorch's `torch.nn.utils.clip_grad_norm_` over every parameter.

use std::collections::HashSet;

use candle_core::backprop::GradStore;
use candle_core::Var;
use torchscale_core::{ClipReport, GradClipper, Result};

use crate::norm::{clip_coef, norm_of, per_tensor_norms, present, scale};

/// Clips all gradients (dense and expert alike) by their global L2 norm, as
/// `torch.nn.utils.clip_grad_norm_(params, max_norm)` does.
///
/// `total = ||(||g_1||, …, ||g_n||)||_2` in f32, `coef = min(1, max_norm / (total + 1e-6))`, and every
/// listed parameter's gradient is multiplied by `coef`. `max_norm <= 0` turns clipping off (the
/// norm is still reported). Only the gradients of the listed parameters are read and scaled: a
/// [`GradStore`] from `backward()` also holds intermediate tensors, which are left alone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlobalNorm {
    /// The largest allowed norm; `<= 0` disables clipping.
    pub max_norm: f64,
}

impl GlobalNorm {
    /// A clipper with the given maximum norm.
    pub fn new(max_norm: f64) -> Self {
        Self { max_norm }
    }
}

impl GradClipper for GlobalNorm {
    fn clip(&self, grads: &mut GradStore, dense: &[Var], expert: &[Var]) -> Result<ClipReport> {
        let mut seen = HashSet::new();
        let mut all = present(grads, dense, &mut seen);
        all.extend(present(grads, expert, &mut seen));
        let total = match per_tensor_norms(&all, None)? {
            Some(norms) => norm_of(&norms)?,
            None => 0.0,
        };
        let coef = clip_coef(self.max_norm, total);
        if let Some(c) = coef.filter(|c| *c < 1.0) {
            scale(grads, &all, c)?;
        }
        Ok(crate::report(total, coef))
    }
}
