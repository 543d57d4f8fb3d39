//! AdamW with the moments in f32 tensors on the parameter's device (CPU or CUDA), all three
//! updated in place by one kernel.
//!
//! candle's in-place ops lock one destination for writing; the update writes three. So the op
//! on `m` holds `m`'s storage, runs an op on `v` that holds `v`'s, which runs the update on the
//! parameter with both moments borrowed (the CPU kernel of [`super::adamw_update`], or the CUDA
//! one). The four tensors must live in four distinct storages (checked first: a shared storage
//! would lock one lock twice).

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, DType, InplaceOp1, Layout, Result, Storage, Tensor};

use super::{AdamWOp, AdamWStep, Consts};

/// Updates `param` in place from `grad`, with its first and second moments `m` and `v` (f32
/// tensors of `param`'s element count, contiguous, on `param`'s device) updated in place too:
/// the update of [`super::adamw_update`], operation for operation, wherever the tensors live.
/// On CUDA (feature `cuda`) it is one kernel launch; the gradient may be f32, bf16 or f16 there
/// (f64 is cast to f32 first).
pub fn adamw_update_tensors(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    s: &AdamWStep,
) -> Result<()> {
    s.validate()?;
    if grad.dims() != param.dims() {
        bail!(
            "adamw: gradient {:?} for a parameter {:?}",
            grad.dims(),
            param.dims()
        );
    }
    let n = param.elem_count();
    for (name, t) in [("m", m), ("v", v)] {
        if t.elem_count() != n || t.dtype() != DType::F32 || !t.is_contiguous() {
            bail!(
                "adamw: moment {name} must be a contiguous f32 tensor of {n} values, got {:?} {:?}",
                t.dtype(),
                t.dims()
            );
        }
    }
    for (name, t) in [("gradient", grad), ("m", m), ("v", v)] {
        if !t.device().same_device(param.device()) {
            bail!(
                "adamw: {name} is on {:?}, the parameter on {:?}",
                t.device(),
                param.device()
            );
        }
    }
    if !matches!(param.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        bail!(
            "adamw: parameter dtype {:?}, expected f32, f16 or bf16",
            param.dtype()
        );
    }
    if !grad.dtype().is_float() {
        bail!("adamw: gradient dtype {:?} is not a float", grad.dtype());
    }
    if !param.is_contiguous() {
        bail!("adamw: the parameter must be contiguous to be updated in place");
    }
    let keys = [param, grad, m, v].map(storage_key);
    for i in 0..4 {
        if keys[i + 1..].contains(&keys[i]) {
            bail!("adamw: the parameter, gradient, m and v must not share storage");
        }
    }
    if n == 0 {
        return Ok(());
    }
    // The CUDA kernels read f32, bf16 and f16 gradients, contiguous.
    let grad = if param.device().is_cuda() {
        let g = if grad.dtype() == DType::F64 {
            grad.to_dtype(DType::F32)?
        } else {
            grad.clone()
        };
        g.contiguous()?
    } else {
        grad.clone()
    };
    m.inplace_op1(&HoldM {
        c: Consts::new(s),
        param,
        grad: &grad,
        v,
    })
}

/// Identifies a tensor's storage (two tensors share one exactly when these are equal).
fn storage_key(t: &Tensor) -> usize {
    let (s, _) = t.storage_and_layout();
    &*s as *const Storage as usize
}

/// A moment borrowed mutably from its locked storage.
enum Moment<'a> {
    Cpu(&'a mut [f32]),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda_backend::cudarc::driver::CudaViewMut<'a, f32>),
}

/// Applied to `m`: borrows it, then applies [`HoldMV`] to `v`.
struct HoldM<'a> {
    c: Consts,
    param: &'a Tensor,
    grad: &'a Tensor,
    v: &'a Tensor,
}

/// Applied to `v` with `m` borrowed: borrows `v`, then updates the parameter in place.
struct HoldMV<'a, 'm> {
    c: Consts,
    param: &'a Tensor,
    grad: &'a Tensor,
    m: Mutex<Moment<'m>>,
}

/// The contiguous f32 elements of a moment's CPU storage.
fn cpu_moment<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => bail!("adamw: moments must be contiguous f32"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_moment<'a>(
    s: &'a mut candle_core::CudaStorage,
    l: &Layout,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaViewMut<'a, f32>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("adamw: moments must be contiguous f32");
    };
    Ok(s.as_cuda_slice_mut::<f32>()?.slice_mut(a..b))
}

impl InplaceOp1 for HoldM<'_> {
    fn name(&self) -> &'static str {
        "torchscale-adamw-m"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let m = Moment::Cpu(cpu_moment(s, l)?);
        self.v.inplace_op1(&HoldMV {
            c: self.c,
            param: self.param,
            grad: self.grad,
            m: Mutex::new(m),
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        let m = Moment::Cuda(cuda_moment(s, l)?);
        self.v.inplace_op1(&HoldMV {
            c: self.c,
            param: self.param,
            grad: self.grad,
            m: Mutex::new(m),
        })
    }
}

impl InplaceOp1 for HoldMV<'_, '_> {
    fn name(&self) -> &'static str {
        "torchscale-adamw-v"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let v = cpu_moment(s, l)?;
        let Ok(mut m) = self.m.lock() else {
            bail!("adamw: moments poisoned by an earlier panic");
        };
        // Irrefutable without the `cuda` feature (no CUDA variant).
        #[allow(irrefutable_let_patterns)]
        let Moment::Cpu(m) = &mut *m
        else {
            bail!("adamw: m is on a CUDA device, v on the CPU");
        };
        let op = AdamWOp {
            c: self.c,
            moments: Mutex::new((&mut **m, v)),
        };
        self.param.inplace_op2(self.grad, &op)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        let v = cuda_moment(s, l)?;
        let Ok(mut m) = self.m.lock() else {
            bail!("adamw: moments poisoned by an earlier panic");
        };
        let Moment::Cuda(m) = &mut *m else {
            bail!("adamw: m is on the CPU, v on a CUDA device");
        };
        let op = crate::cuda::adamw::AdamWCuda {
            consts: self.c.kernel_args(),
            m: Mutex::new(m),
            v: Mutex::new(v),
        };
        self.param.inplace_op2(self.grad, &op)
    }
}
