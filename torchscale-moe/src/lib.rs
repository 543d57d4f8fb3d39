//! # torchscale-moe
//!
//! Sparse mixture-of-experts as in torchscale 0.3.0 (`component/xmoe`): top-1 and top-2 gating
//! with capacity, the X-MoE low-dimensional cosine router (and, behind a flag, the paper's
//! normalised router with a learnable temperature), the load-balancing loss, and an MoE layer
//! that dispatches tokens by index rather than with dense `[S, E, capacity]` one-hot tensors.
//!
//! - [`MoeConfig`]: the `moe_*` fields and the experts' feed-forward settings.
//! - [`MoeRouter`]: implements [`torchscale_core::Router`]; routing decisions as indices, combine
//!   weights and balance loss in the graph.
//! - Two more routing families: [`DroplessRouter`] (MegaBlocks' dropless top-k, any `k`, no
//!   capacity) and [`ExpertChoiceRouter`] (experts pick their tokens, Zhou et al. 2022).
//!   [`MoeConfig::router`] names one ([`RouterChoice`], serde-tagged); [`build_router`] builds it.
//! - [`MoeLayer`]: `gate.*` + `experts.{j}.*`, [`MoeLayer::forward`] on `[S, C]` rows and
//!   [`MoeLayer::forward_ctx`] / [`torchscale_core::Sublayer`] on `[B, T, C]`. The router is a
//!   plug-in: [`MoeLayer::with_router`] (and [`MoeLayer::expert_parallel_with_router`]) take any
//!   `Box<dyn Router>`, one written in user code included.
//! - [`parallel`]: the expert-parallelism seam ([`ExpertComm`]; [`CollectiveComm`] runs it on
//!   any [`torchscale_core::Collective`] with [`all_to_all::all_to_all_rows`], differentiable).
//!
//! **One dependency.** This crate re-exports what its API takes and returns ([`RouteOptions`],
//! [`Routing`], [`RoutingStats`], [`Router`], [`Sublayer`]/[`Ctx`], [`Activation`],
//! [`FeedForward`]/[`FfnConfig`] (the experts), [`ParamStore`], [`Error`], [`Result`]), the candle
//! it was built with ([`candle_core`], [`candle_nn`]) and [`torchscale_core`] itself; [`prelude`]
//! brings the layer, its config, the traits and everyday types in one `use`. Our [`Error`]
//! converts into `candle_core::Error`, so `?` works on these calls in candle code.
//!
//! ```
//! use torchscale_moe::prelude::*;
//!
//! # fn main() -> torchscale_moe::Result<()> {
//! let cfg = MoeConfig {
//!     embed_dim: 8, ffn_dim: 16, num_experts: 4, use_xmoe: true, ..Default::default()
//! }
//! .validated()?;
//! let store = ParamStore::new(0);
//! let moe = MoeLayer::new(cfg, 1.0, store.var_builder(DType::F32, &Device::Cpu))?;
//! let x = Tensor::randn(0f32, 1.0, (12, 8), &Device::Cpu)?;
//! let out = moe.forward(&x, &RouteOptions { train: true, seed: Some(7), ..Default::default() })?;
//! assert_eq!(out.output.dims(), &[12, 8]);
//! // Training top-2 capacity: 2 * ceil(12 / 4) = 6 slots per expert.
//! assert_eq!(out.stats.capacity, 6);
//! assert!(out.balance_loss.to_scalar::<f32>()? > 0.0);
//! assert!(store.get("gate.wg").is_some() && store.get("experts.3.fc2.weight").is_some());
//!
//! // Dropless top-3: nothing is dropped, every token gets 3 experts.
//! let router = RouterChoice::Dropless { k: 3 };
//! let cfg = MoeConfig { embed_dim: 8, ffn_dim: 16, num_experts: 4, router, ..Default::default() };
//! let moe = MoeLayer::new(cfg, 1.0, ParamStore::new(1).var_builder(DType::F32, &Device::Cpu))?;
//! let out = moe.forward(&x, &RouteOptions { train: true, ..Default::default() })?;
//! assert_eq!(out.stats.tokens_per_expert.iter().sum::<usize>(), 12 * 3);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod all_to_all;
pub mod balance_loss;
pub mod capacity;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dispatch;
pub mod expert_compute;
mod grouped;
pub mod layer;
pub mod parallel;
pub mod router;

pub use config::{MoeConfig, SecondExpertPolicy};
pub use dispatch::DispatchPlan;
pub use expert_compute::{expert_compute, set_expert_compute, ExpertCompute};
pub use layer::{MoeLayer, MoeOutput};
pub use parallel::{CollectiveComm, ExpertComm, InProcessGroup, SingleProcess};
pub use router::{
    build_router, DroplessRouter, ExpertChoiceRouter, Gate, MoeRouter, RouterChoice, XMoeGate,
};
pub use torchscale_core::router::ChoiceStatus;

// What the API takes and returns, so that this crate is the only dependency a user needs.
pub use candle_core;
pub use candle_nn;
pub use torchscale_core;
pub use torchscale_core::ffn::{FeedForward, FfnConfig};
pub use torchscale_core::init::ParamStore;
pub use torchscale_core::{
    Activation, AuxOutput, Ctx, Error, Result, RouteOptions, Router, Routing, RoutingStats,
    Sublayer,
};

/// The MoE layer, its config and router, the traits and everyday types, for
/// `use torchscale_moe::prelude::*` ([`Error`] and [`Result`] stay at the crate root, so that the
/// standard `Result` is not shadowed).
pub mod prelude {
    pub use crate::{
        build_router, DroplessRouter, ExpertChoiceRouter, ExpertComm, MoeConfig, MoeLayer,
        MoeOutput, MoeRouter, RouterChoice, SecondExpertPolicy, SingleProcess,
    };
    pub use torchscale_core::prelude::*;
    pub use torchscale_core::{Routing, RoutingStats};
}

// The README's examples compile and run as doctests, so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
