//! # torchscale-admin
//!
//! Admin (Liu et al., "Understanding the Difficulty of Training Transformers"), in the
//! profiling-free form of admin-torch 0.1.0: every residual block of a Post-LN transformer
//! becomes `LN(x·ω + f(x))` with one closed-form ω for the stack ([`omega::omega`]), a fixed
//! buffer or a learnable per-channel vector. It depends on `torchscale-core` and candle only, and
//! wraps any function, so it plugs into a transformer written with plain `candle_nn`.
//!
//! - [`as_residual`]`(n)` → [`AdminBuilder`] → [`OmegaResidual`], for your own model
//!   (admin-torch's `as_module`).
//! - [`Admin`]: the same as a [`torchscale_core::Stabilizer`], for torchscale-style stacks.
//!
//! Parameter layout of [`AdminBuilder::build`]: the LayerNorm's `weight`/`bias` go under the
//! `norm_vb` you pass, ω under `omega_vb` as `omega`. admin-torch's own example keeps them in two
//! lists (`layer_norms.i.*`, `residuals.i.omega`); [`Admin`] uses `<site norm>.*` and
//! `<site>_residual.omega` inside the layer (see [`omega_prefix`]).
//!
//! **One dependency.** This crate re-exports what its API takes and returns ([`NormSpec`],
//! [`Residual`], [`ParamStore`], [`LayerNorm`], [`Multiway`]/[`Branch`], [`Error`], [`Result`]),
//! the candle it was built with ([`candle_core`], [`candle_nn`]) and [`torchscale_core`] itself;
//! [`prelude`] brings the builder, the traits and everyday types in one `use`.
//! [`OmegaResidual::forward_with`] takes a closure returning candle's `Result`, and our
//! [`Error`] converts into `candle_core::Error`, so a candle model uses it with plain `?`:
//!
//! ```
//! use torchscale_admin::candle_core::{self, DType, Device, Module, Tensor};
//! use torchscale_admin::candle_nn::{linear, Linear};
//! use torchscale_admin::{as_residual, NormSpec, OmegaResidual, ParamStore};
//!
//! /// One sublayer of your own candle model, wrapped as `LN(x·ω + f(x))`.
//! fn block(res: &OmegaResidual, mlp: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
//!     Ok(res.forward_with(x, |h| mlp.forward(h)?.gelu_erf())?)
//! }
//!
//! # fn main() -> torchscale_admin::Result<()> {
//! let store = ParamStore::new(0);
//! let vb = store.var_builder(DType::F32, &Device::Cpu);
//! let spec = NormSpec { dim: 8, eps: 1e-5, multiway: false };
//! // An encoder of 3 layers has 6 residual sublayers.
//! let res = as_residual(6).build(spec, vb.pp("ln0"), vb.pp("res0"))?;
//! assert!((res.omega().init_value() - 1.6116105).abs() < 1e-6);
//!
//! let mlp = linear(8, 8, vb.pp("mlp"))?;
//! let x = Tensor::ones((2, 5, 8), DType::F32, &Device::Cpu)?;
//! let y = block(&res, &mlp, &x)?;
//! assert_eq!(y.dims(), &[2, 5, 8]);
//! // Each row is layer-normalised (unit weight, zero bias at init): mean 0.
//! let mean = y.mean_keepdim(2)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(mean < 1e-5);
//! assert!(store.get("ln0.weight").is_some() && store.get("mlp.weight").is_some());
//!
//! // A learnable per-channel omega instead of the fixed buffer:
//! let res = as_residual(6)
//!     .output_change_scale("O(1)".parse()?)
//!     .as_parameter(8)
//!     .build(spec, vb.pp("ln1"), vb.pp("res1"))?;
//! assert_eq!(store.get("res1.omega").map(|v| v.dims().to_vec()), Some(vec![8]));
//! // Our closures work too (`forward`, with our `Result`).
//! let y = res.forward(&x, &mut |h| Ok((h * 0.5)?))?;
//! assert_eq!(y.dims(), &[2, 5, 8]);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod omega;
pub mod prelude;
pub mod residual;

pub use omega::{omega, OutputChangeScale};
pub use residual::{Omega, OmegaResidual};

// What the API takes and returns, so that this crate is the only dependency a user needs.
pub use candle_core;
pub use candle_nn;
pub use torchscale_core;
pub use torchscale_core::init::ParamStore;
pub use torchscale_core::layer_norm::LayerNorm;
pub use torchscale_core::{
    Branch, Error, Multiway, NormSpec, Residual, Result, Site, Stabilizer, StackKind,
};

use candle_nn::VarBuilder;

/// Starts an Admin residual for a stack of `num_residual_layers` residual sublayers (2 per encoder
/// layer, 3 per decoder layer with cross-attention). Defaults: `output_change_scale = default`,
/// ω a fixed buffer.
pub fn as_residual(num_residual_layers: usize) -> AdminBuilder {
    AdminBuilder {
        num_residual_layers,
        scale: OutputChangeScale::Default,
        embed_dim: None,
    }
}

/// Options of an Admin residual; see [`as_residual`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminBuilder {
    num_residual_layers: usize,
    scale: OutputChangeScale,
    embed_dim: Option<usize>,
}

impl AdminBuilder {
    /// How the output change scales with depth (picks ω).
    pub fn output_change_scale(mut self, scale: OutputChangeScale) -> Self {
        self.scale = scale;
        self
    }

    /// Makes ω a learnable vector of width `embed_dim` instead of a fixed `[1]` buffer.
    pub fn as_parameter(mut self, embed_dim: usize) -> Self {
        self.embed_dim = Some(embed_dim);
        self
    }

    /// The initial ω.
    pub fn omega_value(&self) -> Result<f64> {
        omega(self.num_residual_layers, self.scale)
    }

    /// ω alone (admin-torch's `OmegaResidual`), under `vb` as `omega`.
    pub fn build_omega(&self, vb: VarBuilder) -> Result<Omega> {
        let init = self.omega_value()?;
        match self.embed_dim {
            Some(d) => Omega::parameter(init, d, vb),
            None => Omega::buffer(init, vb),
        }
    }

    /// `LN(x·ω + f(x))`: the LayerNorm of width `spec.dim` under `norm_vb` (`weight`, `bias`, or
    /// `A.*`/`B.*` when multiway), ω under `omega_vb` (`omega`).
    pub fn build(
        &self,
        spec: NormSpec,
        norm_vb: VarBuilder,
        omega_vb: VarBuilder,
    ) -> Result<OmegaResidual> {
        if let Some(d) = self.embed_dim {
            if d != spec.dim {
                return Err(Error::config(
                    "embed_dim",
                    format!(
                        "omega width {d} differs from the LayerNorm width {}",
                        spec.dim
                    ),
                ));
            }
        }
        let omega = self.build_omega(omega_vb)?;
        let norm = Multiway::new(spec.multiway, norm_vb, |vb| {
            LayerNorm::new(spec.dim, spec.eps, vb)
        })?;
        Ok(OmegaResidual::new(omega, norm))
    }
}

/// Where [`Admin`] stores ω of a site, next to the site's LayerNorm: `self_attn_residual`,
/// `encoder_attn_residual`, `ffn_residual` (key `<prefix>.omega`); a custom site `name` (its norm
/// key) stores it under `name` with a `_layer_norm` suffix replaced by `_residual`.
pub fn omega_prefix(site: Site) -> std::borrow::Cow<'static, str> {
    match site {
        Site::SelfAttention => "self_attn_residual".into(),
        Site::CrossAttention => "encoder_attn_residual".into(),
        Site::FeedForward => "ffn_residual".into(),
        Site::Custom(name) => format!(
            "{}_residual",
            name.strip_suffix("_layer_norm").unwrap_or(name)
        )
        .into(),
    }
}

/// Admin as a technique: `LN(ω·x + f(x))` at every site, default init, no final LayerNorm.
///
/// `n` is the stack's [`StackKind::residual_sublayers`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Admin {
    builder: AdminBuilder,
    as_parameter: bool,
    omega: f64,
}

impl Admin {
    /// The default (`O(logn)` ω, fixed buffer) for `stack`.
    pub fn for_stack(stack: StackKind) -> Result<Self> {
        Self::new(stack, OutputChangeScale::Default, false)
    }

    /// With a chosen output-change scale and, if `as_parameter`, a learnable per-channel ω (of the
    /// residual's `NormSpec::dim`).
    pub fn new(stack: StackKind, scale: OutputChangeScale, as_parameter: bool) -> Result<Self> {
        let builder = as_residual(stack.residual_sublayers()).output_change_scale(scale);
        let omega = builder.omega_value()?;
        Ok(Self {
            builder,
            as_parameter,
            omega,
        })
    }

    /// The initial ω of every residual of the stack.
    pub fn omega(&self) -> f64 {
        self.omega
    }
}

impl Stabilizer for Admin {
    fn name(&self) -> &'static str {
        "admin"
    }

    fn residual(&self, site: Site, spec: NormSpec, vb: VarBuilder) -> Result<Box<dyn Residual>> {
        // The width of a learnable ω is only known here, from the residual's norm.
        let b = if self.as_parameter {
            self.builder.as_parameter(spec.dim)
        } else {
            self.builder
        };
        Ok(Box::new(b.build(
            spec,
            vb.pp(site.norm_name()),
            vb.pp(omega_prefix(site)),
        )?))
    }

    fn residual_scale(&self) -> f64 {
        self.omega
    }

    /// The LayerNorm, plus a learnable ω of the norm's width (a buffer ω is no parameter).
    fn residual_param_count(&self, _site: Site, spec: NormSpec) -> usize {
        let omega = if self.as_parameter { spec.dim } else { 0 };
        spec.norm_param_count().saturating_add(omega)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use torchscale_core::init::ParamStore;
    use torchscale_core::ParamRole;

    const SPEC: NormSpec = NormSpec {
        dim: 4,
        eps: 1e-5,
        multiway: false,
    };

    #[test]
    fn admin_counts_residual_sublayers_of_the_stack() -> Result<()> {
        // Decoder of an enc-dec: 3 sublayers per layer, so 4 layers give n = 12 (SPEC.md 6.2).
        let dec = StackKind::DecoderOfEncDec {
            encoder_layers: 4,
            decoder_layers: 4,
        };
        approx::assert_abs_diff_eq!(Admin::for_stack(dec)?.omega(), 2.0170, epsilon = 5e-5);
        // Encoder of 6 layers: n = 12 too; O(1) gives sqrt(12).
        let enc = StackKind::Encoder { layers: 6 };
        let a = Admin::new(enc, OutputChangeScale::O1, false)?;
        approx::assert_abs_diff_eq!(a.omega(), 3.4641, epsilon = 5e-5);
        assert_eq!(a.residual_scale(), a.omega());
        assert!(Admin::for_stack(StackKind::Encoder { layers: 0 }).is_err());
        Ok(())
    }

    #[test]
    fn admin_stabilizer_layout_and_defaults() -> Result<()> {
        let store = ParamStore::new(0);
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let stack = StackKind::Decoder { layers: 2 };
        let buf = Admin::for_stack(stack)?;
        let _ = buf.residual(Site::SelfAttention, SPEC, vb.pp("a"))?;
        let par = Admin::new(stack, OutputChangeScale::OLogN, true)?;
        let r = par.residual(Site::FeedForward, SPEC, vb.pp("b"))?;
        let names: Vec<String> = store.named_vars().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            names,
            [
                "a.self_attn_layer_norm.bias",
                "a.self_attn_layer_norm.weight",
                "b.ffn_residual.omega",
                "b.final_layer_norm.bias",
                "b.final_layer_norm.weight",
            ]
        );
        let omega = store
            .get("b.ffn_residual.omega")
            .ok_or_else(|| Error::invalid("omega", "missing"))?;
        let want = omega::omega(4, OutputChangeScale::OLogN)? as f32;
        assert_eq!(omega.as_tensor().to_vec1::<f32>()?, vec![want; 4]);
        // The sublayer sees x; the block is LN(ω·x + f(x)) with f(h) = h².
        let x = Tensor::new(&[[1.0f32, 2.0, 3.0, 5.0]], &Device::Cpu)?;
        let y = r.forward(&x, &mut |h| Ok(h.sqr()?))?;
        let y: Vec<f32> = y.flatten_all()?.to_vec1()?;
        let w = omega::omega(4, OutputChangeScale::OLogN)?;
        let row: Vec<f64> = [1.0f64, 2.0, 3.0, 5.0]
            .iter()
            .map(|v| v * w + v * v)
            .collect();
        let mean = row.iter().sum::<f64>() / 4.0;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 4.0;
        for (g, v) in y.iter().zip(&row) {
            approx::assert_abs_diff_eq!(
                *g as f64,
                (v - mean) / (var + 1e-5).sqrt(),
                epsilon = 1e-5
            );
        }
        for site in [Site::SelfAttention, Site::CrossAttention, Site::FeedForward] {
            assert!(!par.inner_norm(site));
            for role in [ParamRole::Query, ParamRole::Value, ParamRole::Fc2] {
                assert_eq!(par.init_gain(site, role), 1.0);
            }
        }
        assert!(!par.final_norm());
        assert_eq!(par.name(), "admin");
        Ok(())
    }

    #[test]
    fn parameter_width_must_match_norm_width() {
        let store = ParamStore::new(0);
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let err = as_residual(4)
            .as_parameter(5)
            .build(SPEC, vb.pp("n"), vb.pp("o"))
            .unwrap_err();
        assert!(matches!(err, Error::Config { ref field, .. } if field == "embed_dim"));
        assert!(as_residual(0).build(SPEC, vb.pp("n"), vb.pp("o")).is_err());
    }
}

// The README's examples compile and run as doctests, so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
