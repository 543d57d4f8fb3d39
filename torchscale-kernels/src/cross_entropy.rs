//! Summed label-smoothed cross entropy (fairseq's `label_smoothed_nll_loss`) over `[N, V]` logits,
//! with a fused backward.
//!
//! The composed version materialises `log_softmax(logits)` (and, in candle, the max, the shifted
//! logits and their exponentials), gathers the targets and sums; its backward allocates several
//! `[N, V]` tensors. The fused forward reads each row once from memory (a max pass, then a pass
//! summing `exp(x − max)` and, when smoothing, `x − max` while the row is still in cache) and
//! keeps only the per-row log-sum-exp; the backward writes the one `[N, V]` gradient directly,
//! `(a + b·V)·p_v − b − a·[v = t]`. Rows run in parallel, the inner loops in 16 f32 lanes (built
//! for AVX-512 when the CPU has it) with a polynomial `exp`.

use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, D};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::cpu::{as_f32, cpu_float, worth_threading};
use crate::cuda::cuda_float;
use crate::switch::fused_enabled;

/// Summed label-smoothed cross entropy over the rows of `logits` (`[N, V]`) whose target is not
/// `ignore_index`: a `[2]` f32 tensor `[loss_sum, nll_sum]` whose backward gives the gradient of
/// `g0·loss_sum + g1·nll_sum` with respect to `logits`.
///
/// With `lp = log_softmax(logits)` (f32) and `eps_i = eps / (V − 1)` (0 when `eps = 0`), a kept row
/// with target `t` adds `nll = −lp[t]` and `loss = (1 − eps − eps_i)·nll + eps_i·Σ_v(−lp[v])`.
/// The fused kernel runs on CPU float logits (and, with the `cuda` feature, on CUDA f32 / f16 /
/// bf16 logits) when fused kernels are on, the composed version
/// ([`label_smoothed_ce_composed`]) otherwise.
pub fn label_smoothed_ce(
    logits: &Tensor,
    targets: &[u32],
    epsilon: f64,
    ignore_index: Option<u32>,
) -> Result<Tensor> {
    validate(logits, targets, epsilon, ignore_index)?;
    let on_cuda = cuda_float(&[logits]);
    if !fused_enabled()
        || !(cpu_float(&[logits]) || on_cuda)
        || (on_cuda && logits.elem_count() == 0)
    {
        return label_smoothed_ce_composed(logits, targets, epsilon, ignore_index);
    }
    let op = CeOp {
        targets: targets.to_vec(),
        epsilon,
        ignore_index,
        lse: OnceLock::new(),
        #[cfg(feature = "cuda")]
        cuda: Default::default(),
    };
    if on_cuda {
        // The CUDA kernels read rows in place: strided logits are copied once here.
        return logits.contiguous()?.apply_op1(op);
    }
    logits.apply_op1(op)
}

/// The composed candle version of [`label_smoothed_ce`] (the reference the kernel is tested
/// against): `log_softmax` in f32, a gather of the targets and masked sums.
pub fn label_smoothed_ce_composed(
    logits: &Tensor,
    targets: &[u32],
    epsilon: f64,
    ignore_index: Option<u32>,
) -> Result<Tensor> {
    let (n, v) = validate(logits, targets, epsilon, ignore_index)?;
    let dev = logits.device();
    let kept = |t: u32| ignore_index != Some(t);
    // Ignored rows gather class 0 (any valid index) and are masked out.
    let mask: Vec<f32> = targets
        .iter()
        .map(|&t| f32::from(u8::from(kept(t))))
        .collect();
    let safe: Vec<u32> = targets
        .iter()
        .map(|&t| if kept(t) { t } else { 0 })
        .collect();
    let mask = Tensor::from_vec(mask, n, dev)?;
    let safe = Tensor::from_vec(safe, (n, 1), dev)?;
    let lp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let nll = (lp.gather(&safe, 1)?.squeeze(1)?.neg()? * &mask)?.sum_all()?;
    let smooth = (lp.sum(1)?.neg()? * &mask)?.sum_all()?;
    let eps_i = smoothing_share(epsilon, v);
    let loss = ((&nll * (1.0 - epsilon - eps_i))? + (smooth * eps_i)?)?;
    Tensor::stack(&[loss, nll], 0)
}

/// `eps / (V − 1)`, the probability mass each non-target class gets (0 without smoothing).
fn smoothing_share(epsilon: f64, v: usize) -> f64 {
    if epsilon > 0.0 {
        epsilon / (v - 1) as f64
    } else {
        0.0
    }
}

/// Checks the arguments of both versions; returns `(N, V)`.
fn validate(
    logits: &Tensor,
    targets: &[u32],
    epsilon: f64,
    ignore_index: Option<u32>,
) -> Result<(usize, usize)> {
    let (n, v) = match logits.dims() {
        &[n, v] if v > 0 => (n, v),
        d => bail!("label_smoothed_ce: logits {d:?}, expected [N, V] with V > 0"),
    };
    if targets.len() != n {
        bail!(
            "label_smoothed_ce: {} targets for logits {:?}",
            targets.len(),
            logits.dims()
        );
    }
    if !(0.0..1.0).contains(&epsilon) || (v == 1 && epsilon > 0.0) {
        bail!("label_smoothed_ce: epsilon {epsilon} must be in [0, 1) (0 when V = 1)");
    }
    if let Some((i, t)) = targets
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= v && ignore_index != Some(t))
    {
        bail!("label_smoothed_ce: target {i} is class {t}, outside 0..{v}");
    }
    Ok((n, v))
}

/// The fused op: the targets and smoothing live here, and the forward leaves the per-row
/// log-sum-exp for the backward.
struct CeOp {
    targets: Vec<u32>,
    epsilon: f64,
    ignore_index: Option<u32>,
    lse: OnceLock<Vec<Lse>>,
    /// The targets and per-row log-sum-exp on the device (CUDA forward).
    #[cfg(feature = "cuda")]
    cuda: std::sync::Mutex<Option<crate::cuda::cross_entropy::Saved>>,
}

impl CeOp {
    fn kept(&self, t: u32) -> bool {
        self.ignore_index != Some(t)
    }

    #[cfg(feature = "cuda")]
    fn cuda_params(&self, v: usize) -> crate::cuda::cross_entropy::Params {
        crate::cuda::cross_entropy::Params {
            epsilon: self.epsilon,
            eps_i: smoothing_share(self.epsilon, v),
            ignore_index: self.ignore_index,
        }
    }
}

/// The float element types the kernels read and write, converted to and from f32.
pub(crate) trait Elem: candle_core::WithDType {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for f64 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f64::from(v)
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// True when the CPU runs AVX-512F, so the row kernels take their 16-lane build.
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Lanes of the row accumulators (one AVX-512 register of f32).
const LANES: usize = 16;

/// `e^x` in f32 that vectorizes (Cephes' `expf`: `x = k·ln2 + r`, a degree-7 polynomial in `r`,
/// `2^k` built in the exponent bits); within ~1 ulp of `f32::exp`, 0 below −87.3, NaN kept.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LO: f32 = -87.3;
    const HI: f32 = 88.3;
    // 1.5·2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    // Comparisons, not f32::max, so that NaN passes through.
    let c = if x < LO { LO } else { x };
    let c = if c > HI { HI } else { c };
    let kf = c * std::f32::consts::LOG2_E + MAGIC;
    let ki = kf.to_bits() as i32 - MAGIC.to_bits() as i32;
    let k = kf - MAGIC;
    let r = c - k * 0.693_359_4 - k * -2.121_944_4e-4;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    let scale = f32::from_bits(((ki + 127) as u32) << 23);
    if x < LO {
        0.0
    } else {
        e * scale
    }
}

/// Row statistics: `(max, Σ exp(x − max), Σ (x − max))` (the last only when `SMOOTH`).
///
/// Sums of `x − max`, not of `x`, keep the log-probabilities exact for large logits, as the
/// composed `log_softmax` does.
#[inline(always)]
fn row_stats_impl<T: Elem, const SMOOTH: bool>(x: &[T]) -> (f32, f32, f32) {
    let mut mx = [f32::NEG_INFINITY; LANES];
    let body = x.chunks_exact(LANES);
    let tail = body.remainder();
    for c in body {
        for j in 0..LANES {
            let v = c[j].to_f32();
            mx[j] = if v > mx[j] { v } else { mx[j] };
        }
    }
    let mut m = mx
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for v in tail {
        let v = v.to_f32();
        m = if v > m { v } else { m };
    }
    // Second pass over the row while it is in cache.
    let (mut se, mut sd) = ([0f32; LANES], [0f32; LANES]);
    for c in x.chunks_exact(LANES) {
        for j in 0..LANES {
            let d = c[j].to_f32() - m;
            se[j] += exp(d);
            if SMOOTH {
                sd[j] += d;
            }
        }
    }
    let (mut e, mut s): (f32, f32) = (se.iter().sum(), sd.iter().sum());
    for v in tail {
        let d = v.to_f32() - m;
        e += exp(d);
        if SMOOTH {
            s += d;
        }
    }
    (m, e, s)
}

/// `dx_v = c·exp(x_v − max − ln_sum) − b` over one row (the caller subtracts `a` at the target).
#[inline(always)]
fn row_grad_impl<T: Elem>(x: &[T], dx: &mut [T], (m, ln_sum): (f32, f32), c: f32, b: f32) {
    for (d, v) in dx.iter_mut().zip(x) {
        *d = T::from_f32(c * exp((v.to_f32() - m) - ln_sum) - b);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn row_stats_avx512<T: Elem, const SMOOTH: bool>(x: &[T]) -> (f32, f32, f32) {
    row_stats_impl::<T, SMOOTH>(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn row_grad_avx512<T: Elem>(x: &[T], dx: &mut [T], lse: (f32, f32), c: f32, b: f32) {
    row_grad_impl(x, dx, lse, c, b)
}

fn row_stats<T: Elem, const SMOOTH: bool>(x: &[T], avx512: bool) -> (f32, f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: the caller found AVX-512F on this CPU (`has_avx512`).
        return unsafe { row_stats_avx512::<T, SMOOTH>(x) };
    }
    let _ = avx512;
    row_stats_impl::<T, SMOOTH>(x)
}

fn row_grad<T: Elem>(x: &[T], dx: &mut [T], lse: (f32, f32), c: f32, b: f32, avx512: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: the caller found AVX-512F on this CPU (`has_avx512`).
        return unsafe { row_grad_avx512(x, dx, lse, c, b) };
    }
    let _ = avx512;
    row_grad_impl(x, dx, lse, c, b)
}

/// Rows per rayon task: about 16K elements, so that small inputs stay on one thread.
fn min_rows(v: usize) -> usize {
    (1 << 14) / v.max(1) + 1
}

/// A row's log-sum-exp as `(max, ln Σ exp(x − max))`, split to keep its precision.
type Lse = (f32, f32);

/// Per kept row `(lse, −lp[t], −Σ lp)`; ignored rows give `(NaN, 0, 0)` and are never read.
fn forward_rows<T: Elem>(x: &[T], op: &CeOp, v: usize) -> Vec<(Lse, f64, f64)> {
    let avx512 = has_avx512();
    let smooth = op.epsilon > 0.0;
    let one = |(row, &t): (&[T], &u32)| {
        if !op.kept(t) {
            return ((f32::NAN, f32::NAN), 0.0, 0.0);
        }
        let (m, e, s) = if smooth {
            row_stats::<T, true>(row, avx512)
        } else {
            row_stats::<T, false>(row, avx512)
        };
        let ln_sum = e.ln();
        // −lp[t] = ln_sum − (x_t − max);  −Σ lp = V·ln_sum − Σ (x − max).
        let ln = f64::from(ln_sum);
        let nll = ln - f64::from(row[t as usize].to_f32() - m);
        let sm = if smooth {
            v as f64 * ln - f64::from(s)
        } else {
            0.0
        };
        ((m, ln_sum), nll, sm)
    };
    if !worth_threading(x.len()) {
        // Small: stay on this thread (handing work to rayon's pool costs more than it takes).
        return x.chunks(v).zip(op.targets.iter()).map(one).collect();
    }
    x.par_chunks(v)
        .zip(op.targets.par_iter())
        .with_min_len(min_rows(v))
        .map(one)
        .collect()
}

/// `d/dlogits` of `g0·loss_sum + g1·nll_sum`, in the dtype of `x`.
fn backward_rows<T: Elem>(x: &[T], op: &CeOp, lse: &[Lse], v: usize, g: (f64, f64)) -> Vec<T> {
    let avx512 = has_avx512();
    let eps_i = smoothing_share(op.epsilon, v);
    // d_v = a·(p_v − [v = t]) + b·(V·p_v − 1) = (a + b·V)·p_v − b − a·[v = t].
    let a = g.0 * (1.0 - op.epsilon - eps_i) + g.1;
    let b = g.0 * eps_i;
    let (c, a32, b32) = ((a + b * v as f64) as f32, a as f32, b as f32);
    let mut dx = vec![T::from_f32(0.0); x.len()];
    type Item<'a, T> = ((&'a mut [T], &'a [T]), (&'a u32, &'a Lse));
    let one = |((d, row), (&t, &l)): Item<'_, T>| {
        if op.kept(t) {
            row_grad(row, d, l, c, b32, avx512);
            let t = t as usize;
            d[t] = T::from_f32(c * exp((row[t].to_f32() - l.0) - l.1) - b32 - a32);
        }
    };
    if worth_threading(x.len()) {
        dx.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(op.targets.par_iter().zip(lse.par_iter()))
            .with_min_len(min_rows(v))
            .for_each(one);
    } else {
        dx.chunks_mut(v)
            .zip(x.chunks(v))
            .zip(op.targets.iter().zip(lse.iter()))
            .for_each(one);
    }
    dx
}

/// Calls `f` on the elements of `s` under `l` with their own element type (contiguous storage is
/// borrowed; a strided layout is gathered into f32 first).
fn dispatch<R>(s: &CpuStorage, l: &Layout, f: impl RowsFn<R>) -> Result<R> {
    if let Some((a, b)) = l.contiguous_offsets() {
        match s {
            CpuStorage::F32(x) => return Ok(f.call(&x[a..b])),
            CpuStorage::F16(x) => return Ok(f.call(&x[a..b])),
            CpuStorage::BF16(x) => return Ok(f.call(&x[a..b])),
            _ => {}
        }
    }
    Ok(f.call::<f32>(&as_f32(s, l)?))
}

/// A kernel generic over the element type (what a closure cannot be).
trait RowsFn<R> {
    fn call<T: Elem>(self, x: &[T]) -> R;
}

struct Fwd<'a>(&'a CeOp, usize);

impl RowsFn<Vec<(Lse, f64, f64)>> for Fwd<'_> {
    fn call<T: Elem>(self, x: &[T]) -> Vec<(Lse, f64, f64)> {
        forward_rows(x, self.0, self.1)
    }
}

struct Bwd<'a>(&'a CeOp, &'a [Lse], &'a Tensor, (f64, f64));

impl RowsFn<Result<Tensor>> for Bwd<'_> {
    fn call<T: Elem>(self, x: &[T]) -> Result<Tensor> {
        let logits = self.2;
        let dx = backward_rows(x, self.0, self.1, logits.dims2()?.1, self.3);
        let dx = Tensor::from_vec(dx, logits.shape(), &candle_core::Device::Cpu)?;
        // Gathered (strided or f64) logits were read as f32: back to the logits' dtype.
        if dx.dtype() == logits.dtype() {
            Ok(dx)
        } else {
            dx.to_dtype(logits.dtype())
        }
    }
}

impl CustomOp1 for CeOp {
    fn name(&self) -> &'static str {
        "torchscale-label-smoothed-ce"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let v = l.dims()[1];
        let rows = dispatch(s, l, Fwd(self, v))?;
        let eps_i = smoothing_share(self.epsilon, v);
        let (mut nll, mut smooth) = (0f64, 0f64);
        for &(_, n, s) in &rows {
            nll += n;
            smooth += s;
        }
        let loss = (1.0 - self.epsilon - eps_i) * nll + eps_i * smooth;
        // A second forward of the same op would compute the same values: keep the first.
        let _ = self.lse.set(rows.into_iter().map(|r| r.0).collect());
        Ok((
            CpuStorage::F32(vec![loss as f32, nll as f32]),
            Shape::from(2),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let v = l.dims().get(1).copied().unwrap_or(0);
        let p = self.cuda_params(v);
        let (out, shape, saved) = crate::cuda::cross_entropy::forward(s, l, &self.targets, p)?;
        *self.cuda.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        Ok((out, shape))
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if logits.device().is_cuda() {
            let saved = self.cuda.lock().unwrap_or_else(|e| e.into_inner());
            let Some(saved) = saved.as_ref() else {
                bail!("label_smoothed_ce: backward before forward");
            };
            let p = self.cuda_params(logits.dims2()?.1);
            return crate::cuda::cross_entropy::backward(logits, grad, saved, p).map(Some);
        }
        let Some(lse) = self.lse.get() else {
            bail!("label_smoothed_ce: backward before forward");
        };
        let g = grad.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let &[g0, g1] = g.as_slice() else {
            bail!(
                "label_smoothed_ce: output gradient {:?}, expected [2]",
                grad.dims()
            );
        };
        let g = (f64::from(g0), f64::from(g1));
        let (storage, layout) = logits.storage_and_layout();
        let Storage::Cpu(s) = &*storage else {
            bail!(
                "label_smoothed_ce: fused backward on a {:?} tensor",
                logits.device()
            );
        };
        let dx = dispatch(s, layout, Bwd(self, lse, logits, g))??;
        Ok(Some(dx))
    }
}
