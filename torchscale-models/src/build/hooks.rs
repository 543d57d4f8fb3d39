//! Choices made in code rather than in a config: a stabiliser, a router or extra sites defined
//! by the user, per layer.

use std::sync::Arc;

use candle_nn::VarBuilder;
use torchscale_core::{Result, Router, Stabilizer};
use torchscale_moe::MoeConfig;

use crate::layer::{LayerBuildCx, SiteBlock};
use crate::spec::StackSpec;

/// Per layer index, a stabiliser in place of the config's choice (`None`: keep it). The spec's
/// [`kind`](StackSpec::kind) tells the encoder and decoder of an encoder-decoder apart.
pub type StabilizerHook =
    Arc<dyn Fn(&StackSpec, usize) -> Result<Option<Arc<dyn Stabilizer>>> + Send + Sync>;

/// Per MoE layer, a router in place of the config's (`None`: keep it). It gets the layer, the
/// layer's MoE settings and the router's parameters (`layers.{i}.moe_layer.gate`).
pub type RouterHook = Arc<
    dyn Fn(&LayerBuildCx, &MoeConfig, VarBuilder) -> Result<Option<Box<dyn Router>>> + Send + Sync,
>;

/// Per layer, the final list of sites, from the ones the config's layout built: add a site,
/// replace or drop one. New sites build their parameters under `cx.vb`, after the layout's.
pub type SiteHook =
    Arc<dyn Fn(&LayerBuildCx, Vec<SiteBlock>) -> Result<Vec<SiteBlock>> + Send + Sync>;

/// The user's hooks on how a stack's layers are built; every one is optional, and an
/// encoder-decoder runs the same hooks for both stacks.
#[derive(Clone, Default)]
pub struct StackHooks {
    /// Per-layer stabiliser override.
    pub stabilizer: Option<StabilizerHook>,
    /// Per-MoE-layer router override.
    pub router: Option<RouterHook>,
    /// Per-layer site list.
    pub sites: Option<SiteHook>,
}

impl StackHooks {
    /// Sets the stabiliser hook.
    pub fn with_stabilizer(
        mut self,
        f: impl Fn(&StackSpec, usize) -> Result<Option<Arc<dyn Stabilizer>>> + Send + Sync + 'static,
    ) -> Self {
        self.stabilizer = Some(Arc::new(f));
        self
    }

    /// Sets the router hook.
    pub fn with_router(
        mut self,
        f: impl Fn(&LayerBuildCx, &MoeConfig, VarBuilder) -> Result<Option<Box<dyn Router>>>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        self.router = Some(Arc::new(f));
        self
    }

    /// Sets the site hook.
    pub fn with_sites(
        mut self,
        f: impl Fn(&LayerBuildCx, Vec<SiteBlock>) -> Result<Vec<SiteBlock>> + Send + Sync + 'static,
    ) -> Self {
        self.sites = Some(Arc::new(f));
        self
    }

    /// True when no hook is set.
    pub fn is_empty(&self) -> bool {
        self.stabilizer.is_none() && self.router.is_none() && self.sites.is_none()
    }
}

// Closures have no Debug: say which hooks are set.
impl std::fmt::Debug for StackHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackHooks")
            .field("stabilizer", &self.stabilizer.is_some())
            .field("router", &self.router.is_some())
            .field("sites", &self.sites.is_some())
            .finish()
    }
}
