//! Dropout that is a no-op outside training.

use candle_core::Tensor;

use crate::Result;

/// Inverted dropout with probability `p` when `train` is true; identity otherwise or when `p == 0`.
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if !train || p <= 0.0 {
        return Ok(x.clone());
    }
    Ok(candle_nn::ops::dropout(x, p as f32)?)
}
