//! LayerNorm and residual LayerNorm on CUDA (`kernels/norm.cu`): the forward keeps the per-row
//! `[mean, rstd]` on the device for the backward, which launches the row kernel for the input
//! gradients and the column-chunk kernel plus its reduction for `[dw, db]` (in f32).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Tensor};

use super::launch::{
    by_dtype, device_of, f32_view, guard_view, output, per_row, row_threads, tensor, u32_arg, view,
    Elem, Kernel, Module,
};

/// `[mean, rstd]` per row, kept by an op between its forward and backward.
pub(crate) type Stats = std::sync::Mutex<Option<CudaSlice<f32>>>;

/// Rows and width of an input whose last dimension is `d`, as kernel arguments.
fn sizes(l: &Layout, d: usize, what: &str) -> Result<(u32, u32)> {
    if l.dims().last() != Some(&d) || d == 0 {
        bail!("{what}: input {:?} does not end in the width {d}", l.dims());
    }
    let rows = l.shape().elem_count() / d;
    Ok((u32_arg(rows, what)?, u32_arg(d, what)?))
}

/// The forward kernel (`y` null: statistics only).
#[allow(clippy::too_many_arguments)]
fn launch_fwd<T: Elem>(
    dev: &CudaDevice,
    x: &CudaView<'_, T>,
    fx: Option<&CudaView<'_, T>>,
    alpha: f32,
    (w, b): (&CudaView<'_, f32>, &CudaView<'_, f32>),
    y: Option<&mut CudaSlice<T>>,
    stats: &mut CudaSlice<f32>,
    (rows, d, eps): (u32, u32, f32),
) -> Result<()> {
    let null = 0u64;
    let k = Kernel::typed::<T>(dev, Module::Norm, "ln_fwd")?;
    let mut a = k.builder();
    a.arg(x);
    match fx {
        Some(fx) => a.arg(fx),
        None => a.arg(&null),
    };
    a.arg(&alpha).arg(w).arg(b);
    match y {
        Some(y) => a.arg(y),
        None => a.arg(&null),
    };
    a.arg(stats).arg(&rows).arg(&d).arg(&eps);
    // SAFETY: the arguments match `ln_fwd_*` in kernels/norm.cu, x (and fx) hold rows * d
    // elements, w and b d, y rows * d and stats 2 rows.
    unsafe { a.launch(per_row(rows, row_threads(d as usize))) }.w()?;
    Ok(())
}

/// `y` in `x`'s dtype and the per-row statistics of LayerNorm over `s = x` (or `alpha x + fx`).
fn forward(
    x: (&CudaStorage, &Layout),
    fx: Option<(&CudaStorage, &Layout)>,
    alpha: f32,
    (w, b): (&CudaView<'_, f32>, &CudaView<'_, f32>),
    eps: f32,
    what: &str,
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    let dev = &x.0.device;
    let (rows, d) = sizes(x.1, w.len(), what)?;
    if b.len() != w.len() {
        bail!(
            "{what}: weight of {} and bias of {} values",
            w.len(),
            b.len()
        );
    }
    if let Some((_, l)) = fx {
        if l.dims() != x.1.dims() {
            bail!("{what}: fx {:?} for x {:?}", l.dims(), x.1.dims());
        }
    }
    let n = rows as usize * d as usize;
    by_dtype!(x.0.dtype(), what, T => {
        let xv = view::<T>(x.0, x.1, what)?;
        let fxv = fx.map(|(s, l)| view::<T>(s, l, what)).transpose()?;
        let mut y = output::<T>(dev, n)?;
        let mut stats = output::<f32>(dev, 2 * rows as usize)?;
        launch_fwd(dev, &xv, fxv.as_ref(), alpha, (w, b), Some(&mut y), &mut stats, (rows, d, eps))?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), stats))
    })
}

/// `LayerNorm(x)` with separate `w`, `b` (any float dtype, cast to f32 when not f32).
pub(crate) fn layer_norm_fwd(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    eps: f32,
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    let (mut tw, mut tb) = (None, None);
    let wv = f32_view(w.0, w.1, &mut tw, "layer_norm weight")?;
    let bv = f32_view(b.0, b.1, &mut tb, "layer_norm bias")?;
    forward(x, None, 1.0, (&wv, &bv), eps, "layer_norm")
}

/// `LayerNorm(alpha x + fx)` with `wb = [weight, bias]` (`[2C]`).
pub(crate) fn residual_fwd(
    x: (&CudaStorage, &Layout),
    fx: (&CudaStorage, &Layout),
    wb: (&CudaStorage, &Layout),
    alpha: f32,
    eps: f32,
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    let mut t = None;
    let wbv = f32_view(wb.0, wb.1, &mut t, "residual_layer_norm weight and bias")?;
    let d = wbv.len() / 2;
    let (w, b) = (wbv.slice(..d), wbv.slice(d..2 * d));
    forward(x, Some(fx), alpha, (&w, &b), eps, "residual_layer_norm")
}

/// The input-gradient outputs of a backward: `out1 = scale1 ds` and, when asked, a second
/// tensor `out2 = scale2 ds`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DsOutputs {
    pub out1: Option<f32>,
    pub out2: Option<f32>,
}

/// The backward of LayerNorm over `s = x` (or `alpha x + fx`): `(out1, out2, [dw, db] in f32)`,
/// each only when asked for. `w` is the weight (`[C]`, any float dtype); `stats` are the
/// forward's when at hand (recomputed otherwise).
#[allow(clippy::too_many_arguments)]
fn backward(
    x: &Tensor,
    fx: Option<&Tensor>,
    alpha: f32,
    w: &Tensor,
    grad: &Tensor,
    stats: Option<&CudaSlice<f32>>,
    eps: f32,
    (outs, need_wb): (DsOutputs, bool),
    what: &str,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let dev = device_of(x)?;
    let d = w.elem_count();
    let (rows, d32) = sizes(x.layout(), d, what)?;
    if grad.dims() != x.dims() {
        bail!(
            "{what}: gradient {:?} for an output {:?}",
            grad.dims(),
            x.dims()
        );
    }
    let n = rows as usize * d;
    let (x, g) = (x.contiguous()?, grad.contiguous()?.to_dtype(x.dtype())?);
    let fx = fx.map(Tensor::contiguous).transpose()?;
    let w = w.to_dtype(DType::F32)?.contiguous()?;
    by_dtype!(x.dtype(), what, T => {
        let (xs, gs, ws) = (x.storage_and_layout(), g.storage_and_layout(), w.storage_and_layout());
        let fxs = fx.as_ref().map(Tensor::storage_and_layout);
        let xv = guard_view::<T>(&xs, what)?;
        let gv = guard_view::<T>(&gs, what)?;
        let wv = guard_view::<f32>(&ws, what)?;
        let fxv = fxs.as_ref().map(|s| guard_view::<T>(s, what)).transpose()?;
        let recomputed;
        let stats = match stats {
            Some(s) if s.len() == 2 * rows as usize => s,
            _ => {
                let mut s = output::<f32>(&dev, 2 * rows as usize)?;
                launch_fwd::<T>(&dev, &xv, fxv.as_ref(), alpha, (&wv, &wv), None, &mut s, (rows, d32, eps))?;
                recomputed = s;
                &recomputed
            }
        };
        let null = 0u64;
        let mut out1 = outs.out1.map(|_| output::<T>(&dev, n)).transpose()?;
        let mut out2 = outs.out2.map(|_| output::<T>(&dev, n)).transpose()?;
        if let Some(o1) = out1.as_mut() {
            let (scale1, scale2) = (outs.out1.unwrap_or(1.0), outs.out2.unwrap_or(0.0));
            let k = Kernel::typed::<T>(&dev, Module::Norm, "ln_bwd_dx")?;
            let mut a = k.builder();
            a.arg(&xv);
            match fxv.as_ref() {
                Some(f) => a.arg(f),
                None => a.arg(&null),
            };
            a.arg(&alpha).arg(&gv).arg(&wv).arg(stats).arg(o1).arg(&scale1);
            match out2.as_mut() {
                Some(o2) => a.arg(o2),
                None => a.arg(&null),
            };
            a.arg(&scale2).arg(&rows).arg(&d32);
            // SAFETY: the arguments match `ln_bwd_dx_*`; x, fx, g, out1, out2 hold rows * d
            // elements, w d, stats 2 rows.
            unsafe { a.launch(per_row(rows, row_threads(d))) }.w()?;
        }
        let dwb = if need_wb {
            Some(weight_grads::<T>(&dev, (&xv, fxv.as_ref(), alpha, &gv), stats, (rows, d32))?)
        } else {
            None
        };
        let shape = x.shape();
        Ok((
            out1.map(|o| tensor(o, &dev, shape)),
            out2.map(|o| tensor(o, &dev, shape)),
            dwb.map(|o| tensor(o, &dev, 2 * d)),
        ))
    })
}

/// `[dw, db]` (f32, `2d`): per-chunk column sums, then their sum over chunks.
fn weight_grads<T: Elem>(
    dev: &CudaDevice,
    (x, fx, alpha, g): (
        &CudaView<'_, T>,
        Option<&CudaView<'_, T>>,
        f32,
        &CudaView<'_, T>,
    ),
    stats: &CudaSlice<f32>,
    (rows, d): (u32, u32),
) -> Result<CudaSlice<f32>> {
    // About 16 rows per chunk, at most 1024 chunks: enough blocks to fill the GPU, few partials.
    let chunks = rows.div_ceil(16).clamp(1, 1024);
    let per_chunk = rows.div_ceil(chunks).max(1);
    let chunks = rows.div_ceil(per_chunk).max(1);
    let threads = (d.div_ceil(32) * 32).min(256);
    let mut partial = output::<f32>(dev, chunks as usize * 2 * d as usize)?;
    let null = 0u64;
    let k = Kernel::typed::<T>(dev, Module::Norm, "ln_bwd_wb")?;
    let mut a = k.builder();
    a.arg(x);
    match fx {
        Some(f) => a.arg(f),
        None => a.arg(&null),
    };
    a.arg(&alpha)
        .arg(g)
        .arg(stats)
        .arg(&mut partial)
        .arg(&rows)
        .arg(&d)
        .arg(&per_chunk);
    let cfg = candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: (d.div_ceil(threads), chunks, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match `ln_bwd_wb_*`; partial holds chunks * 2d values and every
    // (chunk, column) pair is written.
    unsafe { a.launch(cfg) }.w()?;
    let two_d = 2 * d;
    let mut dwb = output::<f32>(dev, two_d as usize)?;
    let k = Kernel::new(dev, Module::Norm, "ln_wb_reduce")?;
    let mut a = k.builder();
    a.arg(&partial).arg(&chunks).arg(&two_d).arg(&mut dwb);
    let cfg = candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: (two_d.div_ceil(256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match `ln_wb_reduce`; dwb holds 2d values, all written.
    unsafe { a.launch(cfg) }.w()?;
    Ok(dwb)
}

/// The gradients of [`crate::layer_norm`] on CUDA for `x`, `w`, `b` (each when its flag is on),
/// in their dtypes.
pub(crate) fn layer_norm_bwd(
    (x, w, b): (&Tensor, &Tensor, &Tensor),
    grad: &Tensor,
    stats: Option<&CudaSlice<f32>>,
    eps: f32,
    (need_x, need_w, need_b): (bool, bool, bool),
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let outs = DsOutputs {
        out1: need_x.then_some(1.0),
        out2: None,
    };
    let (dx, _, dwb) = backward(
        x,
        None,
        1.0,
        w,
        grad,
        stats,
        eps,
        (outs, need_w || need_b),
        "layer_norm backward",
    )?;
    let d = w.elem_count();
    let part = |i: usize, like: &Tensor, on: bool| -> Result<Option<Tensor>> {
        match (&dwb, on) {
            (Some(t), true) => Ok(Some(t.narrow(0, i * d, d)?.to_dtype(like.dtype())?)),
            _ => Ok(None),
        }
    };
    Ok((dx, part(0, w, need_w)?, part(1, b, need_b)?))
}

/// The gradients of [`crate::residual_layer_norm`] on CUDA for `x`, `fx` and `wb` (each when its
/// flag is on), in their dtypes; with `alpha = 1` and both `x` and `fx` wanted, one tensor is
/// handed to both (candle's gradient store never writes into it).
#[allow(clippy::too_many_arguments)]
pub(crate) fn residual_bwd(
    (x, fx, wb): (&Tensor, &Tensor, &Tensor),
    grad: &Tensor,
    stats: Option<&CudaSlice<f32>>,
    alpha: f32,
    eps: f32,
    (need_x, need_fx, need_wb): (bool, bool, bool),
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let d = wb.elem_count() / 2;
    let w = wb.narrow(0, 0, d)?;
    let outs = match (need_x, need_fx) {
        (true, true) if alpha != 1.0 => DsOutputs {
            out1: Some(1.0),
            out2: Some(alpha),
        },
        (true, true) | (false, true) => DsOutputs {
            out1: Some(1.0),
            out2: None,
        },
        (true, false) => DsOutputs {
            out1: Some(alpha),
            out2: None,
        },
        (false, false) => DsOutputs {
            out1: None,
            out2: None,
        },
    };
    let (ds, dx2, dwb) = backward(
        x,
        Some(fx),
        alpha,
        &w,
        grad,
        stats,
        eps,
        (outs, need_wb),
        "residual_layer_norm backward",
    )?;
    let (dx, dfx) = match (need_x, need_fx) {
        (true, true) if dx2.is_some() => (dx2, ds),
        (true, true) => (ds.clone(), ds),
        (true, false) => (ds, None),
        _ => (None, ds),
    };
    let dwb = dwb.map(|t| t.to_dtype(wb.dtype())).transpose()?;
    Ok((dx, dfx, dwb))
}
