//! `torch.nn.LayerNorm` with a working backward.
//!
//! candle's fused `ops::layer_norm` (used by `candle_nn::LayerNorm`) has no backward: the graph is
//! cut silently. This one runs torchscale-kernels' fused LayerNorm (its own backward) on the CPU
//! and composed candle ops elsewhere; both match `torch.nn.LayerNorm` (biased variance, affine)
//! and compute the statistics in f32 whatever the input dtype.

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::Result;

/// `torch.nn.LayerNorm` over the last dimension, with `weight` and `bias`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Builds `weight` (ones) and `bias` (zeros) of width `dim` under `vb`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }

    /// From existing tensors.
    pub fn from_tensors(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    /// The scale.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The shift.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// The epsilon added to the variance.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// `LN(alpha * x + fx)`: a residual sum and its norm in one fused op on the CPU
    /// (`torchscale_kernels::residual_layer_norm`), the same composed ops elsewhere.
    pub fn residual_forward(&self, x: &Tensor, fx: &Tensor, alpha: f64) -> Result<Tensor> {
        Ok(torchscale_kernels::residual_layer_norm(
            x,
            fx,
            alpha,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }

    /// Normalises over the last dimension: the fused kernel with its own backward on the CPU
    /// (`torchscale_kernels::layer_norm`), composed candle ops elsewhere.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(torchscale_kernels::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        LayerNorm::forward(self, xs).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}
