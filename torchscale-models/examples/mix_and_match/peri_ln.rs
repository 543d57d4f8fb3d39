//! Peri-LN, a stabiliser that lives in this example only: every sublayer is normalised on its
//! way in and on its way out, `x + LN_out(f(LN_in(x)))`, and the stack ends with a LayerNorm.
//!
//! The crates know nothing of it; it plugs in through the `Stabilizer` and `Residual` traits.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use torchscale_models::torchscale_core::layer_norm::LayerNorm;
use torchscale_models::torchscale_core::{
    Branch, Multiway, NormSpec, Residual, Result, Site, Stabilizer,
};

/// One Peri-LN block: the input norm under the site's usual key, the output norm next to it
/// (`<site norm>_out`).
#[derive(Debug)]
pub struct PeriLnResidual {
    input: Multiway<LayerNorm>,
    output: Multiway<LayerNorm>,
}

impl Residual for PeriLnResidual {
    fn pre(&self, x: &Tensor, branch: Branch) -> Result<Tensor> {
        self.input.apply(x, branch, |ln, h| ln.forward(h))
    }

    fn post(&self, x: &Tensor, fx: &Tensor, branch: Branch) -> Result<Tensor> {
        // The skip stays un-normalised, as in Pre-LN; only the branch's output is rescaled.
        let y = self.output.apply(fx, branch, |ln, h| ln.forward(h))?;
        Ok((x + y)?)
    }
}

/// The Peri-LN technique: Peri-LN blocks everywhere, default init, a final LayerNorm.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeriLn;

impl Stabilizer for PeriLn {
    fn name(&self) -> &'static str {
        "peri-ln"
    }

    fn residual(&self, site: Site, spec: NormSpec, vb: VarBuilder) -> Result<Box<dyn Residual>> {
        let norm = |name: String| {
            Multiway::new(spec.multiway, vb.pp(name), |vb| {
                LayerNorm::new(spec.dim, spec.eps, vb)
            })
        };
        Ok(Box::new(PeriLnResidual {
            input: norm(site.norm_name().to_string())?,
            output: norm(format!("{}_out", site.norm_name()))?,
        }))
    }

    fn final_norm(&self) -> bool {
        true
    }
}
