//! Training losses: fairseq's label-smoothed cross entropy and the MoE balance loss.

use candle_core::{DType, Tensor};
use torchscale_core::{Error, Result};

/// Summed losses of a batch, as fairseq's `label_smoothed_cross_entropy` criterion reports them.
#[derive(Debug, Clone)]
pub struct SmoothedLoss {
    /// Sum over non-padding tokens of the smoothed loss (a scalar f32 tensor with a gradient).
    pub loss_sum: Tensor,
    /// Sum over non-padding tokens of the plain negative log-likelihood (for perplexity).
    pub nll_sum: Tensor,
    /// Number of non-padding tokens (fairseq's `ntokens`, the usual `sample_size`).
    pub ntokens: usize,
}

/// Label-smoothed cross entropy with fairseq's `label_smoothed_nll_loss` weighting.
///
/// With `lp = log_softmax(logits)` (in f32), `V` the vocabulary and `eps_i = eps / (V - 1)`:
/// `loss = (1 - eps - eps_i) * (-lp[target]) + eps_i * sum_v(-lp[v])` per token, so the target
/// gets probability mass `1 - eps` and every other class `eps / (V - 1)`. Tokens whose target is
/// `ignore_index` (fairseq's padding index is 1) count in neither the sums nor `ntokens`.
///
/// `logits` is `[..., V]` and `target` (u32 or i64) has the leading dims of `logits`.
pub fn label_smoothed_cross_entropy(
    logits: &Tensor,
    target: &Tensor,
    epsilon: f64,
    ignore_index: Option<u32>,
) -> Result<SmoothedLoss> {
    let dims = logits.dims();
    let (lead, v) = match dims.split_last() {
        Some((&v, lead)) if v > 0 => (lead, v),
        _ => return Err(Error::shape("logits", "[..., V] with V > 0", dims)),
    };
    if target.dims() != lead {
        return Err(Error::shape(
            "target",
            format!("{lead:?} (the leading dims of logits)"),
            target.dims(),
        ));
    }
    if !(0.0..1.0).contains(&epsilon) {
        return Err(Error::config(
            "label_smoothing",
            format!("must be in [0, 1), got {epsilon}"),
        ));
    }
    if v == 1 && epsilon > 0.0 {
        return Err(Error::config(
            "label_smoothing",
            "needs a vocabulary of at least 2 classes",
        ));
    }
    let targets = target_values(target)?;
    let mut classes = Vec::with_capacity(targets.len());
    let mut ntokens = 0;
    for (i, &t) in targets.iter().enumerate() {
        let kept = ignore_index.is_none_or(|p| i64::from(p) != t);
        if kept && !(0..v as i64).contains(&t) {
            return Err(Error::invalid(
                "target",
                format!("token {i} has class {t}, outside 0..{v}"),
            ));
        }
        ntokens += usize::from(kept);
        // A padding target is the ignore index itself, which fits in u32.
        classes.push(t as u32);
    }
    // [loss_sum, nll_sum] from the fused kernel (or its composed version off the CPU).
    let sums = torchscale_kernels::cross_entropy::label_smoothed_ce(
        &logits.reshape((classes.len(), v))?,
        &classes,
        epsilon,
        ignore_index,
    )?;
    Ok(SmoothedLoss {
        loss_sum: sums.get(0)?,
        nll_sum: sums.get(1)?,
        ntokens,
    })
}

/// The target classes on the host, for validation and the padding mask.
fn target_values(target: &Tensor) -> Result<Vec<i64>> {
    let flat = target.flatten_all()?;
    match target.dtype() {
        DType::U32 => Ok(flat.to_vec1::<u32>()?.into_iter().map(i64::from).collect()),
        DType::I64 => Ok(flat.to_vec1::<i64>()?),
        DType::U8 => Ok(flat.to_vec1::<u8>()?.into_iter().map(i64::from).collect()),
        got => Err(Error::DType {
            what: "target".into(),
            expected: DType::U32,
            got,
        }),
    }
}

/// How per-layer MoE auxiliary losses are combined (fairseq's `moe_gate_loss_combine_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuxCombine {
    /// Sum over MoE layers (torchscale's example recipes).
    Sum,
    /// Mean over MoE layers (fairseq's default).
    #[default]
    Average,
}

/// `weight * combine(aux_losses)`: the gate-balance term added to the training loss, or `None`
/// when the model has no MoE layer.
///
/// fairseq's MoE criterion adds `weight * sample_size * gate_loss` to a *summed* token loss; a
/// caller that uses [`SmoothedLoss::loss_sum`] multiplies the result by `ntokens` to match, one that
/// uses a per-token mean adds it as is. Each entry must hold a single value (`l_aux` is a scalar).
pub fn moe_balance_loss(
    aux_losses: &[Tensor],
    weight: f64,
    combine: AuxCombine,
) -> Result<Option<Tensor>> {
    let mut total: Option<Tensor> = None;
    for (i, l) in aux_losses.iter().enumerate() {
        if l.elem_count() != 1 {
            return Err(Error::shape(
                format!("aux_losses[{i}]"),
                "a scalar",
                l.dims(),
            ));
        }
        let l = l.to_dtype(DType::F32)?.sum_all()?;
        total = Some(match total {
            Some(t) => (t + l)?,
            None => l,
        });
    }
    let Some(total) = total else { return Ok(None) };
    let scale = match combine {
        AuxCombine::Sum => weight,
        AuxCombine::Average => weight / aux_losses.len() as f64,
    };
    Ok(Some((total * scale)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    const LN2: f64 = std::f64::consts::LN_2;

    fn scalar(t: &Tensor) -> f64 {
        t.to_scalar::<f32>().unwrap() as f64
    }

    #[test]
    fn no_smoothing_is_cross_entropy() {
        let dev = Device::Cpu;
        let logits = Tensor::new(
            &[
                [1.0f32, -2.0, 0.5, 3.0],
                [0.1, 0.2, -0.3, 0.0],
                [2.0, 2.0, -1.0, 0.0],
            ],
            &dev,
        )
        .unwrap();
        let target = Tensor::new(&[3u32, 0, 2], &dev).unwrap();
        let ce = scalar(&candle_nn::loss::cross_entropy(&logits, &target).unwrap());
        let out = label_smoothed_cross_entropy(&logits, &target, 0.0, None).unwrap();
        assert_eq!(out.ntokens, 3);
        assert!((scalar(&out.loss_sum) / 3.0 - ce).abs() < 1e-6);
        assert!((scalar(&out.nll_sum) / 3.0 - ce).abs() < 1e-6);
    }

    #[test]
    fn smoothing_by_hand_with_padding() {
        // Rows: probs [.5, .25, .25] target 0 (nll ln2); [.25, .25, .5] target 0 (nll 2 ln2);
        // a padding row (target 1). Each real row: sum_v -lp = ln2 + 2*2ln2 = 5 ln2.
        // eps = 0.1, eps_i = 0.05: loss = 0.85 * 3 ln2 + 0.05 * 10 ln2 = 3.05 ln2.
        let dev = Device::Cpu;
        let l2 = LN2 as f32;
        let logits = Var::new(&[[[l2, 0.0, 0.0], [0.0, 0.0, l2], [7.0, -3.0, 1.0]]], &dev).unwrap();
        let target = Tensor::new(&[[0i64, 0, 1]], &dev).unwrap();
        let out = label_smoothed_cross_entropy(&logits, &target, 0.1, Some(1)).unwrap();
        assert_eq!(out.ntokens, 2);
        assert!((scalar(&out.loss_sum) - 3.05 * LN2).abs() < 1e-6);
        assert!((scalar(&out.nll_sum) - 3.0 * LN2).abs() < 1e-6);
        // The padding row gets no gradient, the others do.
        let g = out.loss_sum.backward().unwrap();
        let g = g
            .get(&logits)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(g[2].iter().all(|x| *x == 0.0));
        assert!(g[0].iter().chain(&g[1]).all(|x| *x != 0.0));
    }

    #[test]
    fn fused_and_composed_agree() {
        let dev = Device::Cpu;
        let logits = Var::randn(0f32, 2.0, (2, 3, 11), &dev).unwrap();
        let target = Tensor::new(&[[3u32, 1, 10], [0, 1, 7]], &dev).unwrap();
        let run = |fused: bool| {
            torchscale_kernels::with_fused(fused, || {
                let out = label_smoothed_cross_entropy(&logits, &target, 0.1, Some(1)).unwrap();
                let total = ((&out.loss_sum * 0.7).unwrap() + &out.nll_sum).unwrap();
                let g = total.backward().unwrap();
                let g = g.get(&logits).unwrap().flatten_all().unwrap();
                (scalar(&out.loss_sum), scalar(&out.nll_sum), out.ntokens, g)
            })
        };
        let (f, c) = (run(true), run(false));
        assert_eq!((f.2, c.2), (4, 4));
        assert!((f.0 - c.0).abs() < 1e-5 * c.0.abs() && (f.1 - c.1).abs() < 1e-5 * c.1.abs());
        let diff = (f.3 - c.3).unwrap().abs().unwrap().max(0).unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let dev = Device::Cpu;
        let logits = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let e = label_smoothed_cross_entropy(
            &logits,
            &Tensor::new(&[0u32, 3], &dev).unwrap(),
            0.1,
            None,
        );
        assert!(e.unwrap_err().to_string().contains("target"));
        let e =
            label_smoothed_cross_entropy(&logits, &Tensor::new(&[0u32], &dev).unwrap(), 0.1, None);
        assert!(matches!(e, Err(Error::Shape { .. })));
        let e = label_smoothed_cross_entropy(
            &logits,
            &Tensor::new(&[0u32, 1], &dev).unwrap(),
            1.5,
            None,
        );
        assert!(matches!(e, Err(Error::Config { .. })));
    }

    #[test]
    fn balance_loss_combines() {
        let dev = Device::Cpu;
        let a = Var::new(0.5f32, &dev).unwrap();
        let b = Tensor::new(&[1.5f32], &dev).unwrap();
        let losses = [a.as_tensor().clone(), b];
        let s = moe_balance_loss(&losses, 0.01, AuxCombine::Sum)
            .unwrap()
            .unwrap();
        assert!((scalar(&s) - 0.02).abs() < 1e-8);
        let m = moe_balance_loss(&losses, 0.01, AuxCombine::Average)
            .unwrap()
            .unwrap();
        assert!((scalar(&m) - 0.01).abs() < 1e-8);
        let g = m.backward().unwrap();
        assert!((g.get(&a).unwrap().to_scalar::<f32>().unwrap() - 0.005).abs() < 1e-8);
        assert!(moe_balance_loss(&[], 1.0, AuxCombine::Sum)
            .unwrap()
            .is_none());
    }
}
