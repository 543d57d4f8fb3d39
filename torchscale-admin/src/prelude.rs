//! The Admin builder, its residual, the traits and everyday types, for
//! `use torchscale_admin::prelude::*`.
//!
//! [`Error`](crate::Error) and [`Result`](crate::Result) stay at the crate root so that a glob
//! import does not shadow the standard `Result`.

pub use crate::{as_residual, Admin, AdminBuilder, Omega, OmegaResidual, OutputChangeScale};
pub use torchscale_core::prelude::*;
