//! The load-balancing loss shared by top-1 and top-2 gating.

use candle_core::{Tensor, D};
use torchscale_core::{Error, Result};

/// `l_aux = E² · mean_e(m_e · c_e)` with `m_e` the mean gate probability of expert `e` over all
/// `S` tokens and `c_e` the fraction of the `S` tokens whose first choice is `e` (padding tokens
/// excluded from the count but not from `S`), before capacity dropping. Equals 1 for perfectly
/// uniform routing.
///
/// `probs: [S, E]` stays in the graph; `first_counts[e]` is the count behind `c_e`. Returns a
/// rank-0 tensor of the dtype of `probs`.
pub fn balance_loss(probs: &Tensor, first_counts: &[usize]) -> Result<Tensor> {
    let (s, e) = probs.dims2()?;
    if first_counts.len() != e {
        return Err(Error::shape(
            "first_counts",
            format!("[{e}] (one count per expert)"),
            &[first_counts.len()],
        ));
    }
    if s == 0 {
        return Err(Error::invalid("probs", "no tokens"));
    }
    let me = probs.mean(D::Minus2)?;
    let ce: Vec<f64> = first_counts.iter().map(|&c| c as f64 / s as f64).collect();
    let ce = Tensor::from_vec(ce, e, probs.device())?.to_dtype(probs.dtype())?;
    let mean = (me * ce)?.mean_all()?;
    Ok((mean * (e * e) as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn loss(p: &[f32], s: usize, e: usize, counts: &[usize]) -> f32 {
        let t = Tensor::from_slice(p, (s, e), &Device::Cpu).unwrap();
        balance_loss(&t, counts)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn uniform_routing_gives_one() {
        // SPEC 4.5: l_aux = 1 for perfectly uniform routing.
        let p = [0.25f32; 16];
        assert!((loss(&p, 4, 4, &[1, 1, 1, 1]) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn matches_the_formula() {
        // m = [0.55, 0.45]; c = [1, 0]; E * sum_e m_e c_e = 2 * 0.55 = 1.1.
        let p = [0.7f32, 0.3, 0.4, 0.6];
        assert!((loss(&p, 2, 2, &[2, 0]) - 1.1).abs() < 1e-6);
        // A padding token lowers the count but not the denominator: c = [0.5, 0] -> 0.55.
        assert!((loss(&p, 2, 2, &[1, 0]) - 0.55).abs() < 1e-6);
    }

    #[test]
    fn wrong_count_length_is_an_error() {
        let t = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(balance_loss(&t, &[1, 1]).is_err());
    }
}
