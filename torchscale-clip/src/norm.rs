//! Norm helpers shared by the clippers: gradient lookup, per-tensor norms and scaling.

use std::collections::HashSet;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, TensorId, Var};
use torchscale_core::Result;

/// The gradients of `params` found in `grads`, each parameter once (a parameter listed twice,
/// or in both the dense and the expert list, would otherwise be counted and scaled twice).
/// Parameters without a gradient are skipped, as PyTorch skips `p.grad is None`.
pub(crate) fn present(
    grads: &GradStore,
    params: &[Var],
    seen: &mut HashSet<TensorId>,
) -> Vec<(TensorId, Tensor)> {
    params
        .iter()
        .filter(|v| seen.insert(v.id()))
        .filter_map(|v| grads.get_id(v.id()).map(|g| (v.id(), g.clone())))
        .collect()
}

/// The L2 norm of each tensor, computed in f32 (torch's `clip_grad_norm_` accumulates in f32 for
/// f32 gradients and upcasts half precision), returned as a rank-1 f32 tensor of length `n`.
/// `divisor` divides each gradient first (SparseClip's expert copies).
pub(crate) fn per_tensor_norms(
    tensors: &[(TensorId, Tensor)],
    divisor: Option<f32>,
) -> Result<Option<Tensor>> {
    let mut norms = Vec::with_capacity(tensors.len());
    for (_, g) in tensors {
        let mut g = g.to_dtype(DType::F32)?;
        if let Some(d) = divisor {
            g = (g / d as f64)?;
        }
        norms.push(g.sqr()?.sum_all()?.sqrt()?.reshape(1)?);
    }
    if norms.is_empty() {
        return Ok(None);
    }
    Ok(Some(Tensor::cat(&norms, 0)?))
}

/// The L2 norm of a rank-1 f32 tensor of norms ("a norm of per-tensor norms"), as f32 on the host.
pub(crate) fn norm_of(norms: &Tensor) -> Result<f32> {
    Ok(norms.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?)
}

/// The squared L2 norm of a rank-1 f32 tensor of norms, as f32 on the host (what expert-parallel
/// clipping sums over ranks).
pub(crate) fn sq_norm_of(norms: &Tensor) -> Result<f32> {
    Ok(norms.sqr()?.sum_all()?.to_scalar::<f32>()?)
}

/// `min(1, max_norm / (total + 1e-6))`, computed in f32 as torch does; `None` when clipping is
/// off (`max_norm <= 0` or NaN) or the norm is not finite.
pub(crate) fn clip_coef(max_norm: f64, total: f32) -> Option<f32> {
    // `max_norm > 0` is false for NaN too, which also disables clipping.
    let enabled = max_norm > 0.0;
    if !enabled || !total.is_finite() {
        return None;
    }
    Some((max_norm as f32 / (total + 1e-6)).min(1.0))
}

/// Multiplies the stored gradient of each id by `coef`, keeping its dtype.
pub(crate) fn scale(
    grads: &mut GradStore,
    tensors: &[(TensorId, Tensor)],
    coef: f32,
) -> Result<()> {
    for (id, g) in tensors {
        grads.insert_id(*id, g.affine(coef as f64, 0.0)?);
    }
    Ok(())
}
