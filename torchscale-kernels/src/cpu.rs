//! Reading candle CPU storage as f32 and writing results back in the caller's dtype.
//!
//! The kernels compute in f32 whatever the input dtype (f16 / bf16 activations keep f32
//! statistics, as torchscale does); contiguous f32 input is borrowed, not copied.

use std::borrow::Cow;

pub(crate) use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};

/// The storage offsets of a layout's elements in row-major order.
pub(crate) fn strided_offsets(l: &Layout) -> Vec<usize> {
    let dims = l.dims();
    let strides = l.stride();
    let n = l.shape().elem_count();
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return out;
    }
    let mut idx = vec![0usize; dims.len()];
    let mut off = l.start_offset();
    for _ in 0..n {
        out.push(off);
        // Odometer increment over the multi-index, innermost dimension first.
        for d in (0..dims.len()).rev() {
            idx[d] += 1;
            off += strides[d];
            if idx[d] < dims[d] {
                break;
            }
            off -= strides[d] * dims[d];
            idx[d] = 0;
        }
    }
    out
}

fn gather<T: Copy>(v: &[T], l: &Layout, f: impl Fn(T) -> f32) -> Vec<f32> {
    match l.contiguous_offsets() {
        Some((a, b)) => v[a..b].iter().map(|x| f(*x)).collect(),
        None => strided_offsets(l).into_iter().map(|i| f(v[i])).collect(),
    }
}

/// The elements of `s` under `l`, row-major, as f32 (borrowed when already contiguous f32).
pub(crate) fn as_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<Cow<'a, [f32]>> {
    Ok(match s {
        CpuStorage::F32(v) => match l.contiguous_offsets() {
            Some((a, b)) => Cow::Borrowed(&v[a..b]),
            None => Cow::Owned(gather(v, l, |x| x)),
        },
        CpuStorage::F16(v) => Cow::Owned(gather(v, l, f16::to_f32)),
        CpuStorage::BF16(v) => Cow::Owned(gather(v, l, bf16::to_f32)),
        CpuStorage::F64(v) => Cow::Owned(gather(v, l, |x| x as f32)),
        other => bail!("fused kernels take float tensors, got {:?}", other.dtype()),
    })
}

/// `v` as storage of `dtype` (f32 is moved, others are converted).
pub(crate) fn storage_from_f32(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::F16 => CpuStorage::F16(v.into_iter().map(f16::from_f32).collect()),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
        DType::F64 => CpuStorage::F64(v.into_iter().map(f64::from).collect()),
        other => bail!("fused kernels write float tensors, not {other:?}"),
    })
}

/// A CPU tensor of `dtype` and `shape` from f32 values.
pub(crate) fn tensor_from_f32(
    v: Vec<f32>,
    shape: impl Into<Shape>,
    dtype: DType,
) -> Result<Tensor> {
    let t = Tensor::from_vec(v, shape, &Device::Cpu)?;
    if dtype == DType::F32 {
        Ok(t)
    } else {
        t.to_dtype(dtype)
    }
}

/// Runs `f` on the elements of a CPU tensor as f32 (row-major, borrowed when possible).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(&as_f32(s, layout)?),
        _ => bail!("fused CPU kernel called on a {:?} tensor", t.device()),
    }
}

/// True when every tensor is on the CPU with a float dtype the kernels read.
pub(crate) fn cpu_float(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| {
        t.device().is_cpu()
            && matches!(
                t.dtype(),
                DType::F32 | DType::F16 | DType::BF16 | DType::F64
            )
    })
}

/// Splits `0..n` into at most `parts` contiguous ranges of near-equal length.
pub(crate) fn chunks(n: usize, parts: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    let base = n / parts;
    let extra = n % parts;
    (0..parts).map(move |i| {
        let start = i * base + i.min(extra);
        start..start + base + usize::from(i < extra)
    })
}

/// Worker threads to split element-wise work over (rayon's pool, as candle uses).
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Whether the caller runs on one of rayon's workers. There a split is cheap (the other workers
/// steal from its queue); from any other thread rayon hands the whole call to its pool and wakes
/// a worker, tens of microseconds on a virtual machine. `runtime::in_pool` runs a training step
/// on a worker.
pub(crate) fn on_worker() -> bool {
    rayon::current_thread_index().is_some()
}

/// Below this many elements a memory-bound kernel stays on the calling thread (a split costs
/// about what it saves), from a worker and from outside the pool.
pub(crate) fn par_min_elems() -> usize {
    if on_worker() {
        1 << 14
    } else {
        1 << 16
    }
}

/// Whether `elems` elements of memory-bound work are worth splitting over rayon's threads.
pub(crate) fn worth_threading(elems: usize) -> bool {
    threads() > 1 && elems >= par_min_elems()
}
