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

/// Stochastic depth (timm's `DropPath`): each sample of the batch (dimension 0) is dropped with
/// probability `p` and the survivors are scaled by `1/(1-p)`; identity outside training.
pub fn drop_path(x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if !train || p <= 0.0 {
        return Ok(x.clone());
    }
    let b = x.dim(0)?;
    let mut shape = vec![1usize; x.rank()];
    shape[0] = b;
    let keep = Tensor::rand(0f32, 1f32, b, x.device())?
        .ge(p as f32)?
        .to_dtype(x.dtype())?;
    let keep = (keep.reshape(shape)? / (1.0 - p))?;
    Ok(x.broadcast_mul(&keep)?)
}
