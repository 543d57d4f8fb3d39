//! Grouped linear: consecutive row groups of one matrix, each multiplied by its own weight.
//!
//! `x: [K, I]` holds the rows of `E` groups one after another (`counts[e]` rows for group `e`,
//! empty groups allowed); `w: [E, O, I]` and `b: [E, O]` hold one linear layer per group. Row `r`
//! of group `e` becomes `x[r] @ w[e]^T + b[e]`. This is what a dropless mixture of experts needs:
//! every expert's tokens side by side, no padding to a common capacity.
//!
//! The fused CPU op runs one product per non-empty group straight on the slices of `x` and `w`
//! (no `narrow` copies, no `cat`), split over rayon's threads by group when there are many small
//! groups; its backward computes `dx` (per group `g_e @ w[e]`), `dw` (per group `g_e^T @ x_e`, the
//! transpose read in place, zero for an empty group) and `db` (column sums of `g_e`) in one pass
//! over the groups.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{
    as_f32, cpu_float, on_worker, storage_from_f32, tensor_from_f32, threads, with_f32,
    BackendStorage,
};
use crate::gemm::{matmul, Mat};
use crate::linear::column_sums;
use crate::switch::fused_enabled;

/// `x @ w[e]^T (+ b[e])` for each group `e` of consecutive rows of `x` (`x: [K, I]`,
/// `w: [E, O, I]`, `b: [E, O]`; group `e` is rows `offsets[e]..offsets[e] + counts[e]` with
/// `offsets` the running sum of `counts`); returns `[K, O]`.
///
/// `counts` must have one entry per group (`counts.len() == E`) and sum to `K`; groups may be
/// empty (their `dw` and `db` are zero). Shapes that do not fit are errors naming the argument.
///
/// The fused kernel runs on CPU f32 / f16 / bf16 tensors of one dtype when fused kernels are on
/// (computing in f32); otherwise (f64, other devices, `TORCHSCALE_FUSED=0`, [`crate::with_fused`]
/// off) this is [`grouped_linear_composed`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// use torchscale_kernels::{grouped_linear, grouped_linear_composed};
///
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let x = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
/// let w = Tensor::randn(0f32, 0.5, (3, 6, 4), &dev)?;
/// let b = Tensor::randn(0f32, 0.5, (3, 6), &dev)?;
/// // Group 0 has rows 0..2, group 1 none, group 2 rows 2..5.
/// let y = grouped_linear(&x, &w, Some(&b), &[2, 0, 3])?;
/// assert_eq!(y.dims(), &[5, 6]);
/// let r = grouped_linear_composed(&x, &w, Some(&b), &[2, 0, 3])?;
/// assert!((y - r)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
/// assert!(grouped_linear(&x, &w, None, &[2, 2]).is_err());
/// # Ok(()) }
/// ```
pub fn grouped_linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    counts: &[usize],
) -> Result<Tensor> {
    check(x.dims(), w.dims(), b.map(|b| b.dims()), counts)?;
    let same_dtype = w.dtype() == x.dtype() && b.is_none_or(|b| b.dtype() == x.dtype());
    let mut all = vec![x, w];
    all.extend(b);
    // f64 keeps its precision on the composed path (the kernel computes in f32).
    if !fused_enabled() || !same_dtype || x.dtype() == DType::F64 || !cpu_float(&all) {
        return grouped_linear_composed(x, w, b, counts);
    }
    let op = GroupedLinearOp {
        counts: counts.to_vec(),
    };
    match b {
        Some(b) => x.apply_op3_arc(w, b, Arc::new(Box::new(op))),
        None => x.apply_op2_arc(w, Arc::new(Box::new(op))),
    }
}

/// [`grouped_linear`] from candle ops: for each non-empty group, `narrow` its rows, `matmul` by
/// the transpose of its weight, add its bias; then `cat` the groups. The reference the fused
/// kernel is tested against, and the path for f64 and non-CPU tensors.
pub fn grouped_linear_composed(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    counts: &[usize],
) -> Result<Tensor> {
    let (k, out_dim, _) = check(x.dims(), w.dims(), b.map(|b| b.dims()), counts)?;
    let mut outs = Vec::with_capacity(counts.len());
    for (e, r) in ranges(counts).enumerate() {
        if r.is_empty() {
            continue;
        }
        let y = x.narrow(0, r.start, r.len())?.matmul(&w.get(e)?.t()?)?;
        outs.push(match b {
            Some(b) => y.broadcast_add(&b.get(e)?)?,
            None => y,
        });
    }
    if outs.is_empty() {
        return Tensor::zeros((k, out_dim), x.dtype(), x.device());
    }
    Tensor::cat(&outs, 0)
}

/// Checks the shapes and counts; returns `(K, O, I)`.
fn check(
    x: &[usize],
    w: &[usize],
    b: Option<&[usize]>,
    counts: &[usize],
) -> Result<(usize, usize, usize)> {
    let &[groups, out_dim, in_dim] = w else {
        bail!("grouped_linear: weight w must be [groups, out, in], got {w:?}");
    };
    let &[k, x_in] = x else {
        bail!("grouped_linear: input x must be [rows, in], got {x:?}");
    };
    if x_in != in_dim {
        bail!("grouped_linear: input x {x:?} does not end in the in-dim {in_dim} of w {w:?}");
    }
    if let Some(b) = b {
        if b != [groups, out_dim] {
            bail!("grouped_linear: bias b {b:?} must be [{groups}, {out_dim}] for w {w:?}");
        }
    }
    if counts.len() != groups {
        bail!(
            "grouped_linear: counts has {} groups, but w {w:?} has {groups}",
            counts.len()
        );
    }
    let total = counts.iter().try_fold(0usize, |s, &n| s.checked_add(n));
    if total != Some(k) {
        let total = total.map_or_else(|| "more than usize::MAX".to_string(), |t| t.to_string());
        bail!("grouped_linear: counts {counts:?} sum to {total}, but x {x:?} has {k} rows");
    }
    Ok((k, out_dim, in_dim))
}

/// The row range of each group (counts already checked to sum to a `usize`).
fn ranges(counts: &[usize]) -> impl Iterator<Item = Range<usize>> + '_ {
    counts.iter().scan(0usize, |off, &n| {
        let r = *off..*off + n;
        *off += n;
        Some(r)
    })
}

/// Splits `buf` into consecutive pieces of `len * width` elements, one per length.
fn split_rows<'a>(mut buf: &'a mut [f32], lens: &[usize], width: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(lens.len());
    for &n in lens {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(n * width);
        out.push(head);
        buf = tail;
    }
    out
}

/// Whether to split the groups over rayon's threads (each product then on one thread) rather
/// than run them one after another (each product splitting itself when large enough): when there
/// are at least as many non-empty groups as threads and enough work to pay for the split.
fn split_groups(counts: &[usize], macs_per_row: usize) -> bool {
    let threads = threads();
    let busy = counts.iter().filter(|&&n| n > 0).count();
    let rows: usize = counts.iter().sum();
    let min_macs = if on_worker() { 1 << 19 } else { 1 << 22 };
    threads > 1 && busy >= threads && rows.saturating_mul(macs_per_row) >= min_macs
}

/// Runs `f` on each task, over rayon's threads when `parallel`.
fn run_tasks<T: Send>(
    tasks: Vec<T>,
    parallel: bool,
    f: impl Fn(T) -> Result<()> + Sync + Send,
) -> Result<()> {
    if parallel {
        tasks.into_par_iter().try_for_each(f)
    } else {
        tasks.into_iter().try_for_each(f)
    }
}

/// The fused grouped linear (CustomOp2 without bias, CustomOp3 with); `counts` as passed to
/// [`grouped_linear`].
struct GroupedLinearOp {
    counts: Vec<usize>,
}

impl GroupedLinearOp {
    fn forward(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (k, out_dim, in_dim) =
            check(x.1.dims(), w.1.dims(), b.map(|b| b.1.dims()), &self.counts)?;
        let xs = as_f32(x.0, x.1)?;
        let ws = as_f32(w.0, w.1)?;
        let bs = b.map(|b| as_f32(b.0, b.1)).transpose()?;
        let mut y = vec![0f32; k * out_dim];
        let parallel = split_groups(&self.counts, out_dim * in_dim);
        let tasks: Vec<_> = split_rows(&mut y, &self.counts, out_dim)
            .into_iter()
            .zip(ranges(&self.counts))
            .enumerate()
            .filter(|(_, (_, r))| !r.is_empty())
            .collect();
        run_tasks(tasks, parallel, |(e, (dst, r))| {
            if let Some(bs) = bs.as_deref() {
                let be = &bs[e * out_dim..(e + 1) * out_dim];
                for row in dst.chunks_mut(out_dim.max(1)) {
                    row.copy_from_slice(be);
                }
            }
            matmul(
                (r.len(), out_dim, in_dim),
                dst,
                out_dim,
                bs.is_some(),
                Mat::rows(&xs[r.start * in_dim..r.end * in_dim], in_dim),
                Mat::transposed(
                    &ws[e * out_dim * in_dim..(e + 1) * out_dim * in_dim],
                    in_dim,
                ),
                1.0,
                !parallel,
            )
        })?;
        Ok((storage_from_f32(y, x.0.dtype())?, Shape::from((k, out_dim))))
    }

    /// `dx`, `dw` and `db` (each only for an input that tracks gradients) in `x`'s dtype.
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (k, out_dim, in_dim) = check(x.dims(), w.dims(), b.map(|b| b.dims()), &self.counts)?;
        if grad.dims() != [k, out_dim] {
            bail!(
                "grouped_linear: gradient {:?}, expected [{k}, {out_dim}]",
                grad.dims()
            );
        }
        let groups = self.counts.len();
        let (need_x, need_w) = (x.track_op(), w.track_op());
        let need_b = b.is_some_and(|b| b.track_op());
        let dtype = x.dtype();
        let parallel = split_groups(&self.counts, out_dim * in_dim);
        with_f32(grad, |g| {
            with_f32(x, |xs| {
                with_f32(w, |ws| {
                    let mut dx = vec![0f32; if need_x { k * in_dim } else { 0 }];
                    let mut dw = vec![0f32; if need_w { groups * out_dim * in_dim } else { 0 }];
                    let dx_parts = if need_x {
                        split_rows(&mut dx, &self.counts, in_dim)
                            .into_iter()
                            .map(Some)
                            .collect()
                    } else {
                        (0..groups)
                            .map(|_| None)
                            .collect::<Vec<Option<&mut [f32]>>>()
                    };
                    let dw_parts: Vec<Option<&mut [f32]>> = if need_w {
                        dw.chunks_mut((out_dim * in_dim).max(1))
                            .map(Some)
                            .chain(std::iter::repeat_with(|| None))
                            .take(groups)
                            .collect()
                    } else {
                        (0..groups).map(|_| None).collect()
                    };
                    let tasks: Vec<_> = dx_parts
                        .into_iter()
                        .zip(dw_parts)
                        .zip(ranges(&self.counts))
                        .enumerate()
                        .filter(|(_, (_, r))| !r.is_empty())
                        .collect();
                    run_tasks(tasks, parallel, |(e, ((dx, dw), r))| {
                        let ge = &g[r.start * out_dim..r.end * out_dim];
                        let we = &ws[e * out_dim * in_dim..(e + 1) * out_dim * in_dim];
                        if let Some(dx) = dx {
                            // dx_e = g_e @ w_e.
                            matmul(
                                (r.len(), in_dim, out_dim),
                                dx,
                                in_dim,
                                false,
                                Mat::rows(ge, out_dim),
                                Mat::rows(we, in_dim),
                                1.0,
                                !parallel,
                            )?;
                        }
                        if let Some(dw) = dw {
                            // dw_e = g_e^T @ x_e.
                            matmul(
                                (out_dim, in_dim, r.len()),
                                dw,
                                in_dim,
                                false,
                                Mat::transposed(ge, out_dim),
                                Mat::rows(&xs[r.start * in_dim..r.end * in_dim], in_dim),
                                1.0,
                                !parallel,
                            )?;
                        }
                        Ok(())
                    })?;
                    let db = need_b.then(|| {
                        let mut db = Vec::with_capacity(groups * out_dim);
                        for r in ranges(&self.counts) {
                            db.extend(column_sums(
                                &g[r.start * out_dim..r.end * out_dim],
                                r.len(),
                                out_dim,
                            ));
                        }
                        db
                    });
                    let dx = need_x
                        .then(|| tensor_from_f32(dx, (k, in_dim), dtype))
                        .transpose()?;
                    let dw = need_w
                        .then(|| tensor_from_f32(dw, (groups, out_dim, in_dim), dtype))
                        .transpose()?;
                    let db = db
                        .map(|db| tensor_from_f32(db, (groups, out_dim), dtype))
                        .transpose()?;
                    Ok((dx, dw, db))
                })
            })
        })
    }
}

impl CustomOp2 for GroupedLinearOp {
    fn name(&self) -> &'static str {
        "torchscale-grouped-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, w, None, grad)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for GroupedLinearOp {
    fn name(&self) -> &'static str {
        "torchscale-grouped-linear-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, w, Some(b), grad)
    }
}
