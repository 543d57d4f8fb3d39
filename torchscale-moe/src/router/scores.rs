//! The gate scores every built-in router starts from: logits in the gating dtype (non-finite
//! entries replaced, as torchscale does), their softmax, and host copies of both for the
//! discrete decisions.

use candle_core::{DType, Tensor};
use torchscale_core::{Error, Result};

use super::gate::{make_finite, Gate};

/// Logits and probabilities of one routing call, in the graph and on the host.
pub(crate) struct Scores {
    /// `[S, E]` logits in the gating dtype.
    pub logits: Tensor,
    /// The logits, row-major, as f64.
    pub logits_h: Vec<f64>,
    /// `[S, E]` softmax of the logits.
    pub probs: Tensor,
    /// The probabilities, row-major, as f64.
    pub probs_h: Vec<f64>,
}

impl Scores {
    /// Runs `gate` on `x: [S, C]` with the gating math in `gating_dtype`.
    pub fn new(gate: &Gate, x: &Tensor, gating_dtype: DType) -> Result<Self> {
        let logits = gate.logits(x, gating_dtype)?;
        let mut logits_h = host(&logits)?;
        let logits = make_finite(&logits, &mut logits_h)?;
        let probs = torchscale_kernels::softmax_last_dim(&logits)?;
        let probs_h = host(&probs)?;
        Ok(Self {
            logits,
            logits_h,
            probs,
            probs_h,
        })
    }
}

fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// The dtype of the gating math for input of dtype `dt`: f32 with `use_fp32` (f64 input stays
/// f64), the input dtype otherwise.
pub(crate) fn gating_dtype(dt: DType, use_fp32: bool) -> DType {
    if dt == DType::F64 || !use_fp32 {
        dt
    } else {
        DType::F32
    }
}

/// `torch.finfo(dtype).eps` of a gating dtype.
pub(crate) fn gating_eps(gdt: DType) -> f64 {
    match gdt {
        DType::F64 => f64::EPSILON,
        DType::BF16 => 2f64.powi(-7),
        DType::F16 => 2f64.powi(-10),
        _ => f32::EPSILON as f64,
    }
}

/// `[S]` padding flags from an optional mask.
pub(crate) fn padding_flags(padding: Option<&Tensor>, s: usize) -> Result<Vec<bool>> {
    match padding {
        None => Ok(vec![false; s]),
        Some(p) => {
            if p.elem_count() != s || p.rank() > 1 {
                return Err(Error::shape("padding", format!("[{s}]"), p.dims()));
            }
            Ok(host(p)?.into_iter().map(|x| x != 0.0).collect())
        }
    }
}

/// Mean entropy of the rows of `probs` (`[S, E]` row-major), in nats.
pub(crate) fn mean_entropy(probs: &[f64], e: usize) -> f64 {
    let s = probs.len() / e.max(1);
    if s == 0 {
        return 0.0;
    }
    let total: f64 = probs
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| -p * p.ln())
        .sum();
    total / s as f64
}

/// `[S, k]` 0/1 mask of the kept choices, in `like`'s dtype and device.
pub(crate) fn kept_mask(
    status: &[torchscale_core::router::ChoiceStatus],
    s: usize,
    k: usize,
    like: &Tensor,
) -> Result<Tensor> {
    let kept: Vec<u8> = status.iter().map(|st| st.is_kept() as u8).collect();
    Ok(Tensor::from_vec(kept, (s, k), like.device())?.to_dtype(like.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_of_uniform_rows_is_ln_e() {
        let p = [0.25; 8];
        assert!((mean_entropy(&p, 4) - 4f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn eps_follows_torch_finfo() {
        assert_eq!(gating_eps(DType::F32), f32::EPSILON as f64);
        assert_eq!(gating_eps(DType::BF16), 0.0078125);
        assert_eq!(gating_dtype(DType::BF16, true), DType::F32);
        assert_eq!(gating_dtype(DType::BF16, false), DType::BF16);
        assert_eq!(gating_dtype(DType::F64, true), DType::F64);
    }
}
