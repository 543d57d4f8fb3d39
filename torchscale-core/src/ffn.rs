//! torchscale's `FeedForwardNetwork`: `fc2([LN](act(fc1 x)))`, also each MoE expert.

use candle_core::{ModuleT, Tensor};
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

/// The same as [`FeedForward::forward`], for candle code that takes any `ModuleT`
/// (`xs.apply_t(&ffn, train)?`); `train` switches the dropouts on.
impl ModuleT for FeedForward {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Ok(FeedForward::forward(self, xs, train)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dropout::seed_dropout;
    use crate::init::ParamStore;
    use candle_core::{DType, Device};

    fn block(activation: Activation, dropout: f64) -> Result<(ParamStore, FeedForward)> {
        let store = ParamStore::new(3);
        let cfg = FfnConfig {
            embed_dim: 4,
            ffn_dim: 8,
            activation,
            activation_dropout: dropout,
            dropout,
            inner_norm: true,
            layernorm_eps: 1e-5,
        };
        let ffn = FeedForward::new(cfg, 1.0, store.var_builder(DType::F32, &Device::Cpu))?;
        Ok((store, ffn))
    }

    fn vals(t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.flatten_all()?.to_vec1()?)
    }

    #[test]
    fn module_t_forward_is_the_inherent_forward() -> Result<()> {
        let x = Tensor::new(
            &[[0.5f32, -1.0, 2.0, 0.0], [1.0, 1.0, -3.0, 0.25]],
            &Device::Cpu,
        )?;
        for act in [Activation::Gelu, Activation::Relu] {
            let (_, ffn) = block(act, 0.3)?;
            // Evaluation: no dropout, deterministic.
            let eval = vals(&x.apply_t(&ffn, false)?)?;
            assert_eq!(eval, vals(&ffn.forward(&x, false)?)?);
            // Training: the same masks under the same dropout seed.
            seed_dropout(11);
            let train = vals(&x.apply_t(&ffn, true)?)?;
            seed_dropout(11);
            assert_eq!(train, vals(&ffn.forward(&x, true)?)?);
            assert_ne!(train, eval, "train flag must reach the dropouts");
        }
        Ok(())
    }

    #[test]
    fn module_t_hand_computed_without_inner_norm() -> Result<()> {
        let store = ParamStore::new(5);
        let cfg = FfnConfig {
            embed_dim: 2,
            ffn_dim: 3,
            activation: Activation::Relu,
            activation_dropout: 0.0,
            dropout: 0.0,
            inner_norm: false,
            layernorm_eps: 1e-5,
        };
        let ffn = FeedForward::new(cfg, 1.0, store.var_builder(DType::F32, &Device::Cpu))?;
        let x = Tensor::new(&[[1.0f32, -2.0]], &Device::Cpu)?;
        let got = vals(&x.apply_t(&ffn, true)?)?;
        // fc2(relu(fc1 x)) from the stored weights, by hand.
        let w1 = ffn.fc1().weight().to_vec2::<f32>()?;
        let b1 = ffn
            .fc1()
            .bias()
            .map(|b| b.to_vec1::<f32>())
            .transpose()?
            .unwrap_or_default();
        let w2 = ffn.fc2().weight().to_vec2::<f32>()?;
        let b2 = ffn
            .fc2()
            .bias()
            .map(|b| b.to_vec1::<f32>())
            .transpose()?
            .unwrap_or_default();
        let h: Vec<f32> = (0..3)
            .map(|j| (w1[j][0] * 1.0 + w1[j][1] * -2.0 + b1[j]).max(0.0))
            .collect();
        for (i, g) in got.iter().enumerate() {
            let want: f32 = (0..3).map(|j| w2[i][j] * h[j]).sum::<f32>() + b2[i];
            assert!((g - want).abs() < 1e-5, "{i}: {g} vs {want}");
        }
        Ok(())
    }
}
