//! Post-LN: `x_{l+1} = LN(α·x_l + f(x_l))`, the original Transformer wiring (α = 1) and, with
//! α > 1, DeepNorm's up-weighted skip.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use torchscale_core::layer_norm::LayerNorm;
use torchscale_core::{Branch, Multiway, NormSpec, Residual, Result, Site, Stabilizer};

/// `LN(α·x + f)`: the norm sits after the sum, the sublayer sees the raw stream.
#[derive(Debug, Clone)]
pub struct PostNormResidual {
    norm: Multiway<LayerNorm>,
    alpha: f64,
}

impl PostNormResidual {
    /// From an existing norm and skip scale `alpha`.
    pub fn new(norm: Multiway<LayerNorm>, alpha: f64) -> Self {
        Self { norm, alpha }
    }

    /// Builds the norm of `site` under `vb.pp(site.norm_name())` (`A`/`B` copies when multiway).
    pub fn build(site: Site, spec: NormSpec, alpha: f64, vb: VarBuilder) -> Result<Self> {
        let norm = build_norm(site, spec, vb)?;
        Ok(Self::new(norm, alpha))
    }

    /// The skip scale α.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The LayerNorm (or its multiway pair).
    pub fn norm(&self) -> &Multiway<LayerNorm> {
        &self.norm
    }
}

/// The LayerNorm of a residual site, under torchscale's key for that site.
pub(crate) fn build_norm(
    site: Site,
    spec: NormSpec,
    vb: VarBuilder,
) -> Result<Multiway<LayerNorm>> {
    Multiway::new(spec.multiway, vb.pp(site.norm_name()), |vb| {
        LayerNorm::new(spec.dim, spec.eps, vb)
    })
}

impl Residual for PostNormResidual {
    fn pre(&self, x: &Tensor, _branch: Branch) -> Result<Tensor> {
        Ok(x.clone())
    }

    fn post(&self, x: &Tensor, fx: &Tensor, branch: Branch) -> Result<Tensor> {
        if let Multiway::Single(ln) = &self.norm {
            // One fused op for the scaled sum and its norm (the same numbers as below).
            return ln.residual_forward(x, fx, self.alpha);
        }
        // torchscale multiplies the skip, not the sublayer output: `residual * alpha + x`.
        let skip = if self.alpha == 1.0 {
            x.clone()
        } else {
            (x * self.alpha)?
        };
        let sum = (skip + fx)?;
        self.norm.apply(&sum, branch, |ln, h| ln.forward(h))
    }
}

/// The vanilla Post-LN technique: `LN(x + f(x))`, default init, no final norm.
#[derive(Debug, Clone, Copy, Default)]
pub struct PostLn;

impl Stabilizer for PostLn {
    fn name(&self) -> &'static str {
        "post-ln"
    }

    fn residual(&self, site: Site, spec: NormSpec, vb: VarBuilder) -> Result<Box<dyn Residual>> {
        Ok(Box::new(PostNormResidual::build(site, spec, 1.0, vb)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{hand_layer_norm, ln_vb, to_vec};
    use candle_core::{DType, Device};
    use torchscale_core::init::ParamStore;

    const SPEC: NormSpec = NormSpec {
        dim: 4,
        eps: 1e-5,
        multiway: false,
    };

    #[test]
    fn post_norm_computes_ln_of_scaled_skip_plus_f() -> Result<()> {
        let dev = Device::Cpu;
        let x = [0.5f32, -1.0, 2.0, 0.25, 1.5, 0.0, -0.75, 3.0];
        let f = [0.1f32, 0.2, -0.3, 0.4, -1.0, 0.5, 0.25, -2.0];
        let w = [1.1f32, 0.9, 1.2, 0.8];
        let b = [0.05f32, -0.1, 0.0, 0.2];
        let vb = ln_vb("final_layer_norm", &w, &b)?;
        let alpha = 1.7;
        let res = PostNormResidual::build(Site::FeedForward, SPEC, alpha, vb)?;
        let xt = Tensor::from_slice(&x, (1, 2, 4), &dev)?;
        let ft = Tensor::from_slice(&f, (1, 2, 4), &dev)?;
        let pre = res.pre(&xt, Branch::A)?;
        assert_eq!(to_vec(&pre)?, x.to_vec(), "post-LN feeds the raw stream");
        let got = to_vec(&res.forward(&xt, &mut |_h| Ok(ft.clone()))?)?;
        for row in 0..2 {
            let r: Vec<f64> = (0..4)
                .map(|j| alpha * x[row * 4 + j] as f64 + f[row * 4 + j] as f64)
                .collect();
            let want = hand_layer_norm(&r, &w, &b, 1e-5);
            for j in 0..4 {
                approx::assert_abs_diff_eq!(got[row * 4 + j] as f64, want[j], epsilon = 1e-5);
            }
        }
        Ok(())
    }

    #[test]
    fn post_ln_stabilizer_uses_unit_alpha_and_site_key() -> Result<()> {
        let store = ParamStore::new(3);
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let res = PostLn.residual(Site::SelfAttention, SPEC, vb)?;
        assert!(store.get("self_attn_layer_norm.weight").is_some());
        assert!(store.get("self_attn_layer_norm.bias").is_some());
        let x = Tensor::new(&[[1.0f32, 2.0, 3.0, 4.0]], &Device::Cpu)?;
        let f = Tensor::new(&[[4.0f32, 2.0, 1.0, -1.0]], &Device::Cpu)?;
        let got = to_vec(&res.post(&x, &f, Branch::A)?)?;
        let want = hand_layer_norm(&[5.0, 4.0, 4.0, 3.0], &[1.0; 4], &[0.0; 4], 1e-5);
        for j in 0..4 {
            approx::assert_abs_diff_eq!(got[j] as f64, want[j], epsilon = 1e-5);
        }
        assert!(!PostLn.final_norm());
        assert!(!PostLn.inner_norm(Site::SelfAttention));
        assert_eq!(PostLn.residual_scale(), 1.0);
        Ok(())
    }

    #[test]
    fn multiway_post_norm_splits_between_copies() -> Result<()> {
        let store = ParamStore::new(4);
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let spec = NormSpec {
            multiway: true,
            ..SPEC
        };
        let res = PostNormResidual::build(Site::FeedForward, spec, 1.0, vb)?;
        // Make copy B distinguishable: bias 1 instead of 0.
        let bias_b = store
            .get("final_layer_norm.B.bias")
            .ok_or_else(|| torchscale_core::Error::invalid("B", "missing"))?;
        bias_b.set(&Tensor::ones(4, DType::F32, &Device::Cpu)?)?;
        assert!(store.get("final_layer_norm.A.weight").is_some());
        let x = Tensor::new(
            &[[[1.0f32, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]],
            &Device::Cpu,
        )?;
        let f = x.zeros_like()?;
        let got = to_vec(&res.post(&x, &f, Branch::SplitAt(1))?)?;
        let a = hand_layer_norm(&[1.0, 2.0, 3.0, 4.0], &[1.0; 4], &[0.0; 4], 1e-5);
        let b = hand_layer_norm(&[4.0, 3.0, 2.0, 1.0], &[1.0; 4], &[1.0; 4], 1e-5);
        for j in 0..4 {
            approx::assert_abs_diff_eq!(got[j] as f64, a[j], epsilon = 1e-5);
            approx::assert_abs_diff_eq!(got[4 + j] as f64, b[j], epsilon = 1e-5);
        }
        Ok(())
    }

    #[test]
    fn gradients_reach_post_norm_parameters() -> Result<()> {
        crate::test_util::assert_wiring(&PostLn, Site::CrossAttention, false, 1.0)?;
        crate::test_util::assert_norm_grads(&PostLn, Site::FeedForward)
    }
}
