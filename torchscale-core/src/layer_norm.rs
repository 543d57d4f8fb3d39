//! LayerNorm composed from primitive ops, so that its backward works.
//!
//! candle's fused `ops::layer_norm` (used by `candle_nn::LayerNorm`) has no backward: the graph is
//! cut silently. This one matches `torch.nn.LayerNorm` (biased variance, affine) and computes its
//! statistics in f32 whatever the input dtype.

use candle_core::{DType, Module, Tensor, D};
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

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = if dtype == DType::F32 || dtype == DType::F64 {
            x.clone()
        } else {
            x.to_dtype(DType::F32)?
        };
        let mean = xf.mean_keepdim(D::Minus1)?;
        let centred = xf.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let w = self.weight.to_dtype(normed.dtype())?;
        let b = self.bias.to_dtype(normed.dtype())?;
        let y = normed.broadcast_mul(&w)?.broadcast_add(&b)?;
        Ok(y.to_dtype(dtype)?)
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        LayerNorm::forward(self, xs).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}
