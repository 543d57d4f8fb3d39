//! Fused CPU training kernels for torchscale-rs, as candle custom ops that carry their own
//! backward.
//!
//! Each op here replaces a chain of small candle ops (each allocating its output, each adding a
//! node whose gradient candle accumulates into a fresh zero tensor) by one kernel forward and one
//! backward, computes in f32 whatever the input dtype, and reads transposed operands in place.
//! With the `cuda` feature the same ops run on CUDA tensors (see [`cuda`]): kernels of their own
//! for LayerNorm, residual LayerNorm, softmax, GELU, cross entropy and AdamW, cuBLAS products on
//! the flattened rows for the linear layers, cuBLAS batched products around the fused softmax
//! for attention. Each public function falls back to its composed candle version when the
//! tensors are on neither device the kernels cover, when the kernels are switched off (`TORCHSCALE_FUSED=0`, or [`with_fused`] on one thread),
//! or for inputs the kernel does not cover; the tests hold every kernel to its composed version,
//! forward and backward.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use torchscale_kernels::{linear, linear_composed, with_fused};
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let x = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?;
//! let w = Var::randn(0f32, 0.3, (4, 8), &dev)?;
//! let b = Var::zeros(4, candle_core::DType::F32, &dev)?;
//! let fused = linear(&x, &w, Some(&b))?;
//! let composed = with_fused(false, || linear(&x, &w, Some(&b)))?;
//! let diff = (fused - composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-5);
//! let grads = linear(&x, &w, Some(&b))?.sum_all()?.backward()?;
//! assert_eq!(grads.get(&w).unwrap().dims(), &[4, 8]);
//! # let _ = linear_composed; Ok(()) }
//! ```

pub mod activation;
pub mod adamw;
#[cfg(feature = "mimalloc")]
pub mod alloc;
pub mod attention;
mod cpu;
pub mod cross_entropy;
pub mod cuda;
mod gemm;
pub mod grouped;
pub mod layer_norm;
pub mod linear;
pub mod linear_act;
pub mod residual_norm;
pub mod runtime;
pub mod softmax;
pub mod switch;

pub use activation::{gelu_erf, gelu_erf_composed};
pub use attention::{attention, attention_composed, attention_packed, AttentionOptions};
pub use grouped::{
    grouped_layer_norm, grouped_layer_norm_composed, grouped_linear, grouped_linear_composed,
};
pub use layer_norm::{layer_norm, layer_norm_composed};
pub use linear::{linear, linear_composed};
pub use linear_act::{linear_gelu, linear_gelu_composed};
pub use residual_norm::{residual_layer_norm, residual_layer_norm_composed};
pub use softmax::{softmax_last_dim, softmax_last_dim_composed};
pub use switch::{fused_enabled, with_fused};

// The README's examples compile and run as doctests, so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
