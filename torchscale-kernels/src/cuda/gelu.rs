//! Exact (erf) GELU on CUDA (`kernels/gelu.cu`), element-wise each way.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaStorage, Layout, Result, Shape, Tensor};

use super::launch::{
    by_dtype, device_of, elementwise, guard_view, output, tensor, view, Kernel, Module,
};

/// The forward on a contiguous CUDA input.
pub(crate) fn forward(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let what = "gelu_erf";
    let dev = &s.device;
    by_dtype!(s.dtype(), what, T => {
        let x = view::<T>(s, l, what)?;
        let n = x.len();
        let mut y = output::<T>(dev, n)?;
        if n > 0 {
            let k = Kernel::typed::<T>(dev, Module::Gelu, "gelu_fwd")?;
            let mut a = k.builder();
            let n64 = n as u64;
            a.arg(&x).arg(&mut y).arg(&n64);
            // SAFETY: the arguments match `gelu_fwd_*`; x and y hold n elements.
            unsafe { a.launch(elementwise(n)) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), l.shape().clone()))
    })
}

/// `dx = g gelu'(x)`.
pub(crate) fn backward(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let what = "gelu_erf backward";
    if grad.dims() != x.dims() {
        bail!(
            "{what}: gradient {:?} for an input {:?}",
            grad.dims(),
            x.dims()
        );
    }
    let dev = device_of(x)?;
    let (x, g) = (x.contiguous()?, grad.contiguous()?.to_dtype(x.dtype())?);
    by_dtype!(x.dtype(), what, T => {
        let (xs, gs) = (x.storage_and_layout(), g.storage_and_layout());
        let (xv, gv) = (guard_view::<T>(&xs, what)?, guard_view::<T>(&gs, what)?);
        let n = xv.len();
        let mut dx = output::<T>(&dev, n)?;
        if n > 0 {
            let k = Kernel::typed::<T>(&dev, Module::Gelu, "gelu_bwd")?;
            let mut a = k.builder();
            let n64 = n as u64;
            a.arg(&xv).arg(&gv).arg(&mut dx).arg(&n64);
            // SAFETY: the arguments match `gelu_bwd_*`; x, g and dx hold n elements.
            unsafe { a.launch(elementwise(n)) }.w()?;
        }
        Ok(tensor(dx, &dev, x.shape()))
    })
}
