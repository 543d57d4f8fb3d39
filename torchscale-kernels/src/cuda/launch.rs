//! What every launch needs: the PTX modules, outputs (NaN-poisoned on request), contiguous
//! views of device memory, launch shapes and results wrapped as tensors.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DeviceRepr, LaunchArgs, LaunchConfig,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{
    bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, StorageRef, Tensor,
    WithDType,
};
use half::{bf16, f16};

/// The PTX of each kernel file, by name (`norm`, `softmax`, `gelu`, `cross_entropy`, `adamw`).
pub const PTX: [(&str, &str); 5] = [
    ("norm", include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"))),
    (
        "softmax",
        include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx")),
    ),
    ("gelu", include_str!(concat!(env!("OUT_DIR"), "/gelu.ptx"))),
    (
        "cross_entropy",
        include_str!(concat!(env!("OUT_DIR"), "/cross_entropy.ptx")),
    ),
    (
        "adamw",
        include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx")),
    ),
];

/// A kernel file, loaded once per device as its own module.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Module {
    Norm,
    Softmax,
    Gelu,
    CrossEntropy,
    AdamW,
}

static POISON: AtomicBool = AtomicBool::new(false);

/// When on, every output the fused CUDA kernels write is filled with NaN before the kernel runs,
/// so that tests see any element a kernel fails to write. Off by default (it costs a host to
/// device copy per output).
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, Ordering::SeqCst);
}

/// Whether [`set_poison_outputs`] is on.
pub fn poisoning() -> bool {
    POISON.load(Ordering::SeqCst)
}

/// An element type the kernels read and write, with its kernel-name suffix.
pub(crate) trait Elem: CudaDType + DeviceRepr + WithDType {
    const SFX: &'static str;
}

impl Elem for f32 {
    const SFX: &'static str = "f32";
}
impl Elem for bf16 {
    const SFX: &'static str = "bf16";
}
impl Elem for f16 {
    const SFX: &'static str = "f16";
}
impl Elem for f64 {
    const SFX: &'static str = "f64";
}

/// Runs `$body` with the type alias `$T` set to the element type of `$dtype` (f32, bf16, f16).
macro_rules! by_dtype {
    ($dtype:expr, $what:expr, $T:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            d => candle_core::bail!("{}: CUDA kernels take f32, bf16 or f16, not {d:?}", $what),
        }
    };
}
pub(crate) use by_dtype;

/// The contiguous device elements of a tensor's storage, from its `storage_and_layout()`
/// (the guard must outlive the view); names `what` when the tensor is not on a CUDA device.
pub(crate) fn guard_view<'a, T: Elem>(
    g: &'a (StorageRef<'_>, &Layout),
    what: &str,
) -> Result<CudaView<'a, T>> {
    match &*g.0 {
        Storage::Cuda(s) => view(s, g.1, what),
        _ => bail!("{what}: expected a CUDA tensor"),
    }
}

/// A loaded kernel and the device's stream it launches on.
pub(crate) struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    /// `name` from `module` (loading the module on first use on this device).
    pub fn new(dev: &CudaDevice, module: Module, name: &str) -> Result<Self> {
        let (file, ptx) = PTX[module as usize];
        let module_name = format!("torchscale_kernels_{file}");
        let func = dev.get_or_load_custom_func(name, &module_name, ptx)?;
        Ok(Self {
            func: func.into_cuda_function(),
            stream: dev.cuda_stream(),
        })
    }

    /// `{base}_{suffix of T}` from `module`.
    pub fn typed<T: Elem>(dev: &CudaDevice, module: Module, base: &str) -> Result<Self> {
        Self::new(dev, module, &format!("{base}_{}", T::SFX))
    }

    /// A launch of this kernel; push the arguments in the kernel's order.
    pub fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// A fresh device buffer of `n` elements, NaN-filled when poisoning is on.
pub(crate) fn output<T: Elem>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    if poisoning() {
        dev.clone_htod(&vec![T::from_f64(f64::NAN); n])
    } else {
        // SAFETY: the caller launches a kernel that writes every element before anything reads.
        unsafe { dev.alloc::<T>(n) }
    }
}

/// The elements of `s` under the contiguous layout `l`; names `what` when `l` is strided.
pub(crate) fn view<'a, T: Elem>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!(
            "{what}: the CUDA kernel needs a contiguous tensor, got strides {:?}",
            l.stride()
        );
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// `s` under `l` as contiguous f32: a view when it already is, else a converted copy kept in
/// `tmp` (weights and biases of another dtype are tiny).
pub(crate) fn f32_view<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    tmp: &'a mut Option<CudaStorage>,
    what: &str,
) -> Result<CudaView<'a, f32>> {
    if s.dtype() == DType::F32 && l.is_contiguous() {
        return view::<f32>(s, l, what);
    }
    let converted = tmp.insert(s.to_dtype(l, DType::F32)?);
    Ok(converted.as_cuda_slice::<f32>()?.slice(..))
}

/// `slice` as a tensor of `shape` on `dev`, outside any graph.
pub(crate) fn tensor<T: Elem>(
    slice: CudaSlice<T>,
    dev: &CudaDevice,
    shape: impl Into<Shape>,
) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// `n` as a kernel's `unsigned` argument; names `what` when it does not fit.
pub(crate) fn u32_arg(n: usize, what: &str) -> Result<u32> {
    // Grid sizes in x are capped at 2^31 - 1, and row kernels run one block per row.
    match u32::try_from(n) {
        Ok(v) if v < (1 << 31) => Ok(v),
        _ => bail!("{what}: {n} is too large for the CUDA kernels (at most 2^31 - 1)"),
    }
}

/// Threads per block for a row of `d` elements: about four elements per thread, whole warps,
/// 32 to 512.
pub(crate) fn row_threads(d: usize) -> u32 {
    (d.div_ceil(4).div_ceil(32) * 32).clamp(32, 512) as u32
}

/// One block of `threads` per row.
pub(crate) fn per_row(rows: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride launch over `n` elements.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The CUDA device of a tensor.
pub(crate) fn device_of(t: &Tensor) -> Result<CudaDevice> {
    Ok(t.device().as_cuda_device()?.clone())
}
