//! Sub-LN (Magneto, "Foundation Transformers", arXiv 2210.06423): Pre-LN residuals plus a second
//! LayerNorm inside each sublayer (before `out_proj` and before `fc2`), with the init of the value,
//! output and feed-forward weights (and biases) multiplied by γ (natural logarithms):
//!
//! | stack | γ |
//! |---|---|
//! | encoder only (N) | sqrt(ln(2N)) |
//! | decoder only (M) | sqrt(ln(2M)) |
//! | encoder of enc-dec | sqrt(ln(3M)·ln(2N)/3) |
//! | decoder of enc-dec | sqrt(ln(3M)); cross-attention keeps gain 1 |
//!
//! torchscale skips every parameter under `encoder_attn` in the decoder of an encoder-decoder, and
//! cross-attention has no inner norm.

use candle_nn::VarBuilder;
use torchscale_core::{NormSpec, ParamRole, Residual, Result, Site, Stabilizer, StackKind};

use crate::pre_ln::PreNormResidual;
use crate::validate_layers;

/// Sub-LN for one stack: pre-norm residuals, inner norms, init gain γ, a final LayerNorm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SubLn {
    stack: StackKind,
    gamma: f64,
}

impl SubLn {
    /// The constants of `stack`; fails with a config error when a layer count is zero.
    pub fn for_stack(stack: StackKind) -> Result<Self> {
        validate_layers(stack)?;
        let gamma = match stack {
            StackKind::Encoder { layers: l } | StackKind::Decoder { layers: l } => {
                (2.0 * l as f64).ln().sqrt()
            }
            StackKind::EncoderOfEncDec {
                encoder_layers,
                decoder_layers,
            } => {
                let n = encoder_layers as f64;
                let m = decoder_layers as f64;
                ((3.0 * m).ln() * (2.0 * n).ln() / 3.0).sqrt()
            }
            StackKind::DecoderOfEncDec { decoder_layers, .. } => {
                (3.0 * decoder_layers as f64).ln().sqrt()
            }
        };
        Ok(Self { stack, gamma })
    }

    /// The init gain γ of `v_proj`, `out_proj`, `fc1`, `fc2` (weights and biases).
    pub fn gamma(&self) -> f64 {
        self.gamma
    }

    /// The stack these constants are for.
    pub fn stack(&self) -> StackKind {
        self.stack
    }
}

impl Stabilizer for SubLn {
    fn name(&self) -> &'static str {
        "subln"
    }

    fn residual(&self, site: Site, spec: NormSpec, vb: VarBuilder) -> Result<Box<dyn Residual>> {
        Ok(Box::new(PreNormResidual::build(site, spec, vb)?))
    }

    /// γ for value, output and feed-forward weights; 1 for queries and keys, and for every
    /// cross-attention weight of an enc-dec decoder (torchscale skips `encoder_attn`).
    fn init_gain(&self, site: Site, role: ParamRole) -> f64 {
        if site == Site::CrossAttention && matches!(self.stack, StackKind::DecoderOfEncDec { .. }) {
            return 1.0;
        }
        match role {
            ParamRole::Query | ParamRole::Key => 1.0,
            ParamRole::Value | ParamRole::Out | ParamRole::Fc1 | ParamRole::Fc2 => self.gamma,
        }
    }

    /// Self-attention (`inner_attn_ln`) and feed-forward (`ffn_layernorm`); not cross-attention.
    fn inner_norm(&self, site: Site) -> bool {
        match site {
            Site::SelfAttention | Site::FeedForward => true,
            Site::CrossAttention | Site::Custom(_) => false,
        }
    }

    fn final_norm(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{
        assert_linear_std, assert_norm_grads, assert_wiring, golden_files, meta_f64,
    };
    use torchscale_core::Error;

    fn gammas(n: usize, m: usize) -> Result<[f64; 3]> {
        let (encoder_layers, decoder_layers) = (n, m);
        Ok([
            SubLn::for_stack(StackKind::Encoder { layers: n })?.gamma(),
            SubLn::for_stack(StackKind::EncoderOfEncDec {
                encoder_layers,
                decoder_layers,
            })?
            .gamma(),
            SubLn::for_stack(StackKind::DecoderOfEncDec {
                encoder_layers,
                decoder_layers,
            })?
            .gamma(),
        ])
    }

    #[test]
    fn gamma_matches_spec_table() -> Result<()> {
        // SPEC.md section 3.4: N = M, (encoder only, enc-dec encoder, enc-dec decoder).
        let table = [
            (6, [1.5764, 1.5473, 1.7001]),
            (12, [1.7827, 1.9484, 1.8930]),
            (24, [1.9675, 2.3492, 2.0680]),
        ];
        for (n, want) in table {
            for (g, w) in gammas(n, n)?.iter().zip(want) {
                approx::assert_abs_diff_eq!(*g, w, epsilon = 5.1e-5);
            }
        }
        // "Note γ < 1 for N = 1 (sqrt(ln 2) = 0.833)".
        let one = SubLn::for_stack(StackKind::Decoder { layers: 1 })?.gamma();
        approx::assert_abs_diff_eq!(one, 0.833, epsilon = 5e-4);
        Ok(())
    }

    #[test]
    fn gamma_matches_golden_derived() -> Result<()> {
        let mut checked = 0;
        for g in golden_files()? {
            let d = &g.derived;
            let n = g.config["encoder_layers"].as_u64().map(|v| v as usize);
            let m = g.config["decoder_layers"].as_u64().map(|v| v as usize);
            let mut cases = Vec::new();
            match (g.config_class.as_str(), n, m) {
                ("EncoderConfig", Some(n), _) => {
                    cases.push(("subln_init_gain", StackKind::Encoder { layers: n }));
                }
                ("DecoderConfig", _, Some(m)) => {
                    cases.push(("subln_init_gain", StackKind::Decoder { layers: m }));
                }
                ("EncoderDecoderConfig", Some(encoder_layers), Some(decoder_layers)) => {
                    cases.push((
                        "subln_encoder_init_gain",
                        StackKind::EncoderOfEncDec {
                            encoder_layers,
                            decoder_layers,
                        },
                    ));
                    cases.push((
                        "subln_decoder_init_gain",
                        StackKind::DecoderOfEncDec {
                            encoder_layers,
                            decoder_layers,
                        },
                    ));
                }
                _ => {}
            }
            for (key, stack) in cases {
                let Some(want) = meta_f64(d, key) else {
                    continue;
                };
                let got = SubLn::for_stack(stack)?.gamma();
                approx::assert_relative_eq!(got, want, max_relative = 1e-12);
                checked += 1;
            }
        }
        assert!(
            checked >= 4,
            "only {checked} Sub-LN stacks found in the golden files"
        );
        Ok(())
    }

    #[test]
    fn gains_skip_cross_attention_of_decoder() -> Result<()> {
        let stack = StackKind::DecoderOfEncDec {
            encoder_layers: 6,
            decoder_layers: 6,
        };
        let s = SubLn::for_stack(stack)?;
        for role in [
            ParamRole::Value,
            ParamRole::Out,
            ParamRole::Fc1,
            ParamRole::Fc2,
        ] {
            assert_eq!(s.init_gain(Site::SelfAttention, role), s.gamma());
            assert_eq!(s.init_gain(Site::FeedForward, role), s.gamma());
            assert_eq!(s.init_gain(Site::CrossAttention, role), 1.0);
        }
        assert_eq!(s.init_gain(Site::SelfAttention, ParamRole::Query), 1.0);
        assert_eq!(s.init_gain(Site::SelfAttention, ParamRole::Key), 1.0);
        assert!(s.inner_norm(Site::SelfAttention));
        assert!(s.inner_norm(Site::FeedForward));
        assert!(!s.inner_norm(Site::CrossAttention));
        assert!(s.final_norm());
        assert_eq!(s.residual_scale(), 1.0);
        Ok(())
    }

    #[test]
    fn zero_layers_is_a_config_error() {
        let err = SubLn::for_stack(StackKind::Decoder { layers: 0 }).unwrap_err();
        assert!(matches!(err, Error::Config { ref field, .. } if field == "decoder_layers"));
    }

    #[test]
    fn residual_is_pre_norm_and_trains_norm() -> Result<()> {
        let s = SubLn::for_stack(StackKind::Encoder { layers: 2 })?;
        assert_wiring(&s, Site::SelfAttention, true, 1.0)?;
        assert_norm_grads(&s, Site::SelfAttention)
    }

    #[test]
    fn linear_init_std_follows_gamma() -> Result<()> {
        let s = SubLn::for_stack(StackKind::DecoderOfEncDec {
            encoder_layers: 12,
            decoder_layers: 12,
        })?;
        assert_linear_std(&s, Site::FeedForward, ParamRole::Fc1, 21)?;
        assert_linear_std(&s, Site::SelfAttention, ParamRole::Out, 22)?;
        assert_linear_std(&s, Site::CrossAttention, ParamRole::Value, 23)
    }
}
