//! The one-pass AdamW update on CUDA (`kernels/adamw.cu`): the parameter (f32, bf16 or f16),
//! its f32 moments and the gradient (f32, bf16 or f16) in one kernel, all three updated in place.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaViewMut, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CpuStorage, CudaStorage, InplaceOp2, Layout, Result};

use super::launch::{by_dtype, elementwise, view, Elem, Kernel, Module};

/// The in-place op on the parameter (read with the gradient); the moments are borrowed mutably
/// for the one call (`cuda_fwd` takes `&self`, hence the mutexes).
pub(crate) struct AdamWCuda<'a, 'b, 'c> {
    /// `[decay, 1 - b1, b2, 1 - b2, 1 / sqrt(1 - b2^t), eps, lr / (1 - b1^t)]`, the host
    /// kernel's f32 constants.
    pub consts: [f32; 7],
    /// The first moment.
    pub m: Mutex<&'a mut CudaViewMut<'b, f32>>,
    /// The second moment.
    pub v: Mutex<CudaViewMut<'c, f32>>,
}

fn launch<P: Elem, G: Elem>(
    op: &AdamWCuda<'_, '_, '_>,
    (ps, pl): (&mut CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
) -> Result<()> {
    let what = "adamw";
    let Some((a, b)) = pl.contiguous_offsets() else {
        bail!("{what}: the parameter must be contiguous to be updated in place");
    };
    let dev = ps.device.clone();
    let g = view::<G>(gs, gl, what)?;
    let (Ok(mut m), Ok(mut v)) = (op.m.lock(), op.v.lock()) else {
        bail!("{what}: moments poisoned by an earlier panic");
    };
    let mut p = ps.as_cuda_slice_mut::<P>()?.slice_mut(a..b);
    let n = p.len();
    if g.len() != n || m.len() != n || v.len() != n {
        bail!(
            "{what}: {n} parameter values, {} gradient values, moments of {} and {}",
            g.len(),
            m.len(),
            v.len()
        );
    }
    if n == 0 {
        return Ok(());
    }
    let name = format!("adamw_{}_{}", P::SFX, G::SFX);
    let k = Kernel::new(&dev, Module::AdamW, &name)?;
    let mut args = k.builder();
    let n64 = n as u64;
    args.arg(&mut p)
        .arg(&g)
        .arg(&mut **m)
        .arg(&mut *v)
        .arg(&n64);
    for c in &op.consts {
        args.arg(c);
    }
    // SAFETY: the arguments match `adamw_*_*` in kernels/adamw.cu; p, g, m and v hold n values.
    unsafe { args.launch(elementwise(n)) }.w()?;
    Ok(())
}

impl InplaceOp2 for AdamWCuda<'_, '_, '_> {
    fn name(&self) -> &'static str {
        "torchscale-adamw-cuda"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        bail!("adamw: the moments are on a CUDA device but the parameter is on the CPU")
    }

    fn cuda_fwd(
        &self,
        ps: &mut CudaStorage,
        pl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        let (pd, gd) = (ps.dtype(), gs.dtype());
        by_dtype!(pd, "adamw parameter", P => {
            by_dtype!(gd, "adamw gradient", G => launch::<P, G>(self, (ps, pl), (gs, gl)))
        })
    }
}
