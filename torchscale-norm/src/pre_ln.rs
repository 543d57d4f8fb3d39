//! Pre-LN: `x_{l+1} = x_l + f(LN(x_l))`, with a LayerNorm at the end of the stack.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use torchscale_core::layer_norm::LayerNorm;
use torchscale_core::{Branch, Multiway, NormSpec, Residual, Result, Site, Stabilizer};

use crate::post_ln::build_norm;

/// `x + f(LN(x))`: [`Residual::pre`] returns `LN(x)`, [`Residual::post`] returns `x + fx`.
#[derive(Debug, Clone)]
pub struct PreNormResidual {
    norm: Multiway<LayerNorm>,
}

impl PreNormResidual {
    /// From an existing norm.
    pub fn new(norm: Multiway<LayerNorm>) -> Self {
        Self { norm }
    }

    /// Builds the norm of `site` under `vb.pp(site.norm_name())` (`A`/`B` copies when multiway).
    pub fn build(site: Site, spec: NormSpec, vb: VarBuilder) -> Result<Self> {
        Ok(Self::new(build_norm(site, spec, vb)?))
    }

    /// The LayerNorm (or its multiway pair).
    pub fn norm(&self) -> &Multiway<LayerNorm> {
        &self.norm
    }
}

impl Residual for PreNormResidual {
    fn pre(&self, x: &Tensor, branch: Branch) -> Result<Tensor> {
        self.norm.apply(x, branch, |ln, h| ln.forward(h))
    }

    fn post(&self, x: &Tensor, fx: &Tensor, _branch: Branch) -> Result<Tensor> {
        Ok((x + fx)?)
    }
}

/// The Pre-LN technique: pre-norm residuals, default init, a final LayerNorm.
#[derive(Debug, Clone, Copy, Default)]
pub struct PreLn;

impl Stabilizer for PreLn {
    fn name(&self) -> &'static str {
        "pre-ln"
    }

    fn residual(&self, site: Site, spec: NormSpec, vb: VarBuilder) -> Result<Box<dyn Residual>> {
        Ok(Box::new(PreNormResidual::build(site, spec, vb)?))
    }

    fn final_norm(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{hand_layer_norm, ln_vb, to_vec};
    use candle_core::Device;

    #[test]
    fn pre_norm_feeds_ln_and_adds_raw_skip() -> Result<()> {
        let dev = Device::Cpu;
        let x = [0.5f32, -1.0, 2.0, 0.25, 1.5, 0.0, -0.75, 3.0];
        let w = [1.1f32, 0.9, 1.2, 0.8];
        let b = [0.05f32, -0.1, 0.0, 0.2];
        let vb = ln_vb("encoder_attn_layer_norm", &w, &b)?;
        let spec = NormSpec {
            dim: 4,
            eps: 1e-5,
            multiway: false,
        };
        let res = PreNormResidual::build(Site::CrossAttention, spec, vb)?;
        let xt = Tensor::from_slice(&x, (2, 1, 4), &dev)?;
        // f(h) = 3h: the output must be x + 3·LN(x).
        let got = to_vec(&res.forward(&xt, &mut |h| Ok((h * 3.0)?))?)?;
        for row in 0..2 {
            let r: Vec<f64> = x[row * 4..row * 4 + 4].iter().map(|&v| v as f64).collect();
            let ln = hand_layer_norm(&r, &w, &b, 1e-5);
            for j in 0..4 {
                let want = r[j] + 3.0 * ln[j];
                approx::assert_abs_diff_eq!(got[row * 4 + j] as f64, want, epsilon = 2e-5);
            }
        }
        Ok(())
    }

    #[test]
    fn pre_ln_has_final_norm_only() {
        assert!(PreLn.final_norm());
        assert!(!PreLn.inner_norm(Site::FeedForward));
        assert_eq!(
            PreLn.init_gain(Site::SelfAttention, torchscale_core::ParamRole::Value),
            1.0
        );
        assert_eq!(PreLn.name(), "pre-ln");
    }

    #[test]
    fn gradients_reach_pre_norm_parameters() -> Result<()> {
        crate::test_util::assert_wiring(&PreLn, Site::FeedForward, true, 1.0)?;
        crate::test_util::assert_norm_grads(&PreLn, Site::SelfAttention)
    }
}
