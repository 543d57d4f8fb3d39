//! What a trainer needs from a model besides `forward`: reseeding every random draw (dropout
//! masks, MoE second-expert draws) so that a step is a function of (run seed, step), and the
//! expert parameters that SparseClip treats apart, and torchscale's per-forward gate rescale.

use candle_core::Tensor;
use rand::RngCore;
use torchscale_core::dropout::seed_dropout;
use torchscale_core::init::seeded_rng;

use crate::layer::Layer;

/// A seed derived from (`seed`, `salt`), for the per-step and per-layer draws of a run: the first
/// word of ChaCha8 keyed by `seed` on stream `salt` (see [`seeded_rng`]).
///
/// Different salts take different ChaCha streams, so neighbouring steps and layers draw
/// unrelated seeds without a hand-written hash; the value is fixed by ChaCha's specification.
pub fn mix_seed(seed: u64, salt: u64) -> u64 {
    seeded_rng(seed, salt).next_u64()
}

/// Reseeds this thread's dropout masks and the sublayers of `layers` (layer `i`'s from
/// `mix_seed(seed, offset + i + 1)`, which is what an MoE router has always drawn from).
pub(crate) fn reseed_layers(layers: &[Layer], seed: u64, offset: u64) {
    seed_dropout(seed);
    for (i, l) in layers.iter().enumerate() {
        l.reseed(mix_seed(seed, offset + i as u64 + 1));
    }
}

/// Every sublayer's work before a training forward: torchscale's in-place rescale of each X-MoE
/// gate's `wg` to row norm 1.5, which its gate does at the start of each forward (it sets the
/// gradient scale of `wg`).
pub(crate) fn prepare_layers(layers: &[Layer]) -> torchscale_core::Result<()> {
    layers.iter().try_for_each(Layer::prepare_step)
}

/// The expert parameters of every sublayer in `layers`.
pub(crate) fn expert_parameters(layers: &[Layer]) -> Vec<Tensor> {
    layers.iter().flat_map(Layer::expert_parameters).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Step and layer seeds are pinned: exact resume relies on them staying what they are.
    #[test]
    fn mix_seed_is_pinned() {
        let got = [mix_seed(0, 0), mix_seed(0, 1), mix_seed(1234, 5)];
        assert_eq!(
            got,
            [
                15438444565445410878,
                14557467404244061995,
                10452445013471885194
            ]
        );
        assert_ne!(mix_seed(1, 0), mix_seed(0, 1));
    }
}
