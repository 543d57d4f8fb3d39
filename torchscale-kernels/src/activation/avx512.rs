//! Exact GELU and its derivative on AVX-512 by table-driven piecewise polynomials: no exp, no
//! division, one evaluation per element (the portable kernels evaluate two erf branches, an exp
//! and a division, then select).
//!
//! `[-6.1875, 5.8125)` is cut into 32 intervals of width 3/8 centred on `(i - 16) 3/8` (0 is a
//! centre, so `gelu'(0)` comes out as exactly 0.5). On each, a degree-5 polynomial in `x - centre`
//! approximates `Phi(x)` (forward: `gelu = x Phi(x)`) and another `gelu'(x) = Phi(x) + x phi(x)`
//! (backward); a lane's coefficients are picked from two registers by one `vpermt2ps` per
//! coefficient. Below the range both are 0, above it 1 (the true values are within 3e-9 of that).
//! The coefficients are Chebyshev interpolants at 6 nodes per interval, fitted in f64 at first
//! use. Max abs error against f64: about 6e-8 for `Phi`, 1.3e-7 for `gelu'`.

use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Intervals (two 16-lane registers per coefficient).
const N: usize = 32;
/// Coefficients per polynomial (degree 5).
const K: usize = 6;
/// Interval width.
const W: f32 = 0.375;
/// Lower end of the range: interval `i` is `[LO + i W, LO + (i + 1) W)`.
const LO: f32 = -6.1875;
/// Upper end of the range.
const HI: f32 = LO + N as f32 * W;

/// Coefficient `k` of interval `i` at `[k][i]`, in powers of `x - centre`.
struct Tables {
    phi: [[f32; N]; K],
    dgelu: [[f32; N]; K],
}

/// Whether this CPU runs these kernels.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| {
        let phi =
            |x: f64| 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x / std::f64::consts::SQRT_2));
        let pdf = |x: f64| (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        Tables {
            phi: fit(phi),
            dgelu: fit(|x| phi(x) + x * pdf(x)),
        }
    })
}

/// Per interval, the degree-5 Chebyshev interpolant of `f`, as powers of `x - centre`.
fn fit(f: impl Fn(f64) -> f64) -> [[f32; N]; K] {
    let h = f64::from(W) / 2.0;
    let columns: Vec<[f64; K]> = (0..N)
        .map(|i| interpolant(&f, f64::from(LO) + (i as f64 + 0.5) * f64::from(W), h))
        .collect();
    std::array::from_fn(|p| std::array::from_fn(|i| (columns[i][p] / h.powi(p as i32)) as f32))
}

/// The interpolant of `f` at the `K` Chebyshev nodes of `[centre - h, centre + h]`, as powers of
/// `u = (x - centre) / h`.
fn interpolant(f: &impl Fn(f64) -> f64, centre: f64, h: f64) -> [f64; K] {
    let angles: [f64; K] =
        std::array::from_fn(|k| (2 * k + 1) as f64 * std::f64::consts::PI / (2 * K) as f64);
    let values = angles.map(|a| f(centre + h * a.cos()));
    let mut mono = [0f64; K];
    // T_j in powers of u, from T_0 = 1 by T_1 = u T_0, T_{j+1} = 2u T_j - T_{j-1}.
    let (mut t_prev, mut t) = ([0f64; K], [0f64; K]);
    t[0] = 1.0;
    for j in 0..K {
        // Coefficient j of the Chebyshev series, from T_j(cos a) = cos(j a) at the nodes.
        let dot: f64 = angles
            .iter()
            .zip(&values)
            .map(|(&a, &v)| v * (j as f64 * a).cos())
            .sum();
        let c = dot * if j == 0 { 1.0 } else { 2.0 } / K as f64;
        for (m, &tj) in mono.iter_mut().zip(&t) {
            *m += c * tj;
        }
        let twice = if j == 0 { 1.0 } else { 2.0 };
        let mut next = [0f64; K];
        for (p, n) in next.iter_mut().enumerate() {
            let up = if p > 0 { twice * t[p - 1] } else { 0.0 };
            *n = up - t_prev[p];
        }
        (t_prev, t) = (t, next);
    }
    mono
}

/// One polynomial's coefficients as register pairs (intervals 0..16, 16..32).
type Regs = [(__m512, __m512); K];

#[target_feature(enable = "avx512f")]
fn regs(t: &[[f32; N]; K]) -> Regs {
    let mut r = [(_mm512_setzero_ps(), _mm512_setzero_ps()); K];
    for (r, row) in r.iter_mut().zip(t) {
        // SAFETY: each row holds 32 f32, two 16-lane registers.
        *r = unsafe {
            (
                _mm512_loadu_ps(row.as_ptr()),
                _mm512_loadu_ps(row[16..].as_ptr()),
            )
        };
    }
    r
}

/// The piecewise polynomial at `x`: 0 below the range, 1 at or above it, NaN for NaN.
#[inline]
#[target_feature(enable = "avx512f")]
fn piecewise(x: __m512, c: &Regs) -> __m512 {
    // Interval index by truncation (wrong only outside the range, where the result is replaced).
    let s = _mm512_fmadd_ps(x, _mm512_set1_ps(1.0 / W), _mm512_set1_ps(-LO / W));
    let idx = _mm512_cvttps_epi32(s);
    // The centre is exact in f32, so `x - centre` keeps all of x's precision.
    let centre = _mm512_fmadd_ps(
        _mm512_cvtepi32_ps(idx),
        _mm512_set1_ps(W),
        _mm512_set1_ps(LO + W / 2.0),
    );
    let u = _mm512_sub_ps(x, centre);
    let mut r = _mm512_permutex2var_ps(c[K - 1].0, idx, c[K - 1].1);
    for k in (0..K - 1).rev() {
        r = _mm512_fmadd_ps(r, u, _mm512_permutex2var_ps(c[k].0, idx, c[k].1));
    }
    let above = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(HI));
    let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(LO));
    let r = _mm512_mask_blend_ps(above, r, _mm512_set1_ps(1.0));
    _mm512_mask_blend_ps(below, r, _mm512_setzero_ps())
}

/// `out = x p(x)` (`g` empty) or `out = g p(x)`, with `p` the piecewise polynomial `c`: two
/// 16-lane blocks at a time (two independent chains hide the FMA latency, about 15% faster than
/// one), then 16-lane blocks, the last one masked.
#[target_feature(enable = "avx512f")]
fn scaled(x: &[f32], g: &[f32], out: &mut [f32], c: &Regs) {
    let by_g = !g.is_empty();
    let n = out.len().min(x.len());
    let n = if by_g { n.min(g.len()) } else { n };
    let (px, pg, po) = (x.as_ptr(), g.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i + 32 <= n {
        // SAFETY: lanes i..i + 32 are below n, within every slice read or written.
        unsafe {
            let (x0, x1) = (_mm512_loadu_ps(px.add(i)), _mm512_loadu_ps(px.add(i + 16)));
            let (b0, b1) = if by_g {
                (_mm512_loadu_ps(pg.add(i)), _mm512_loadu_ps(pg.add(i + 16)))
            } else {
                (x0, x1)
            };
            let (p0, p1) = (piecewise(x0, c), piecewise(x1, c));
            _mm512_storeu_ps(po.add(i), _mm512_mul_ps(b0, p0));
            _mm512_storeu_ps(po.add(i + 16), _mm512_mul_ps(b1, p1));
        }
        i += 32;
    }
    while i < n {
        let m: __mmask16 = if n - i >= 16 {
            !0
        } else {
            ((1u32 << (n - i)) - 1) as __mmask16
        };
        // SAFETY: lane j is touched only when i + j < n, within every slice read or written.
        unsafe {
            let v = _mm512_maskz_loadu_ps(m, px.add(i));
            let by = if by_g {
                _mm512_maskz_loadu_ps(m, pg.add(i))
            } else {
                v
            };
            _mm512_mask_storeu_ps(po.add(i), m, _mm512_mul_ps(by, piecewise(v, c)));
        }
        i += 16;
    }
}

/// `y = x Phi(x)`.
///
/// # Safety
/// The CPU must support AVX-512F ([`available`]).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn gelu_fwd(x: &[f32], y: &mut [f32]) {
    scaled(x, &[], y, &regs(&tables().phi));
}

/// `dx = g gelu'(x)`.
///
/// # Safety
/// The CPU must support AVX-512F ([`available`]).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn gelu_bwd(x: &[f32], g: &[f32], dx: &mut [f32]) {
    scaled(x, g, dx, &regs(&tables().dgelu));
}
