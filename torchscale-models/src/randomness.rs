//! What a trainer needs from a model besides `forward`: reseeding every random draw (dropout
//! masks, MoE second-expert draws) so that a step is a function of (run seed, step), and the
//! expert parameters that SparseClip treats apart, and torchscale's per-forward gate rescale.

use candle_core::Tensor;
use torchscale_core::dropout::seed_dropout;

use crate::layer::{FfnBlock, Layer};

/// SplitMix64: decorrelates seeds derived from (seed, step, layer) so that neighbouring steps do
/// not draw correlated streams.
pub fn mix_seed(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Reseeds this thread's dropout masks and each MoE router of `layers` (router `i` from
/// `mix_seed(seed, offset + i)`).
pub(crate) fn reseed_layers(layers: &[Layer], seed: u64, offset: u64) {
    seed_dropout(seed);
    for (i, l) in layers.iter().enumerate() {
        if let FfnBlock::Moe(m) = l.ffn() {
            m.router().reseed(mix_seed(seed, offset + i as u64 + 1));
        }
    }
}

/// torchscale's in-place rescale of every X-MoE gate's `wg` to row norm 1.5, which its gate does
/// at the start of each forward (it sets the gradient scale of `wg`).
pub(crate) fn renormalize_gates(layers: &[Layer]) -> torchscale_core::Result<()> {
    for l in layers {
        if let FfnBlock::Moe(m) = l.ffn() {
            m.renormalize_gate()?;
        }
    }
    Ok(())
}

/// The expert parameters of every MoE layer in `layers`.
pub(crate) fn expert_parameters(layers: &[Layer]) -> Vec<Tensor> {
    layers
        .iter()
        .filter_map(|l| match l.ffn() {
            FfnBlock::Moe(m) => Some(m.expert_parameters()),
            FfnBlock::Dense(_) => None,
        })
        .flatten()
        .collect()
}
