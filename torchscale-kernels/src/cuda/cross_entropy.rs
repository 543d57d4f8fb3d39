//! Label-smoothed cross entropy on CUDA (`kernels/cross_entropy.cu`): per-row statistics in one
//! pass after the max, a one-block reduction to `[loss, nll]`, and the gradient in one pass that
//! reads the output gradient on the device.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Tensor};

use super::launch::{
    by_dtype, device_of, guard_view, output, per_row, row_threads, tensor, u32_arg, view, Kernel,
    Module,
};

/// What the backward needs from the forward: the targets on the device and the per-row
/// `(max, ln sum exp(x - max))`.
pub(crate) struct Saved {
    targets: CudaSlice<u32>,
    lse: CudaSlice<f32>,
}

/// The smoothing and ignore settings of one call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// The label smoothing `eps`.
    pub epsilon: f64,
    /// `eps / (V - 1)` (0 without smoothing).
    pub eps_i: f64,
    /// Rows whose target is this class are left out.
    pub ignore_index: Option<u32>,
}

impl Params {
    fn ignore_args(&self) -> (u32, u32) {
        match self.ignore_index {
            Some(i) => (1, i),
            None => (0, 0),
        }
    }
}

/// `[loss, nll]` (f32) of contiguous `[N, V]` logits, and what the backward needs.
pub(crate) fn forward(
    s: &CudaStorage,
    l: &Layout,
    targets: &[u32],
    p: Params,
) -> Result<(CudaStorage, Shape, Saved)> {
    let what = "label_smoothed_ce";
    let &[n, v] = l.dims() else {
        bail!("{what}: logits {:?}, expected [N, V]", l.dims());
    };
    if targets.len() != n || n == 0 || v == 0 {
        bail!(
            "{what}: {} targets for logits {:?}",
            targets.len(),
            l.dims()
        );
    }
    let (n32, v32) = (u32_arg(n, what)?, u32_arg(v, what)?);
    let dev = &s.device;
    let tgt = dev.clone_htod(targets)?;
    let mut lse = output::<f32>(dev, 2 * n)?;
    let mut rowsum = output::<f64>(dev, 2 * n)?;
    let (has_ignore, ignore) = p.ignore_args();
    let smooth = u32::from(p.epsilon > 0.0);
    by_dtype!(s.dtype(), what, T => {
        let x = view::<T>(s, l, what)?;
        let k = Kernel::typed::<T>(dev, Module::CrossEntropy, "ce_fwd_rows")?;
        let mut a = k.builder();
        a.arg(&x)
            .arg(&tgt)
            .arg(&has_ignore)
            .arg(&ignore)
            .arg(&smooth)
            .arg(&mut lse)
            .arg(&mut rowsum)
            .arg(&n32)
            .arg(&v32);
        // SAFETY: the arguments match `ce_fwd_rows_*`; x holds n * v elements, the targets n
        // (each < v or ignored, checked by the caller), lse and rowsum 2n.
        unsafe { a.launch(per_row(n32, row_threads(v))) }.w()?;
    });
    let mut out = output::<f32>(dev, 2)?;
    let coef = 1.0 - p.epsilon - p.eps_i;
    let k = Kernel::new(dev, Module::CrossEntropy, "ce_reduce")?;
    let mut a = k.builder();
    a.arg(&rowsum)
        .arg(&n32)
        .arg(&coef)
        .arg(&p.eps_i)
        .arg(&mut out);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match `ce_reduce`, which needs exactly 256 threads; out holds 2.
    unsafe { a.launch(cfg) }.w()?;
    let saved = Saved { targets: tgt, lse };
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(2),
        saved,
    ))
}

/// `d/dlogits` of `g0 loss + g1 nll` for the output gradient `grad = [g0, g1]`, in the logits'
/// dtype.
pub(crate) fn backward(logits: &Tensor, grad: &Tensor, saved: &Saved, p: Params) -> Result<Tensor> {
    let what = "label_smoothed_ce backward";
    let (n, v) = logits.dims2()?;
    if grad.dims() != [2] {
        bail!("{what}: output gradient {:?}, expected [2]", grad.dims());
    }
    if saved.targets.len() != n || saved.lse.len() != 2 * n {
        bail!(
            "{what}: saved state for {} rows, logits {:?}",
            saved.targets.len(),
            logits.dims()
        );
    }
    let (n32, v32) = (u32_arg(n, what)?, u32_arg(v, what)?);
    let dev = device_of(logits)?;
    let x = logits.contiguous()?;
    let g = grad.to_dtype(DType::F32)?.contiguous()?;
    let (has_ignore, ignore) = p.ignore_args();
    by_dtype!(x.dtype(), what, T => {
        let (xs, gs) = (x.storage_and_layout(), g.storage_and_layout());
        let (xv, gv) = (guard_view::<T>(&xs, what)?, guard_view::<f32>(&gs, what)?);
        let mut dx = output::<T>(&dev, n * v)?;
        let k = Kernel::typed::<T>(&dev, Module::CrossEntropy, "ce_bwd")?;
        let mut a = k.builder();
        a.arg(&xv)
            .arg(&saved.targets)
            .arg(&has_ignore)
            .arg(&ignore)
            .arg(&saved.lse)
            .arg(&gv)
            .arg(&p.epsilon)
            .arg(&p.eps_i)
            .arg(&mut dx)
            .arg(&n32)
            .arg(&v32);
        // SAFETY: the arguments match `ce_bwd_*`; x and dx hold n * v elements, the targets n,
        // lse 2n, the gradient 2.
        unsafe { a.launch(per_row(n32, row_threads(v))) }.w()?;
        Ok(tensor(dx, &dev, (n, v)))
    })
}
