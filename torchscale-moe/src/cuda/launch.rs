//! Kernel launches for the index ops (the `cuda_fwd` of [`super::ops`]).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Shape, Storage, WithDType};

use super::ops::{contiguous2, IndexOp, Kind};

/// The PTX of `kernels/moe_dispatch.cu`.
pub const DISPATCH_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/moe_dispatch.ptx"));
const MODULE: &str = "torchscale_moe_dispatch";

static POISON: AtomicBool = AtomicBool::new(false);

/// When on, every kernel output is filled with NaN before the kernel runs, so that tests see
/// any element a kernel fails to write. Off by default (it costs a host-to-device copy).
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, Ordering::SeqCst);
}

/// Whether [`set_poison_outputs`] is on.
pub fn poisoning() -> bool {
    POISON.load(Ordering::SeqCst)
}

type CResult<T> = candle_core::Result<T>;

fn msg(s: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(s.into())
}

/// A fresh device buffer of `n` elements, NaN-filled when poisoning is on.
pub(crate) fn output<T: WithDType + DeviceRepr>(
    dev: &CudaDevice,
    n: usize,
) -> CResult<CudaSlice<T>> {
    if POISON.load(Ordering::SeqCst) {
        dev.clone_htod(&vec![T::from_f64(f64::NAN); n])
    } else {
        // SAFETY: every element is written by the kernel that follows.
        unsafe { dev.alloc::<T>(n) }
    }
}

/// The `u32` device slice behind `t` (an index tensor on this device) as a guard + offset.
macro_rules! u32_view {
    ($t:expr, $guard:ident, $view:ident) => {
        let ($guard, layout) = $t.storage_and_layout();
        let $view = match &*$guard {
            Storage::Cuda(s) => s.as_cuda_slice::<u32>()?.slice(layout.start_offset()..),
            _ => return Err(msg("moe index tensor is not on the CUDA device")),
        };
    };
}

/// Runs `op` on `a` (and `b`) and wraps the result.
pub(crate) fn run(
    op: &IndexOp,
    a: (&CudaStorage, &Layout),
    b: Option<(&CudaStorage, &Layout)>,
) -> CResult<(CudaStorage, Shape)> {
    let (a0, a1, rows, c) = contiguous2(a.1, "moe index op")?;
    let bl = b.map(|(_, l)| contiguous2(l, "moe index op")).transpose()?;
    let shape = op.out_shape(rows, c, bl.map(|x| (x.2, x.3)))?;
    let dev = &a.0.device;
    macro_rules! go {
        ($var:ident, $sfx:literal) => {{
            let CudaStorageSlice::$var(x) = &a.0.slice else {
                unreachable!()
            };
            let x = x.slice(a0..a1);
            let y = match (b, bl) {
                (Some((s, _)), Some((b0, b1, _, _))) => match &s.slice {
                    CudaStorageSlice::$var(y) => Some(y.slice(b0..b1)),
                    _ => return Err(msg("moe index op: mixed dtypes")),
                },
                _ => None,
            };
            let out = launch(op, dev, &x, y.as_ref(), c, &shape, $sfx)?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match &a.0.slice {
        CudaStorageSlice::F32(_) => go!(F32, "f32"),
        CudaStorageSlice::BF16(_) => go!(BF16, "bf16"),
        CudaStorageSlice::F16(_) => go!(F16, "f16"),
        _ => {
            return Err(msg(
                "moe index op: CUDA kernels exist for f32, bf16 and f16",
            ))
        }
    };
    Ok((out, shape))
}

fn launch<T: WithDType + DeviceRepr>(
    op: &IndexOp,
    dev: &CudaDevice,
    x: &CudaView<'_, T>,
    y: Option<&CudaView<'_, T>>,
    c: usize,
    shape: &Shape,
    sfx: &str,
) -> CResult<CudaSlice<T>> {
    let ix = &op.index;
    let out = output::<T>(dev, shape.elem_count())?;
    let (k, s, r) = (ix.k as u32, ix.num_tokens as u32, ix.num_rows as u32);
    let cc = c as u32;
    let n_choices = s * k;
    let null: u64 = 0;
    let threads = (c.div_ceil(32) * 32).clamp(32, 256) as u32;
    let col_blocks = (c as u32).div_ceil(threads);
    u32_view!(ix.rows, _rows_guard, rows);
    u32_view!(ix.inv, _inv_guard, inv);
    let name = match op.kind {
        Kind::Dispatch | Kind::WeightedScatter => "moe_dispatch",
        Kind::Gather | Kind::Combine => "moe_combine",
        Kind::GateGrad => "moe_gate_grad",
    };
    let func = dev.get_or_load_custom_func(&format!("{name}_{sfx}"), MODULE, DISPATCH_PTX)?;
    let mut bld = func.builder();
    let cfg = match op.kind {
        Kind::Dispatch | Kind::WeightedScatter => {
            bld.arg(x).arg(&inv);
            match y {
                Some(w) => bld.arg(w),
                None => bld.arg(&null),
            };
            bld.arg(&k).arg(&r).arg(&cc).arg(&out);
            grid((r, col_blocks), threads)
        }
        Kind::Gather | Kind::Combine => {
            bld.arg(x).arg(&rows);
            match y {
                Some(w) => bld.arg(w),
                None => bld.arg(&null),
            };
            bld.arg(&k).arg(&s).arg(&cc).arg(&out);
            grid((s, col_blocks), threads)
        }
        Kind::GateGrad => {
            let buf = y.ok_or_else(|| msg("gate grad needs two inputs"))?;
            bld.arg(x)
                .arg(buf)
                .arg(&rows)
                .arg(&n_choices)
                .arg(&k)
                .arg(&cc)
                .arg(&out);
            grid((n_choices.div_ceil(8), 1), 256)
        }
    };
    // SAFETY: argument order and types match the kernels in kernels/moe_dispatch.cu.
    unsafe { bld.launch(cfg) }.w()?;
    Ok(out)
}

pub(crate) fn grid(blocks: (u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.0.max(1), blocks.1.max(1), 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}
