//! How a sublayer joins the residual stream, and how a technique says so.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::multiway::Branch;
use crate::Result;

/// How one sublayer `f` joins the residual stream: where its norms sit and how the skip is scaled.
///
/// Like a tower `Layer` wrapping any `Service`, a `Residual` wraps any function:
/// `res.forward(&x, &mut |h| my_attention(h))`. The lower-level [`Residual::pre`] and
/// [`Residual::post`] serve code that has already computed `f`'s input or output.
pub trait Residual: Send + Sync + std::fmt::Debug {
    /// What the sublayer sees: `LN(x)` for Pre-LN styles, `x` otherwise.
    fn pre(&self, x: &Tensor, branch: Branch) -> Result<Tensor>;

    /// Joins the sublayer output `fx` to the skip `x`: `x + fx`, `LN(α·x + fx)`, `LN(ω·x + fx)`, ...
    fn post(&self, x: &Tensor, fx: &Tensor, branch: Branch) -> Result<Tensor>;

    /// `post(x, f(pre(x)))`.
    fn forward(&self, x: &Tensor, f: &mut dyn FnMut(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        self.forward_branch(x, Branch::A, f)
    }

    /// [`Residual::forward`] with a multiway branch.
    fn forward_branch(
        &self,
        x: &Tensor,
        branch: Branch,
        f: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let h = self.pre(x, branch)?;
        let fx = f(&h)?;
        self.post(x, &fx, branch)
    }
}

/// Where a residual block sits in a layer; also names its LayerNorm as torchscale does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    /// Self-attention (`self_attn_layer_norm`).
    SelfAttention,
    /// Encoder-decoder attention (`encoder_attn_layer_norm`).
    CrossAttention,
    /// Feed-forward or MoE (`final_layer_norm`).
    FeedForward,
}

impl Site {
    /// The torchscale key of this site's LayerNorm.
    pub fn norm_name(&self) -> &'static str {
        match self {
            Site::SelfAttention => "self_attn_layer_norm",
            Site::CrossAttention => "encoder_attn_layer_norm",
            Site::FeedForward => "final_layer_norm",
        }
    }
}

/// The weights whose init a technique may scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamRole {
    /// `q_proj`.
    Query,
    /// `k_proj`.
    Key,
    /// `v_proj`.
    Value,
    /// `out_proj`.
    Out,
    /// `fc1` (dense FFN and experts).
    Fc1,
    /// `fc2` (dense FFN and experts).
    Fc2,
}

/// The shape of the stack a technique is applied to; its constants depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackKind {
    /// An encoder alone, N layers.
    Encoder {
        /// N.
        layers: usize,
    },
    /// A decoder alone, M layers.
    Decoder {
        /// M.
        layers: usize,
    },
    /// The encoder of an encoder-decoder.
    EncoderOfEncDec {
        /// N.
        encoder_layers: usize,
        /// M.
        decoder_layers: usize,
    },
    /// The decoder of an encoder-decoder.
    DecoderOfEncDec {
        /// N.
        encoder_layers: usize,
        /// M.
        decoder_layers: usize,
    },
}

impl StackKind {
    /// Number of layers of this stack.
    pub fn layers(&self) -> usize {
        match *self {
            StackKind::Encoder { layers } | StackKind::Decoder { layers } => layers,
            StackKind::EncoderOfEncDec { encoder_layers, .. } => encoder_layers,
            StackKind::DecoderOfEncDec { decoder_layers, .. } => decoder_layers,
        }
    }

    /// Number of residual sublayers in the stack (2 per encoder layer, 3 per decoder layer of an
    /// encoder-decoder, 2 per decoder-only layer).
    pub fn residual_sublayers(&self) -> usize {
        match *self {
            StackKind::Encoder { layers } | StackKind::Decoder { layers } => 2 * layers,
            StackKind::EncoderOfEncDec { encoder_layers, .. } => 2 * encoder_layers,
            StackKind::DecoderOfEncDec { decoder_layers, .. } => 3 * decoder_layers,
        }
    }
}

/// What a residual block needs to build its norms.
#[derive(Debug, Clone, Copy)]
pub struct NormSpec {
    /// Width of the stream.
    pub dim: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// Multiway A/B copies of the norms.
    pub multiway: bool,
}

/// A technique: answers the three questions that tell stabilisers apart, for one stack.
///
/// 1. the residual wiring of each site ([`Stabilizer::residual`]);
/// 2. whether a sublayer gets an inner norm ([`Stabilizer::inner_norm`], Sub-LN);
/// 3. the init gain of chosen weights ([`Stabilizer::init_gain`], DeepNorm β, Sub-LN γ);
///
/// plus whether the stack ends with a LayerNorm.
pub trait Stabilizer: Send + Sync + std::fmt::Debug {
    /// A short name (`post-ln`, `pre-ln`, `deepnorm`, `subln`, `admin`).
    fn name(&self) -> &'static str;

    /// Builds the residual block of `site`; its norm lives under `vb.pp(site.norm_name())`.
    fn residual(&self, site: Site, spec: NormSpec, vb: VarBuilder) -> Result<Box<dyn Residual>>;

    /// The init gain of the weights and biases of `role` at `site` (1 unless the technique scales it).
    fn init_gain(&self, _site: Site, _role: ParamRole) -> f64 {
        1.0
    }

    /// Whether the sublayer at `site` carries an inner LayerNorm (Sub-LN).
    fn inner_norm(&self, _site: Site) -> bool {
        false
    }

    /// Whether the stack ends with a LayerNorm.
    fn final_norm(&self) -> bool {
        false
    }

    /// The factor on the skip branch, for reporting (DeepNorm α, Admin ω; 1 otherwise).
    fn residual_scale(&self) -> f64 {
        1.0
    }
}
