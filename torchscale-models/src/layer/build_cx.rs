//! What the builder of a layer's sites knows about the layer: its index, the stack, its
//! stabiliser and where its parameters live.

use candle_nn::VarBuilder;
use torchscale_core::{NormSpec, Residual, Result, Site, Stabilizer};

use crate::spec::StackSpec;

/// The layer being built, as the default layout and a [site hook](crate::build::SiteHook) see it.
#[derive(Clone)]
pub struct LayerBuildCx<'a> {
    /// Index of the layer in its stack.
    pub index: usize,
    /// The stack description.
    pub spec: &'a StackSpec,
    /// This layer's stabiliser (the config's technique, a `layer_techniques` entry or a hook's).
    pub stabilizer: &'a dyn Stabilizer,
    /// The layer's parameters (`layers.{index}`); a site's keys go under `vb.pp(site name)`.
    pub vb: VarBuilder<'a>,
    /// The layer has cross-attention (decoder of an encoder-decoder).
    pub cross_attention: bool,
    /// The layer belongs to a causal (decoder) stack, whose norms and FFN are never multiway.
    pub causal: bool,
}

impl std::fmt::Debug for LayerBuildCx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerBuildCx")
            .field("index", &self.index)
            .field("stabilizer", &self.stabilizer.name())
            .field("cross_attention", &self.cross_attention)
            .field("causal", &self.causal)
            .finish_non_exhaustive()
    }
}

impl LayerBuildCx<'_> {
    /// The norm shape of `site`: multiway in a multiway encoder, except cross-attention's.
    pub fn norm_spec(&self, site: Site) -> NormSpec {
        NormSpec {
            dim: self.spec.embed_dim,
            eps: self.spec.layernorm_eps,
            multiway: self.spec.multiway && !self.causal && site != Site::CrossAttention,
        }
    }

    /// The residual of `site` from this layer's stabiliser, its norm under
    /// `layers.{index}.{site.norm_name()}`.
    pub fn residual(&self, site: Site) -> Result<Box<dyn Residual>> {
        self.stabilizer
            .residual(site, self.norm_spec(site), self.vb.clone())
    }

    /// This layer's stochastic depth rate.
    pub fn drop_path(&self) -> f64 {
        self.spec.drop_path(self.index)
    }
}
