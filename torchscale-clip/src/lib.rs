//! # torchscale-clip
//!
//! Gradient clipping for candle, as implementations of torchscale-core's [`GradClipper`]:
//!
//! - [`GlobalNorm`]: `torch.nn.utils.clip_grad_norm_` — one L2 norm over every gradient.
//! - [`SparseClip`]: the MoE-aware clipping of torchscale's fairseq example, where expert
//!   gradients count `1 / max(world_size, num_experts)` towards the squared norm.
//!
//! Both compute the norm in f32 as a norm of per-tensor norms, use
//! `coef = min(1, max_norm / (total + 1e-6))`, do nothing when `max_norm <= 0`, skip parameters
//! that have no gradient, and read and scale only the listed parameters' gradients.
//!
//! **Experts over several ranks.** [`ExpertParallel`] wraps either clipper for expert-parallel
//! runs (each rank holds its own experts' gradients): the experts' part of the squared norm is
//! summed over the ranks of a [`torchscale_core::Collective`], so every rank clips with the norm
//! of one process holding every gradient.
//!
//! **Expert gradients under SparseClip.** torchscale 0.3.0 divides a *copy* of each expert
//! gradient and clips that copy, so the real expert gradients are never scaled. That is evidently
//! not the intent, so [`SparseClip::new`] scales expert gradients by the coefficient like the
//! dense ones ([`ExpertGrads::Clip`]); [`SparseClip::torchscale_compat`]
//! ([`ExpertGrads::Unchanged`]) reproduces the published behaviour for bit-parity with torchscale
//! runs. The norm and the coefficient are the same in both modes.
//!
//! **Non-finite norms.** When the norm is NaN or infinite no gradient is touched: the report
//! carries the non-finite `total_norm` with `coef = 1` and `clipped = false`, and the trainer's
//! guard decides to skip the step (scaling by a NaN coefficient would only spread the NaN).
//!
//! **One dependency.** This crate re-exports what its API takes and returns ([`GradClipper`],
//! [`ClipReport`], [`Error`], [`Result`]), the candle it was built with ([`candle_core`] — whose
//! `Var` and `backprop::GradStore` the clippers take —, [`candle_nn`]) and [`torchscale_core`]
//! itself; [`prelude`] brings the clippers, the trait and everyday types in one `use`.
//!
//! ```
//! use torchscale_clip::prelude::*;
//!
//! # fn main() -> torchscale_clip::Result<()> {
//! let dev = Device::Cpu;
//! let w = Var::new(&[1f32, 1.0], &dev)?;
//! let e = Var::new(&[1f32, 1.0], &dev)?;
//! // d(loss)/dw = [3, 4] (norm 5), d(loss)/de = [0, 6].
//! let loss = (w.as_tensor() * Tensor::new(&[3f32, 4.0], &dev)?)?.sum_all()?
//!     .add(&(e.as_tensor() * Tensor::new(&[0f32, 6.0], &dev)?)?.sum_all()?)?;
//!
//! // SparseClip with 4 experts: total = sqrt(25 + 36 / 4) = sqrt(34).
//! let mut grads = loss.backward()?;
//! let report = SparseClip::new(1.0, 4, 1).clip(&mut grads, &[w.clone()], &[e.clone()])?;
//! assert!((report.total_norm - 34f64.sqrt()).abs() < 1e-5);
//! assert!(report.clipped);
//! let gw = grads.get(&w).unwrap().to_vec1::<f32>()?;
//! assert!((gw[0] as f64 - 3.0 * report.coef).abs() < 1e-6);
//!
//! // Global norm: sqrt(9 + 16 + 36) = sqrt(61); max_norm 0 only measures.
//! let mut grads = loss.backward()?;
//! let report = GlobalNorm::new(0.0).clip(&mut grads, &[w], &[e])?;
//! assert!((report.total_norm - 61f64.sqrt()).abs() < 1e-5);
//! assert!(!report.clipped);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod expert_parallel;
mod global_norm;
mod norm;
mod sparse_clip;

pub use expert_parallel::ExpertParallel;
pub use global_norm::GlobalNorm;
pub use sparse_clip::{ExpertGrads, SparseClip};
pub use torchscale_core::{ClipReport, GradClipper};

// What the API takes and returns, so that this crate is the only dependency a user needs.
pub use candle_core;
pub use candle_nn;
pub use torchscale_core;
pub use torchscale_core::{Error, Result};

/// The clippers, their trait and everyday types (candle's `Var` and `GradStore` included), for
/// `use torchscale_clip::prelude::*` ([`Error`] and [`Result`] stay at the crate root, so that
/// the standard `Result` is not shadowed).
pub mod prelude {
    pub use crate::{ExpertGrads, ExpertParallel, GlobalNorm, SparseClip};
    pub use candle_core::backprop::GradStore;
    pub use candle_core::Var;
    pub use torchscale_core::prelude::*;
}

/// Builds the report from the f32 norm and the coefficient (`None`: nothing was applied).
fn report(total: f32, coef: Option<f32>) -> ClipReport {
    let coef = coef.unwrap_or(1.0) as f64;
    ClipReport {
        total_norm: total as f64,
        coef,
        clipped: coef < 1.0,
    }
}

// The README's examples compile and run as doctests, so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
