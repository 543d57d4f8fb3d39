//! The `f` in a residual block, and the context that carries its extra inputs and outputs.

use std::any::Any;

use candle_core::Tensor;

use crate::attention::{AttentionInputs, KvCache, MultiheadAttention};
use crate::ffn::FeedForward;
use crate::multiway::{Branch, Multiway};
use crate::router::AuxOutput;
use crate::Result;

/// Extra inputs and outputs of a sublayer call, so that `forward` keeps one signature for
/// attention, feed-forward and MoE.
#[derive(Debug, Default)]
pub struct Ctx<'a> {
    /// Training mode (dropout, MoE training capacity).
    pub train: bool,
    /// Index of the layer in its stack (MoE layers report it with their auxiliary outputs).
    pub layer: usize,
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

/// The `f` in `x -> x (+) f(x)`: attention, feed-forward, MoE, or a kind defined by a user.
///
/// A stack layer is a sequence of sites, each a `Residual` around a `Sublayer`; the stack only
/// talks to its sublayers through this trait, so a new kind needs no edit of the stack. The
/// provided methods are the hooks a trainer and a checkpoint need; their defaults suit a
/// sublayer without randomness of its own, experts or buffers.
pub trait Sublayer: Send + Sync + std::fmt::Debug {
    /// `[B, T, C] -> [B, T, C]`.
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor>;

    /// Whether this call runs the sublayer at all; when false the site passes `x` through
    /// untouched (cross-attention of a decoder called without an encoder output).
    fn active(&self, _ctx: &Ctx) -> bool {
        true
    }

    /// Reseeds the sublayer's own random draws (an MoE router's), from a per-step seed.
    fn reseed(&self, _seed: u64) {}

    /// Work before each training forward (X-MoE's gate rescale).
    fn prepare_step(&self) -> Result<()> {
        Ok(())
    }

    /// Expert parameters, which SparseClip and expert parallelism treat apart.
    fn expert_parameters(&self) -> Vec<Tensor> {
        Vec::new()
    }

    /// Non-trainable tensors kept in the state_dict, keyed relative to the sublayer.
    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }

    /// The concrete sublayer, for callers that need its own API (`downcast_ref::<MoeLayer>()`).
    fn as_any(&self) -> &dyn Any;
}

impl Sublayer for FeedForward {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        FeedForward::forward(self, x, ctx.train)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A multiway feed-forward (BEiT-3): the branch in `ctx` picks the copy.
impl Sublayer for Multiway<FeedForward> {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let train = ctx.train;
        self.apply(x, ctx.branch, |f, h| f.forward(h, train))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Sublayer for MultiheadAttention {
    /// Cross-attention runs only when the context holds an encoder output.
    fn active(&self, ctx: &Ctx) -> bool {
        self.config().self_attention || ctx.memory.is_some()
    }

    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(match self.xpos() {
            Some(x) => vec![(
                "xpos.scale".to_string(),
                x.scale_buffer(&candle_core::Device::Cpu)?,
            )],
            None => Vec::new(),
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

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
