//! The gate network: token features to expert logits.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use torchscale_core::Result;

use super::xmoe::XMoeGate;
use crate::config::MoeConfig;

/// The two gates of torchscale: a plain `Linear(C -> E, no bias)` (`gate.wg.weight`) or the
/// X-MoE gate (`gate.wg_reduction.weight`, `gate.wg`).
#[derive(Debug, Clone)]
pub enum Gate {
    /// `logits = x W_g^T`, `W_g: [E, C]`.
    Linear(Tensor),
    /// X-MoE cosine routing.
    XMoe(XMoeGate),
}

impl Gate {
    /// Builds the gate described by `cfg` under `vb` (the `gate` scope).
    pub fn new(cfg: &MoeConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.use_xmoe {
            Ok(Gate::XMoe(XMoeGate::new(
                cfg.embed_dim,
                cfg.num_experts,
                cfg.xmoe_routing_dim,
                cfg.paper_routing,
                vb,
            )?))
        } else {
            let wg = torchscale_core::linear::linear(
                cfg.embed_dim,
                cfg.num_experts,
                false,
                1.0,
                vb.pp("wg"),
            )?;
            Ok(Gate::Linear(wg.weight().clone()))
        }
    }

    /// `[S, C] -> [S, E]` logits in `gating_dtype`. The router then replaces non-finite logits
    /// by the smallest finite one, as torchscale does.
    pub fn logits(&self, x: &Tensor, gating_dtype: DType) -> Result<Tensor> {
        match self {
            Gate::Linear(w) => Ok(torchscale_kernels::linear(x, w, None)?.to_dtype(gating_dtype)?),
            Gate::XMoe(g) => g.logits(x, gating_dtype),
        }
    }

    /// X-MoE's in-place rescale of the expert embeddings ([`XMoeGate::rescale_wg`]); false
    /// (nothing to do) for the linear gate.
    pub fn rescale_wg(&self) -> Result<bool> {
        match self {
            Gate::XMoe(g) => g.rescale_wg(),
            Gate::Linear(_) => Ok(false),
        }
    }
}

/// Replaces NaN and ±inf by the smallest finite entry, so that argmax never sees NaN
/// (torchscale's X-MoE gate does so; harmless for the other). `host` holds the logits' values
/// and is updated too.
pub(crate) fn make_finite(logits: &Tensor, host: &mut [f64]) -> Result<Tensor> {
    if host.iter().all(|x| x.is_finite()) {
        return Ok(logits.clone());
    }
    let min = host
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f64::INFINITY, f64::min);
    let min = if min.is_finite() { min } else { 0.0 };
    let ok: Vec<u8> = host.iter().map(|x| x.is_finite() as u8).collect();
    host.iter_mut()
        .filter(|x| !x.is_finite())
        .for_each(|x| *x = min);
    let ok = Tensor::from_vec(ok, logits.shape(), logits.device())?;
    let fill = Tensor::full(min, logits.shape(), logits.device())?.to_dtype(logits.dtype())?;
    Ok(ok.where_cond(logits, &fill)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn non_finite_logits_become_the_smallest_finite_one() {
        let t = Tensor::new(&[[1f32, f32::NAN], [f32::INFINITY, -2.0]], &Device::Cpu).unwrap();
        let mut host = vec![1.0, f64::NAN, f64::INFINITY, -2.0];
        let f = make_finite(&t, &mut host)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(f, vec![vec![1.0, -2.0], vec![-2.0, -2.0]]);
        assert_eq!(host, vec![1.0, -2.0, -2.0, -2.0]);
    }
}
