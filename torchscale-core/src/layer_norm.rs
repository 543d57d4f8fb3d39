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

/// The same as [`LayerNorm::forward`], for candle code that takes any `Module`
/// (`xs.apply(&ln)?`, `candle_nn::seq()`).
impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        Ok(LayerNorm::forward(self, xs)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn module_forward_is_the_inherent_forward_and_trains() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[1.5f32, -0.5, 2.0], &dev)?;
        let b = Var::new(&[0.1f32, 0.0, -0.2], &dev)?;
        let ln = LayerNorm::from_tensors(w.as_tensor().clone(), b.as_tensor().clone(), 1e-5);
        let x = Tensor::new(&[[1.0f32, 2.0, 4.0], [-3.0, 0.0, 3.0]], &dev)?;
        let via_module = x.apply(&ln)?;
        let direct = ln.forward(&x)?;
        assert_eq!(via_module.to_vec2::<f32>()?, direct.to_vec2::<f32>()?);
        // Row 2: mean 0, biased variance 6, so (x - 0) / sqrt(6) * w + b.
        let s = (6.0f32 + 1e-5).sqrt();
        let want = [-3.0 / s * 1.5 + 0.1, 0.0, 3.0 / s * 2.0 - 0.2];
        for (g, w) in via_module.to_vec2::<f32>()?[1].iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        // The Module path keeps the graph: d(sum y)/d bias = number of rows.
        let grads = via_module.sum_all()?.backward()?;
        let gb = grads.get(b.as_tensor()).map(|g| g.to_vec1::<f32>());
        assert_eq!(gb.transpose()?, Some(vec![2.0f32; 3]));
        Ok(())
    }

    #[test]
    fn module_errors_stay_candle_errors() -> Result<()> {
        let dev = Device::Cpu;
        let ln = LayerNorm::from_tensors(
            Tensor::ones(3, DType::F32, &dev)?,
            Tensor::zeros(3, DType::F32, &dev)?,
            1e-5,
        );
        let bad = Tensor::ones((2, 4), DType::F32, &dev)?;
        // First lines only: with RUST_BACKTRACE set, candle appends the (differing) backtraces.
        let direct = ln.forward(&bad).unwrap_err().to_string();
        let via_module = Module::forward(&ln, &bad).unwrap_err();
        assert_eq!(via_module.to_string().lines().next(), direct.lines().next());
        assert_eq!(
            direct.lines().next(),
            Some("layer_norm: weight [3] and bias [3] must both be [4] for input [2, 4]")
        );
        assert!(!matches!(via_module, candle_core::Error::Wrapped(_)));
        Ok(())
    }
}
