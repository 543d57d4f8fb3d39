//! Naming a routing family in a config: [`RouterChoice`] and [`build_router`].

use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use torchscale_core::{Result, Router};

use super::dropless::check_k;
use super::expert_choice::check_capacity_factor;
use super::{DroplessRouter, ExpertChoiceRouter, MoeRouter};
use crate::config::MoeConfig;

/// Which built-in router an MoE layer builds (`MoeConfig::router`). Serialised with a `kind`
/// tag: `{"kind": "capacity"}`, `{"kind": "dropless", "k": 2}`,
/// `{"kind": "expert_choice", "capacity_factor": 1.0}`.
///
/// A router written in user code does not need a variant: hand it to
/// [`crate::MoeLayer::with_router`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RouterChoice {
    /// torchscale's top-1 / top-2 with capacity, GShard or X-MoE as the MoeConfig flags say.
    #[default]
    Capacity,
    /// Dropless top-k ([`DroplessRouter`]), `k` in `1..=E`.
    Dropless {
        /// Experts per token.
        k: usize,
    },
    /// Expert choice ([`ExpertChoiceRouter`]): each expert takes
    /// `ceil(capacity_factor · S / E)` tokens.
    ExpertChoice {
        /// Tokens per expert relative to an even share `S / E`; finite and positive.
        capacity_factor: f64,
    },
}

impl RouterChoice {
    /// Checks the variant's fields for `num_experts` experts; errors name `{field}.k` or
    /// `{field}.capacity_factor`.
    pub fn validate(&self, num_experts: usize, field: &str) -> Result<()> {
        match self {
            RouterChoice::Capacity => Ok(()),
            RouterChoice::Dropless { k } => check_k(*k, num_experts, field),
            RouterChoice::ExpertChoice { capacity_factor } => {
                check_capacity_factor(*capacity_factor, field)
            }
        }
    }

    /// True for the default ([`RouterChoice::Capacity`]).
    pub fn is_capacity(&self) -> bool {
        *self == RouterChoice::Capacity
    }
}

/// Builds the router `choice` names, with the gate of `cfg` under `vb` (by convention the
/// layer's `gate` scope: [`crate::MoeLayer::new`] passes `vb.pp("gate")`).
pub fn build_router(
    choice: &RouterChoice,
    cfg: &MoeConfig,
    vb: VarBuilder,
) -> Result<Box<dyn Router>> {
    choice.validate(cfg.num_experts, "router")?;
    Ok(match choice {
        RouterChoice::Capacity => Box::new(MoeRouter::new(cfg, vb)?),
        RouterChoice::Dropless { k } => Box::new(DroplessRouter::new(cfg, *k, vb)?),
        RouterChoice::ExpertChoice { capacity_factor } => {
            Box::new(ExpertChoiceRouter::new(cfg, *capacity_factor, vb)?)
        }
    })
}
