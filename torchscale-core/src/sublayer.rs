//! The `f` in a residual block, and the context that carries its extra inputs and outputs.

use candle_core::Tensor;

use crate::attention::{AttentionInputs, KvCache, MultiheadAttention};
use crate::ffn::FeedForward;
use crate::multiway::Branch;
use crate::router::AuxOutput;
use crate::Result;

/// Extra inputs and outputs of a sublayer call, so that `forward` keeps one signature for
/// attention, feed-forward and MoE.
#[derive(Debug, Default)]
pub struct Ctx<'a> {
    /// Training mode (dropout, MoE training capacity).
    pub train: bool,
    /// Multiway branch.
    pub branch: Branch,
    /// `[B, S]`, nonzero = padded key.
    pub key_padding_mask: Option<&'a Tensor>,
    /// Additive `[T, S]` mask.
    pub attn_mask: Option<&'a Tensor>,
    /// Relative position bias for self-attention.
    pub rel_pos: Option<&'a Tensor>,
    /// Encoder output `[B, S, C]` for cross-attention.
    pub memory: Option<&'a Tensor>,
    /// Padding mask of `memory`.
    pub memory_padding_mask: Option<&'a Tensor>,
    /// Relative position bias for cross-attention.
    pub cross_rel_pos: Option<&'a Tensor>,
    /// Incremental cache of this layer's self-attention.
    pub cache: Option<&'a mut KvCache>,
    /// True when an incremental call processes a whole prompt.
    pub is_first_step: bool,
    /// Random draws for an MoE router's second-expert policy, `[S]` (None: drawn internally).
    pub moe_uniform: Option<&'a Tensor>,
    /// MoE: the input is time-major `[T, B, C]` (torchscale's encoder) rather than batch-major.
    pub time_major: bool,
    /// Auxiliary outputs (balance losses, routing statistics) pushed by sublayers.
    pub aux: Vec<AuxOutput>,
}

/// The `f` in `x -> x (+) f(x)`: attention, feed-forward, MoE.
pub trait Sublayer: Send + Sync {
    /// `[B, T, C] -> [B, T, C]`.
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor>;
}

impl Sublayer for FeedForward {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        FeedForward::forward(self, x, ctx.train)
    }
}

impl Sublayer for MultiheadAttention {
    /// Self-attention over `x`, or cross-attention over `ctx.memory` when this module is not
    /// self-attention.
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        if self.config().self_attention {
            let inputs = AttentionInputs {
                key_padding_mask: ctx.key_padding_mask,
                attn_mask: ctx.attn_mask,
                rel_pos: ctx.rel_pos,
                is_first_step: ctx.is_first_step,
                branch: ctx.branch,
                train: ctx.train,
            };
            MultiheadAttention::forward(self, x, x, &inputs, ctx.cache.as_deref_mut())
        } else {
            let memory = ctx.memory.ok_or_else(|| {
                crate::Error::invalid("encoder_out", "cross-attention needs the encoder output")
            })?;
            let inputs = AttentionInputs {
                key_padding_mask: ctx.memory_padding_mask,
                rel_pos: ctx.cross_rel_pos,
                branch: ctx.branch,
                train: ctx.train,
                ..Default::default()
            };
            MultiheadAttention::forward(self, x, memory, &inputs, None)
        }
    }
}
