//! # torchscale-core
//!
//! The shared vocabulary of torchscale-rs: the traits every technique plugs into, the error type,
//! and differentiable building blocks that match Microsoft's torchscale 0.3.0 number for number.
//!
//! - Traits: [`Sublayer`] (the `f` of a residual block), [`Residual`] (how `f` joins the stream),
//!   [`Stabilizer`] (a technique: wiring, inner norms, init gains), [`Router`] (MoE routing) and
//!   [`GradClipper`].
//! - Blocks: [`attention::MultiheadAttention`] (self/cross, masks, cache, relative bias, xPos),
//!   [`ffn::FeedForward`], [`layer_norm::LayerNorm`] (with a working backward), embeddings,
//!   [`multiway::Multiway`] wrapping.
//! - [`init::ParamStore`]: parameters under torchscale's state_dict names, with PyTorch's default
//!   init from a seeded generator.
//!
//! **In candle code.** [`Error`] converts into `candle_core::Error`, so `?` works on our calls
//! inside a function returning `candle_core::Result`; [`Residual::forward_with`] wraps a closure
//! that returns candle's `Result`; [`layer_norm::LayerNorm`] is a `candle_nn::Module` and
//! [`ffn::FeedForward`] a `candle_nn::ModuleT`. [`prelude`] brings the traits and everyday types in
//! one `use`; `torchscale_core::candle_core` and `torchscale_core::candle_nn` are the candle this
//! crate was built with.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use torchscale_core::{ffn::{FeedForward, FfnConfig}, init::ParamStore, Activation};
//!
//! # fn main() -> torchscale_core::Result<()> {
//! let store = ParamStore::new(0);
//! let vb = store.var_builder(DType::F32, &Device::Cpu);
//! let cfg = FfnConfig {
//!     embed_dim: 8, ffn_dim: 16, activation: Activation::Gelu,
//!     activation_dropout: 0.0, dropout: 0.0, inner_norm: true, layernorm_eps: 1e-5,
//! };
//! let ffn = FeedForward::new(cfg, 1.0, vb.pp("ffn"))?;
//! let y = ffn.forward(&Tensor::ones((2, 3, 8), DType::F32, &Device::Cpu)?, false)?;
//! assert_eq!(y.dims(), &[2, 3, 8]);
//! assert!(store.get("ffn.ffn_layernorm.weight").is_some());
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod activation;
pub mod attention;
pub mod clip;
pub mod collective;
pub mod dropout;
pub mod embedding;
pub mod error;
pub mod ffn;
pub mod init;
pub mod layer_norm;
pub mod linear;
pub mod local_group;
pub mod multiway;
pub mod prelude;
pub mod residual;
pub mod router;
pub mod sublayer;

pub use activation::Activation;
pub use clip::{ClipReport, GradClipper};
pub use collective::Collective;
pub use error::{Error, Result};
pub use local_group::LocalGroup;
pub use multiway::{Branch, Multiway};
pub use residual::{NormSpec, ParamRole, Residual, Site, Stabilizer, StackKind};
pub use router::{AuxOutput, RouteOptions, Router, Routing, RoutingStats};
pub use sublayer::{Ctx, Sublayer};

pub use candle_core;
pub use candle_nn;

// The README's examples compile and run as doctests, so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
