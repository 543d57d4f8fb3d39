//! `gelu(x @ w^T + b)` (exact erf GELU) as one op: the FFN's first projection and its activation.
//!
//! Forward: one matrix product over all rows into the pre-activation `h` (bias rows pre-filled),
//! kept by the op for the backward, then `y = gelu(h)`. Backward: `dh = g gelu'(h)` in one pass,
//! then the fused linear's backward on `dh`. One graph node instead of two, and no gradient tensor
//! for the linear's output accumulated between them.

use std::sync::{Arc, Mutex};

use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};

use crate::activation::{gelu_backward_f32, gelu_erf, gelu_forward_f32};
use crate::cpu::{as_f32, cpu_float, storage_from_f32, with_f32, BackendStorage};
use crate::cuda::cuda_float;
use crate::linear::{affine_f32, backward as linear_backward, leading_rows, linear};
use crate::switch::fused_enabled;

/// Exact (erf) GELU of `x @ w^T (+ b)` over the last dimension of `x` (`w: [out, in]`,
/// `b: [out]`): the fused kernel on CPU f32 / f16 / bf16 tensors of one dtype when fused kernels
/// are on, [`linear_gelu_composed`] otherwise (f64 included, so that it keeps its precision).
/// On CUDA tensors (feature `cuda`, fused kernels on) it is [`linear`]'s cuBLAS product on the
/// flattened rows, then the CUDA GELU kernel: two graph nodes, each fused.
pub fn linear_gelu(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let &[out_dim, in_dim] = w.dims() else {
        bail!(
            "linear_gelu: weight w must be [out, in], got {:?}",
            w.dims()
        );
    };
    if x.dims().last() != Some(&in_dim) {
        bail!(
            "linear_gelu: input x {:?} does not end in the in-dim {in_dim} of w {:?}",
            x.dims(),
            w.dims()
        );
    }
    if let Some(b) = b {
        if b.dims() != [out_dim] {
            bail!(
                "linear_gelu: bias b {:?} must be [{out_dim}] for w {:?}",
                b.dims(),
                w.dims()
            );
        }
    }
    let same_dtype = w.dtype() == x.dtype() && b.is_none_or(|b| b.dtype() == x.dtype());
    let mut all = vec![x, w];
    all.extend(b);
    if fused_enabled() && same_dtype && cuda_float(&all) {
        // The products go to cuBLAS; a fused product + GELU op would hold the pre-activation
        // the same way the two ops do.
        return linear_gelu_composed(x, w, b);
    }
    if !fused_enabled() || !same_dtype || x.dtype() == DType::F64 || !cpu_float(&all) {
        return linear_gelu_composed(x, w, b);
    }
    let op = LinearGeluOp {
        pre: Mutex::new(None),
    };
    match b {
        Some(b) => x.apply_op3_arc(w, b, Arc::new(Box::new(op))),
        None => x.apply_op2_arc(w, Arc::new(Box::new(op))),
    }
}

/// [`linear`] then [`gelu_erf`], two ops (each fused when the kernels are on): the reference for
/// the fused kernel.
pub fn linear_gelu_composed(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    gelu_erf(&linear(x, w, b)?)
}

/// The fused op (CustomOp2 without bias, CustomOp3 with); `pre` holds the pre-activation
/// `x @ w^T + b` in f32 from the forward for the backward.
struct LinearGeluOp {
    pre: Mutex<Option<Vec<f32>>>,
}

/// `(rows, out, in)` of the product for `x` and `w` layouts.
fn dims(x: &[usize], w: &[usize]) -> Result<(usize, usize, usize)> {
    match (x.last(), w) {
        (Some(&i), &[out, in_dim]) if i == in_dim => Ok((leading_rows(x), out, in_dim)),
        _ => bail!("linear_gelu: input x {x:?} and weight w {w:?} do not fit"),
    }
}

fn out_shape(x: &[usize], out: usize) -> Shape {
    let mut dims = x.to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out;
    }
    Shape::from(dims)
}

impl LinearGeluOp {
    fn forward(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, out, in_dim) = dims(x.1.dims(), w.1.dims())?;
        let xs = as_f32(x.0, x.1)?;
        let ws = as_f32(w.0, w.1)?;
        let bs = b.map(|b| as_f32(b.0, b.1)).transpose()?;
        let h = affine_f32((rows, out, in_dim), &xs, &ws, bs.as_deref())?;
        let mut y = vec![0f32; h.len()];
        gelu_forward_f32(&h, &mut y);
        *self.pre.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        Ok((
            storage_from_f32(y, x.0.dtype())?,
            out_shape(x.1.dims(), out),
        ))
    }

    /// The pre-activation again (when the forward's is not at hand).
    fn recompute(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Vec<f32>> {
        let size = dims(x.dims(), w.dims())?;
        with_f32(x, |xs| {
            with_f32(w, |ws| match b {
                Some(b) => with_f32(b, |bs| affine_f32(size, xs, ws, Some(bs))),
                None => affine_f32(size, xs, ws, None),
            })
        })
    }

    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need_b = b.is_some_and(|b| b.track_op());
        if !(x.track_op() || w.track_op() || need_b) {
            return Ok((None, None, None));
        }
        let dh = {
            let guard = self.pre.lock().unwrap_or_else(|e| e.into_inner());
            let recomputed;
            let h = match guard.as_deref() {
                Some(h) if h.len() == grad.elem_count() => h,
                _ => {
                    recomputed = Self::recompute(x, w, b)?;
                    &recomputed
                }
            };
            with_f32(grad, |g| {
                let mut dh = vec![0f32; h.len()];
                gelu_backward_f32(h, g, &mut dh);
                Ok(dh)
            })?
        };
        let dh = Tensor::from_vec(dh, grad.shape(), &Device::Cpu)?;
        linear_backward(x, w, need_b, &dh)
    }
}

impl CustomOp2 for LinearGeluOp {
    fn name(&self) -> &'static str {
        "torchscale-linear-gelu"
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

impl CustomOp3 for LinearGeluOp {
    fn name(&self) -> &'static str {
        "torchscale-linear-bias-gelu"
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
