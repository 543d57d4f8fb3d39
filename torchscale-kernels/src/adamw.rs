//! One AdamW update of one parameter, in place and in one pass over memory.
//!
//! The composed update (PyTorch's `torch.optim.AdamW` written with candle ops) allocates about
//! nine parameter-sized tensors per step and reads or writes each several times; the fused one
//! reads the parameter, gradient and moments once and writes them back once, with exactly the
//! composed operation order (f32 arithmetic on the same f32 constants), so both agree bit for bit
//! up to the sign of zeros.
//!
//! [`adamw_check`] runs the same arithmetic without writing anything and says whether the update
//! would leave every parameter and moment value finite, so that an optimizer can refuse a step
//! before changing any parameter (see its documentation for why a separate read-only pass).

use std::sync::Mutex;

use candle_core::{
    bail, CpuStorage, DType, InplaceOp2, Layout, Result, Storage, Tensor, WithDType,
};
use rayon::prelude::*;

use crate::cpu::as_f32;
use crate::cross_entropy::{has_avx512, Elem};

mod tensors;
pub use tensors::adamw_update_tensors;

/// The hyper-parameters of one AdamW update of one parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the bias-corrected root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay (0 for the no-decay group).
    pub weight_decay: f64,
    /// This parameter's update count, this update included (>= 1).
    pub step: u64,
}

impl AdamWStep {
    /// Errors unless `step >= 1` and every hyper-parameter is finite.
    pub fn validate(&self) -> Result<()> {
        if self.step == 0 {
            bail!("adamw: step must be >= 1 (the count including this update), got 0");
        }
        for (name, v) in [
            ("lr", self.lr),
            ("beta1", self.beta1),
            ("beta2", self.beta2),
            ("eps", self.eps),
            ("weight_decay", self.weight_decay),
        ] {
            if !v.is_finite() {
                bail!("adamw: {name} must be finite, got {v}");
            }
        }
        Ok(())
    }

    /// `(1 − β1^t, sqrt(1 − β2^t))` for `t = step`, with `powf` on the u64 step (exact up to
    /// 2^53; an `i32` exponent would wrap at 2^31 updates). PyTorch computes `beta ** step` on
    /// floats the same way.
    pub fn bias_corrections(&self) -> (f64, f64) {
        let t = self.step as f64;
        (1.0 - self.beta1.powf(t), (1.0 - self.beta2.powf(t)).sqrt())
    }
}

/// The f32 constants of the composed update (each rounded from f64 as candle's `affine` does).
#[derive(Clone, Copy)]
struct Consts {
    decay: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    inv_bc2: f32,
    eps: f32,
    step_size: f32,
}

impl Consts {
    fn new(s: &AdamWStep) -> Self {
        let (bc1, bc2_sqrt) = s.bias_corrections();
        Self {
            decay: (1.0 - s.lr * s.weight_decay) as f32,
            one_minus_b1: (1.0 - s.beta1) as f32,
            b2: s.beta2 as f32,
            one_minus_b2: (1.0 - s.beta2) as f32,
            inv_bc2: (1.0 / bc2_sqrt) as f32,
            eps: s.eps as f32,
            step_size: (s.lr / bc1) as f32,
        }
    }

    /// The constants in the order of the CUDA kernel's arguments (`kernels/adamw.cu`).
    #[cfg(feature = "cuda")]
    fn kernel_args(&self) -> [f32; 7] {
        [
            self.decay,
            self.one_minus_b1,
            self.b2,
            self.one_minus_b2,
            self.inv_bc2,
            self.eps,
            self.step_size,
        ]
    }
}

/// Updates `param` (CPU, f32 / f16 / bf16, contiguous) in place from `grad` (same shape, any
/// float dtype and layout), with its f32 moments `m` and `v` (one value per element, row-major)
/// updated in place:
///
/// ```text
/// p ← p·(1 − lr·wd);  m ← m + (g − m)(1 − β1);  v ← β2·v + (1 − β2)·g²
/// p ← p − lr/(1 − β1^t) · m / (sqrt(v)/sqrt(1 − β2^t) + eps)
/// ```
///
/// The arithmetic is [`adamw_composed`]'s, operation for operation.
pub fn adamw_update(
    param: &Tensor,
    grad: &Tensor,
    m: &mut [f32],
    v: &mut [f32],
    s: &AdamWStep,
) -> Result<()> {
    check_args(param, grad, m.len(), v.len(), s)?;
    if param.elem_count() == 0 {
        return Ok(());
    }
    let op = AdamWOp {
        c: Consts::new(s),
        moments: Mutex::new((m, v)),
    };
    param.inplace_op2(grad, &op)
}

/// Whether [`adamw_update`] with these arguments would leave every value finite: the parameter
/// (after rounding to its dtype, so an f16 parameter pushed past 65504 counts as infinite) and
/// both moments. Nothing is written; the arithmetic is [`adamw_update`]'s, operation for
/// operation, so the answer is exact.
///
/// Why a read-only pass before the update instead of a check folded into it: the update works in
/// place, so once it has found a non-finite value the elements before it (and the parameters an
/// optimizer updated before this one: a step is all or nothing) are already overwritten. Undoing
/// that needs the old values: a copy of every parameter and both its moments, held until the
/// whole step is known to be finite, which is three extra writes per element and up to three
/// times the parameters' memory. This pass reads the four streams once (about 4/7 of the
/// update's memory traffic), writes nothing and needs no memory.
pub fn adamw_check(
    param: &Tensor,
    grad: &Tensor,
    m: &[f32],
    v: &[f32],
    s: &AdamWStep,
) -> Result<bool> {
    check_args(param, grad, m.len(), v.len(), s)?;
    if param.elem_count() == 0 {
        return Ok(true);
    }
    let c = Consts::new(s);
    let (ps, pl) = param.storage_and_layout();
    let (gs, gl) = grad.storage_and_layout();
    let (Storage::Cpu(ps), Storage::Cpu(gs)) = (&*ps, &*gs) else {
        bail!("adamw: host moments need CPU tensors");
    };
    let Some((a, b)) = pl.contiguous_offsets() else {
        bail!("adamw: the parameter must be contiguous");
    };
    Ok(match ps {
        CpuStorage::F32(p) => check_run(&p[a..b], gs, gl, m, v, c)?,
        CpuStorage::F16(p) => check_run(&p[a..b], gs, gl, m, v, c)?,
        CpuStorage::BF16(p) => check_run(&p[a..b], gs, gl, m, v, c)?,
        _ => bail!("adamw: parameter dtype must be f32, f16 or bf16"),
    })
}

/// The checks [`adamw_update`] and [`adamw_check`] share.
fn check_args(param: &Tensor, grad: &Tensor, m: usize, v: usize, s: &AdamWStep) -> Result<()> {
    s.validate()?;
    if grad.dims() != param.dims() {
        bail!(
            "adamw: gradient {:?} for a parameter {:?}",
            grad.dims(),
            param.dims()
        );
    }
    let n = param.elem_count();
    if m != n || v != n {
        bail!("adamw: moments of {m} and {v} values for a parameter of {n}");
    }
    if !param.device().is_cpu() || !grad.device().is_cpu() {
        bail!(
            "adamw: host moments need CPU tensors, got {:?} (see adamw_update_tensors)",
            param.device()
        );
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
    Ok(())
}

/// The composed candle update (the reference [`adamw_update`] is tested against, and the fallback
/// off the CPU): returns the new parameter (in its dtype) and the new moments (f32).
pub fn adamw_composed(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    s: &AdamWStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    s.validate()?;
    // detach: the update must not extend the autograd graph of the parameter.
    let g = grad.detach().to_dtype(DType::F32)?;
    let mut p = param.detach().to_dtype(DType::F32)?;
    if s.weight_decay != 0.0 {
        p = p.affine(1.0 - s.lr * s.weight_decay, 0.0)?;
    }
    // m + (1 - β1)(g - m): PyTorch's lerp form of the first-moment update.
    let m = (m + ((&g - m)? * (1.0 - s.beta1))?)?;
    let v = ((v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
    let (bc1, bc2_sqrt) = s.bias_corrections();
    let denom = (v.sqrt()? / bc2_sqrt)?.affine(1.0, s.eps)?;
    let p = (p - ((&m / denom)? * (s.lr / bc1))?)?;
    Ok((p.to_dtype(param.dtype())?, m, v))
}

/// The in-place op; the moments are borrowed for the one call (`InplaceOp2::cpu_fwd` takes
/// `&self`, hence the mutex).
struct AdamWOp<'a> {
    c: Consts,
    moments: Mutex<(&'a mut [f32], &'a mut [f32])>,
}

/// The update of one element, in the composed order: the new `(p, m, v)`, `p` still in f32.
#[inline(always)]
fn element<const DECAY: bool>(p: f32, g: f32, m: f32, v: f32, c: &Consts) -> (f32, f32, f32) {
    let mut x = p;
    if DECAY {
        x *= c.decay;
    }
    let mn = m + (g - m) * c.one_minus_b1;
    let vn = v * c.b2 + g * g * c.one_minus_b2;
    let denom = vn.sqrt() * c.inv_bc2 + c.eps;
    x -= mn / denom * c.step_size;
    (x, mn, vn)
}

/// The update of one run of elements, in the composed order.
#[inline(always)]
fn kernel_impl<T: Elem, G: Elem, const DECAY: bool>(
    p: &mut [T],
    g: &[G],
    m: &mut [f32],
    v: &mut [f32],
    c: Consts,
) {
    for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let (x, mn, vn) = element::<DECAY>(p.to_f32(), g.to_f32(), *m, *v, &c);
        *m = mn;
        *v = vn;
        *p = T::from_f32(x);
    }
}

/// Whether the update of one run of elements leaves them all finite (nothing is written).
#[inline(always)]
fn check_impl<T: Elem, G: Elem, const DECAY: bool>(
    p: &[T],
    g: &[G],
    m: &[f32],
    v: &[f32],
    c: Consts,
) -> bool {
    // An integer OR reduction (no early exit) so that the loop vectorizes like the update.
    let mut bad = 0u32;
    for (((p, g), m), v) in p.iter().zip(g).zip(m).zip(v) {
        let (x, mn, vn) = element::<DECAY>(p.to_f32(), g.to_f32(), *m, *v, &c);
        let x = T::from_f32(x).to_f32();
        bad |= u32::from(!(x.is_finite() & mn.is_finite() & vn.is_finite()));
    }
    bad == 0
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn check_avx512<T: Elem, G: Elem, const DECAY: bool>(
    p: &[T],
    g: &[G],
    m: &[f32],
    v: &[f32],
    c: Consts,
) -> bool {
    check_impl::<T, G, DECAY>(p, g, m, v, c)
}

fn check_kernel<T: Elem, G: Elem>(
    p: &[T],
    g: &[G],
    m: &[f32],
    v: &[f32],
    c: Consts,
    avx512: bool,
) -> bool {
    let decay = c.decay != 1.0;
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: the caller found AVX-512F on this CPU (`has_avx512`).
        return unsafe {
            if decay {
                check_avx512::<T, G, true>(p, g, m, v, c)
            } else {
                check_avx512::<T, G, false>(p, g, m, v, c)
            }
        };
    }
    let _ = avx512;
    if decay {
        check_impl::<T, G, true>(p, g, m, v, c)
    } else {
        check_impl::<T, G, false>(p, g, m, v, c)
    }
}

fn check_all<T: Elem, G: Elem>(p: &[T], g: &[G], m: &[f32], v: &[f32], c: Consts) -> bool {
    let avx512 = has_avx512();
    if p.len() <= CHUNK {
        return check_kernel(p, g, m, v, c, avx512);
    }
    p.par_chunks(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
        .all(|((p, g), (m, v))| check_kernel(p, g, m, v, c, avx512))
}

/// [`check_all`] with the gradient read as [`run`] reads it.
fn check_run<T: Elem>(
    p: &[T],
    gs: &CpuStorage,
    gl: &Layout,
    m: &[f32],
    v: &[f32],
    c: Consts,
) -> Result<bool> {
    Ok(
        match (
            gl.contiguous_offsets(),
            <T as WithDType>::cpu_storage_as_slice(gs),
        ) {
            (Some((a, b)), Ok(g)) => check_all(p, &g[a..b], m, v, c),
            _ => check_all(p, &as_f32(gs, gl)?, m, v, c),
        },
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn kernel_avx512<T: Elem, G: Elem, const DECAY: bool>(
    p: &mut [T],
    g: &[G],
    m: &mut [f32],
    v: &mut [f32],
    c: Consts,
) {
    kernel_impl::<T, G, DECAY>(p, g, m, v, c)
}

fn kernel<T: Elem, G: Elem>(
    p: &mut [T],
    g: &[G],
    m: &mut [f32],
    v: &mut [f32],
    c: Consts,
    avx512: bool,
) {
    // Multiplying by exactly 1 changes nothing, so the decay-free loop is the same update.
    let decay = c.decay != 1.0;
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: the caller found AVX-512F on this CPU (`has_avx512`).
        return unsafe {
            if decay {
                kernel_avx512::<T, G, true>(p, g, m, v, c)
            } else {
                kernel_avx512::<T, G, false>(p, g, m, v, c)
            }
        };
    }
    let _ = avx512;
    if decay {
        kernel_impl::<T, G, true>(p, g, m, v, c)
    } else {
        kernel_impl::<T, G, false>(p, g, m, v, c)
    }
}

/// Elements per rayon task (four streams of 256 KB in f32).
const CHUNK: usize = 1 << 16;

fn update<T: Elem, G: Elem>(p: &mut [T], g: &[G], m: &mut [f32], v: &mut [f32], c: Consts) {
    let avx512 = has_avx512();
    if p.len() <= CHUNK {
        return kernel(p, g, m, v, c, avx512);
    }
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| kernel(p, g, m, v, c, avx512));
}

/// Reads the gradient in its own dtype when it matches the parameter's and is contiguous, as f32
/// otherwise.
fn run<T: Elem>(
    p: &mut [T],
    gs: &CpuStorage,
    gl: &Layout,
    m: &mut [f32],
    v: &mut [f32],
    c: Consts,
) -> Result<()> {
    match (
        gl.contiguous_offsets(),
        <T as WithDType>::cpu_storage_as_slice(gs),
    ) {
        (Some((a, b)), Ok(g)) => update(p, &g[a..b], m, v, c),
        _ => update(p, &as_f32(gs, gl)?, m, v, c),
    }
    Ok(())
}

impl InplaceOp2 for AdamWOp<'_> {
    fn name(&self) -> &'static str {
        "torchscale-adamw"
    }

    fn cpu_fwd(
        &self,
        ps: &mut CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let Some((a, b)) = pl.contiguous_offsets() else {
            bail!("adamw: the parameter must be contiguous to be updated in place");
        };
        let Ok(mut moments) = self.moments.lock() else {
            bail!("adamw: moments poisoned by an earlier panic");
        };
        let (m, v) = &mut *moments;
        match ps {
            CpuStorage::F32(p) => run(&mut p[a..b], gs, gl, m, v, self.c),
            CpuStorage::F16(p) => run(&mut p[a..b], gs, gl, m, v, self.c),
            CpuStorage::BF16(p) => run(&mut p[a..b], gs, gl, m, v, self.c),
            _ => bail!("adamw: parameter dtype must be f32, f16 or bf16"),
        }
    }
}
