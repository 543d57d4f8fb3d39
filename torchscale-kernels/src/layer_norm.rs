//! `torch.nn.LayerNorm` over the last dimension (biased variance, affine) as one kernel each way.
//!
//! Forward: per row, mean and variance by two passes over the row while it sits in cache (as
//! exact as the composed version), then `y = (x - mean) rstd w + b`; the per-row mean and
//! `rstd = 1 / sqrt(var + eps)` are kept for the backward. Backward, with `x^ = (x - mean) rstd`:
//! `dx = rstd (g w - mean(g w) - x^ mean(g w x^))`, `dw = sum_rows g x^`, `db = sum_rows g`, rows
//! split over threads, each with its own `dw`/`db` partial sums added at the end.
//!
//! Rows up to 128 wide take the kernels of `narrow` on AVX-512 (16 rows per block, one
//! transpose-and-add reduction per block instead of horizontal sums per row). Outputs are not
//! zero-filled first: every kernel writes each element (see `filled`).

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::activation::vmath::{fma, hsum, multiversion, sum1, LANES};
use crate::cpu::{as_f32, cpu_float, storage_from_f32, tensor_from_f32, threads, with_f32};
use crate::cuda::cuda_float;
use crate::switch::fused_enabled;

#[cfg(target_arch = "x86_64")]
pub(crate) mod narrow;

/// LayerNorm of `x` over its last dimension with `weight` and `bias` of that width: the fused
/// kernel on CPU float tensors (and, with the `cuda` feature, on CUDA f32 / f16 / bf16 tensors)
/// when fused kernels are on, [`layer_norm_composed`] otherwise (an
/// f64 `x` stays composed, keeping f64 precision). `weight` and `bias` may have another dtype than
/// `x` (f32 norms under bf16 activations); the output has `x`'s dtype, their gradients theirs.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let Some(&width) = x.dims().last() else {
        bail!("layer_norm: input must have at least one dimension, got a scalar");
    };
    if weight.dims() != [width] || bias.dims() != [width] {
        bail!(
            "layer_norm: weight {:?} and bias {:?} must both be [{width}] for input {:?}",
            weight.dims(),
            bias.dims(),
            x.dims()
        );
    }
    let ts = [x, weight, bias];
    let on_cuda = cuda_float(&ts);
    if !fused_enabled()
        || !(cpu_float(&ts) || on_cuda)
        || x.dtype() == DType::F64
        || x.elem_count() == 0
    {
        return layer_norm_composed(x, weight, bias, eps);
    }
    let op = LayerNormOp {
        eps: eps as f32,
        stats: Mutex::new(None),
        #[cfg(feature = "cuda")]
        cuda_stats: Default::default(),
    };
    // The CUDA kernels read rows in place: a strided input is copied once here.
    let x = if on_cuda { x.contiguous()? } else { x.clone() };
    x.apply_op3_arc(weight, bias, Arc::new(Box::new(op)))
}

/// The composed LayerNorm of `torchscale-core` (statistics in f32 for half types, `weight` and
/// `bias` cast to the compute dtype, result cast back): the reference for the fused kernel.
pub fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = if dtype == DType::F32 || dtype == DType::F64 {
        x.clone()
    } else {
        x.to_dtype(DType::F32)?
    };
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centred = xf.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    let w = weight.to_dtype(normed.dtype())?;
    let b = bias.to_dtype(normed.dtype())?;
    normed.broadcast_mul(&w)?.broadcast_add(&b)?.to_dtype(dtype)
}

/// The fused LayerNorm; `stats` holds `[mean, rstd]` per row from the forward for the backward.
struct LayerNormOp {
    eps: f32,
    stats: Mutex<Option<Vec<f32>>>,
    /// The forward's `[mean, rstd]` per row on the device (CUDA forward).
    #[cfg(feature = "cuda")]
    cuda_stats: crate::cuda::norm::Stats,
}

/// Rows per parallel task (all rows when the work is small).
pub(crate) fn rows_per_task(rows: usize, d: usize, tasks_per_thread: usize) -> usize {
    // The narrow kernels take about a quarter of the time per element of the row kernels
    // (measured at [256, 64]: 1.7 us against 7.7 us), so their work counts a quarter: a split
    // costs a few microseconds of waking and joining whatever the kernel.
    #[cfg(target_arch = "x86_64")]
    let work = if narrow_kernels(d).is_some() {
        rows * d / 4
    } else {
        rows * d
    };
    #[cfg(not(target_arch = "x86_64"))]
    let work = rows * d;
    if crate::cpu::worth_threading(work) {
        rows.div_ceil(threads() * tasks_per_thread).max(1)
    } else {
        rows.max(1)
    }
}

/// `(mean, 1 / sqrt(var + eps))` of one row.
#[inline(always)]
pub(crate) fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum1(x, |v| v) / n;
    let var = sum1(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

#[inline(always)]
fn fwd_kernel<const FMA: bool>(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f32,
    y: &mut [MaybeUninit<f32>],
    stats: &mut [f32],
) {
    let d = w.len();
    for ((x, y), st) in x
        .chunks_exact(d)
        .zip(y.chunks_exact_mut(d))
        .zip(stats.chunks_exact_mut(2))
    {
        let (mean, rstd) = row_stats(x, eps);
        for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
            y.write(fma::<FMA>((x - mean) * rstd, w, b));
        }
        st[0] = mean;
        st[1] = rstd;
    }
}

/// Recomputes `[mean, rstd]` per row (when the forward's are not at hand).
#[inline(always)]
fn stats_kernel<const FMA: bool>(x: &[f32], d: usize, eps: f32, stats: &mut [f32]) {
    for (x, st) in x.chunks_exact(d).zip(stats.chunks_exact_mut(2)) {
        (st[0], st[1]) = row_stats(x, eps);
    }
}

/// Backward over a block of rows. `dx` is empty when `x` needs no gradient, else every element
/// is written; `dwb` (`dw` then `db`, accumulated into) is empty when neither `w` nor `b` does.
#[inline(always)]
pub(crate) fn bwd_kernel<const FMA: bool>(
    x: &[f32],
    g: &[f32],
    w: &[f32],
    stats: &[f32],
    dx: &mut [MaybeUninit<f32>],
    dwb: &mut [f32],
) {
    let d = w.len();
    let inv_d = 1.0 / d as f32;
    let (dw, db) = dwb.split_at_mut(dwb.len() / 2);
    for (row, ((x, g), st)) in x
        .chunks_exact(d)
        .zip(g.chunks_exact(d))
        .zip(stats.chunks_exact(2))
        .enumerate()
    {
        let (mean, rstd) = (st[0], st[1]);
        if !dx.is_empty() {
            let dx = &mut dx[row * d..(row + 1) * d];
            // sum(g w) and sum(g w x^) with x^ = (x - mean) rstd, in one pass.
            let mut s_gw = [0f32; LANES];
            let mut s_gwx = [0f32; LANES];
            let bulk = d - d % LANES;
            let tail = (bulk..d).fold((0f32, 0f32), |(a, c), i| {
                let gw = g[i] * w[i];
                (a + gw, fma::<FMA>(gw, (x[i] - mean) * rstd, c))
            });
            for ((x, g), w) in x[..bulk]
                .chunks_exact(LANES)
                .zip(g[..bulk].chunks_exact(LANES))
                .zip(w[..bulk].chunks_exact(LANES))
            {
                let sums = s_gw.iter_mut().zip(s_gwx.iter_mut());
                for (((a, c), &x), (&g, &w)) in sums.zip(x).zip(g.iter().zip(w)) {
                    let gw = g * w;
                    *a += gw;
                    *c = fma::<FMA>(gw, (x - mean) * rstd, *c);
                }
            }
            let m_gw = (hsum(s_gw) + tail.0) * inv_d;
            let m_gwx = (hsum(s_gwx) + tail.1) * inv_d;
            // `g * w` rounded as in its mean, not fused: an exact product minus the mean of rounded
            // ones leaves the rounding error, which rstd (up to 1/sqrt(eps)) magnifies.
            if dw.is_empty() {
                for (((o, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                    let xh = (x - mean) * rstd;
                    o.write(rstd * fma::<FMA>(-xh, m_gwx, g * w - m_gw));
                }
            } else {
                let parts = dw.iter_mut().zip(db.iter_mut());
                for ((((o, &x), &g), &w), (dw, db)) in dx.iter_mut().zip(x).zip(g).zip(w).zip(parts)
                {
                    let xh = (x - mean) * rstd;
                    o.write(rstd * fma::<FMA>(-xh, m_gwx, g * w - m_gw));
                    *dw = fma::<FMA>(g, xh, *dw);
                    *db += g;
                }
            }
        } else if !dw.is_empty() {
            for (((&x, &g), dw), db) in x.iter().zip(g).zip(dw.iter_mut()).zip(db.iter_mut()) {
                *dw = fma::<FMA>(g, (x - mean) * rstd, *dw);
                *db += g;
            }
        }
    }
}

multiversion!(fn fwd_wide = fwd_kernel(
    x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [MaybeUninit<f32>], stats: &mut [f32]
));
multiversion!(fn stats_wide = stats_kernel(x: &[f32], d: usize, eps: f32, stats: &mut [f32]));
multiversion!(fn bwd_wide = bwd_kernel(
    x: &[f32], g: &[f32], w: &[f32], stats: &[f32], dx: &mut [MaybeUninit<f32>], dwb: &mut [f32]
));

/// The narrow-row kernels for width `d`, where the CPU and the width suit them.
#[cfg(target_arch = "x86_64")]
pub(crate) fn narrow_kernels(d: usize) -> Option<narrow::Narrow> {
    narrow::Narrow::new(d)
}

/// `v` as floats, every element written.
///
/// # Safety
/// Every element of `v` is initialised.
pub(crate) unsafe fn assume_init(v: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`; the caller vouches for the values.
    unsafe { &mut *(v as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// A `Vec` of `n` floats that `fill` writes (outputs the kernels overwrite whole are not
/// zero-filled first: at these sizes that fill costs a fifth of a LayerNorm).
///
/// # Safety
/// `fill` writes every element of the slice it gets.
pub(crate) unsafe fn filled<R>(
    n: usize,
    fill: impl FnOnce(&mut [MaybeUninit<f32>]) -> R,
) -> (Vec<f32>, R) {
    let mut v = Vec::with_capacity(n);
    let r = fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: `fill` wrote all `n` elements (the caller's promise).
    unsafe { v.set_len(n) };
    (v, r)
}

/// [`filled`] for a fallible `fill`: the `Vec` is returned only when `fill` succeeds.
///
/// # Safety
/// When `fill` returns `Ok`, it has written every element of the slice it got.
pub(crate) unsafe fn try_filled<R>(
    n: usize,
    fill: impl FnOnce(&mut [MaybeUninit<f32>]) -> Result<R>,
) -> Result<(Vec<f32>, R)> {
    let mut v = Vec::with_capacity(n);
    let r = fill(&mut v.spare_capacity_mut()[..n])?;
    // SAFETY: `fill` succeeded, so it wrote all `n` elements (the caller's promise).
    unsafe { v.set_len(n) };
    Ok((v, r))
}

/// Forward over a block of rows, writing every element of `y`: 16 rows at a time on narrow
/// rows, row by row otherwise.
pub(crate) fn fwd_rows(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f32,
    y: &mut [MaybeUninit<f32>],
    stats: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = narrow_kernels(w.len()) {
        return k.fwd(x, w, b, eps, y, stats);
    }
    fwd_wide(x, w, b, eps, y, stats)
}

/// `[mean, rstd]` per row of a block.
pub(crate) fn stats_rows(x: &[f32], d: usize, eps: f32, stats: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = narrow_kernels(d) {
        return k.stats(x, eps, stats);
    }
    stats_wide(x, d, eps, stats)
}

/// Backward over a block of rows (see [`bwd_kernel`]), writing every element of `dx`.
pub(crate) fn bwd_rows(
    x: &[f32],
    g: &[f32],
    w: &[f32],
    stats: &[f32],
    dx: &mut [MaybeUninit<f32>],
    dwb: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = narrow_kernels(w.len()) {
        return k.bwd(x, g, w, stats, dx, dwb);
    }
    bwd_wide(x, g, w, stats, dx, dwb)
}

impl LayerNormOp {
    /// Per-row statistics of `x` (rows of width `d`), computed in parallel.
    fn compute_stats(&self, x: &[f32], d: usize) -> Vec<f32> {
        let rows = x.len() / d;
        let mut stats = vec![0f32; 2 * rows];
        let step = rows_per_task(rows, d, 4);
        if step >= rows {
            // One task: run it here (handing it to rayon's pool costs more than it takes).
            stats_rows(x, d, self.eps, &mut stats);
        } else {
            stats
                .par_chunks_mut(2 * step)
                .zip(x.par_chunks(step * d))
                .for_each(|(st, x)| stats_rows(x, d, self.eps, st));
        }
        stats
    }

    /// The gradients for `x` (when `need_dx`) and the summed `[dw, db]` (when `need_wb`), in f32.
    fn backward(
        &self,
        x: &[f32],
        g: &[f32],
        w: &[f32],
        need_dx: bool,
        need_wb: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let d = w.len();
        let rows = x.len() / d;
        let guard = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let recomputed;
        let stats = match guard.as_deref() {
            Some(s) if s.len() == 2 * rows => s,
            _ => {
                recomputed = self.compute_stats(x, d);
                &recomputed
            }
        };
        // One task per thread: each owns a `[dw, db]` partial, so the tasks stay few.
        let step = rows_per_task(rows, d, 1);
        let tasks = rows.div_ceil(step);
        let task = |t: usize, dx: &mut [MaybeUninit<f32>]| {
            let rows = t * step..((t + 1) * step).min(rows);
            let mut dwb = if need_wb {
                vec![0f32; 2 * d]
            } else {
                Vec::new()
            };
            bwd_rows(
                &x[rows.start * d..rows.end * d],
                &g[rows.start * d..rows.end * d],
                w,
                &stats[2 * rows.start..2 * rows.end],
                dx,
                &mut dwb,
            );
            dwb
        };
        let n = if need_dx { x.len() } else { 0 };
        // SAFETY: each task's `bwd_rows` writes every element of its block of `dx`, and the
        // blocks cover it (or it is empty).
        let (dx, partials) = unsafe {
            filled(n, |dx| {
                let mut parts: Vec<&mut [MaybeUninit<f32>]> = if need_dx {
                    dx.chunks_mut(step * d).collect()
                } else {
                    (0..tasks)
                        .map(|_| <&mut [MaybeUninit<f32>]>::default())
                        .collect()
                };
                let partials: Vec<Vec<f32>> = if tasks <= 1 {
                    // One task: run it here (handing it to rayon's pool costs more than it takes).
                    parts
                        .iter_mut()
                        .enumerate()
                        .map(|(t, dx)| task(t, dx))
                        .collect()
                } else {
                    parts
                        .par_iter_mut()
                        .enumerate()
                        .map(|(t, dx)| task(t, dx))
                        .collect()
                };
                partials
            })
        };
        let mut parts = partials.into_iter();
        let mut dwb = parts.next().unwrap_or_default();
        for p in parts {
            for (a, b) in dwb.iter_mut().zip(&p) {
                *a += b;
            }
        }
        (dx, dwb)
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "torchscale-layer-norm"
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
        let d = l2.shape().elem_count();
        if l1.dims().last() != Some(&d) || l3.shape().elem_count() != d || d == 0 {
            bail!(
                "layer_norm: input {:?}, weight {:?}, bias {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let (xs, ws, bs) = (as_f32(s1, l1)?, as_f32(s2, l2)?, as_f32(s3, l3)?);
        let rows = xs.len() / d;
        let mut stats = vec![0f32; 2 * rows];
        let step = rows_per_task(rows, d, 4);
        // SAFETY: `fwd_rows` writes every element of each block, and the blocks cover `y`.
        let (y, ()) = unsafe {
            filled(xs.len(), |y| {
                if step >= rows {
                    fwd_rows(&xs, &ws, &bs, self.eps, y, &mut stats);
                } else {
                    y.par_chunks_mut(step * d)
                        .zip(xs.par_chunks(step * d))
                        .zip(stats.par_chunks_mut(2 * step))
                        .for_each(|((y, x), st)| fwd_rows(x, &ws, &bs, self.eps, y, st));
                }
            })
        };
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
        Ok((storage_from_f32(y, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (y, stats) = crate::cuda::norm::layer_norm_fwd((s1, l1), (s2, l2), (s3, l3), self.eps)?;
        *self.cuda_stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
        Ok((y, l1.shape().clone()))
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
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let stats = self.cuda_stats.lock().unwrap_or_else(|e| e.into_inner());
            let needs = (need_dx, need_w, need_b);
            return crate::cuda::norm::layer_norm_bwd(
                (x, w, b),
                grad,
                stats.as_ref(),
                self.eps,
                needs,
            );
        }
        let (dx, mut dwb) = with_f32(x, |xs| {
            with_f32(grad, |g| {
                with_f32(w, |ws| {
                    Ok(self.backward(xs, g, ws, need_dx, need_w || need_b))
                })
            })
        })?;
        let d = w.elem_count();
        let dx = if need_dx {
            Some(tensor_from_f32(dx, x.shape(), x.dtype())?)
        } else {
            None
        };
        let db = if need_b {
            Some(tensor_from_f32(dwb.split_off(d), d, b.dtype())?)
        } else {
            None
        };
        let dw = if need_w {
            dwb.truncate(d);
            Some(tensor_from_f32(dwb, d, w.dtype())?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}
