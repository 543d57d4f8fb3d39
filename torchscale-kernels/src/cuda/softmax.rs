//! Softmax over the last dimension on CUDA (`kernels/softmax.cu`): one block per row each way,
//! the backward from the saved output.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaStorage, Layout, Result, Shape, Tensor};

use super::launch::{
    by_dtype, device_of, guard_view, output, per_row, row_threads, tensor, u32_arg, view, Kernel,
    Module,
};

/// `(rows, d)` of a tensor of `dims` as kernel arguments.
fn sizes(dims: &[usize], what: &str) -> Result<(u32, u32)> {
    let Some(&d) = dims.last() else {
        bail!("{what}: needs at least one dimension, got a scalar");
    };
    if d == 0 {
        bail!("{what}: empty last dimension in {dims:?}");
    }
    let rows = dims.iter().product::<usize>() / d;
    Ok((u32_arg(rows, what)?, u32_arg(d, what)?))
}

/// The forward on a contiguous CUDA input.
pub(crate) fn forward(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let what = "softmax_last_dim";
    let (rows, d) = sizes(l.dims(), what)?;
    let dev = &s.device;
    by_dtype!(s.dtype(), what, T => {
        let x = view::<T>(s, l, what)?;
        let mut y = output::<T>(dev, x.len())?;
        let k = Kernel::typed::<T>(dev, Module::Softmax, "softmax_fwd")?;
        let mut a = k.builder();
        a.arg(&x).arg(&mut y).arg(&rows).arg(&d);
        // SAFETY: the arguments match `softmax_fwd_*`; x and y hold rows * d elements.
        unsafe { a.launch(per_row(rows, row_threads(d as usize))) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), l.shape().clone()))
    })
}

/// `dx = y (g - sum(g y))` from the forward's output `y`.
pub(crate) fn backward(y: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let what = "softmax_last_dim backward";
    let (rows, d) = sizes(y.dims(), what)?;
    if grad.dims() != y.dims() {
        bail!(
            "{what}: gradient {:?} for an output {:?}",
            grad.dims(),
            y.dims()
        );
    }
    let dev = device_of(y)?;
    let (y, g) = (y.contiguous()?, grad.contiguous()?.to_dtype(y.dtype())?);
    by_dtype!(y.dtype(), what, T => {
        let (ys, gs) = (y.storage_and_layout(), g.storage_and_layout());
        let (yv, gv) = (guard_view::<T>(&ys, what)?, guard_view::<T>(&gs, what)?);
        let mut dx = output::<T>(&dev, yv.len())?;
        let k = Kernel::typed::<T>(&dev, Module::Softmax, "softmax_bwd")?;
        let mut a = k.builder();
        a.arg(&yv).arg(&gv).arg(&mut dx).arg(&rows).arg(&d);
        // SAFETY: the arguments match `softmax_bwd_*`; y, g and dx hold rows * d elements.
        unsafe { a.launch(per_row(rows, row_threads(d as usize))) }.w()?;
        Ok(tensor(dx, &dev, y.shape()))
    })
}
