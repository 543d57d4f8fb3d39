//! # torchscale-norm
//!
//! The residual wirings and init scalings of torchscale 0.3.0, as implementations of
//! [`torchscale_core::Stabilizer`] (the technique) and [`torchscale_core::Residual`] (one block):
//!
//! | technique | residual | inner norms | init gain of v/out/fc1/fc2 | final norm | file |
//! |---|---|---|---|---|---|
//! | [`PostLn`] | `LN(x + f(x))` | no | 1 | no | `post_ln.rs` |
//! | [`PreLn`] | `x + f(LN(x))` | no | 1 | yes | `pre_ln.rs` |
//! | [`DeepNorm`] | `LN(α·x + f(x))` | no | β | no | `deepnorm.rs` |
//! | [`SubLn`] | `x + f(LN(x))` | self-attn, FFN | γ (not cross-attn) | yes | `subln.rs` |
//!
//! Each residual owns its LayerNorm, built under `vb.pp(site.norm_name())`, so its keys are
//! torchscale's (`self_attn_layer_norm.weight`, `final_layer_norm.A.bias` when multiway, ...).
//!
//! **One dependency.** This crate re-exports what its API takes and returns ([`Stabilizer`],
//! [`Residual`], [`NormSpec`], [`Site`], [`StackKind`], [`ParamRole`], [`LayerNorm`],
//! [`Multiway`]/[`Branch`], [`ParamStore`], [`Error`], [`Result`]), the candle it was built with
//! ([`candle_core`], [`candle_nn`]) and [`torchscale_core`] itself; [`prelude`] brings the
//! techniques, the traits and everyday types in one `use`. A residual wraps a closure returning
//! candle's `Result` with [`Residual::forward_with`], and `?` turns our [`Error`] into
//! `candle_core::Error` in candle code.
//!
//! ```
//! use torchscale_norm::prelude::*;
//! use torchscale_norm::{stabilizer_for, Technique};
//!
//! # fn main() -> torchscale_norm::Result<()> {
//! let stack = StackKind::Encoder { layers: 6 };
//! let deepnorm = stabilizer_for(Technique::DeepNorm, stack)?;
//! // DeepNet's constants for a 6-layer encoder: α = 12^(1/4), β = 48^(-1/4).
//! assert!((deepnorm.residual_scale() - 1.8612).abs() < 1e-4);
//! assert!((deepnorm.init_gain(Site::FeedForward, ParamRole::Fc1) - 0.3799).abs() < 1e-4);
//!
//! let store = ParamStore::new(0);
//! let vb = store.var_builder(DType::F32, &Device::Cpu);
//! let spec = NormSpec { dim: 8, eps: 1e-5, multiway: false };
//! let res = deepnorm.residual(Site::SelfAttention, spec, vb.pp("layers.0"))?;
//! let x = Tensor::ones((2, 3, 8), DType::F32, &Device::Cpu)?;
//! // Any function can be the sublayer, here one returning candle's `Result`: f(h) = 2h, so the
//! // block is LN((α + 2)·x).
//! let y = res.forward_with(&x, |h| h * 2.0)?;
//! assert_eq!(y.dims(), &[2, 3, 8]);
//! assert!(store.get("layers.0.self_attn_layer_norm.weight").is_some());
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod deepnorm;
pub mod post_ln;
pub mod pre_ln;
pub mod subln;

pub use deepnorm::DeepNorm;
pub use post_ln::{PostLn, PostNormResidual};
pub use pre_ln::{PreLn, PreNormResidual};
pub use subln::SubLn;

// What the API takes and returns, so that this crate is the only dependency a user needs.
pub use candle_core;
pub use candle_nn;
pub use torchscale_core;
pub use torchscale_core::init::ParamStore;
pub use torchscale_core::layer_norm::LayerNorm;
pub use torchscale_core::{
    Branch, Error, Multiway, NormSpec, ParamRole, Residual, Result, Site, Stabilizer, StackKind,
};

/// The techniques, the traits and everyday types, for `use torchscale_norm::prelude::*`
/// ([`Error`] and [`Result`] stay at the crate root, so that the standard `Result` is not
/// shadowed).
pub mod prelude {
    pub use crate::{
        stabilizer_for, DeepNorm, PostLn, PostNormResidual, PreLn, PreNormResidual, SubLn,
        Technique,
    };
    pub use torchscale_core::prelude::*;
}

/// The techniques of this crate, for choosing one at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Technique {
    /// [`PostLn`].
    PostLn,
    /// [`PreLn`].
    PreLn,
    /// [`DeepNorm`].
    DeepNorm,
    /// [`SubLn`] (Magneto).
    SubLn,
}

/// The stabilizer of `kind` for `stack` (DeepNorm and Sub-LN constants depend on the stack; a stack
/// with zero layers is a config error for them).
pub fn stabilizer_for(kind: Technique, stack: StackKind) -> Result<Box<dyn Stabilizer>> {
    Ok(match kind {
        Technique::PostLn => Box::new(PostLn),
        Technique::PreLn => Box::new(PreLn),
        Technique::DeepNorm => Box::new(DeepNorm::for_stack(stack)?),
        Technique::SubLn => Box::new(SubLn::for_stack(stack)?),
    })
}

/// Rejects zero layer counts, which make the DeepNorm and Sub-LN formulas infinite or NaN.
pub(crate) fn validate_layers(stack: StackKind) -> Result<()> {
    let counts: &[(&str, usize)] = match stack {
        StackKind::Encoder { layers } => &[("encoder_layers", layers)],
        StackKind::Decoder { layers } => &[("decoder_layers", layers)],
        StackKind::EncoderOfEncDec {
            encoder_layers,
            decoder_layers,
        }
        | StackKind::DecoderOfEncDec {
            encoder_layers,
            decoder_layers,
        } => &[
            ("encoder_layers", encoder_layers),
            ("decoder_layers", decoder_layers),
        ],
    };
    for &(field, n) in counts {
        if n == 0 {
            return Err(Error::config(field, "must be at least 1"));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod test_util;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::golden_files;
    use torchscale_core::Site;

    #[test]
    fn stabilizer_for_picks_the_technique() -> Result<()> {
        let stack = StackKind::Decoder { layers: 4 };
        let names: Vec<_> = [
            Technique::PostLn,
            Technique::PreLn,
            Technique::DeepNorm,
            Technique::SubLn,
        ]
        .into_iter()
        .map(|t| stabilizer_for(t, stack).map(|s| s.name()))
        .collect::<Result<_>>()?;
        assert_eq!(names, ["post-ln", "pre-ln", "deepnorm", "subln"]);
        assert!(stabilizer_for(Technique::SubLn, StackKind::Encoder { layers: 0 }).is_err());
        // Layer counts do not matter to Post-LN / Pre-LN.
        assert!(stabilizer_for(Technique::PreLn, StackKind::Encoder { layers: 0 }).is_ok());
        Ok(())
    }

    /// Each golden model's config picks a technique; its skip scale and final norm must agree with
    /// the per-layer alpha torchscale reports and FORMAT.md's variant table.
    #[test]
    fn golden_configs_agree_with_the_chosen_technique() -> Result<()> {
        let mut checked = 0;
        for g in golden_files()? {
            let c = &g.config;
            let sides: Vec<(&str, StackKind, &str)> = match g.config_class.as_str() {
                "EncoderConfig" | "DecoderConfig" if g.derived.get("layer_alpha").is_some() => {
                    let enc = g.config_class == "EncoderConfig";
                    let key = if enc { "encoder" } else { "decoder" };
                    let n = c[format!("{key}_layers")].as_u64().unwrap_or(0) as usize;
                    let stack = if enc {
                        StackKind::Encoder { layers: n }
                    } else {
                        StackKind::Decoder { layers: n }
                    };
                    vec![(key, stack, "layer_alpha")]
                }
                "EncoderDecoderConfig" => {
                    let encoder_layers = c["encoder_layers"].as_u64().unwrap_or(0) as usize;
                    let decoder_layers = c["decoder_layers"].as_u64().unwrap_or(0) as usize;
                    vec![
                        (
                            "encoder",
                            StackKind::EncoderOfEncDec {
                                encoder_layers,
                                decoder_layers,
                            },
                            "encoder_layer_alpha",
                        ),
                        (
                            "decoder",
                            StackKind::DecoderOfEncDec {
                                encoder_layers,
                                decoder_layers,
                            },
                            "decoder_layer_alpha",
                        ),
                    ]
                }
                _ => vec![],
            };
            for (side, stack, alpha_key) in sides {
                let pre = c[format!("{side}_normalize_before")]
                    .as_bool()
                    .unwrap_or(false);
                let technique = if c["deepnorm"].as_bool() == Some(true) {
                    Technique::DeepNorm
                } else if c["subln"].as_bool() == Some(true) {
                    Technique::SubLn
                } else if pre {
                    Technique::PreLn
                } else {
                    Technique::PostLn
                };
                let s = stabilizer_for(technique, stack)?;
                // FORMAT.md 3.5: the final LayerNorm exists exactly when the stack is pre-norm.
                assert_eq!(s.final_norm(), pre, "{} {side}", g.name);
                assert_eq!(
                    s.inner_norm(Site::FeedForward),
                    technique == Technique::SubLn
                );
                let alphas = g.derived[alpha_key].as_array().cloned().unwrap_or_default();
                assert_eq!(alphas.len(), stack.layers(), "{} {side}", g.name);
                for a in alphas {
                    let a = a.as_f64().unwrap_or(f64::NAN);
                    approx::assert_relative_eq!(s.residual_scale(), a, max_relative = 1e-12);
                }
                checked += 1;
            }
        }
        assert!(checked >= 15, "only {checked} golden stacks checked");
        Ok(())
    }
}

// The README's examples compile and run as doctests, so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
