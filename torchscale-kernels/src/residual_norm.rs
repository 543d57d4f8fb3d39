//! `LayerNorm(alpha * x + fx)` over the last dimension as one kernel each way: the residual of
//! Post-LN (`alpha = 1`) and DeepNorm (`alpha > 1`) without the sum as a separate tensor.
//!
//! Forward, per row: the sum `s = alpha x + fx` is written into the output row, normalised in
//! place there (two-pass statistics while the row sits in cache); only the per-row `[mean, rstd]`
//! is kept. The backward recomputes each row of `s` from `x` and `fx` into a one-row scratch (one
//! extra read instead of a kept `[rows, C]` tensor), runs the LayerNorm row backward on it for
//! `ds`, and hands `ds` to `fx` and `alpha ds` to `x`. `weight` and `bias` travel as one
//! concatenated `[2C]` input (candle's `cat` backward splits their gradient).
//!
//! Narrow rows (up to 128, AVX-512) go 32 rows at a time through the narrow LayerNorm kernels
//! (`layer_norm::narrow`): the sums of a step are written (forward) or recomputed into a
//! scratch (backward) and normalised together.

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::activation::vmath::{fma, multiversion};
use crate::cpu::{as_f32, cpu_float, storage_from_f32, tensor_from_f32, with_f32, BackendStorage};
use crate::cuda::cuda_float;
use crate::layer_norm::{assume_init, bwd_kernel, filled, layer_norm, row_stats, rows_per_task};
#[cfg(target_arch = "x86_64")]
use crate::layer_norm::{narrow::MAX_D, narrow_kernels};
use crate::switch::fused_enabled;

/// LayerNorm (`torch.nn.LayerNorm`: biased variance, affine) over the last dimension of
/// `alpha * x + fx`, statistics in f32: the fused kernel on CPU float tensors (and, with the
/// `cuda` feature, on CUDA f32 / f16 / bf16 tensors) when fused kernels are on, [`residual_layer_norm_composed`] otherwise (f64 stays composed, keeping its precision).
/// `x` and `fx` have one shape and dtype; `weight` and `bias` are `[C]`, in `x`'s dtype or f32
/// under half activations. The output has `x`'s dtype.
pub fn residual_layer_norm(
    x: &Tensor,
    fx: &Tensor,
    alpha: f64,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let Some(&width) = x.dims().last() else {
        bail!("residual_layer_norm: x must have at least one dimension, got a scalar");
    };
    if fx.dims() != x.dims() {
        bail!(
            "residual_layer_norm: fx {:?} must have the shape of x {:?}",
            fx.dims(),
            x.dims()
        );
    }
    if x.dtype() != fx.dtype() {
        bail!(
            "residual_layer_norm: fx is {:?} but x is {:?}",
            fx.dtype(),
            x.dtype()
        );
    }
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if t.dims() != [width] {
            bail!(
                "residual_layer_norm: {name} {:?} must be [{width}] for x {:?}",
                t.dims(),
                x.dims()
            );
        }
    }
    let ts = [x, fx, weight, bias];
    let on_cuda = cuda_float(&ts);
    if !fused_enabled()
        || !(cpu_float(&ts) || on_cuda)
        || x.dtype() == DType::F64
        || weight.dtype() != bias.dtype()
        || x.elem_count() == 0
    {
        return residual_layer_norm_composed(x, fx, alpha, weight, bias, eps);
    }
    let wb = Tensor::cat(&[weight, bias], 0)?;
    let op = ResidualNormOp {
        alpha: alpha as f32,
        eps: eps as f32,
        stats: Mutex::new(None),
        #[cfg(feature = "cuda")]
        cuda_stats: Default::default(),
    };
    if on_cuda {
        // The CUDA kernels read rows in place: strided inputs are copied once here.
        return x
            .contiguous()?
            .apply_op3_arc(&fx.contiguous()?, &wb, Arc::new(Box::new(op)));
    }
    x.apply_op3_arc(fx, &wb, Arc::new(Box::new(op)))
}

/// The scaled skip, the sum and [`layer_norm`] as separate ops, exactly as torchscale-norm's
/// Post-LN residual computes them: the reference for the fused kernel.
pub fn residual_layer_norm_composed(
    x: &Tensor,
    fx: &Tensor,
    alpha: f64,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let skip = if alpha == 1.0 {
        x.clone()
    } else {
        (x * alpha)?
    };
    layer_norm(&(skip + fx)?, weight, bias, eps)
}

/// The fused op; `stats` holds `[mean, rstd]` per row from the forward for the backward.
struct ResidualNormOp {
    alpha: f32,
    eps: f32,
    stats: Mutex<Option<Vec<f32>>>,
    /// The forward's `[mean, rstd]` per row on the device (CUDA forward).
    #[cfg(feature = "cuda")]
    cuda_stats: crate::cuda::norm::Stats,
}

/// `s = x * alpha + fx`, rounded as the composed version rounds it (product, then sum).
#[inline(always)]
fn residual_sum(x: &[f32], fx: &[f32], alpha: f32, s: &mut [f32]) {
    for ((s, &x), &f) in s.iter_mut().zip(x).zip(fx) {
        *s = x * alpha + f;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fwd_kernel<const FMA: bool>(
    x: &[f32],
    fx: &[f32],
    alpha: f32,
    wb: &[f32],
    eps: f32,
    y: &mut [MaybeUninit<f32>],
    stats: &mut [f32],
) {
    let d = wb.len() / 2;
    let (w, b) = wb.split_at(d);
    for (((x, fx), y), st) in x
        .chunks_exact(d)
        .zip(fx.chunks_exact(d))
        .zip(y.chunks_exact_mut(d))
        .zip(stats.chunks_exact_mut(2))
    {
        residual_sum_into_kernel::<FMA>(x, fx, alpha, y);
        // SAFETY: every element of the row was just written.
        let y = unsafe { assume_init(y) };
        let (mean, rstd) = row_stats(y, eps);
        for ((y, &w), &b) in y.iter_mut().zip(w).zip(b) {
            *y = fma::<FMA>((*y - mean) * rstd, w, b);
        }
        st[0] = mean;
        st[1] = rstd;
    }
}

/// Recomputes `[mean, rstd]` per row (when the forward's are not at hand).
#[inline(always)]
fn stats_kernel<const FMA: bool>(
    x: &[f32],
    fx: &[f32],
    alpha: f32,
    eps: f32,
    stats: &mut [f32],
    s: &mut [f32],
) {
    let d = s.len();
    for ((x, fx), st) in x
        .chunks_exact(d)
        .zip(fx.chunks_exact(d))
        .zip(stats.chunks_exact_mut(2))
    {
        residual_sum(x, fx, alpha, s);
        (st[0], st[1]) = row_stats(s, eps);
    }
}

/// The inputs of the backward over a block of rows.
struct BwdRows<'a> {
    x: &'a [f32],
    fx: &'a [f32],
    g: &'a [f32],
    w: &'a [f32],
    stats: &'a [f32],
    alpha: f32,
    /// Multiply `ds` by `alpha` (only `x` needs a gradient).
    scale_ds: bool,
}

/// The outputs of the backward over a block of rows. `ds` (empty when neither `x` nor `fx` needs
/// a gradient) gets the gradient of the sum; `dx` (empty unless both do and `alpha != 1`) gets
/// `alpha ds`; `dwb` (`dw` then `db`, accumulated into) is empty when neither `w` nor `b` needs a
/// gradient; `s` is a one-row scratch.
struct BwdOut<'a> {
    ds: &'a mut [MaybeUninit<f32>],
    dx: &'a mut [MaybeUninit<f32>],
    dwb: &'a mut [f32],
    s: &'a mut [f32],
}

#[inline(always)]
fn bwd_task_kernel<const FMA: bool>(i: &BwdRows<'_>, o: &mut BwdOut<'_>) {
    let d = i.w.len();
    for (row, st) in i.stats.chunks_exact(2).enumerate() {
        let at = row * d..(row + 1) * d;
        residual_sum(&i.x[at.clone()], &i.fx[at.clone()], i.alpha, o.s);
        let ds = if o.ds.is_empty() {
            &mut []
        } else {
            &mut o.ds[at.clone()]
        };
        bwd_kernel::<FMA>(o.s, &i.g[at.clone()], i.w, st, ds, o.dwb);
        // SAFETY: `bwd_kernel` wrote every element of the row (or it is empty).
        let ds = unsafe { assume_init(ds) };
        if !o.dx.is_empty() {
            scale_into_kernel::<FMA>(&mut o.dx[at], ds, i.alpha);
        } else if i.scale_ds {
            ds.iter_mut().for_each(|v| *v *= i.alpha);
        }
    }
}

multiversion!(fn fwd_wide = fwd_kernel(
    x: &[f32],
    fx: &[f32],
    alpha: f32,
    wb: &[f32],
    eps: f32,
    y: &mut [MaybeUninit<f32>],
    stats: &mut [f32]
));
multiversion!(fn stats_wide = stats_kernel(
    x: &[f32], fx: &[f32], alpha: f32, eps: f32, stats: &mut [f32], s: &mut [f32]
));
multiversion!(fn bwd_wide = bwd_task_kernel(i: &BwdRows<'_>, o: &mut BwdOut<'_>));
#[cfg(target_arch = "x86_64")]
multiversion!(fn residual_sum_best = residual_sum_kernel(
    x: &[f32], fx: &[f32], alpha: f32, s: &mut [f32]
));

#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn residual_sum_kernel<const FMA: bool>(x: &[f32], fx: &[f32], alpha: f32, s: &mut [f32]) {
    residual_sum(x, fx, alpha, s)
}

#[inline(always)]
fn residual_sum_into_kernel<const FMA: bool>(
    x: &[f32],
    fx: &[f32],
    alpha: f32,
    s: &mut [MaybeUninit<f32>],
) {
    for ((s, &x), &f) in s.iter_mut().zip(x).zip(fx) {
        s.write(x * alpha + f);
    }
}

#[cfg(target_arch = "x86_64")]
multiversion!(fn residual_sum_into = residual_sum_into_kernel(
    x: &[f32], fx: &[f32], alpha: f32, s: &mut [MaybeUninit<f32>]
));

/// Rows per step of the narrow kernels: the sums of a step stay in L1 between the passes.
#[cfg(target_arch = "x86_64")]
const STEP: usize = 32;

/// Forward over a block of rows, writing every element of `y`: on narrow rows the sums of
/// [`STEP`] rows are written into `y` and normalised there 16 rows at a time; row by row
/// otherwise.
#[allow(clippy::too_many_arguments)]
fn fwd_rows(
    x: &[f32],
    fx: &[f32],
    alpha: f32,
    wb: &[f32],
    eps: f32,
    y: &mut [MaybeUninit<f32>],
    stats: &mut [f32],
) {
    let d = wb.len() / 2;
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = narrow_kernels(d) {
        let (w, b) = wb.split_at(d);
        let n = STEP * d;
        for (((x, fx), y), st) in x
            .chunks(n)
            .zip(fx.chunks(n))
            .zip(y.chunks_mut(n))
            .zip(stats.chunks_mut(2 * STEP))
        {
            residual_sum_into(x, fx, alpha, y);
            // SAFETY: `residual_sum_into` wrote every element (the chunks of `x`, `fx` and
            // `y` have one length).
            k.fwd_in_place(unsafe { assume_init(y) }, w, b, eps, st);
        }
        return;
    }
    fwd_wide(x, fx, alpha, wb, eps, y, stats)
}

/// `[mean, rstd]` per row of `alpha x + fx`; `s` is a one-row scratch.
fn stats_rows(x: &[f32], fx: &[f32], alpha: f32, eps: f32, stats: &mut [f32], s: &mut [f32]) {
    let d = s.len();
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = narrow_kernels(d) {
        let mut sums = [0f32; STEP * MAX_D];
        let n = STEP * d;
        for ((x, fx), st) in x
            .chunks(n)
            .zip(fx.chunks(n))
            .zip(stats.chunks_mut(2 * STEP))
        {
            let sums = &mut sums[..x.len()];
            residual_sum_best(x, fx, alpha, sums);
            k.stats(sums, eps, st);
        }
        return;
    }
    stats_wide(x, fx, alpha, eps, stats, s)
}

/// Backward over a block of rows: on narrow rows the sums of [`STEP`] rows are recomputed into a
/// scratch and run through the narrow LayerNorm backward together; row by row otherwise. `ds`
/// and `dx` (each empty when not wanted, see [`BwdOut`]) have every element written.
fn bwd_rows(
    i: &BwdRows<'_>,
    ds: &mut [MaybeUninit<f32>],
    dx: &mut [MaybeUninit<f32>],
    dwb: &mut [f32],
) {
    let d = i.w.len();
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = narrow_kernels(d) {
        let mut sums = [0f32; STEP * MAX_D];
        let n = STEP * d;
        for (t, st) in i.stats.chunks(2 * STEP).enumerate() {
            let at = t * n..t * n + st.len() / 2 * d;
            let sums = &mut sums[..at.len()];
            residual_sum_best(&i.x[at.clone()], &i.fx[at.clone()], i.alpha, sums);
            let ds = if ds.is_empty() {
                &mut []
            } else {
                &mut ds[at.clone()]
            };
            k.bwd(sums, &i.g[at.clone()], i.w, st, ds, dwb);
            // SAFETY: `bwd` wrote every element of `ds` (its rows are those of `st`).
            let ds = unsafe { assume_init(ds) };
            if !dx.is_empty() {
                scale_into(&mut dx[at], ds, i.alpha);
            } else if i.scale_ds {
                scale_in_place(ds, i.alpha);
            }
        }
        return;
    }
    let mut out = BwdOut {
        ds,
        dx,
        dwb,
        s: &mut vec![0f32; d],
    };
    bwd_wide(i, &mut out)
}

#[inline(always)]
fn scale_into_kernel<const FMA: bool>(dst: &mut [MaybeUninit<f32>], src: &[f32], alpha: f32) {
    for (d, &v) in dst.iter_mut().zip(src) {
        d.write(alpha * v);
    }
}

#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn scale_in_place_kernel<const FMA: bool>(v: &mut [f32], alpha: f32) {
    v.iter_mut().for_each(|v| *v *= alpha);
}

#[cfg(target_arch = "x86_64")]
multiversion!(fn scale_into = scale_into_kernel(
    dst: &mut [MaybeUninit<f32>], src: &[f32], alpha: f32
));
#[cfg(target_arch = "x86_64")]
multiversion!(fn scale_in_place = scale_in_place_kernel(v: &mut [f32], alpha: f32));

/// `buf` cut into `tasks` pieces of `len` elements (the last one shorter), or `tasks` empty
/// slices when `buf` is empty (an output nobody needs).
fn pieces<T>(buf: &mut [T], len: usize, tasks: usize) -> Vec<&mut [T]> {
    if buf.is_empty() {
        (0..tasks).map(|_| <&mut [T]>::default()).collect()
    } else {
        buf.chunks_mut(len).collect()
    }
}

/// Which gradients the backward computes.
#[derive(Clone, Copy)]
struct Needs {
    x: bool,
    fx: bool,
    wb: bool,
}

impl ResidualNormOp {
    /// Per-row statistics of `alpha x + fx` (rows of width `d`), computed in parallel.
    fn compute_stats(&self, x: &[f32], fx: &[f32], d: usize) -> Vec<f32> {
        let rows = x.len() / d;
        let mut stats = vec![0f32; 2 * rows];
        let step = rows_per_task(rows, d, 4);
        let run = |(st, (x, fx)): (&mut [f32], (&[f32], &[f32]))| {
            stats_rows(x, fx, self.alpha, self.eps, st, &mut vec![0f32; d]);
        };
        if step >= rows {
            run((&mut stats, (x, fx)));
        } else {
            stats
                .par_chunks_mut(2 * step)
                .zip(x.par_chunks(step * d).zip(fx.par_chunks(step * d)))
                .for_each(run);
        }
        stats
    }

    /// `(ds, dx, [dw, db])` in f32: `ds` is the gradient of the sum (times `alpha` when only
    /// `x` needs one), `dx = alpha ds` when both `x` and `fx` need one and `alpha != 1`; unneeded
    /// outputs are empty.
    fn backward(
        &self,
        x: &[f32],
        fx: &[f32],
        g: &[f32],
        w: &[f32],
        needs: Needs,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let d = w.len();
        let rows = x.len() / d;
        let guard = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let recomputed;
        let stats = match guard.as_deref() {
            Some(s) if s.len() == 2 * rows => s,
            _ => {
                recomputed = self.compute_stats(x, fx, d);
                &recomputed
            }
        };
        let len = |on: bool| if on { x.len() } else { 0 };
        let scale_ds = needs.x && !needs.fx && self.alpha != 1.0;
        // One task per thread: each owns a `[dw, db]` partial, so the tasks stay few.
        let step = rows_per_task(rows, d, 1);
        let tasks = rows.div_ceil(step);
        type Out<'a> = (&'a mut [MaybeUninit<f32>], &'a mut [MaybeUninit<f32>]);
        let task = |t: usize, (ds, dx): &mut Out<'_>| {
            let r = t * step * d..((t + 1) * step).min(rows) * d;
            let mut dwb = if needs.wb {
                vec![0f32; 2 * d]
            } else {
                Vec::new()
            };
            let rows = BwdRows {
                x: &x[r.clone()],
                fx: &fx[r.clone()],
                g: &g[r.clone()],
                w,
                stats: &stats[2 * (r.start / d)..2 * (r.end / d)],
                alpha: self.alpha,
                scale_ds,
            };
            bwd_rows(&rows, ds, dx, &mut dwb);
            dwb
        };
        let run = |ds: &mut [MaybeUninit<f32>], dx: &mut [MaybeUninit<f32>]| {
            let mut outs: Vec<Out<'_>> = pieces(ds, step * d, tasks)
                .into_iter()
                .zip(pieces(dx, step * d, tasks))
                .collect();
            if tasks <= 1 {
                // One task: run it here (handing it to rayon's pool costs more than it takes).
                outs.iter_mut()
                    .enumerate()
                    .map(|(t, o)| task(t, o))
                    .collect()
            } else {
                outs.par_iter_mut()
                    .enumerate()
                    .map(|(t, o)| task(t, o))
                    .collect()
            }
        };
        // SAFETY: each task's `bwd_rows` writes every element of its blocks of `ds` and `dx`,
        // and the blocks cover them (or they are empty).
        let (ds, (dx, partials)) = unsafe {
            filled(len(needs.x || needs.fx), |ds| {
                filled(len(needs.x && needs.fx && self.alpha != 1.0), |dx| {
                    let partials: Vec<Vec<f32>> = run(ds, dx);
                    partials
                })
            })
        };
        let mut parts = partials.into_iter();
        let mut dwb = parts.next().unwrap_or_default();
        for p in parts {
            for (a, b) in dwb.iter_mut().zip(&p) {
                *a += b;
            }
        }
        (ds, dx, dwb)
    }
}

impl CustomOp3 for ResidualNormOp {
    fn name(&self) -> &'static str {
        "torchscale-residual-layer-norm"
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
        let d = l3.shape().elem_count() / 2;
        if l1.dims().last() != Some(&d) || l1.dims() != l2.dims() || d == 0 {
            bail!(
                "residual_layer_norm: x {:?}, fx {:?}, weight and bias {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let (xs, fxs, wb) = (as_f32(s1, l1)?, as_f32(s2, l2)?, as_f32(s3, l3)?);
        let rows = xs.len() / d;
        let mut stats = vec![0f32; 2 * rows];
        let step = rows_per_task(rows, d, 4);
        let (alpha, eps) = (self.alpha, self.eps);
        // SAFETY: `fwd_rows` writes every element of each block, and the blocks cover `y`.
        let (y, ()) = unsafe {
            filled(xs.len(), |y| {
                if step >= rows {
                    fwd_rows(&xs, &fxs, alpha, &wb, eps, y, &mut stats);
                } else {
                    y.par_chunks_mut(step * d)
                        .zip(xs.par_chunks(step * d).zip(fxs.par_chunks(step * d)))
                        .zip(stats.par_chunks_mut(2 * step))
                        .for_each(|((y, (x, fx)), st)| fwd_rows(x, fx, alpha, &wb, eps, y, st));
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
        let (y, stats) =
            crate::cuda::norm::residual_fwd((s1, l1), (s2, l2), (s3, l3), self.alpha, self.eps)?;
        *self.cuda_stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        fx: &Tensor,
        wb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let needs = Needs {
            x: x.track_op(),
            fx: fx.track_op(),
            wb: wb.track_op(),
        };
        if !(needs.x || needs.fx || needs.wb) {
            return Ok((None, None, None));
        }
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let stats = self.cuda_stats.lock().unwrap_or_else(|e| e.into_inner());
            return crate::cuda::norm::residual_bwd(
                (x, fx, wb),
                grad,
                stats.as_ref(),
                self.alpha,
                self.eps,
                (needs.x, needs.fx, needs.wb),
            );
        }
        let d = wb.elem_count() / 2;
        let (ds, dx, dwb) = with_f32(x, |xs| {
            with_f32(fx, |fxs| {
                with_f32(grad, |g| {
                    with_f32(wb, |wb| Ok(self.backward(xs, fxs, g, &wb[..d], needs)))
                })
            })
        })?;
        let dwb = if needs.wb {
            Some(tensor_from_f32(dwb, 2 * d, wb.dtype())?)
        } else {
            None
        };
        let ds = if needs.x || needs.fx {
            Some(tensor_from_f32(ds, x.shape(), x.dtype())?)
        } else {
            None
        };
        let (dx, dfx) = match (needs.x, needs.fx) {
            // alpha = 1: one tensor for both (candle's gradient store adds it to each input's
            // sum out of place, never writing into it).
            (true, true) if dx.is_empty() => (ds.clone(), ds),
            (true, true) => (Some(tensor_from_f32(dx, x.shape(), x.dtype())?), ds),
            (true, false) => (ds, None),
            _ => (None, ds),
        };
        Ok((dx, dfx, dwb))
    }
}
