//! `y = x @ w^T + b` for any leading dimensions, as one matrix product over all rows, with a
//! backward that computes `dx = dy @ w`, `dw = dy^T @ x` (one product over every token, the
//! transpose read in place) and `db = column sums of dy`.
//!
//! candle_nn's `Linear` broadcasts `w` over the batch and multiplies batch by batch; its backward
//! then produces one `[in, out]` gradient per batch element and sums them.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{
    as_f32, chunks, cpu_float, storage_from_f32, tensor_from_f32, threads, with_f32,
    worth_threading, BackendStorage,
};
use crate::cuda::cuda_float;
use crate::gemm::{assume_written, matmul, product, Mat};
use crate::switch::fused_enabled;

/// `x @ w^T (+ b)` over the last dimension of `x` (`w: [out, in]`, `b: [out]`): the fused kernel on
/// CPU f32 / f16 / bf16 tensors of one dtype when fused kernels are on, [`linear_composed`]
/// otherwise (f64 included, so that it keeps its precision). On CUDA tensors (feature `cuda`,
/// fused kernels on) it is candle's cuBLAS matmul on `x` flattened to `[rows, in]`: one product
/// each way over every row, where the composed version multiplies batch by batch.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let same_dtype = w.dtype() == x.dtype() && b.is_none_or(|b| b.dtype() == x.dtype());
    let mut all = vec![x, w];
    all.extend(b);
    if fused_enabled() && same_dtype && cuda_float(&all) {
        return linear_rows(x, w, b);
    }
    // f64 keeps its precision on the composed path (the kernel computes in f32).
    if !fused_enabled() || !same_dtype || x.dtype() == DType::F64 || !cpu_float(&all) {
        return linear_composed(x, w, b);
    }
    let (out_dim, in_dim) = w.dims2()?;
    if x.dims().last() != Some(&in_dim) {
        candle_core::bail!(
            "linear: input {:?} does not end in the weight's in-dim {in_dim}",
            x.dims()
        );
    }
    if let Some(b) = b {
        if b.dims() != [out_dim] {
            candle_core::bail!("linear: bias {:?}, expected [{out_dim}]", b.dims());
        }
    }
    match b {
        Some(b) => x.apply_op3_arc(w, b, std::sync::Arc::new(Box::new(LinearOp))),
        None => x.apply_op2_arc(w, std::sync::Arc::new(Box::new(LinearOp))),
    }
}

/// `x @ w^T (+ b)` as one candle matmul over `x` flattened to `[rows, in]` (`w^T` read in place
/// by cuBLAS), so that the backward is one product for `dx` and one for `dw` over all rows; the
/// bias is broadcast over the rows (its gradient one column sum).
fn linear_rows(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    if x.dims().last() != Some(&in_dim) {
        candle_core::bail!(
            "linear: input {:?} does not end in the weight's in-dim {in_dim}",
            x.dims()
        );
    }
    if let Some(b) = b {
        if b.dims() != [out_dim] {
            candle_core::bail!("linear: bias {:?}, expected [{out_dim}]", b.dims());
        }
    }
    let rows = leading_rows(x.dims());
    let y = x.reshape((rows, in_dim))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out_dim;
    }
    y.reshape(dims)
}

/// candle_nn's `Linear` (the reference the fused kernel is tested against).
pub fn linear_composed(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    candle_nn::Linear::new(w.clone(), b.cloned()).forward(x)
}

/// The fused linear (CustomOp2 without bias, CustomOp3 with).
struct LinearOp;

fn out_shape(x: &Layout, w: &Layout) -> Shape {
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = w.dims()[0];
    }
    Shape::from(dims)
}

fn forward(
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    b: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let (out_dim, in_dim) = (w.1.dims()[0], w.1.dims()[1]);
    let rows = leading_rows(x.1.dims());
    let xs = as_f32(x.0, x.1)?;
    let ws = as_f32(w.0, w.1)?;
    let bs = b.map(|b| as_f32(b.0, b.1)).transpose()?;
    let y = affine_f32((rows, out_dim, in_dim), &xs, &ws, bs.as_deref())?;
    Ok((storage_from_f32(y, x.0.dtype())?, out_shape(x.1, w.1)))
}

/// `x @ w^T (+ b)` in f32 for row-major `x: [rows, in_dim]`, `w: [out_dim, in_dim]`,
/// `b: [out_dim]`: one product over all rows, accumulated onto the bias rows when there is one.
pub(crate) fn affine_f32(
    (rows, out_dim, in_dim): (usize, usize, usize),
    xs: &[f32],
    ws: &[f32],
    bs: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let Some(bs) = bs else {
        return product(
            (rows, out_dim, in_dim),
            Mat::rows(xs, in_dim),
            Mat::transposed(ws, in_dim),
            1.0,
            true,
        );
    };
    let mut y = bias_rows(bs, rows);
    matmul(
        (rows, out_dim, in_dim),
        &mut y,
        out_dim,
        true,
        Mat::rows(xs, in_dim),
        Mat::transposed(ws, in_dim),
        1.0,
        true,
    )?;
    Ok(y)
}

/// `rows` copies of `b` side by side (the start of `x @ w^T + b`), written once, not zeroed first.
fn bias_rows(b: &[f32], rows: usize) -> Vec<f32> {
    let n = b.len();
    let mut y: Vec<MaybeUninit<f32>> = Vec::with_capacity(rows * n);
    // SAFETY: `MaybeUninit` elements need no initialisation.
    unsafe { y.set_len(rows * n) };
    if n > 0 {
        let fill = |row: &mut [MaybeUninit<f32>]| {
            for (d, v) in row.iter_mut().zip(b) {
                d.write(*v);
            }
        };
        if worth_threading(rows * n) {
            y.par_chunks_mut(n).for_each(fill);
        } else {
            y.chunks_mut(n).for_each(fill);
        }
    }
    // SAFETY: every row of `n` elements was written from `b` above.
    assume_written(y)
}

/// The number of rows of `x @ w^T`: the product of all but the last dimension (not the element
/// count over the in-dim, which is 0 / 0 when the in-dim is 0).
pub(crate) fn leading_rows(dims: &[usize]) -> usize {
    dims[..dims.len().saturating_sub(1)].iter().product()
}

/// Column sums of a row-major `[rows, cols]` matrix, split over column blocks.
pub(crate) fn column_sums(g: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; cols];
    let parts = if worth_threading(rows * cols) {
        threads()
    } else {
        1
    };
    let ranges: Vec<_> = chunks(cols, parts).collect();
    let mut pieces: Vec<&mut [f32]> = Vec::with_capacity(ranges.len());
    let mut rest = out.as_mut_slice();
    for r in &ranges {
        let (head, tail) = rest.split_at_mut(r.len());
        pieces.push(head);
        rest = tail;
    }
    let sum_block = |(acc, r): (&mut [f32], std::ops::Range<usize>)| {
        for row in 0..rows {
            let src = &g[row * cols + r.start..row * cols + r.end];
            for (a, s) in acc.iter_mut().zip(src) {
                *a += s;
            }
        }
    };
    if parts == 1 {
        pieces.into_iter().zip(ranges).for_each(sum_block);
    } else {
        pieces
            .into_par_iter()
            .zip(ranges.into_par_iter())
            .for_each(sum_block);
    }
    out
}

/// The gradients of `x @ w^T (+ b)` for an upstream `grad` (`db` only when `with_bias`), each
/// only for an input that tracks gradients, in `x`'s dtype.
pub(crate) fn backward(
    x: &Tensor,
    w: &Tensor,
    with_bias: bool,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (out_dim, in_dim) = w.dims2()?;
    let rows = leading_rows(x.dims());
    let dtype = x.dtype();
    with_f32(grad, |g| {
        let dx = if x.track_op() {
            let dx = with_f32(w, |ws| {
                product(
                    (rows, in_dim, out_dim),
                    Mat::rows(g, out_dim),
                    Mat::rows(ws, in_dim),
                    1.0,
                    true,
                )
            })?;
            Some(tensor_from_f32(dx, x.shape(), dtype)?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let dw = with_f32(x, |xs| {
                product(
                    (out_dim, in_dim, rows),
                    Mat::transposed(g, out_dim),
                    Mat::rows(xs, in_dim),
                    1.0,
                    true,
                )
            })?;
            Some(tensor_from_f32(dw, (out_dim, in_dim), dtype)?)
        } else {
            None
        };
        let db = if with_bias {
            Some(tensor_from_f32(
                column_sums(g, rows, out_dim),
                out_dim,
                dtype,
            )?)
        } else {
            None
        };
        Ok((dx, dw, db))
    })
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "torchscale-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        forward((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = backward(x, w, false, grad)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "torchscale-linear-bias"
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
        forward((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = backward(x, w, b.track_op(), grad)?;
        Ok((dx, dw, db))
    }
}
