//! Exact (erf) GELU, `y = 0.5 x (1 + erf(x / sqrt 2))`, as one element-wise kernel each way.
//!
//! candle's `gelu_erf` forward is one op already, but its backward builds about six temporaries;
//! the fused backward is `dx = g (0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi))` in one
//! pass. On AVX-512 CPUs both directions are table-driven piecewise polynomials (see `avx512`,
//! about 0.13 ns per element on one core, 2.3x the portable kernels); elsewhere the erf is our own
//! branch-free f32 approximation (max abs error about 1.5e-7), written so that the loops
//! vectorize. The module also holds the small vector-math toolkit (exp, lane sums, per-CPU
//! compilation) that softmax and LayerNorm share.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{as_f32, cpu_float, storage_from_f32, tensor_from_f32, with_f32};
use crate::cuda::cuda_float;
use crate::switch::fused_enabled;
use vmath::{fma, multiversion, poly, INV_SQRT_2PI};

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Exact GELU of `x`: the fused kernel on CPU f32 / f16 / bf16 tensors (and, with the `cuda`
/// feature, on CUDA ones) when fused kernels are on, [`gelu_erf_composed`] otherwise (f64 stays composed, so that it keeps f64 precision).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    let on_cuda = cuda_float(&[x]);
    if !fused_enabled() || !(cpu_float(&[x]) || on_cuda) || x.dtype() == DType::F64 {
        return gelu_erf_composed(x);
    }
    if on_cuda {
        if x.elem_count() == 0 {
            return gelu_erf_composed(x);
        }
        // The CUDA kernel reads the elements in place: a strided input is copied once here.
        return x.contiguous()?.apply_op1_arc(Arc::new(Box::new(GeluOp)));
    }
    x.apply_op1_arc(Arc::new(Box::new(GeluOp)))
}

/// candle's `gelu_erf`, computed in f32 for half types and cast back (the reference the fused
/// kernel is tested against).
pub fn gelu_erf_composed(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    if dtype == DType::F32 || dtype == DType::F64 {
        x.gelu_erf()
    } else {
        x.to_dtype(DType::F32)?.gelu_erf()?.to_dtype(dtype)
    }
}

/// Elements per parallel task: big enough to amortise rayon, small enough to balance.
const TASK: usize = 1 << 14;

/// The fused GELU.
struct GeluOp;

/// `(erf(z), exp(-z^2))`: the exponential is needed by erf for |z| >= 1 and by the GELU
/// derivative everywhere, so it is computed once.
///
/// |z| < 1: `z P(z^2)`; |z| >= 1: `1 - exp(-z^2) Q(t)`, `t = 1 / (1 + z / 2)`, where `Q`
/// approximates the scaled complement `exp(z^2) erfc(z)`. Both polynomials are Chebyshev
/// interpolants fitted for this file (degree 6 and 7); beyond |z| = 4 the second form rounds to 1.
#[inline(always)]
pub(crate) fn erf_and_gauss<const FMA: bool>(z: f32) -> (f32, f32) {
    #[allow(clippy::excessive_precision)]
    const SMALL: [f32; 7] = [
        1.1283791658483504,
        -0.37612626666719623,
        0.11283594715152363,
        -0.026854212010276407,
        0.0051890874227800456,
        -0.0008016864281817755,
        7.875875046790626e-05,
    ];
    #[allow(clippy::excessive_precision)]
    const LARGE: [f32; 8] = [
        -0.00016423638897842922,
        0.2850616201379137,
        0.2587513662812305,
        0.35103032341526114,
        -0.11020829428978954,
        0.5712651757960413,
        -0.47652527417578855,
        0.120852433048583,
    ];
    let a = z.abs();
    let a2 = a * a;
    let gauss = vmath::exp_nonpos::<FMA>(-a2);
    let small = a * poly::<FMA, 7>(&SMALL, a2);
    let t = 1.0 / fma::<FMA>(a, 0.5, 1.0);
    let large = fma::<FMA>(-gauss, poly::<FMA, 8>(&LARGE, t), 1.0);
    let e = if a < 1.0 { small } else { large };
    (e.copysign(z), gauss)
}

#[inline(always)]
fn gelu_fwd_kernel<const FMA: bool>(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        let (e, _) = erf_and_gauss::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2);
        *y = 0.5 * x * (1.0 + e);
    }
}

#[inline(always)]
fn gelu_bwd_kernel<const FMA: bool>(x: &[f32], g: &[f32], dx: &mut [f32]) {
    for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
        let (e, gauss) = erf_and_gauss::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2);
        *d = g * fma::<FMA>(x * gauss, INV_SQRT_2PI, 0.5 * (1.0 + e));
    }
}

multiversion!(fn gelu_fwd_poly = gelu_fwd_kernel(x: &[f32], y: &mut [f32]));
multiversion!(fn gelu_bwd_poly = gelu_bwd_kernel(x: &[f32], g: &[f32], dx: &mut [f32]));

/// `y = gelu(x)` on one thread: the AVX-512 table kernels where the CPU has them.
fn gelu_fwd(x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: the CPU supports AVX-512F.
        return unsafe { avx512::gelu_fwd(x, y) };
    }
    gelu_fwd_poly(x, y)
}

/// `dx = g gelu'(x)` on one thread: the AVX-512 table kernels where the CPU has them.
fn gelu_bwd(x: &[f32], g: &[f32], dx: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: the CPU supports AVX-512F.
        return unsafe { avx512::gelu_bwd(x, g, dx) };
    }
    gelu_bwd_poly(x, g, dx)
}

/// `y = gelu(x)` over f32 slices of one length, split over threads when large.
pub(crate) fn gelu_forward_f32(x: &[f32], y: &mut [f32]) {
    if crate::cpu::worth_threading(x.len()) {
        y.par_chunks_mut(TASK)
            .zip(x.par_chunks(TASK))
            .for_each(|(y, x)| gelu_fwd(x, y));
    } else {
        gelu_fwd(x, y);
    }
}

/// `dx = g gelu'(x)` over f32 slices of one length, split over threads when large.
pub(crate) fn gelu_backward_f32(x: &[f32], g: &[f32], dx: &mut [f32]) {
    if crate::cpu::worth_threading(x.len()) {
        dx.par_chunks_mut(TASK)
            .zip(x.par_chunks(TASK).zip(g.par_chunks(TASK)))
            .for_each(|(d, (x, g))| gelu_bwd(x, g, d));
    } else {
        gelu_bwd(x, g, dx);
    }
}

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "torchscale-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = as_f32(s, l)?;
        let mut y = vec![0f32; xs.len()];
        gelu_forward_f32(&xs, &mut y);
        Ok((storage_from_f32(y, s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::gelu::forward(s, l)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return crate::cuda::gelu::backward(x, grad).map(Some);
        }
        let dx = with_f32(x, |xs| {
            with_f32(grad, |g| {
                let mut dx = vec![0f32; xs.len()];
                gelu_backward_f32(xs, g, &mut dx);
                Ok(dx)
            })
        })?;
        Ok(Some(tensor_from_f32(dx, x.shape(), x.dtype())?))
    }
}

/// Branch-free f32 math that LLVM vectorizes, and per-CPU compilation of the loops that use it
/// (shared by the softmax and LayerNorm kernels).
pub(crate) mod vmath {
    /// `1 / sqrt(2 pi)`.
    pub(crate) const INV_SQRT_2PI: f32 = 0.398_942_3;

    /// Partial sums kept side by side: they vectorize (four AVX-512 registers, hiding the add
    /// latency) and round less than one running sum. With fewer lanes LLVM fully unrolls the lane
    /// loop and then packs it into 2-wide vectors; at 64 it keeps the loop and vectorizes it.
    pub(crate) const LANES: usize = 64;

    /// `a * b + c`, fused when the caller is compiled for FMA (otherwise `mul_add` would be a
    /// slow library call).
    #[inline(always)]
    pub(crate) fn fma<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
        if FMA {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }

    /// `c[0] + c[1] x + ... + c[N-1] x^(N-1)` by Horner's rule.
    #[inline(always)]
    pub(crate) fn poly<const FMA: bool, const N: usize>(c: &[f32; N], x: f32) -> f32 {
        let mut r = c[N - 1];
        for k in (0..N - 1).rev() {
            r = fma::<FMA>(r, x, c[k]);
        }
        r
    }

    /// `exp(y)` for `y <= 0` (and NaN, which stays NaN), relative error about 2 ulp; below -87 it
    /// returns 0 (the true value is under 2^-125 there).
    ///
    /// `y = n ln2 + r` with `n` rounded by the 1.5 * 2^23 shift (so no rounding instruction is
    /// needed), `exp(r)` by a degree-6 Chebyshev interpolant on [-ln2/2, ln2/2], `2^n` built in the
    /// exponent bits.
    #[inline(always)]
    pub(crate) fn exp_nonpos<const FMA: bool>(y: f32) -> f32 {
        const SHIFT: f32 = 12_582_912.0;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        #[allow(clippy::excessive_precision)]
        const EXP: [f32; 7] = [
            1.0,
            1.0000000377162146,
            0.5000000047117702,
            0.166664155146519,
            0.041666352896796176,
            0.00837512639826415,
            0.0013941108434201539,
        ];
        let yc = if y < -87.0 { -87.0 } else { y };
        let shifted = fma::<FMA>(yc, std::f32::consts::LOG2_E, SHIFT);
        let n = shifted - SHIFT;
        let r = fma::<FMA>(n, -LN2_LO, fma::<FMA>(n, -LN2_HI, yc));
        let k = (shifted.to_bits() as i32).wrapping_sub(SHIFT.to_bits() as i32);
        let scale = f32::from_bits((k.wrapping_add(127) as u32) << 23);
        let e = poly::<FMA, 7>(&EXP, r) * scale;
        if y < -87.0 {
            0.0
        } else {
            e
        }
    }

    /// The sum of the lanes, by halving (each step is one vector add).
    #[inline(always)]
    pub(crate) fn hsum(mut a: [f32; LANES]) -> f32 {
        let mut n = LANES;
        while n > 1 {
            n /= 2;
            for i in 0..n {
                a[i] += a[i + n];
            }
        }
        a[0]
    }

    /// The max of the lanes, by halving (NaN lanes are skipped, as in the lane-wise max).
    #[inline(always)]
    pub(crate) fn hmax(mut a: [f32; LANES]) -> f32 {
        let mut n = LANES;
        while n > 1 {
            n /= 2;
            for i in 0..n {
                a[i] = if a[i + n] > a[i] { a[i + n] } else { a[i] };
            }
        }
        a[0]
    }

    /// `sum_i f(a_i, b_i)` over equal-length slices, in [`LANES`] partial sums.
    #[inline(always)]
    pub(crate) fn sum2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
        if a.len() < LANES {
            return a.iter().zip(b).map(|(&a, &b)| f(a, b)).sum();
        }
        let mut acc = [0f32; LANES];
        let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let (ar, br) = (ac.remainder(), bc.remainder());
        for (a, b) in ac.zip(bc) {
            for ((s, &a), &b) in acc.iter_mut().zip(a).zip(b) {
                *s += f(a, b);
            }
        }
        let mut tail = 0f32;
        for (&a, &b) in ar.iter().zip(br) {
            tail += f(a, b);
        }
        hsum(acc) + tail
    }

    /// `sum_i f(a_i)`, in [`LANES`] partial sums.
    #[inline(always)]
    pub(crate) fn sum1(a: &[f32], f: impl Fn(f32) -> f32) -> f32 {
        sum2(a, a, |a, _| f(a))
    }

    /// Compiles `$kernel::<true>` (FMA) for AVX-512 and for AVX2 and `$kernel::<false>` for the
    /// baseline, and defines `$name` that runs the best one this CPU supports: the crate is built
    /// for baseline x86-64, where the loops would otherwise get 4-wide SSE and no FMA.
    macro_rules! multiversion {
        ($vis:vis fn $name:ident = $kernel:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?) => {
            $vis fn $name($($arg: $ty),*) $(-> $ret)? {
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                    unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                        $kernel::<true>($($arg),*)
                    }
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                        $kernel::<true>($($arg),*)
                    }
                    if std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("avx512vl")
                        && std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        // SAFETY: the CPU has every feature `avx512` is compiled for.
                        return unsafe { avx512($($arg),*) };
                    }
                    if std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        // SAFETY: the CPU has every feature `avx2` is compiled for.
                        return unsafe { avx2($($arg),*) };
                    }
                }
                $kernel::<false>($($arg),*)
            }
        };
    }
    pub(crate) use multiversion;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erf_f64(v: &[f64]) -> Vec<f64> {
        Tensor::new(v, &candle_core::Device::Cpu)
            .and_then(|t| t.erf())
            .and_then(|t| t.to_vec1())
            .expect("f64 erf")
    }

    #[inline(always)]
    fn erf_kernel<const FMA: bool>(z: &[f32], out: &mut [f32]) {
        for (o, &z) in out.iter_mut().zip(z) {
            *o = erf_and_gauss::<FMA>(z).0;
        }
    }
    multiversion!(fn erf_best = erf_kernel(z: &[f32], out: &mut [f32]));

    /// Max abs error of erf and of exp(-z^2) against f64 on a dense grid of [-10, 10], on the
    /// vectorized path and on the baseline one.
    #[test]
    fn erf_is_accurate_to_f32() {
        let z: Vec<f32> = (-400_000..=400_000).map(|i| i as f32 * 2.5e-5).collect();
        let want = erf_f64(&z.iter().map(|&v| f64::from(v)).collect::<Vec<_>>());
        let mut fast = vec![0f32; z.len()];
        erf_best(&z, &mut fast);
        let mut base = vec![0f32; z.len()];
        erf_kernel::<false>(&z, &mut base);
        let (mut e_fast, mut e_base, mut e_gauss) = (0f64, 0f64, 0f64);
        for (i, &w) in want.iter().enumerate() {
            e_fast = e_fast.max((f64::from(fast[i]) - w).abs());
            e_base = e_base.max((f64::from(base[i]) - w).abs());
            let zz = f64::from(z[i]);
            let g = f64::from(erf_and_gauss::<false>(z[i]).1);
            e_gauss = e_gauss.max((g - (-zz * zz).exp()).abs());
        }
        assert!(e_fast < 3e-7, "erf max abs error {e_fast:e}");
        assert!(e_base < 3e-7, "baseline erf max abs error {e_base:e}");
        assert!(e_gauss < 3e-7, "exp(-z^2) max abs error {e_gauss:e}");
        let specials = [
            0.0f32,
            -0.0,
            10.0,
            -10.0,
            40.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        let want = [0.0f32, -0.0, 1.0, -1.0, 1.0, 1.0, -1.0];
        for (z, w) in specials.iter().zip(want) {
            let got = erf_and_gauss::<false>(*z).0;
            assert!(
                got == w && got.is_sign_negative() == w.is_sign_negative(),
                "erf({z}) = {got}"
            );
        }
        assert!(erf_and_gauss::<false>(f32::NAN).0.is_nan());
    }

    /// GELU and its derivative against f64 on a dense grid of [-10, 10], on every kernel this
    /// CPU runs (the AVX-512 tables and the portable polynomials).
    #[test]
    fn gelu_kernels_are_accurate() {
        let x: Vec<f32> = (-400_000..=400_000).map(|i| i as f32 * 2.5e-5).collect();
        let g: Vec<f32> = (0..x.len()).map(|i| 1.0 - (i % 3) as f32 * 0.75).collect();
        let z: Vec<f64> = x
            .iter()
            .map(|&v| f64::from(v) * std::f64::consts::FRAC_1_SQRT_2)
            .collect();
        let erf = erf_f64(&z);
        type Kernels = (fn(&[f32], &mut [f32]), fn(&[f32], &[f32], &mut [f32]));
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut kernels: Vec<(&str, Kernels)> = vec![("portable", (gelu_fwd_poly, gelu_bwd_poly))];
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            kernels.push(("avx512", (gelu_fwd, gelu_bwd)));
        }
        for (name, (fwd, bwd)) in kernels {
            let (mut y, mut dx) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            fwd(&x, &mut y);
            bwd(&x, &g, &mut dx);
            let (mut ey, mut ed) = (0f64, 0f64);
            for (i, &v) in x.iter().enumerate() {
                let v = f64::from(v);
                let cdf = 0.5 * (1.0 + erf[i]);
                let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
                ey = ey.max((f64::from(y[i]) - v * cdf).abs() / v.abs().max(1.0));
                ed = ed.max((f64::from(dx[i]) - f64::from(g[i]) * (cdf + v * pdf)).abs());
            }
            assert!(ey < 3e-7, "{name} gelu relative error {ey:e}");
            assert!(ed < 3e-7, "{name} gelu derivative error {ed:e}");
            let special = [0.0f32, -0.0, 10.0, -10.0, f32::INFINITY, f32::NAN];
            let (mut y, mut dx) = ([0f32; 6], [0f32; 6]);
            fwd(&special, &mut y);
            bwd(&special, &[1.0; 6], &mut dx);
            assert_eq!(&y[..5], &[0.0, 0.0, 10.0, 0.0, f32::INFINITY], "{name}");
            assert_eq!(&dx[..3], &[0.5, 0.5, 1.0], "{name}");
            assert!(dx[3].abs() < 1e-20, "{name}: gelu'(-10) = {}", dx[3]);
            assert!(y[5].is_nan() && dx[5].is_nan(), "{name}: NaN in, NaN out");
        }
    }

    /// exp on (-inf, 0] against f64, relative, including the underflow cut.
    #[test]
    fn exp_nonpos_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let y = -(i as f32) * 4.35e-4;
            let got = f64::from(vmath::exp_nonpos::<false>(y));
            let want = f64::from(y).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 4e-7, "exp relative error {worst:e}");
        assert_eq!(vmath::exp_nonpos::<false>(f32::NEG_INFINITY), 0.0);
        assert_eq!(vmath::exp_nonpos::<false>(-100.0), 0.0);
        assert_eq!(vmath::exp_nonpos::<false>(0.0), 1.0);
        assert!(vmath::exp_nonpos::<false>(f32::NAN).is_nan());
    }
}
