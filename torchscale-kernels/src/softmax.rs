//! Softmax over the last dimension, one pass per row each way, with a backward
//! `dx = y (g - sum(g y))` from the saved output.
//!
//! A row whose entries are all `-inf` (a fully masked attention row) gives zeros, not NaN: it
//! attends to nothing. Its backward is zero too. Every other row is untouched by that rule, bit
//! for bit (its max is finite and its sum at least 1).
//!
//! candle_nn's own `ops::softmax_last_dim` has no backward (it silently cuts the graph), and the
//! composed `ops::softmax` allocates five tensors forward and more backward.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::activation::vmath::{exp_nonpos, hmax, hsum, multiversion, sum1, sum2, LANES};
use crate::cpu::{as_f32, cpu_float, storage_from_f32, tensor_from_f32, threads, with_f32};
use crate::cuda::cuda_float;
use crate::switch::fused_enabled;

/// Softmax over the last dimension of `x`: the fused kernel on CPU f32 / f16 / bf16 tensors (and,
/// with the `cuda` feature, on CUDA ones) when fused kernels are on, [`softmax_last_dim_composed`] otherwise (f64 stays composed, keeping f64
/// precision). `-inf` entries get probability 0; a row of only `-inf` gives zeros (and zero
/// gradient), as composed.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 {
        bail!("softmax_last_dim: needs at least one dimension, got a scalar");
    }
    let on_cuda = cuda_float(&[x]);
    if !fused_enabled()
        || !(cpu_float(&[x]) || on_cuda)
        || x.dtype() == DType::F64
        || x.elem_count() == 0
    {
        return softmax_last_dim_composed(x);
    }
    if on_cuda {
        // The CUDA kernel reads rows in place: a strided input is copied once here.
        return x.contiguous()?.apply_op1_arc(Arc::new(Box::new(SoftmaxOp)));
    }
    x.apply_op1_arc(Arc::new(Box::new(SoftmaxOp)))
}

/// candle_nn's composed `softmax` over the last dimension, in f32 for half types, cast back (the
/// reference the fused kernel is tested against), except that a row of only `-inf` gives zeros
/// with a zero gradient instead of NaN.
pub fn softmax_last_dim_composed(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    if dtype == DType::F32 || dtype == DType::F64 {
        softmax_zero_dead_rows(x)
    } else {
        softmax_zero_dead_rows(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)
    }
}

/// candle_nn's `softmax` over the last dimension (`exp(x - max) / sum`) with two fixes on
/// `[.., 1]` tensors only: a row whose max is `-inf` subtracts 0 instead (so its `exp` is 0, not
/// `exp(NaN)`), and its zero sum becomes 1 (so `0 / 1 = 0`). Other rows see the same values and
/// the same gradients as candle_nn's (`where` keeps their max, `+ 0` their sum).
fn softmax_zero_dead_rows(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let dead = max.eq(f64::NEG_INFINITY)?;
    let max = dead.where_cond(&max.zeros_like()?, &max)?;
    let num = x.broadcast_sub(&max)?.exp()?;
    let den = (num.sum_keepdim(D::Minus1)? + dead.to_dtype(x.dtype())?)?;
    num.broadcast_div(&den)
}

/// The fused softmax.
struct SoftmaxOp;

/// Softmax of each row (width `d`) of `x` into `y`.
#[inline(always)]
fn fwd_kernel<const FMA: bool>(x: &[f32], y: &mut [f32], d: usize) {
    if d < 4 * LANES {
        fwd_narrow::<FMA>(x, y, d)
    } else {
        fwd_wide::<FMA>(x, y, d)
    }
}

/// Narrow rows (under 256: MoE gates over a few experts, short attention rows), a group of rows
/// (about 1K elements, in L1) at a time: per row `x - max`, then one flat vectorized `exp` over
/// the group (no per-row scalar tail), then per row the scaling by the inverse sum. Measured
/// faster than [`fwd_wide`] up to width 255, slower from 256.
#[inline(always)]
fn fwd_narrow<const FMA: bool>(x: &[f32], y: &mut [f32], d: usize) {
    let group = (1024 / d).max(1) * d;
    for (x, y) in x.chunks(group).zip(y.chunks_mut(group)) {
        for (x, y) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let m = live_max(max1(x));
            for (o, &v) in y.iter_mut().zip(x) {
                *o = v - m;
            }
        }
        for o in y.iter_mut() {
            *o = exp_nonpos::<FMA>(*o);
        }
        for y in y.chunks_exact_mut(d) {
            let inv = inv_sum(sum1(y, |v| v));
            for o in y {
                *o *= inv;
            }
        }
    }
}

/// Wide rows: the max, then `exp(x - max)` written and summed in one pass over whole lanes
/// (the ragged tail by a separate flat loop, which still vectorizes), then the scaling.
#[inline(always)]
fn fwd_wide<const FMA: bool>(x: &[f32], y: &mut [f32], d: usize) {
    let bulk = d - d % LANES;
    for (x, y) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let m = live_max(max1(x));
        let (xb, xt) = x.split_at(bulk);
        let (yb, yt) = y.split_at_mut(bulk);
        let mut sums = [0f32; LANES];
        for (x, y) in xb.chunks_exact(LANES).zip(yb.chunks_exact_mut(LANES)) {
            for ((s, o), &v) in sums.iter_mut().zip(y.iter_mut()).zip(x) {
                *o = exp_nonpos::<FMA>(v - m);
                *s += *o;
            }
        }
        for (o, &v) in yt.iter_mut().zip(xt) {
            *o = exp_nonpos::<FMA>(v - m);
        }
        let inv = inv_sum(hsum(sums) + yt.iter().sum::<f32>());
        for o in y.iter_mut() {
            *o *= inv;
        }
    }
}

/// The row max to subtract: 0 for a row of only `-inf`, so that its `exp` gives 0, not NaN.
#[inline(always)]
fn live_max(m: f32) -> f32 {
    if m == f32::NEG_INFINITY {
        0.0
    } else {
        m
    }
}

/// `1 / sum`, or 0 for the zero sum of a row of only `-inf` (its output is then 0, not
/// `0 * inf`); a NaN sum stays NaN.
#[inline(always)]
fn inv_sum(sum: f32) -> f32 {
    if sum == 0.0 {
        0.0
    } else {
        1.0 / sum
    }
}

/// The largest element (NaN elements are skipped; they reach the output through `x - max`).
#[inline(always)]
fn max1(x: &[f32]) -> f32 {
    let max = |m: f32, v: f32| if v > m { v } else { m };
    if x.len() < LANES {
        return x.iter().fold(f32::NEG_INFINITY, |m, &v| max(m, v));
    }
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in lanes.iter_mut().zip(c) {
            *a = max(*a, v);
        }
    }
    tail.iter().fold(hmax(lanes), |m, &v| max(m, v))
}

/// `dx = y (g - sum(g y))` row by row.
#[inline(always)]
fn bwd_kernel<const FMA: bool>(y: &[f32], g: &[f32], dx: &mut [f32], d: usize) {
    for ((y, g), dx) in y
        .chunks_exact(d)
        .zip(g.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        let s = sum2(y, g, |y, g| y * g);
        for ((o, &y), &g) in dx.iter_mut().zip(y).zip(g) {
            *o = y * (g - s);
        }
    }
}

multiversion!(fn fwd_rows = fwd_kernel(x: &[f32], y: &mut [f32], d: usize));
multiversion!(fn bwd_rows = bwd_kernel(y: &[f32], g: &[f32], dx: &mut [f32], d: usize));

/// Rows per parallel task for `rows` rows of width `d` (all of them when the work is small).
fn rows_per_task(rows: usize, d: usize) -> usize {
    if crate::cpu::worth_threading(rows * d) {
        rows.div_ceil(threads() * 4).max(1)
    } else {
        rows.max(1)
    }
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "torchscale-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        let xs = as_f32(s, l)?;
        let rows = xs.len() / d;
        let mut y = vec![0f32; xs.len()];
        let step = rows_per_task(rows, d) * d;
        if step >= xs.len() {
            // One task: run it here (handing it to rayon's pool costs more than it takes).
            fwd_rows(&xs, &mut y, d);
        } else {
            y.par_chunks_mut(step)
                .zip(xs.par_chunks(step))
                .for_each(|(y, x)| fwd_rows(x, y, d));
        }
        Ok((storage_from_f32(y, s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::softmax::forward(s, l)
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        #[cfg(feature = "cuda")]
        if res.device().is_cuda() {
            return crate::cuda::softmax::backward(res, grad).map(Some);
        }
        let d = x.dims().last().copied().unwrap_or(1).max(1);
        let dx = with_f32(res, |y| {
            with_f32(grad, |g| {
                let mut dx = vec![0f32; y.len()];
                let step = rows_per_task(y.len() / d, d) * d;
                if step >= y.len() {
                    bwd_rows(y, g, &mut dx, d);
                } else {
                    dx.par_chunks_mut(step)
                        .zip(y.par_chunks(step).zip(g.par_chunks(step)))
                        .for_each(|(dx, (y, g))| bwd_rows(y, g, dx, d));
                }
                Ok(dx)
            })
        })?;
        Ok(Some(tensor_from_f32(dx, x.shape(), x.dtype())?))
    }
}
