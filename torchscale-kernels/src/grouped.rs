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
//!
//! [`grouped_layer_norm`] is the LayerNorm counterpart (one `weight` / `bias` row per group, the
//! statistics per row as usual): the row kernels of [`mod@crate::layer_norm`] run on each group's
//! block with its own affine, and the backward sums each group's rows into its own `dw` / `db`.

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{
    as_f32, cpu_float, on_worker, storage_from_f32, tensor_from_f32, threads, with_f32,
    worth_threading, BackendStorage,
};
use crate::gemm::{assume_written, matmul, matmul_uninit, Mat};
use crate::layer_norm::{bwd_rows, fwd_rows, rows_per_task, stats_rows};
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

/// Splits `buf` into consecutive pieces of `len * width` elements, one per length (the rest, if
/// any, is left out).
fn split_rows<'a, T>(mut buf: &'a mut [T], lens: &[usize], width: usize) -> Vec<&'a mut [T]> {
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

/// LayerNorm over the last dimension of `x: [K, D]` where the rows of group `e` (rows
/// `offsets[e]..offsets[e] + counts[e]`, as in [`grouped_linear`]) take the affine `weight[e]`,
/// `bias[e]` (`weight`, `bias: [E, D]`); equal to `layer_norm` of each group's rows with its own
/// row of `weight` and `bias`. Groups without rows get zero `dw` / `db`.
///
/// The fused kernel on CPU float tensors when fused kernels are on (an f64 `x` stays composed);
/// [`grouped_layer_norm_composed`] otherwise. `weight` and `bias` may have another dtype than `x`
/// (as for [`crate::layer_norm()`]).
pub fn grouped_layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    counts: &[usize],
) -> Result<Tensor> {
    let (k, d) = check_norm(x.dims(), weight.dims(), bias.dims(), counts)?;
    let ts = [x, weight, bias];
    if !fused_enabled() || !cpu_float(&ts) || x.dtype() == DType::F64 || k == 0 {
        return grouped_layer_norm_composed(x, weight, bias, eps, counts);
    }
    let op = GroupedLayerNormOp {
        counts: counts.to_vec(),
        eps: eps as f32,
        width: d,
        stats: Mutex::new(None),
    };
    x.apply_op3_arc(weight, bias, Arc::new(Box::new(op)))
}

/// [`grouped_layer_norm`] group by group: `narrow` each group's rows, [`crate::layer_norm()`] with
/// its row of `weight` and `bias` (the composed candle version when fused kernels are off), `cat`.
/// The reference the fused kernel is tested against, and the path for f64 and other devices.
pub fn grouped_layer_norm_composed(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    counts: &[usize],
) -> Result<Tensor> {
    let (k, d) = check_norm(x.dims(), weight.dims(), bias.dims(), counts)?;
    let mut outs = Vec::with_capacity(counts.len());
    for (e, r) in ranges(counts).enumerate() {
        if !r.is_empty() {
            let xe = x.narrow(0, r.start, r.len())?;
            outs.push(crate::layer_norm(&xe, &weight.get(e)?, &bias.get(e)?, eps)?);
        }
    }
    if outs.is_empty() {
        return Tensor::zeros((k, d), x.dtype(), x.device());
    }
    Tensor::cat(&outs, 0)
}

/// Checks the shapes and counts of a grouped LayerNorm; returns `(K, D)`.
fn check_norm(x: &[usize], w: &[usize], b: &[usize], counts: &[usize]) -> Result<(usize, usize)> {
    let &[groups, d] = w else {
        bail!("grouped_layer_norm: weight must be [groups, width], got {w:?}");
    };
    if b != w {
        bail!("grouped_layer_norm: bias {b:?} must have the shape of weight {w:?}");
    }
    let &[k, xd] = x else {
        bail!("grouped_layer_norm: input x must be [rows, width], got {x:?}");
    };
    if xd != d || d == 0 {
        bail!("grouped_layer_norm: input x {x:?} and weight {w:?} must share a non-zero width");
    }
    if counts.len() != groups {
        bail!(
            "grouped_layer_norm: counts has {} groups, but weight {w:?} has {groups}",
            counts.len()
        );
    }
    let total = counts.iter().try_fold(0usize, |s, &n| s.checked_add(n));
    if total != Some(k) {
        let total = total.map_or_else(|| "more than usize::MAX".to_string(), |t| t.to_string());
        bail!("grouped_layer_norm: counts {counts:?} sum to {total}, but x {x:?} has {k} rows");
    }
    Ok((k, d))
}

/// The fused grouped LayerNorm; `stats` holds `[mean, rstd]` per row from the forward.
struct GroupedLayerNormOp {
    counts: Vec<usize>,
    eps: f32,
    width: usize,
    stats: Mutex<Option<Vec<f32>>>,
}

impl GroupedLayerNormOp {
    /// The work split: `(group, rows)` blocks in row order covering every row, each group cut
    /// into blocks of at most a thread's share of the rows; and whether to run them in parallel.
    fn blocks(&self) -> (Vec<(usize, Range<usize>)>, bool) {
        let rows: usize = self.counts.iter().sum();
        let step = rows_per_task(rows, self.width, 1);
        let mut blocks = Vec::new();
        for (e, r) in ranges(&self.counts).enumerate() {
            let mut start = r.start;
            while start < r.end {
                let end = (start + step).min(r.end);
                blocks.push((e, start..end));
                start = end;
            }
        }
        let parallel = blocks.len() > 1 && worth_threading(rows * self.width);
        (blocks, parallel)
    }

    /// `[mean, rstd]` per row (the forward's, or computed again when they are not at hand).
    fn stats(&self, x: &[f32]) -> Vec<f32> {
        let d = self.width;
        if let Some(s) = self.stats.lock().unwrap_or_else(|e| e.into_inner()).take() {
            if s.len() == 2 * (x.len() / d) {
                return s;
            }
        }
        let mut stats = vec![0f32; 2 * (x.len() / d)];
        stats_rows(x, d, self.eps, &mut stats);
        stats
    }
}

impl CustomOp3 for GroupedLayerNormOp {
    fn name(&self) -> &'static str {
        "torchscale-grouped-layer-norm"
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
        let (k, d) = check_norm(l1.dims(), l2.dims(), l3.dims(), &self.counts)?;
        let (xs, ws, bs) = (as_f32(s1, l1)?, as_f32(s2, l2)?, as_f32(s3, l3)?);
        let (blocks, parallel) = self.blocks();
        let lens: Vec<usize> = blocks.iter().map(|(_, r)| r.len()).collect();
        let mut y = uninit(k * d);
        let mut stats = vec![0f32; 2 * k];
        let tasks: Vec<_> = blocks
            .into_iter()
            .zip(split_rows(&mut y, &lens, d))
            .zip(split_rows(&mut stats, &lens, 2))
            .collect();
        run_tasks(tasks, parallel, |(((e, r), y), st)| {
            let (w, b) = (&ws[e * d..(e + 1) * d], &bs[e * d..(e + 1) * d]);
            fwd_rows(&xs[r.start * d..r.end * d], w, b, self.eps, y, st);
            Ok(())
        })?;
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
        // SAFETY: the blocks cover every row of `y`, and `fwd_rows` writes each block whole.
        let y = assume_written(y);
        Ok((storage_from_f32(y, s1.dtype())?, Shape::from((k, d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (need_dx, need_w, need_b) = (x.track_op(), w.track_op(), b.track_op());
        if !(need_dx || need_w || need_b) {
            return Ok((None, None, None));
        }
        let (k, d) = check_norm(x.dims(), w.dims(), b.dims(), &self.counts)?;
        let groups = self.counts.len();
        let need_wb = need_w || need_b;
        let (dx, dwb) = with_f32(x, |xs| {
            with_f32(grad, |g| {
                with_f32(w, |ws| {
                    let stats = self.stats(xs);
                    let (blocks, parallel) = self.blocks();
                    let lens: Vec<usize> = blocks.iter().map(|(_, r)| r.len()).collect();
                    let mut dx = uninit(if need_dx { k * d } else { 0 });
                    let dx_parts = optional_parts(need_dx, &mut dx, &lens, d);
                    // One `[dw, db]` partial per block, summed per group below.
                    let partials = Mutex::new(vec![Vec::new(); blocks.len()]);
                    let tasks: Vec<_> = blocks.iter().enumerate().zip(dx_parts).collect();
                    run_tasks(tasks, parallel, |((i, (e, r)), dx)| {
                        let mut dwb = if need_wb {
                            vec![0f32; 2 * d]
                        } else {
                            Vec::new()
                        };
                        let mut none: [MaybeUninit<f32>; 0] = [];
                        bwd_rows(
                            &xs[r.start * d..r.end * d],
                            &g[r.start * d..r.end * d],
                            &ws[e * d..(e + 1) * d],
                            &stats[2 * r.start..2 * r.end],
                            dx.unwrap_or(&mut none),
                            &mut dwb,
                        );
                        partials.lock().unwrap_or_else(|p| p.into_inner())[i] = dwb;
                        Ok(())
                    })?;
                    let partials = partials.into_inner().unwrap_or_else(|p| p.into_inner());
                    // `[dw (E × D), db (E × D)]`, zero for groups without rows.
                    let mut dwb = vec![0f32; if need_wb { 2 * groups * d } else { 0 }];
                    if need_wb {
                        let (dw, db) = dwb.split_at_mut(groups * d);
                        for ((e, _), p) in blocks.iter().zip(&partials) {
                            let (pw, pb) = p.split_at(d);
                            for (a, v) in dw[e * d..(e + 1) * d].iter_mut().zip(pw) {
                                *a += v;
                            }
                            for (a, v) in db[e * d..(e + 1) * d].iter_mut().zip(pb) {
                                *a += v;
                            }
                        }
                    }
                    // SAFETY: the blocks cover every row of `dx` (or it is empty), and
                    // `bwd_rows` writes each block whole when it is given one.
                    Ok((assume_written(dx), dwb))
                })
            })
        })?;
        let dx = need_dx
            .then(|| tensor_from_f32(dx, (k, d), x.dtype()))
            .transpose()?;
        let (dw, db) = if need_wb {
            let mut dwb = dwb;
            let db = dwb.split_off(groups * d);
            (
                need_w
                    .then(|| tensor_from_f32(dwb, (groups, d), w.dtype()))
                    .transpose()?,
                need_b
                    .then(|| tensor_from_f32(db, (groups, d), b.dtype()))
                    .transpose()?,
            )
        } else {
            (None, None)
        };
        Ok((dx, dw, db))
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
        let mut y = uninit(k * out_dim);
        let parallel = split_groups(&self.counts, out_dim * in_dim);
        let tasks: Vec<_> = split_rows(&mut y, &self.counts, out_dim)
            .into_iter()
            .zip(ranges(&self.counts))
            .enumerate()
            .filter(|(_, (_, r))| !r.is_empty())
            .collect();
        run_tasks(tasks, parallel, |(e, (dst, r))| {
            let xe = Mat::rows(&xs[r.start * in_dim..r.end * in_dim], in_dim);
            let we = Mat::transposed(
                &ws[e * out_dim * in_dim..(e + 1) * out_dim * in_dim],
                in_dim,
            );
            let dims = (r.len(), out_dim, in_dim);
            let Some(bs) = bs.as_deref() else {
                return matmul_uninit(dims, dst, out_dim, xe, we, 1.0, !parallel);
            };
            let be = &bs[e * out_dim..(e + 1) * out_dim];
            for row in dst.chunks_mut(out_dim.max(1)) {
                for (d, v) in row.iter_mut().zip(be) {
                    d.write(*v);
                }
            }
            // SAFETY: every element of `dst` was written from the bias just above, and
            // `MaybeUninit<f32>` has the layout of `f32`.
            let dst = unsafe { &mut *(dst as *mut [MaybeUninit<f32>] as *mut [f32]) };
            matmul(dims, dst, out_dim, true, xe, we, 1.0, !parallel)
        })?;
        // SAFETY: the groups' row blocks cover `y` (the counts sum to `k`), and each block was
        // written above, by its product or by its bias then its product.
        let y = assume_written(y);
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
        let wsize = out_dim * in_dim;
        with_f32(grad, |g| {
            with_f32(x, |xs| {
                with_f32(w, |ws| {
                    let mut dx = uninit(if need_x { k * in_dim } else { 0 });
                    let mut dw = uninit(if need_w { groups * wsize } else { 0 });
                    let dx_parts = optional_parts(need_x, &mut dx, &self.counts, in_dim);
                    let dw_parts = optional_parts(need_w, &mut dw, &vec![1; groups], wsize);
                    let tasks: Vec<_> = dx_parts
                        .into_iter()
                        .zip(dw_parts)
                        .zip(ranges(&self.counts))
                        .enumerate()
                        // An empty group still has its `dw` block to zero.
                        .filter(|(_, ((_, dw), r))| !r.is_empty() || dw.is_some())
                        .collect();
                    run_tasks(tasks, parallel, |(e, ((dx, dw), r))| {
                        let ge = &g[r.start * out_dim..r.end * out_dim];
                        let we = &ws[e * wsize..(e + 1) * wsize];
                        if let Some(dx) = dx {
                            // dx_e = g_e @ w_e.
                            matmul_uninit(
                                (r.len(), in_dim, out_dim),
                                dx,
                                in_dim,
                                Mat::rows(ge, out_dim),
                                Mat::rows(we, in_dim),
                                1.0,
                                !parallel,
                            )?;
                        }
                        if let Some(dw) = dw {
                            // dw_e = g_e^T @ x_e (zeros for an empty group).
                            matmul_uninit(
                                (out_dim, in_dim, r.len()),
                                dw,
                                in_dim,
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
                    // SAFETY: the groups' row blocks cover `dx` and their weight blocks cover
                    // `dw` (each allocated only when needed, then with every group's task kept),
                    // and `matmul_uninit` wrote each block whole.
                    let (dx, dw) = (assume_written(dx), assume_written(dw));
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

/// [`split_rows`] of `buf` as `Some` pieces when `needed` (else `lens.len()` times `None`: `buf`
/// is then empty).
fn optional_parts<'a>(
    needed: bool,
    buf: &'a mut [MaybeUninit<f32>],
    lens: &[usize],
    width: usize,
) -> Vec<Option<&'a mut [MaybeUninit<f32>]>> {
    if needed {
        split_rows(buf, lens, width).into_iter().map(Some).collect()
    } else {
        lens.iter().map(|_| None).collect()
    }
}

/// A buffer of `n` elements, none written yet.
fn uninit(n: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: `MaybeUninit` elements need no initialisation.
    unsafe { v.set_len(n) };
    v
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
