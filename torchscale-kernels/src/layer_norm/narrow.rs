//! LayerNorm row kernels for narrow rows (width up to [`MAX_D`]) on AVX-512F, 16 rows at a time.
//!
//! A row of 64 is four registers: the row-at-a-time kernels spend most of their time in the
//! horizontal sums (two per row in the forward, two in the backward, each a chain of dependent
//! shuffles and adds). Here each row's chunks are added vertically into one register, and the
//! 16 registers of a block of 16 rows are reduced together by a transpose-and-add tree (15
//! shuffle pairs and adds for 16 sums, which come out as one register, lane `r` = row `r`). The
//! statistics of a block then cost one vector division and square root. A row whose width is
//! not a multiple of 16 ends in a masked chunk (masked loads read nothing past the row).
//!
//! The arithmetic is the row kernels' (two-pass mean and variance, the same output and gradient
//! formulas); only the order of the additions differs.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// The widest row these kernels take (8 registers; wider rows amortise the horizontal sums).
pub(crate) const MAX_D: usize = 128;

/// Registers per row at most.
const MAX_C: usize = MAX_D / 16;

/// Proof that the CPU runs AVX-512F and the rows are at most [`MAX_D`] wide: the only way to the
/// kernels, which are compiled for that feature.
#[derive(Clone, Copy)]
pub(crate) struct Narrow {
    d: usize,
}

impl Narrow {
    /// The kernels for rows of width `d`, when this CPU and width suit them.
    pub(crate) fn new(d: usize) -> Option<Self> {
        (d > 0 && d <= MAX_D && is_x86_feature_detected!("avx512f")).then_some(Self { d })
    }

    /// Rows of `d` that every slice can hold (`per_row` elements per row in `stats`).
    fn rows(&self, xs: &[&[f32]], stats: usize) -> usize {
        let d = self.d;
        xs.iter().map(|x| x.len() / d).fold(stats / 2, usize::min)
    }

    /// `y = (x - mean) rstd w + b` per row, `stats` = `[mean, rstd]` per row: every element of
    /// `y` is written (the rows of `x`, `y` and `st` agree; the callers make them so).
    pub(crate) fn fwd(
        &self,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        eps: f32,
        y: &mut [MaybeUninit<f32>],
        st: &mut [f32],
    ) {
        let rows = self.rows(&[x], st.len()).min(y.len() / self.d);
        if w.len() < self.d || b.len() < self.d {
            return;
        }
        let y = y.as_mut_ptr().cast::<f32>();
        // SAFETY: AVX-512F is present (`new`); every row read or written lies in `x`, `y`.
        unsafe { norm_rows(x.as_ptr(), Some(y), rows, self.d, (w, b), eps, st) }
    }

    /// [`Self::fwd`] with `y` holding `x` on entry (normalised in place).
    pub(crate) fn fwd_in_place(
        &self,
        y: &mut [f32],
        w: &[f32],
        b: &[f32],
        eps: f32,
        st: &mut [f32],
    ) {
        let rows = self.rows(&[y], st.len());
        if w.len() < self.d || b.len() < self.d {
            return;
        }
        let p = y.as_mut_ptr();
        // SAFETY: as in `fwd`; each element is read before it is overwritten (see `norm_rows`).
        unsafe { norm_rows(p, Some(p), rows, self.d, (w, b), eps, st) }
    }

    /// `[mean, rstd]` per row of `x` into `st`.
    pub(crate) fn stats(&self, x: &[f32], eps: f32, st: &mut [f32]) {
        let rows = self.rows(&[x], st.len());
        // SAFETY: as in `fwd`; nothing is written but `st`.
        unsafe { norm_rows(x.as_ptr(), None, rows, self.d, (&[], &[]), eps, st) }
    }

    /// The LayerNorm backward over rows of `x` (as the row kernel `bwd_kernel`): `dx` (empty:
    /// not wanted) gets the input gradient, every element written; `dwb` (`dw` then `db`,
    /// empty: not wanted) has the weight and bias gradients added.
    pub(crate) fn bwd(
        &self,
        x: &[f32],
        g: &[f32],
        w: &[f32],
        st: &[f32],
        dx: &mut [MaybeUninit<f32>],
        dwb: &mut [f32],
    ) {
        let d = self.d;
        let mut rows = self.rows(&[x, g], st.len());
        if !dx.is_empty() {
            rows = rows.min(dx.len() / d);
        }
        if w.len() < d || (!dwb.is_empty() && dwb.len() < 2 * d) {
            return;
        }
        let dx = (!dx.is_empty()).then_some(dx.as_mut_ptr().cast::<f32>());
        let dwb = (!dwb.is_empty()).then_some(dwb);
        // SAFETY: AVX-512F is present; every row read or written lies in the slices.
        unsafe { bwd_rows(x.as_ptr(), g.as_ptr(), rows, d, w, st, dx, dwb) }
    }
}

/// The load mask of chunk `c` of `NC` in a row whose last chunk has mask `tail`.
#[inline(always)]
fn chunk_mask<const NC: usize>(c: usize, tail: __mmask16) -> __mmask16 {
    if c + 1 == NC {
        tail
    } else {
        0xFFFF
    }
}

/// The mask of the last chunk of a row of `d`.
#[inline(always)]
fn tail_mask(d: usize) -> __mmask16 {
    let left = d - 16 * ((d - 1) / 16);
    if left >= 16 {
        0xFFFF
    } else {
        (1u16 << left) - 1
    }
}

/// Runs `$f::<NC>($args)` for the `NC` (registers per row) of width `$d`: the chunk loops
/// then unroll, and the weights stay in registers.
macro_rules! by_chunks {
    ($d:expr, $f:ident($($a:expr),*)) => {
        match $d.div_ceil(16) {
            1 => $f::<1>($($a),*),
            2 => $f::<2>($($a),*),
            3 => $f::<3>($($a),*),
            4 => $f::<4>($($a),*),
            5 => $f::<5>($($a),*),
            6 => $f::<6>($($a),*),
            7 => $f::<7>($($a),*),
            _ => $f::<MAX_C>($($a),*),
        }
    };
}

/// Lane `r` = the sum of the lanes of `v[r]`: pairs of registers are interleaved and added,
/// halving the partial sums per row at each of the four levels.
#[inline]
#[target_feature(enable = "avx512f")]
fn reduce16(v: &[__m512; 16]) -> __m512 {
    // (Plain loops, no closures: a closure would not be compiled for AVX-512.)
    // Level 1: in each 128-bit lane, [a, b, a, b] partial sums of rows 2i, 2i + 1.
    let mut l1 = [_mm512_setzero_ps(); 8];
    for (i, o) in l1.iter_mut().enumerate() {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        *o = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    // Level 2: [r0, r1, r2, r3] of rows 4i.. in each 128-bit lane.
    let mut l2 = [_mm512_setzero_ps(); 4];
    for (i, o) in l2.iter_mut().enumerate() {
        let (a, b) = (l1[2 * i], l1[2 * i + 1]);
        *o = _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(a, b),
            _mm512_shuffle_ps::<0xEE>(a, b),
        );
    }
    // Level 3: 128-bit lanes [rows 8i..8i+4 twice, rows 8i+4..8i+8 twice].
    let mut l3 = [_mm512_setzero_ps(); 2];
    for (i, o) in l3.iter_mut().enumerate() {
        let (a, b) = (l2[2 * i], l2[2 * i + 1]);
        *o = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(a, b),
            _mm512_shuffle_f32x4::<0xDD>(a, b),
        );
    }
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x88>(l3[0], l3[1]),
        _mm512_shuffle_f32x4::<0xDD>(l3[0], l3[1]),
    )
}

/// The lanes of `v`.
#[inline]
#[target_feature(enable = "avx512f")]
fn lanes(v: __m512) -> [f32; 16] {
    let mut out = [0f32; 16];
    // SAFETY: `out` holds 16 floats.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) };
    out
}

/// Forward over `rows` rows of `d` from `x`: statistics into `st`, and when `y` is given the
/// normalised rows there (`y` may be `x`: row `r` is written only after its last read).
///
/// # Safety
/// AVX-512F; `x` (and `y`) hold `rows * d` floats, `st` `2 * rows`, `w` and `b` `d` when `y` is
/// given.
#[target_feature(enable = "avx512f")]
unsafe fn norm_rows(
    x: *const f32,
    y: Option<*mut f32>,
    rows: usize,
    d: usize,
    wb: (&[f32], &[f32]),
    eps: f32,
    st: &mut [f32],
) {
    by_chunks!(d, norm_rows_n(x, y, rows, d, wb, eps, st))
}

/// [`norm_rows`] for rows of `NC` registers.
///
/// # Safety
/// As [`norm_rows`], and `d.div_ceil(16) == NC`.
#[target_feature(enable = "avx512f")]
unsafe fn norm_rows_n<const NC: usize>(
    x: *const f32,
    y: Option<*mut f32>,
    rows: usize,
    d: usize,
    (w, b): (&[f32], &[f32]),
    eps: f32,
    st: &mut [f32],
) {
    let nc = NC;
    let tail = tail_mask(d);
    let mut wv = [_mm512_setzero_ps(); NC];
    let mut bv = [_mm512_setzero_ps(); NC];
    if y.is_some() {
        for c in 0..nc {
            let m = chunk_mask::<NC>(c, tail);
            wv[c] = _mm512_maskz_loadu_ps(m, w.as_ptr().add(16 * c));
            bv[c] = _mm512_maskz_loadu_ps(m, b.as_ptr().add(16 * c));
        }
    }
    let n = _mm512_set1_ps(d as f32);
    let mut acc = [_mm512_setzero_ps(); 16];
    for r0 in (0..rows).step_by(16) {
        let rb = 16.min(rows - r0);
        for (r, a) in acc.iter_mut().enumerate().take(rb) {
            let mut s = _mm512_setzero_ps();
            for c in 0..nc {
                s = _mm512_add_ps(
                    s,
                    _mm512_maskz_loadu_ps(chunk_mask::<NC>(c, tail), x.add((r0 + r) * d + 16 * c)),
                );
            }
            *a = s;
        }
        acc[rb..].fill(_mm512_setzero_ps());
        let means = lanes(_mm512_div_ps(reduce16(&acc), n));
        for (r, a) in acc.iter_mut().enumerate().take(rb) {
            let mean = _mm512_set1_ps(means[r]);
            let mut s = _mm512_setzero_ps();
            for c in 0..nc {
                let m = chunk_mask::<NC>(c, tail);
                let t = _mm512_maskz_sub_ps(
                    m,
                    _mm512_maskz_loadu_ps(m, x.add((r0 + r) * d + 16 * c)),
                    mean,
                );
                s = _mm512_fmadd_ps(t, t, s);
            }
            *a = s;
        }
        let var = _mm512_div_ps(reduce16(&acc), n);
        let rstd = _mm512_div_ps(
            _mm512_set1_ps(1.0),
            _mm512_sqrt_ps(_mm512_add_ps(var, _mm512_set1_ps(eps))),
        );
        let rstds = lanes(rstd);
        for (r, s) in st[2 * r0..2 * (r0 + rb)].chunks_exact_mut(2).enumerate() {
            s[0] = means[r];
            s[1] = rstds[r];
        }
        let Some(y) = y else { continue };
        for r in 0..rb {
            let (mean, rs) = (_mm512_set1_ps(means[r]), _mm512_set1_ps(rstds[r]));
            let out = y.add((r0 + r) * d);
            for c in 0..nc {
                let m = chunk_mask::<NC>(c, tail);
                let xv = _mm512_maskz_loadu_ps(m, x.add((r0 + r) * d + 16 * c));
                let xh = _mm512_mul_ps(_mm512_sub_ps(xv, mean), rs);
                _mm512_mask_storeu_ps(out.add(16 * c), m, _mm512_fmadd_ps(xh, wv[c], bv[c]));
            }
        }
    }
}

/// Backward over `rows` rows of `d`: `dx = rstd (g w - mean(g w) - x^ mean(g w x^))` when `dx`
/// is given, `dw += sum g x^`, `db += sum g` when `dwb` is.
///
/// # Safety
/// AVX-512F; `x`, `g` (and `dx`) hold `rows * d` floats, `st` `2 * rows`, `w` `d`, `dwb` `2d`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn bwd_rows(
    x: *const f32,
    g: *const f32,
    rows: usize,
    d: usize,
    w: &[f32],
    st: &[f32],
    dx: Option<*mut f32>,
    dwb: Option<&mut [f32]>,
) {
    by_chunks!(d, bwd_rows_n(x, g, rows, d, w, st, dx, dwb))
}

/// [`bwd_rows`] for rows of `NC` registers.
///
/// # Safety
/// As [`bwd_rows`], and `d.div_ceil(16) == NC`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn bwd_rows_n<const NC: usize>(
    x: *const f32,
    g: *const f32,
    rows: usize,
    d: usize,
    w: &[f32],
    st: &[f32],
    dx: Option<*mut f32>,
    dwb: Option<&mut [f32]>,
) {
    let nc = NC;
    let tail = tail_mask(d);
    let mut wv = [_mm512_setzero_ps(); NC];
    for (c, wc) in wv.iter_mut().enumerate() {
        *wc = _mm512_maskz_loadu_ps(chunk_mask::<NC>(c, tail), w.as_ptr().add(16 * c));
    }
    let mut dw = [_mm512_setzero_ps(); NC];
    let mut db = [_mm512_setzero_ps(); NC];
    let inv_d = _mm512_set1_ps(1.0 / d as f32);
    let (mut s_gw, mut s_gwx) = ([_mm512_setzero_ps(); 16], [_mm512_setzero_ps(); 16]);
    for r0 in (0..rows).step_by(16) {
        let rb = 16.min(rows - r0);
        let at = |r: usize, c: usize| (r0 + r) * d + 16 * c;
        let (mut m_gw, mut m_gwx) = ([0f32; 16], [0f32; 16]);
        if dx.is_some() {
            for r in 0..rb {
                let (mean, rs) = (
                    _mm512_set1_ps(st[2 * (r0 + r)]),
                    _mm512_set1_ps(st[2 * (r0 + r) + 1]),
                );
                let (mut a, mut b) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                for (c, &wc) in wv.iter().enumerate() {
                    let m = chunk_mask::<NC>(c, tail);
                    let gw = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, g.add(at(r, c))), wc);
                    let xv = _mm512_maskz_loadu_ps(m, x.add(at(r, c)));
                    a = _mm512_add_ps(a, gw);
                    b = _mm512_fmadd_ps(gw, _mm512_mul_ps(_mm512_sub_ps(xv, mean), rs), b);
                }
                s_gw[r] = a;
                s_gwx[r] = b;
            }
            s_gw[rb..].fill(_mm512_setzero_ps());
            s_gwx[rb..].fill(_mm512_setzero_ps());
            m_gw = lanes(_mm512_mul_ps(reduce16(&s_gw), inv_d));
            m_gwx = lanes(_mm512_mul_ps(reduce16(&s_gwx), inv_d));
        }
        for r in 0..rb {
            let (mean, rs) = (
                _mm512_set1_ps(st[2 * (r0 + r)]),
                _mm512_set1_ps(st[2 * (r0 + r) + 1]),
            );
            let (mg, mgx) = (_mm512_set1_ps(-m_gw[r]), _mm512_set1_ps(m_gwx[r]));
            for c in 0..nc {
                let m = chunk_mask::<NC>(c, tail);
                let gv = _mm512_maskz_loadu_ps(m, g.add(at(r, c)));
                let xh = _mm512_mul_ps(
                    _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x.add(at(r, c))), mean),
                    rs,
                );
                if let Some(dx) = dx {
                    // g w rounded as in its mean (see `bwd_kernel`), then the mean subtracted.
                    let gw = _mm512_add_ps(_mm512_mul_ps(gv, wv[c]), mg);
                    let inner = _mm512_fnmadd_ps(xh, mgx, gw);
                    _mm512_mask_storeu_ps(dx.add(at(r, c)), m, _mm512_mul_ps(rs, inner));
                }
                if dwb.is_some() {
                    dw[c] = _mm512_fmadd_ps(gv, xh, dw[c]);
                    db[c] = _mm512_add_ps(db[c], gv);
                }
            }
        }
    }
    if let Some(dwb) = dwb {
        let (dws, dbs) = dwb.split_at_mut(d);
        for c in 0..nc {
            let m = chunk_mask::<NC>(c, tail);
            for (out, v) in [(&mut *dws, dw[c]), (&mut *dbs, db[c])] {
                let p = out.as_mut_ptr().add(16 * c);
                _mm512_mask_storeu_ps(p, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, p), v));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduce16_sums_each_register() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let rows: [[f32; 16]; 16] =
            std::array::from_fn(|r| std::array::from_fn(|l| (r * 100 + l * l) as f32));
        // SAFETY: AVX-512F is present; each row holds 16 floats.
        let got = unsafe {
            let v = rows.map(|r| _mm512_loadu_ps(r.as_ptr()));
            lanes(reduce16(&v))
        };
        for (r, row) in rows.iter().enumerate() {
            assert_eq!(got[r], row.iter().sum::<f32>(), "row {r}");
        }
    }
}
