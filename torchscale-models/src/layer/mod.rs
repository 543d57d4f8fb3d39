//! One Transformer layer: a sequence of sites, each a [`Residual`](torchscale_core::Residual)
//! around a [`Sublayer`](torchscale_core::Sublayer).
//!
//! The layer only talks to its sublayers through the trait, so a new kind (a retention block,
//! say) is a new site, not an edit of [`Layer`]. torchscale's layout (self-attention, optional
//! cross-attention, FFN or MoE) is built by [`torchscale_layout`].

mod build_cx;
mod site;
mod torchscale_layout;

pub use build_cx::LayerBuildCx;
pub use site::SiteBlock;
pub use torchscale_layout::torchscale_layout;

use candle_core::Tensor;
use candle_nn::VarBuilder;
use torchscale_core::attention::MultiheadAttention;
use torchscale_core::ffn::FeedForward;
use torchscale_core::{Ctx, Error, Multiway, Result, Stabilizer};
use torchscale_moe::MoeLayer;

use crate::build::StackHooks;
use crate::spec::StackSpec;

/// One layer: its sites, run in order on the residual stream.
#[derive(Debug)]
pub struct Layer {
    index: usize,
    sites: Vec<SiteBlock>,
}

impl Layer {
    /// A layer made of `sites`; their names must be distinct (they prefix parameter and buffer
    /// keys, and [`Layer::site`] looks them up).
    pub fn from_sites(index: usize, sites: Vec<SiteBlock>) -> Result<Self> {
        for (j, s) in sites.iter().enumerate() {
            if sites[..j].iter().any(|o| o.name() == s.name()) {
                return Err(Error::invalid(
                    "sites",
                    format!("layer {index} has two sites named `{}`", s.name()),
                ));
            }
        }
        Ok(Self { index, sites })
    }

    /// Layer `index` in torchscale's layout under `vb` (= `layers.{index}`), wired by `st`;
    /// `cross` adds cross-attention, `causal_stack` marks a decoder (no multiway FFN or norms).
    pub fn new(
        spec: &StackSpec,
        st: &dyn Stabilizer,
        index: usize,
        cross: bool,
        causal_stack: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cx = LayerBuildCx {
            index,
            spec,
            stabilizer: st,
            vb,
            cross_attention: cross,
            causal: causal_stack,
        };
        Self::from_sites(index, torchscale_layout(&cx, &StackHooks::default())?)
    }

    /// Index of the layer in its stack.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The sites, in order.
    pub fn sites(&self) -> &[SiteBlock] {
        &self.sites
    }

    /// The site named `name`.
    pub fn site(&self, name: &str) -> Option<&SiteBlock> {
        self.sites.iter().find(|s| s.name() == name)
    }

    /// The sublayer of site `name`, if it is a `T`.
    pub fn sublayer<T: 'static>(&self, name: &str) -> Option<&T> {
        self.site(name).and_then(|s| s.sublayer_as::<T>())
    }

    /// The self-attention module (`self_attn`), if the layer has one.
    pub fn self_attn(&self) -> Option<&MultiheadAttention> {
        self.sublayer("self_attn")
    }

    /// The cross-attention module (`encoder_attn`), if the layer has one.
    pub fn encoder_attn(&self) -> Option<&MultiheadAttention> {
        self.sublayer("encoder_attn")
    }

    /// The dense feed-forward (`ffn`), if this is not an MoE layer.
    pub fn ffn(&self) -> Option<&Multiway<FeedForward>> {
        self.sublayer("ffn")
    }

    /// The MoE layer (`moe_layer`), if this is an MoE layer.
    pub fn moe(&self) -> Option<&MoeLayer> {
        self.sublayer("moe_layer")
    }

    /// `[B, T, C] -> [B, T, C]`: every site in order; MoE and other sublayers push their
    /// auxiliary outputs to `ctx.aux`.
    pub fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let mut x = x.clone();
        for site in &self.sites {
            x = site.forward(&x, ctx)?;
        }
        Ok(x)
    }

    /// Reseeds every sublayer's own draws from `seed` (all sublayers of a layer get the same
    /// seed: one that draws should keep a stream of its own).
    pub fn reseed(&self, seed: u64) {
        for s in &self.sites {
            s.sublayer().reseed(seed);
        }
    }

    /// Every sublayer's work before a training forward (X-MoE's gate rescale).
    pub fn prepare_step(&self) -> Result<()> {
        self.sites
            .iter()
            .try_for_each(|s| s.sublayer().prepare_step())
    }

    /// The expert parameters of the layer's sublayers.
    pub fn expert_parameters(&self) -> Vec<Tensor> {
        self.sites
            .iter()
            .flat_map(|s| s.sublayer().expert_parameters())
            .collect()
    }

    /// The sublayers' buffers, keyed `{site name}.{key}` (relative to the layer).
    pub fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for s in &self.sites {
            for (k, t) in s.sublayer().buffers()? {
                out.push((format!("{}.{k}", s.name()), t));
            }
        }
        Ok(out)
    }
}
