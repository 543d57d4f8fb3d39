//! A per-site mix written in user code: DeepNorm's `LN(α·x + f(x))` (with its β-scaled init) on
//! the attention residuals, Admin's `LN(ω·x + f(x))` on the feed-forward residuals.
//!
//! Both constants are those of the whole stack (DeepNet's α, β for M decoder layers; Admin's ω
//! for its 2M residual sublayers), so each half keeps the init rule it was derived under.

use candle_nn::VarBuilder;
use torchscale_models::torchscale_admin::Admin;
use torchscale_models::torchscale_core::{
    NormSpec, ParamRole, Residual, Result, Site, Stabilizer, StackKind,
};
use torchscale_models::torchscale_norm::DeepNorm;

/// DeepNorm for attention sites, Admin for feed-forward (and MoE) sites.
#[derive(Debug, Clone, Copy)]
pub struct DeepAttnAdminFfn {
    deep: DeepNorm,
    admin: Admin,
}

impl DeepAttnAdminFfn {
    /// The mix for `stack`.
    pub fn for_stack(stack: StackKind) -> Result<Self> {
        Ok(Self {
            deep: DeepNorm::for_stack(stack)?,
            admin: Admin::for_stack(stack)?,
        })
    }

    fn owner(&self, site: Site) -> &dyn Stabilizer {
        match site {
            Site::FeedForward => &self.admin,
            _ => &self.deep,
        }
    }
}

impl Stabilizer for DeepAttnAdminFfn {
    fn name(&self) -> &'static str {
        "deepnorm-attn+admin-ffn"
    }

    fn residual(&self, site: Site, spec: NormSpec, vb: VarBuilder) -> Result<Box<dyn Residual>> {
        self.owner(site).residual(site, spec, vb)
    }

    fn init_gain(&self, site: Site, role: ParamRole) -> f64 {
        self.owner(site).init_gain(site, role)
    }

    fn residual_scale(&self) -> f64 {
        self.deep.residual_scale()
    }
}
