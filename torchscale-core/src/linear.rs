//! Linear layers with PyTorch's default init, optionally scaled.

use candle_core::Tensor;
use candle_nn::{Linear, VarBuilder};

use crate::init::linear_init;
use crate::Result;

/// A `[out, in]` Linear under `vb` (keys `weight`, `bias`), initialised like `torch.nn.Linear` with
/// weight and bias both multiplied by `gain` (DeepNorm's β, Sub-LN's γ; 1 otherwise).
pub fn linear(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    gain: f64,
    vb: VarBuilder,
) -> Result<Linear> {
    let init = linear_init(in_dim, gain);
    let w = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let b = if bias {
        Some(vb.get_with_hints(out_dim, "bias", init)?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

/// A bias-free `[out, in]` projection initialised N(0, std) (torchscale's output projection uses
/// std = in^-0.5).
pub fn linear_normal(in_dim: usize, out_dim: usize, std: f64, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        candle_nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    )?;
    Ok(Linear::new(w, None))
}

/// `x @ w^T (+ b)` for any leading dimensions: one fused matrix product over all rows on the CPU
/// (`torchscale_kernels::linear`), candle_nn's `Linear` elsewhere.
pub fn apply(l: &Linear, x: &Tensor) -> Result<Tensor> {
    Ok(torchscale_kernels::linear(x, l.weight(), l.bias())?)
}
