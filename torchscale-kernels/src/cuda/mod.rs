//! The fused kernels on CUDA (feature `cuda`): LayerNorm, residual LayerNorm, softmax over the
//! last dimension, exact GELU, label-smoothed cross entropy and the in-place AdamW update, each
//! forward and backward, for f32 / bf16 / f16 tensors with f32 arithmetic.
//!
//! The public functions of the crate route CUDA tensors here when fused kernels are on: the
//! CustomOps' `cuda_fwd` launch the kernels of `kernels/*.cu` (PTX compiled by `build.rs`,
//! JIT-compiled by the driver on first use), and their `bwd` launch the backward kernels on the
//! saved statistics. `linear` and `linear_gelu` use candle's cuBLAS matmul on the flattened
//! rows (see [`crate::linear`]); attention keeps cuBLAS batched products around the fused
//! softmax (see [`crate::attention`]).
//!
//! Without the feature only [`cuda_float`] exists here, and it is always false.

use candle_core::{DType, Tensor};

#[cfg(feature = "cuda")]
pub(crate) mod adamw;
#[cfg(feature = "cuda")]
pub(crate) mod cross_entropy;
#[cfg(feature = "cuda")]
pub(crate) mod gelu;
#[cfg(feature = "cuda")]
mod launch;
#[cfg(feature = "cuda")]
pub(crate) mod norm;
#[cfg(feature = "cuda")]
pub(crate) mod softmax;

#[cfg(feature = "cuda")]
pub use launch::{poisoning, set_poison_outputs, PTX};

/// True when the CUDA kernels take these tensors: all on a CUDA device, each f32, f16 or bf16
/// (always false without the `cuda` feature).
pub(crate) fn cuda_float(ts: &[&Tensor]) -> bool {
    cfg!(feature = "cuda")
        && ts.iter().all(|t| {
            t.device().is_cuda() && matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16)
        })
}
