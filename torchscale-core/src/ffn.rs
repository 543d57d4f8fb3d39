//! torchscale's `FeedForwardNetwork`: `fc2([LN](act(fc1 x)))`, also each MoE expert.

use candle_core::Tensor;
use candle_nn::{Linear, VarBuilder};

use crate::activation::Activation;
use crate::dropout::dropout;
use crate::layer_norm::LayerNorm;
use crate::linear::{apply, linear};
use crate::Result;

/// Shape and behaviour of a feed-forward block.
#[derive(Debug, Clone, Copy)]
pub struct FfnConfig {
    /// Model width.
    pub embed_dim: usize,
    /// Hidden width.
    pub ffn_dim: usize,
    /// Activation after `fc1`.
    pub activation: Activation,
    /// Dropout after the activation.
    pub activation_dropout: f64,
    /// Dropout on the output.
    pub dropout: f64,
    /// Sub-LN: a LayerNorm (`ffn_layernorm`) of width `ffn_dim` before `fc2`.
    pub inner_norm: bool,
    /// LayerNorm epsilon.
    pub layernorm_eps: f64,
}

/// Keys `fc1.*`, `fc2.*` and, with Sub-LN, `ffn_layernorm.*`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    fc1: Linear,
    fc2: Linear,
    ffn_layernorm: Option<LayerNorm>,
    cfg: FfnConfig,
}

impl FeedForward {
    /// Builds the block; `gain` multiplies the init of `fc1` and `fc2` (weights and biases).
    pub fn new(cfg: FfnConfig, gain: f64, vb: VarBuilder) -> Result<Self> {
        let fc1 = linear(cfg.embed_dim, cfg.ffn_dim, true, gain, vb.pp("fc1"))?;
        let fc2 = linear(cfg.ffn_dim, cfg.embed_dim, true, gain, vb.pp("fc2"))?;
        let ffn_layernorm = if cfg.inner_norm {
            Some(LayerNorm::new(
                cfg.ffn_dim,
                cfg.layernorm_eps,
                vb.pp("ffn_layernorm"),
            )?)
        } else {
            None
        };
        Ok(Self {
            fc1,
            fc2,
            ffn_layernorm,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FfnConfig {
        &self.cfg
    }

    /// The first projection.
    pub fn fc1(&self) -> &Linear {
        &self.fc1
    }

    /// The second projection.
    pub fn fc2(&self) -> &Linear {
        &self.fc2
    }

    /// The Sub-LN inner norm, if any.
    pub fn inner_norm(&self) -> Option<&LayerNorm> {
        self.ffn_layernorm.as_ref()
    }

    /// Every trainable tensor of the block (projections, then the inner norm), as the same
    /// tensors the `VarBuilder` handed out: match them to variables by `Tensor::id`.
    pub fn parameters(&self) -> Vec<Tensor> {
        let mut v = Vec::with_capacity(6);
        for l in [&self.fc1, &self.fc2] {
            v.push(l.weight().clone());
            v.extend(l.bias().cloned());
        }
        if let Some(n) = &self.ffn_layernorm {
            v.push(n.weight().clone());
            v.push(n.bias().clone());
        }
        v
    }

    /// `[.., C] -> [.., C]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = match self.cfg.activation {
            // The projection and its activation in one fused op (one graph node, one pass back).
            Activation::Gelu => {
                torchscale_kernels::linear_gelu(x, self.fc1.weight(), self.fc1.bias())?
            }
            act => act.forward(&apply(&self.fc1, x)?)?,
        };
        let h = dropout(&h, self.cfg.activation_dropout, train)?;
        let h = match &self.ffn_layernorm {
            Some(ln) => ln.forward(&h)?,
            None => h,
        };
        let y = apply(&self.fc2, &h)?;
        dropout(&y, self.cfg.dropout, train)
    }
}
