//! CUDA kernels for the MoE layer (feature `cuda`): routing decisions (top-k with capacity by a
//! fused per-expert cumsum), dispatch into the expert buffer and the gate-weighted combine,
//! each with its backward, for f32, bf16 and f16.
//!
//! - [`route_decisions`]: the GPU version of the host router's assignment (f32 gating).
//! - [`dispatch`] / [`combine`]: candle custom ops (CUDA kernels, host loops on the CPU) with
//!   `bwd`, over a [`DispatchIndex`] in torchscale's `[E * capacity, C]` layout or a compact one.
//! - [`experts_forward`]: what [`crate::MoeLayer`] runs when its input is on a CUDA device.
//! - [`mixed`]: bf16 compute with f32 master weights.
//!
//! `build.rs` compiles `kernels/*.cu` to PTX with nvcc; the driver JIT-compiles it on first use.

mod experts;
pub mod host;
pub mod index;
mod launch;
pub mod mixed;
mod ops;
pub mod route;

pub use experts::experts_forward;
pub use index::{DispatchIndex, Layout, NONE};
pub use launch::{poisoning, set_poison_outputs, DISPATCH_PTX};
pub use ops::{combine, dispatch};
pub use route::{draws_from_uniform, route_decisions, status_of, GpuRoute, RouteParams, ROUTE_PTX};
