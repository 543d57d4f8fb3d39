//! The embedding stage shared by the encoder and the decoder.

use candle_core::Tensor;
use candle_nn::{Linear, VarBuilder};
use torchscale_core::dropout::dropout;
use torchscale_core::embedding::{PositionEmbedding, TokenEmbedding};
use torchscale_core::layer_norm::LayerNorm;
use torchscale_core::linear::linear_normal;
use torchscale_core::{Branch, Error, Multiway, Result};

use crate::spec::StackSpec;

/// fairseq's padding index.
pub const PADDING_IDX: u32 = 1;

/// Token embedding, learned positions and the optional embedding LayerNorm.
#[derive(Debug, Clone)]
pub struct EmbeddingStage {
    /// `embed_tokens`.
    pub tokens: TokenEmbedding,
    /// `embed_positions`, if absolute positions are used.
    pub positions: Option<PositionEmbedding>,
    /// `layernorm_embedding`.
    pub layernorm: Option<Multiway<LayerNorm>>,
    scale: f64,
    dropout: f64,
}

impl EmbeddingStage {
    /// Builds under `vb` (the stack's root); `tokens` may be shared with another stack.
    pub fn new(
        spec: &StackSpec,
        multiway_ln: bool,
        tokens: Option<TokenEmbedding>,
        vocab: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let tokens = match tokens {
            Some(t) => t,
            None => TokenEmbedding::new(
                vocab,
                spec.embed_dim,
                Some(PADDING_IDX),
                vb.pp("embed_tokens"),
            )?,
        };
        let positions = if spec.learned_positions {
            Some(PositionEmbedding::new(
                spec.max_positions,
                spec.embed_dim,
                vb.pp("embed_positions"),
            )?)
        } else {
            None
        };
        let layernorm = if spec.layernorm_embedding {
            Some(Multiway::new(
                multiway_ln,
                vb.pp("layernorm_embedding"),
                |vb| LayerNorm::new(spec.embed_dim, spec.layernorm_eps, vb),
            )?)
        } else {
            None
        };
        Ok(Self {
            tokens,
            positions,
            layernorm,
            scale: spec.embed_scale(),
            dropout: spec.dropout,
        })
    }

    /// The bias-free output projection `[V, C]`: tied to the token table when the spec shares them,
    /// else N(0, C^-0.5) under `vb` (torchscale's init).
    pub fn output_projection(&self, spec: &StackSpec, vb: VarBuilder) -> Result<Linear> {
        if spec.share_input_output_embed {
            return Ok(Linear::new(self.tokens.weight().clone(), None));
        }
        let std = (spec.embed_dim as f64).powf(-0.5);
        linear_normal(spec.embed_dim, spec.vocab_size.max(0) as usize, std, vb)
    }

    /// Returns `(x, embed)`: `embed = scale * E[tokens]`, `x` = embed + positions (from `start`),
    /// LayerNorm, dropout.
    pub fn forward(
        &self,
        tokens: &Tensor,
        start: usize,
        branch: Branch,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        self.forward_named(tokens, "tokens", start, branch, train)
    }

    /// As [`EmbeddingStage::forward`], with errors (bad ids, a sequence longer than the position
    /// table) naming the input `what`.
    pub fn forward_named(
        &self,
        tokens: &Tensor,
        what: &str,
        start: usize,
        branch: Branch,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let e = self.tokens.forward_named(tokens, what)?;
        let embed = if self.scale != 1.0 {
            (e * self.scale)?
        } else {
            e
        };
        let mut x = embed.clone();
        if let Some(p) = &self.positions {
            let rows = p.forward(start, tokens.dim(1)?).map_err(|e| match e {
                Error::Invalid { reason, .. } => Error::invalid(what, reason),
                other => other,
            })?;
            x = x.broadcast_add(&rows.to_dtype(x.dtype())?)?;
        }
        if let Some(ln) = &self.layernorm {
            x = ln.apply(&x, branch, |ln, x| ln.forward(x))?;
        }
        Ok((dropout(&x, self.dropout, train)?, embed))
    }
}
