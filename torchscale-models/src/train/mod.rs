//! Training pieces: AdamW with parameter groups, learning-rate schedules, label-smoothed cross
//! entropy and the MoE balance loss, a NaN/inf step guard and gradient accumulation.
//!
//! Gradient clipping lives in the `torchscale-clip` crate ([`torchscale_clip::GlobalNorm`],
//! [`torchscale_clip::SparseClip`]).
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use torchscale_models::train::{
//!     check_step, label_smoothed_cross_entropy, AdamW, AdamWConfig, InverseSqrt, LrSchedule,
//! };
//!
//! # fn main() -> torchscale_core::Result<()> {
//! let w = Var::from_tensor(&Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu)?)?;
//! let params = vec![("out.weight".to_string(), w.clone())];
//! let mut opt = AdamW::new(params.clone(), AdamWConfig::default())?;
//! let sched = InverseSqrt { warmup_init_lr: 1e-7, ..InverseSqrt::new(5e-4, 4000) };
//!
//! let x = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &Device::Cpu)?;
//! let target = Tensor::new(&[2u32, 1], &Device::Cpu)?; // class 1 is padding here
//! let logits = x.matmul(w.as_tensor())?;
//! let out = label_smoothed_cross_entropy(&logits, &target, 0.1, Some(1))?;
//! assert_eq!(out.ntokens, 1);
//! let grads = out.loss_sum.backward()?;
//! if check_step(&out.loss_sum, &grads, &params)?.is_none() {
//!     opt.set_lr(sched.lr(opt.num_updates()))?;
//!     // `Some(reason)` would mean the update overflowed and nothing was changed.
//!     assert_eq!(opt.step(&grads)?, None);
//! }
//! assert_eq!(opt.num_updates(), 1);
//! # Ok(()) }
//! ```

mod accumulate;
mod checkpointing;
mod data_parallel;
mod guard;
mod loss;
mod optimizer;
mod schedule;
mod trainer;
mod zero;

pub use accumulate::GradAccumulator;
pub use checkpointing::{CheckpointedBackward, HeadLoss};
pub use data_parallel::{bucket_plan, DEFAULT_BUCKET_BYTES};
pub use guard::{check_grad_norm, check_grads, check_loss, check_step, SkipReason, StepGuard};
pub use loss::{label_smoothed_cross_entropy, moe_balance_loss, AuxCombine, SmoothedLoss};
pub use optimizer::{default_decay, AdamW, AdamWConfig};
pub use schedule::{InverseSqrt, LrSchedule, PolynomialDecay, Schedule};
pub use trainer::{ClipMode, MicroBatch, StepCtx, StepReport, Trainer, TrainerConfig};
pub use zero::ZeroAdamW;
