//! The traits and everyday types, for `use torchscale_core::prelude::*`.
//!
//! Traits come in so that their methods (`res.forward(..)`, `res.forward_with(..)`,
//! `stabilizer.residual(..)`, `clipper.clip(..)`) resolve; [`Error`](crate::Error) and
//! [`Result`](crate::Result) stay at the crate root so that a glob import does not shadow the
//! standard `Result`.

pub use crate::activation::Activation;
pub use crate::clip::{ClipReport, GradClipper};
pub use crate::ffn::{FeedForward, FfnConfig};
pub use crate::init::ParamStore;
pub use crate::layer_norm::LayerNorm;
pub use crate::multiway::{Branch, Multiway};
pub use crate::residual::{NormSpec, ParamRole, Residual, Site, Stabilizer, StackKind};
pub use crate::router::{RouteOptions, Router};
pub use crate::sublayer::{Ctx, Sublayer};
pub use candle_core::{DType, Device, Module, ModuleT, Tensor};
pub use candle_nn::VarBuilder;
