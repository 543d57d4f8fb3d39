//! Every expert's feed-forward block on its own rows as two grouped matrix products (dropless
//! MoE): the rows of all experts lie side by side, `counts[e]` of them for expert `e`, and `fc1`
//! and `fc2` each run as one [`torchscale_kernels::grouped_linear`] over the stacked weights of
//! all experts, with no padding to a common capacity and no per-expert `narrow` / `cat`.
//!
//! The weights are stacked with `Tensor::stack` at every call, so that the gradients flow back to
//! each expert's own variables. The Sub-LN inner LayerNorm differs per expert only in its affine
//! part: one [`torchscale_kernels::grouped_layer_norm`] over all rows normalises each expert's
//! rows with its own stacked `weight` and `bias`.
//!
//! Cost: stacking copies every expert's weights at each call, and candle sums their gradient back
//! through the stack (one `[E, out, in]` gradient, then a slice per expert). On the 2-core build
//! machine (mimalloc, on a rayon worker, 2048 rows, 256 -> 1024 -> 256) that made the grouped
//! run about as fast as the per-expert loop at 8 experts and about 1.4x slower at 64; the grouped
//! product on weights already held as one `[E, out, in]` variable was about 1.1-1.3x faster than
//! the loop at 64 (see the `grouped_timing` tests here and in torchscale-kernels).

use candle_core::Tensor;
use torchscale_core::dropout::dropout;
use torchscale_core::ffn::FeedForward;
use torchscale_core::{Error, Result};
use torchscale_kernels::{grouped_layer_norm, grouped_linear};

/// `experts[e].forward(rows_e, train)` for every expert `e`, where `rows_e` is the `e`-th block of
/// `counts[e]` consecutive rows of `rows: [K, C]`; returns `[K, C]` (the blocks in the same order).
///
/// Numerically each expert's own block (with dropout off): `fc1`, the activation, activation
/// dropout, the inner LayerNorm when the experts have one, `fc2` and dropout, with `fc1` and `fc2`
/// as grouped products over the stacked weights. With dropout on, one mask is drawn over all rows
/// for each dropout (the same distribution as the per-expert loop, not the same draws).
///
/// The experts must share their configuration (shapes, activation, dropouts, inner norm);
/// `counts` must have one entry per expert and sum to `K`; experts may have no rows.
pub(crate) fn grouped_experts(
    experts: &[FeedForward],
    rows: &Tensor,
    counts: &[usize],
    train: bool,
) -> Result<Tensor> {
    let Some(first) = experts.first() else {
        return Err(Error::invalid("experts", "no experts to run"));
    };
    check_same_config(experts)?;
    let cfg = *first.config();
    let width = first.fc1().weight().dim(1)?;
    let &[k, c] = rows.dims() else {
        return Err(Error::shape(
            "rows",
            format!("[rows, {width}]"),
            rows.dims(),
        ));
    };
    if c != width {
        return Err(Error::shape(
            "rows",
            format!("[rows, {width}]"),
            rows.dims(),
        ));
    }
    if counts.len() != experts.len() {
        return Err(Error::invalid(
            "counts",
            format!(
                "{} entries for {} experts: {counts:?}",
                counts.len(),
                experts.len()
            ),
        ));
    }
    let total = counts.iter().try_fold(0usize, |s, &n| s.checked_add(n));
    if total != Some(k) {
        return Err(Error::invalid(
            "counts",
            format!("{counts:?} do not sum to the {k} rows of {:?}", rows.dims()),
        ));
    }
    let out_dim = first.fc2().weight().dim(0)?;
    if k == 0 {
        return Ok(Tensor::zeros((0, out_dim), rows.dtype(), rows.device())?);
    }

    let (w1, b1) = stacked(experts, FeedForward::fc1, "fc1")?;
    let (w2, b2) = stacked(experts, FeedForward::fc2, "fc2")?;
    let h = grouped_linear(rows, &w1, b1.as_ref(), counts)?;
    let h = cfg.activation.forward(&h)?;
    let h = dropout(&h, cfg.activation_dropout, train)?;
    let h = match first.inner_norm() {
        Some(ln) => {
            let gammas = stack_each(experts, |e| e.inner_norm().map(|n| n.weight()))?;
            let betas = stack_each(experts, |e| e.inner_norm().map(|n| n.bias()))?;
            grouped_layer_norm(&h, &gammas, &betas, ln.eps(), counts)?
        }
        None => h,
    };
    let y = grouped_linear(&h, &w2, b2.as_ref(), counts)?;
    dropout(&y, cfg.dropout, train)
}

/// Errors unless every expert has the first one's shapes, activation, dropouts and inner norm.
fn check_same_config(experts: &[FeedForward]) -> Result<()> {
    let Some(first) = experts.first() else {
        return Ok(());
    };
    let a = first.config();
    let shapes = |e: &FeedForward| {
        (
            e.fc1().weight().dims().to_vec(),
            e.fc2().weight().dims().to_vec(),
        )
    };
    let eps = |e: &FeedForward| e.inner_norm().map(|n| n.eps());
    for (j, e) in experts.iter().enumerate().skip(1) {
        let b = e.config();
        let same = a.activation == b.activation
            && a.activation_dropout == b.activation_dropout
            && a.dropout == b.dropout
            && eps(first) == eps(e)
            && shapes(first) == shapes(e);
        if !same {
            return Err(Error::invalid(
                "experts",
                format!(
                    "expert {j} differs from expert 0 in its shapes, activation, dropouts or \
                     inner norm; grouped experts must share them"
                ),
            ));
        }
    }
    Ok(())
}

/// The experts' weights of one projection stacked to `[E, out, in]`, and their biases to
/// `[E, out]` (none when no expert has one).
fn stacked(
    experts: &[FeedForward],
    proj: fn(&FeedForward) -> &candle_nn::Linear,
    name: &str,
) -> Result<(Tensor, Option<Tensor>)> {
    let weights: Vec<&Tensor> = experts.iter().map(|e| proj(e).weight()).collect();
    let w = Tensor::stack(&weights, 0)?;
    let biases: Vec<Option<&Tensor>> = experts.iter().map(|e| proj(e).bias()).collect();
    let b = if biases.iter().all(Option::is_none) {
        None
    } else {
        Some(stack_each(experts, |e| proj(e).bias()).map_err(|_| {
            Error::invalid(
                "experts",
                format!("some experts' {name} have a bias and some have none"),
            )
        })?)
    };
    Ok((w, b))
}

/// `Tensor::stack` of one tensor taken from each expert; an error when an expert lacks it.
fn stack_each<'a>(
    experts: &'a [FeedForward],
    get: impl Fn(&'a FeedForward) -> Option<&'a Tensor>,
) -> Result<Tensor> {
    let parts = experts
        .iter()
        .enumerate()
        .map(|(j, e)| {
            get(e).ok_or_else(|| {
                Error::invalid(
                    "experts",
                    format!("expert {j} lacks a parameter the others have"),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&parts, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use torchscale_core::dropout::seed_dropout;
    use torchscale_core::ffn::FfnConfig;
    use torchscale_core::init::ParamStore;
    use torchscale_core::Activation;

    const C: usize = 12;
    const F: usize = 20;

    /// `n` experts under one store (keys `experts.{j}.*`), inner-norm affine set to distinct
    /// random values so that every expert's LayerNorm differs.
    fn experts(
        n: usize,
        activation: Activation,
        inner_norm: bool,
        dropout: f64,
    ) -> Result<(ParamStore, Vec<FeedForward>)> {
        let store = ParamStore::new(7);
        let cfg = FfnConfig {
            embed_dim: C,
            ffn_dim: F,
            activation,
            activation_dropout: dropout,
            dropout,
            inner_norm,
            layernorm_eps: 1e-5,
        };
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let experts = (0..n)
            .map(|j| FeedForward::new(cfg, 1.0, vb.pp(format!("experts.{j}"))))
            .collect::<Result<Vec<_>>>()?;
        for (name, var) in store.named_vars() {
            if name.contains("ffn_layernorm") {
                let base = if name.ends_with("weight") { 1.0 } else { 0.0 };
                let v = (Tensor::randn(0f32, 0.5, F, &Device::Cpu)? + base)?;
                var.set(&v)?;
            }
        }
        Ok((store, experts))
    }

    /// Each expert's own `forward` on its block of rows, then `cat` (the reference).
    fn per_expert(experts: &[FeedForward], rows: &Tensor, counts: &[usize]) -> Result<Tensor> {
        let mut outs = Vec::new();
        let mut off = 0;
        for (e, &n) in experts.iter().zip(counts) {
            if n > 0 {
                outs.push(e.forward(&rows.narrow(0, off, n)?, false)?);
            }
            off += n;
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// max |a - b| <= tol * max |b|, naming `what`.
    fn assert_rel(what: &str, a: &Tensor, b: &Tensor, tol: f32) -> Result<()> {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let m = b.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            d <= tol * m,
            "{what}: max diff {d:e}, max |reference| {m:e}"
        );
        Ok(())
    }

    /// Values and the gradients of rows and of every parameter, grouped against per expert.
    fn compare(activation: Activation, inner_norm: bool, counts: &[usize]) -> Result<()> {
        let (store, experts) = experts(counts.len(), activation, inner_norm, 0.0)?;
        let k: usize = counts.iter().sum();
        let rows = Var::randn(0f32, 1.0, (k, C), &Device::Cpu)?;
        let probe = Tensor::randn(0f32, 1.0, (k, C), &Device::Cpu)?;
        let what = format!("{activation:?} inner_norm={inner_norm} counts={counts:?}");
        // train = true with dropout 0: the training path, deterministic.
        let got = grouped_experts(&experts, rows.as_tensor(), counts, true)?;
        let want = per_expert(&experts, rows.as_tensor(), counts)?;
        assert_rel(&format!("{what} output"), &got, &want, 1e-5)?;
        let g_got = (got * &probe)?.sum_all()?.backward()?;
        let g_want = (want * &probe)?.sum_all()?.backward()?;
        let mut named = store.named_vars();
        named.push(("rows".into(), rows));
        for (name, var) in named {
            let e: usize = name
                .strip_prefix("experts.")
                .and_then(|s| s.split('.').next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(usize::MAX);
            let (a, b) = (g_got.get(&var), g_want.get(&var));
            match (a, b) {
                (Some(a), Some(b)) => assert_rel(&format!("{what} grad {name}"), a, b, 1e-5)?,
                // An expert without rows: the loop never touched it, the grouped run gives zeros.
                (Some(a), None) => {
                    assert_eq!(counts.get(e), Some(&0), "{what}: {name} only in grouped");
                    assert_eq!(
                        a.abs()?.max_all()?.to_scalar::<f32>()?,
                        0.0,
                        "{what}: {name}"
                    );
                }
                (None, _) => panic!("{what}: grouped run gave {name} no gradient"),
            }
        }
        Ok(())
    }

    #[test]
    fn matches_per_expert_loop_values_and_gradients() -> Result<()> {
        for inner_norm in [false, true] {
            for act in [Activation::Gelu, Activation::Relu, Activation::Swish] {
                compare(act, inner_norm, &[5, 0, 9, 3])?;
            }
            compare(Activation::Gelu, inner_norm, &[7])?;
            compare(Activation::Gelu, inner_norm, &[0, 0, 1, 0, 13, 0, 2, 0])?;
        }
        Ok(())
    }

    #[test]
    fn no_rows_give_an_empty_output() -> Result<()> {
        let (_, experts) = experts(3, Activation::Gelu, true, 0.0)?;
        let rows = Tensor::zeros((0, C), DType::F32, &Device::Cpu)?;
        let y = grouped_experts(&experts, &rows, &[0, 0, 0], true)?;
        assert_eq!(y.dims(), &[0, C]);
        Ok(())
    }

    #[test]
    fn dropout_applies_in_training_only() -> Result<()> {
        let (_, experts) = experts(3, Activation::Relu, true, 0.5)?;
        let rows = Tensor::randn(0f32, 1.0, (10, C), &Device::Cpu)?;
        let counts = [4, 0, 6];
        let eval = grouped_experts(&experts, &rows, &counts, false)?;
        assert_rel("eval", &eval, &per_expert(&experts, &rows, &counts)?, 1e-5)?;
        seed_dropout(3);
        let a = grouped_experts(&experts, &rows, &counts, true)?;
        seed_dropout(3);
        let b = grouped_experts(&experts, &rows, &counts, true)?;
        assert_eq!(
            a.to_vec2::<f32>()?,
            b.to_vec2::<f32>()?,
            "same seed, same masks"
        );
        let zeros = a
            .eq(0f32)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert!(zeros > 0.0, "output dropout zeroes some elements");
        Ok(())
    }

    #[test]
    fn bad_inputs_are_errors() -> Result<()> {
        let (_, plain) = experts(3, Activation::Gelu, false, 0.0)?;
        let rows = Tensor::zeros((6, C), DType::F32, &Device::Cpu)?;
        let err = |r: Result<Tensor>| r.map(|_| ()).unwrap_err().to_string();
        let e = err(grouped_experts(&plain, &rows, &[3, 3], false));
        assert!(e.contains("counts") && e.contains("3 experts"), "{e}");
        let e = err(grouped_experts(&plain, &rows, &[3, 3, 1], false));
        assert!(e.contains("counts") && e.contains("6 rows"), "{e}");
        let e = err(grouped_experts(&plain, &rows, &[usize::MAX, 3, 0], false));
        assert!(e.contains("counts"), "{e}");
        let wide = Tensor::zeros((6, C + 1), DType::F32, &Device::Cpu)?;
        let e = err(grouped_experts(&plain, &wide, &[3, 3, 0], false));
        assert!(e.contains("rows"), "{e}");
        let flat = Tensor::zeros(6 * C, DType::F32, &Device::Cpu)?;
        let e = err(grouped_experts(&plain, &flat, &[3, 3, 0], false));
        assert!(e.contains("rows"), "{e}");
        let e = err(grouped_experts(&[], &rows, &[], false));
        assert!(e.contains("experts"), "{e}");
        let (_, normed) = experts(1, Activation::Gelu, true, 0.0)?;
        let mixed = vec![plain[0].clone(), normed[0].clone()];
        let e = err(grouped_experts(&mixed, &rows, &[3, 3], false));
        assert!(e.contains("expert 1"), "{e}");
        Ok(())
    }

    /// Forward + backward time of [`grouped_experts`] against the per-expert loop at MoE sizes
    /// (2048 rows, width 256, hidden 1024, 8 and 64 experts, uneven counts with some empty), on a
    /// rayon worker as a training step runs:
    /// `CANDLE_NUM_THREADS=1 cargo test --release -p torchscale-moe --lib grouped_timing --
    /// --ignored --nocapture` (the system allocator here; the training binaries use mimalloc,
    /// under which the stacked weights' buffers are reused instead of faulted in again).
    #[test]
    #[ignore = "timing, not a check; run by hand"]
    fn grouped_timing() -> Result<()> {
        use std::time::Instant;
        let (k, c, f) = (2048, 256, 1024);
        let iters: usize = std::env::var("GROUPED_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5);
        for (e, inner_norm) in [(8, false), (64, false), (8, true), (64, true)] {
            let store = ParamStore::new(1);
            let cfg = FfnConfig {
                embed_dim: c,
                ffn_dim: f,
                activation: Activation::Gelu,
                activation_dropout: 0.0,
                dropout: 0.0,
                inner_norm,
                layernorm_eps: 1e-5,
            };
            let vb = store.var_builder(DType::F32, &Device::Cpu);
            let experts = (0..e)
                .map(|j| FeedForward::new(cfg, 1.0, vb.pp(format!("experts.{j}"))))
                .collect::<Result<Vec<_>>>()?;
            // Rows assigned by a fixed hash, skewed towards the first experts (density
            // 1 / sqrt), every eighth expert empty.
            let mut counts = vec![0usize; e];
            for r in 0..k {
                let u = ((r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64
                    / (1u64 << 53) as f64;
                let j = ((u * u * e as f64) as usize).min(e - 1);
                counts[if j % 8 == 7 { j - 1 } else { j }] += 1;
            }
            let rows = Var::randn(0f32, 1.0, (k, c), &Device::Cpu)?;
            let time_on_worker = |grouped: bool| -> Result<f64> {
                let mut ts = Vec::with_capacity(iters);
                for i in 0..=iters {
                    let t = Instant::now();
                    let y = if grouped {
                        grouped_experts(&experts, rows.as_tensor(), &counts, true)?
                    } else {
                        per_expert(&experts, rows.as_tensor(), &counts)?
                    };
                    let _grads = y.sum_all()?.backward()?;
                    if i > 0 {
                        ts.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                }
                ts.sort_by(f64::total_cmp);
                Ok(ts[ts.len() / 2])
            };
            // On a rayon worker, as the training binaries run a step (`runtime::in_pool`).
            let time = |grouped: bool| -> Result<f64> {
                torchscale_kernels::runtime::in_pool(|| time_on_worker(grouped))
            };
            // Interleaved, so that a change in machine load hits both alike.
            let (mut g, mut l) = (Vec::new(), Vec::new());
            for _ in 0..2 {
                g.push(time(true)?);
                l.push(time(false)?);
            }
            let (g, l) = (
                g.iter().copied().fold(f64::MAX, f64::min),
                l.iter().copied().fold(f64::MAX, f64::min),
            );
            let empty = counts.iter().filter(|&&n| n == 0).count();
            println!(
                "E={e:3} inner_norm={inner_norm:5} (empty {empty:2}, max count {:4}): \
                 grouped {g:7.1} ms, loop {l:7.1} ms, loop/grouped {:.2}",
                counts.iter().max().unwrap_or(&0),
                l / g
            );
        }
        Ok(())
    }
}
