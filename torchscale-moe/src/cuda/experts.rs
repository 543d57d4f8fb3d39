//! The MoE layer's CUDA path: dispatch with the index kernels into a compact buffer, each
//! expert on its own rows, combine with the gate weights.

use std::sync::Arc;

use candle_core::Tensor;
use torchscale_core::ffn::FeedForward;
use torchscale_core::{Result, Routing};

use super::index::{DispatchIndex, Layout};
use super::ops::{combine, dispatch};

/// `out[s] = Σ_kept gate[s, j] · expert_{e_j}(x[s])` for `x: [S, C]` on a CUDA device, every
/// expert of `experts` (all `E` of them, in order) on exactly its kept tokens. The same result
/// as the layer's host-index path, computed by the kernels (and differentiable through their
/// backward ops).
pub fn experts_forward(
    experts: &[FeedForward],
    x: &Tensor,
    r: &Routing,
    train: bool,
) -> Result<Tensor> {
    let index = Arc::new(DispatchIndex::from_routing(r, Layout::Compact, x.device())?);
    if index.num_rows == 0 {
        return Ok(x.zeros_like()?);
    }
    let mut counts = vec![0usize; r.num_experts];
    for (_, _, e, _) in r.kept_choices() {
        counts[e] += 1;
    }
    let buf = dispatch(x, &index)?;
    let mut outs = Vec::with_capacity(experts.len());
    let mut start = 0;
    for (expert, &n) in experts.iter().zip(&counts) {
        if n > 0 {
            outs.push(expert.forward(&buf.narrow(0, start, n)?, train)?);
        }
        start += n;
    }
    combine(&Tensor::cat(&outs, 0)?, &r.gate, &index)
}
