//! The AVX-512 kernels of the direct small-head attention (see `heads/direct`), on groups of
//! [`LANES`] query rows held in the lanes of one register. Operands are dense copies in scratch:
//! transposed `[d, LANES]` blocks (`qt`, `gt`), rows padded with zeros to `ld` (a multiple of
//! [`LANES`]), and probabilities transposed as `[keys, LANES]`, so that the softmax runs down
//! the columns with no horizontal reduction.
//!
//! The products keep four rows of accumulators in registers (four independent FMA chains hide
//! the FMA latency) and run down the short reduction dimension: at these sizes that beats
//! `gemm`, whose per-call dispatch and packing cost more than the products themselves. The
//! arithmetic is the portable kernels' (the same `exp`, the same softmax and gradient formulas).

use std::arch::x86_64::*;

use candle_core::{bail, Result};

/// Query rows per group: one AVX-512 register of f32.
pub(super) const LANES: usize = 16;

/// Proof that the CPU runs AVX-512F: the safe entry points below take it.
#[derive(Clone, Copy)]
pub(super) struct Avx512(());

/// Errors on scratch smaller than a kernel needs (the callers size it; this is a guard).
fn need(ok: bool) -> Result<()> {
    if !ok {
        bail!("attention: direct kernel scratch too small");
    }
    Ok(())
}

/// Whether `len` floats hold `rows` rows of stride `ld` whose last one reads `last` floats.
fn holds(len: usize, rows: usize, ld: usize, last: usize) -> bool {
    rows == 0 || (rows - 1) * ld + last <= len
}

impl Avx512 {
    /// The kernels, when this CPU runs them.
    pub fn detect() -> Option<Self> {
        is_x86_feature_detected!("avx512f").then_some(Self(()))
    }

    /// `out[j, :] = sum_{c < d} a[j, c] bt[c, :]` for the `out.len() / LANES` rows `j` of `a`
    /// (row stride `lda`): scores `S^T = K (scale Q)^T`, and `dP^T = V dO^T`.
    pub fn scores(
        self,
        a: &[f32],
        lda: usize,
        d: usize,
        bt: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        let rows = out.len() / LANES;
        need(holds(a.len(), rows, lda, d) && bt.len() >= d * LANES)?;
        // SAFETY: AVX-512F (`self`); the reads lie in `a` and `bt`, the writes in `out`.
        unsafe { scores(a.as_ptr(), lda, d, bt.as_ptr(), out.as_mut_ptr(), rows) };
        Ok(())
    }

    /// Masks and softmaxes the transposed scores `pt` (`[keys, LANES]`) down its columns, as
    /// `rows::probs_t` does. `mask`: the transposed mask from the group's first row on, and its
    /// row stride (its first `rb` lanes are added, lanes past the group's rows are padding);
    /// `pad`: the batch's padding over these keys. A column of -inf gives zeros, as composed.
    pub fn probs(
        self,
        mask: Option<(&[f32], usize)>,
        rb: usize,
        pad: Option<&[bool]>,
        pt: &mut [f32],
    ) -> Result<()> {
        let rows = pt.len() / LANES;
        need(pad.is_none_or(|p| p.len() >= rows) && rb <= LANES)?;
        // SAFETY: AVX-512F; the mask is read through bounds-checked slices, `pt` in bounds.
        unsafe { probs(mask, rb, pad, pt.as_mut_ptr(), rows) };
        Ok(())
    }

    /// Turns `dst` (`dP^T`, laid out as `pt`) into `dS^T = P * (dP - colsum(dP * P))`, zero at
    /// padded keys, as `rows::score_grads_t` does.
    pub fn score_grads(self, pad: Option<&[bool]>, pt: &[f32], dst: &mut [f32]) -> Result<()> {
        let rows = dst.len() / LANES;
        need(pt.len() >= rows * LANES && pad.is_none_or(|p| p.len() >= rows))?;
        // SAFETY: AVX-512F; reads and writes within `pt` and `dst`.
        unsafe { score_grads(pad, pt.as_ptr(), dst.as_mut_ptr(), rows) };
        Ok(())
    }

    /// `out[i, :d] = scale * sum_{j < lims[i]} pt[j, i] b[j, :d]` for query rows
    /// `i < lims.len()`, limits clamped to the `pt.len() / LANES` keys of `pt` (`b` and `out` rows of stride `ldb`, `ldo`): `O = P V`, and
    /// `dQ = scale dS K`.
    pub fn rows_acc(
        self,
        pt: &[f32],
        lims: &[usize],
        (b, ldb): (&[f32], usize),
        (d, scale): (usize, f32),
        (out, ldo): (&mut [f32], usize),
    ) -> Result<()> {
        // Each row's limit is clamped to the keys `pt` holds.
        let keys = pt.len() / LANES;
        let n = lims.len();
        need(n <= LANES && holds(b.len(), keys, ldb, d) && holds(out.len(), n, ldo, d))?;
        // SAFETY: AVX-512F; every read and write lies in the slices (checked above; the column
        // loads and stores are masked to `d`).
        unsafe {
            let (b, out) = ((b.as_ptr(), ldb), (out.as_mut_ptr(), ldo));
            rows_acc((pt.as_ptr(), keys), lims, b, (d, scale), out)
        };
        Ok(())
    }

    /// `out[j, :d] += sum_{i < rows} pt[j, i] a[i, :d]` for keys `j < keys` (`a` and `out` rows
    /// of stride `lda`, `ldo`): `dV += P^T dO`, and `dK += dS^T Q`.
    pub fn keys_acc(
        self,
        (pt, keys): (&[f32], usize),
        rows: usize,
        (a, lda): (&[f32], usize),
        d: usize,
        (out, ldo): (&mut [f32], usize),
    ) -> Result<()> {
        need(
            rows <= LANES
                && pt.len() >= keys * LANES
                && holds(a.len(), rows, lda, d)
                && holds(out.len(), keys, ldo, d),
        )?;
        // SAFETY: AVX-512F; every read and write lies in the slices (checked above; the column
        // loads and stores are masked to `d`).
        unsafe {
            keys_acc(
                pt.as_ptr(),
                rows,
                (a.as_ptr(), lda),
                d,
                (out.as_mut_ptr(), ldo),
                keys,
            )
        };
        Ok(())
    }

    /// Copies the first `n` of every `sld` floats of `src` (`rows` rows) to `dst + r * ld`.
    ///
    /// # Safety
    /// `dst` is valid for writes of `rows` rows of stride `ld` with `n` floats each, which no
    /// reference covers while this runs.
    pub unsafe fn store_rows(
        self,
        (src, sld): (&[f32], usize),
        (rows, n): (usize, usize),
        (dst, ld): (*mut f32, usize),
    ) -> Result<()> {
        need(n <= sld && holds(src.len(), rows, sld, n))?;
        // SAFETY: AVX-512F; reads within `src` (masked to `n`), writes as the caller promises.
        unsafe { store_rows((src.as_ptr(), sld), (rows, n), (dst, ld)) };
        Ok(())
    }

    /// `dst[c * LANES + i] = scale * src[i * rs + c]` for rows `i < n`, columns `c < d`, and 0
    /// in lanes `n..LANES`: a block of contiguous rows transposed, 16 columns at a time.
    pub fn transpose(
        self,
        (src, rs): (&[f32], usize),
        (n, d): (usize, usize),
        scale: f32,
        dst: &mut [f32],
    ) -> Result<()> {
        need(n <= LANES && holds(src.len(), n, rs, d) && dst.len() >= d * LANES)?;
        // SAFETY: AVX-512F; masked loads read only the `d` columns of the `n` rows in `src`,
        // stores stay within the first `d * LANES` floats of `dst`.
        unsafe { transpose(src.as_ptr(), rs, (n, d), scale, dst.as_mut_ptr()) };
        Ok(())
    }
}

/// The mask of the first `n` lanes (`n <= 16`).
#[inline(always)]
fn first(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        (1u16 << n) - 1
    }
}

/// # Safety
/// AVX-512F; `a` holds `rows` rows of stride `lda` with `d` columns, `bt` `d * LANES` floats,
/// `out` `rows * LANES`.
#[target_feature(enable = "avx512f")]
unsafe fn scores(a: *const f32, lda: usize, d: usize, bt: *const f32, out: *mut f32, rows: usize) {
    let mut j = 0;
    while j + 4 <= rows {
        let a: [*const f32; 4] = [0, 1, 2, 3].map(|r| a.add((j + r) * lda));
        let mut s = [_mm512_setzero_ps(); 4];
        for c in 0..d {
            let b = _mm512_loadu_ps(bt.add(c * LANES));
            s[0] = _mm512_fmadd_ps(_mm512_set1_ps(*a[0].add(c)), b, s[0]);
            s[1] = _mm512_fmadd_ps(_mm512_set1_ps(*a[1].add(c)), b, s[1]);
            s[2] = _mm512_fmadd_ps(_mm512_set1_ps(*a[2].add(c)), b, s[2]);
            s[3] = _mm512_fmadd_ps(_mm512_set1_ps(*a[3].add(c)), b, s[3]);
        }
        for (r, s) in s.iter().enumerate() {
            _mm512_storeu_ps(out.add((j + r) * LANES), *s);
        }
        j += 4;
    }
    for j in j..rows {
        let a = a.add(j * lda);
        let mut s = _mm512_setzero_ps();
        for c in 0..d {
            s = _mm512_fmadd_ps(
                _mm512_set1_ps(*a.add(c)),
                _mm512_loadu_ps(bt.add(c * LANES)),
                s,
            );
        }
        _mm512_storeu_ps(out.add(j * LANES), s);
    }
}

/// `exp(x)` lane-wise for the softmax's `x <= 0` (and NaN, -inf), by `rows::exp`'s method
/// (Cephes' range reduction and polynomial) with fused multiply-adds, within an ulp of it: 0
/// below -87.3, NaN stays NaN. (Above 0, where the softmax never looks, it does not saturate.)
#[inline]
#[target_feature(enable = "avx512f")]
fn exp16(x: __m512) -> __m512 {
    let set = _mm512_set1_ps;
    let shift = set(12_582_912.0);
    // `max(lo, x)` returns its second operand for NaN: NaN is kept.
    let xc = _mm512_max_ps(set(-87.3), x);
    let t = _mm512_fmadd_ps(xc, set(std::f32::consts::LOG2_E), shift);
    let n = _mm512_sub_ps(t, shift);
    let r = _mm512_fnmadd_ps(n, set(0.693_359_4), xc);
    let r = _mm512_fnmadd_ps(n, set(-2.121_944_4e-4), r);
    let mut p = set(1.987_569_2e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, set(c));
    }
    let e = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), set(1.0));
    let bits = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B40_0000 - 127));
    let y = _mm512_mul_ps(e, _mm512_castsi512_ps(_mm512_slli_epi32::<23>(bits)));
    let low = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, set(-87.3));
    _mm512_mask_mov_ps(y, low, _mm512_setzero_ps())
}

/// # Safety
/// AVX-512F; `pt` holds `rows * LANES` floats, `pad` (if any) `rows` flags.
#[target_feature(enable = "avx512f")]
unsafe fn probs(
    mask: Option<(&[f32], usize)>,
    rb: usize,
    pad: Option<&[bool]>,
    pt: *mut f32,
    rows: usize,
) {
    let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
    for j in 0..rows {
        let row = pt.add(j * LANES);
        let mut x = _mm512_loadu_ps(row);
        if let Some((m, ld)) = mask {
            let m = m.get(j * ld..).unwrap_or(&[]);
            x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(first(rb.min(m.len())), m.as_ptr()));
        }
        if pad.is_some_and(|p| p[j]) {
            x = _mm512_set1_ps(f32::NEG_INFINITY);
        }
        _mm512_storeu_ps(row, x);
        // NaN scores are skipped, as `f32::max` skips them.
        max = _mm512_max_ps(x, max);
    }
    // A column of only -inf (a fully masked row) subtracts 0 and scales by 0: zeros, not NaN.
    // Other columns have a finite max and a sum >= 1, and see no change.
    let zero = _mm512_setzero_ps();
    let dead = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(max, _mm512_set1_ps(f32::NEG_INFINITY));
    let max = _mm512_mask_mov_ps(max, dead, zero);
    let mut sum = zero;
    for j in 0..rows {
        let row = pt.add(j * LANES);
        let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row), max));
        _mm512_storeu_ps(row, e);
        sum = _mm512_add_ps(sum, e);
    }
    // 1 / sum, except 0 where the sum is 0 (NaN sums stay NaN).
    let empty = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(sum, zero);
    let inv = _mm512_mask_mov_ps(_mm512_div_ps(_mm512_set1_ps(1.0), sum), empty, zero);
    for j in 0..rows {
        let row = pt.add(j * LANES);
        _mm512_storeu_ps(row, _mm512_mul_ps(_mm512_loadu_ps(row), inv));
    }
}

/// # Safety
/// AVX-512F; `pt` and `dst` hold `rows * LANES` floats, `pad` (if any) `rows` flags.
#[target_feature(enable = "avx512f")]
unsafe fn score_grads(pad: Option<&[bool]>, pt: *const f32, dst: *mut f32, rows: usize) {
    let mut dot = _mm512_setzero_ps();
    for j in 0..rows {
        let (p, g) = (
            _mm512_loadu_ps(pt.add(j * LANES)),
            _mm512_loadu_ps(dst.add(j * LANES)),
        );
        dot = _mm512_add_ps(dot, _mm512_mul_ps(p, g));
    }
    for j in 0..rows {
        let out = dst.add(j * LANES);
        if pad.is_some_and(|p| p[j]) {
            _mm512_storeu_ps(out, _mm512_setzero_ps());
            continue;
        }
        let p = _mm512_loadu_ps(pt.add(j * LANES));
        _mm512_storeu_ps(
            out,
            _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(out), dot)),
        );
    }
}

/// # Safety
/// AVX-512F; `lims.len() <= LANES`; `pt` holds `keys * LANES` floats, `b` `keys` rows of
/// stride `ldb` and `out` `lims.len()` rows of stride `ldo`, each of `d` columns.
#[target_feature(enable = "avx512f")]
unsafe fn rows_acc(
    (pt, keys): (*const f32, usize),
    lims: &[usize],
    (b, ldb): (*const f32, usize),
    (d, scale): (usize, f32),
    (out, ldo): (*mut f32, usize),
) {
    let scale = _mm512_set1_ps(scale);
    for (ib, lims) in lims.chunks(4).enumerate() {
        // Rows of one block share the largest limit: past its own, a row's weights are zero.
        let lim = lims.iter().copied().max().unwrap_or(0).min(keys);
        // Lanes `4 ib..4 ib + 4` of each row of `pt` (all within its `LANES`).
        let p = pt.add(4 * ib);
        for cc in (0..d).step_by(LANES) {
            let m = first(d - cc);
            let mut s = [_mm512_setzero_ps(); 4];
            for j in 0..lim {
                let v = _mm512_maskz_loadu_ps(m, b.add(j * ldb + cc));
                let pj = p.add(j * LANES);
                s[0] = _mm512_fmadd_ps(_mm512_set1_ps(*pj), v, s[0]);
                s[1] = _mm512_fmadd_ps(_mm512_set1_ps(*pj.add(1)), v, s[1]);
                s[2] = _mm512_fmadd_ps(_mm512_set1_ps(*pj.add(2)), v, s[2]);
                s[3] = _mm512_fmadd_ps(_mm512_set1_ps(*pj.add(3)), v, s[3]);
            }
            for (r, s) in s.iter().enumerate().take(lims.len()) {
                let o = out.add((4 * ib + r) * ldo + cc);
                _mm512_mask_storeu_ps(o, m, _mm512_mul_ps(scale, *s));
            }
        }
    }
}

/// # Safety
/// AVX-512F; `rows <= LANES`; `pt` holds `keys * LANES` floats, `a` `rows` rows of stride `lda`
/// and `out` `keys` rows of stride `ldo`, each of `d` columns.
#[target_feature(enable = "avx512f")]
unsafe fn keys_acc(
    pt: *const f32,
    rows: usize,
    (a, lda): (*const f32, usize),
    d: usize,
    (out, ldo): (*mut f32, usize),
    keys: usize,
) {
    let mut j = 0;
    while j < keys {
        let kb = 4.min(keys - j);
        let p = pt.add(j * LANES);
        for cc in (0..d).step_by(LANES) {
            let m = first(d - cc);
            let mut s = [_mm512_setzero_ps(); 4];
            for (r, s) in s.iter_mut().enumerate().take(kb) {
                *s = _mm512_maskz_loadu_ps(m, out.add((j + r) * ldo + cc));
            }
            if kb == 4 {
                for i in 0..rows {
                    let v = _mm512_maskz_loadu_ps(m, a.add(i * lda + cc));
                    s[0] = _mm512_fmadd_ps(_mm512_set1_ps(*p.add(i)), v, s[0]);
                    s[1] = _mm512_fmadd_ps(_mm512_set1_ps(*p.add(LANES + i)), v, s[1]);
                    s[2] = _mm512_fmadd_ps(_mm512_set1_ps(*p.add(2 * LANES + i)), v, s[2]);
                    s[3] = _mm512_fmadd_ps(_mm512_set1_ps(*p.add(3 * LANES + i)), v, s[3]);
                }
            } else {
                for i in 0..rows {
                    let v = _mm512_maskz_loadu_ps(m, a.add(i * lda + cc));
                    for (r, s) in s.iter_mut().enumerate().take(kb) {
                        *s = _mm512_fmadd_ps(_mm512_set1_ps(*p.add(r * LANES + i)), v, *s);
                    }
                }
            }
            for (r, s) in s.iter().enumerate().take(kb) {
                _mm512_mask_storeu_ps(out.add((j + r) * ldo + cc), m, *s);
            }
        }
        j += kb;
    }
}

/// # Safety
/// AVX-512F; `src` holds `rows` rows of stride `sld` with `n` floats, `dst` is writable there.
#[target_feature(enable = "avx512f")]
unsafe fn store_rows(
    (src, sld): (*const f32, usize),
    (rows, n): (usize, usize),
    (dst, ld): (*mut f32, usize),
) {
    for r in 0..rows {
        for c in (0..n).step_by(LANES) {
            let m = first(n - c);
            let v = _mm512_maskz_loadu_ps(m, src.add(r * sld + c));
            _mm512_mask_storeu_ps(dst.add(r * ld + c), m, v);
        }
    }
}

/// # Safety
/// AVX-512F; `n <= LANES`; `src` holds `n` rows of stride `rs` with `d` columns, `dst`
/// `d * LANES` floats.
#[target_feature(enable = "avx512f")]
unsafe fn transpose(src: *const f32, rs: usize, (n, d): (usize, usize), scale: f32, dst: *mut f32) {
    let scale = _mm512_set1_ps(scale);
    // One 16 x 16 block of columns at a time, transposed in registers by four rounds of
    // shuffles (written out here: a helper returning the 16 registers would go through memory).
    let mut r = [_mm512_setzero_ps(); 16];
    let mut t = [_mm512_setzero_ps(); 16];
    for c0 in (0..d).step_by(LANES) {
        let m = first(d - c0);
        for (i, r) in r.iter_mut().enumerate() {
            *r = if i < n {
                _mm512_mul_ps(scale, _mm512_maskz_loadu_ps(m, src.add(i * rs + c0)))
            } else {
                _mm512_setzero_ps()
            };
        }
        // Round 1: interleave rows 2k, 2k + 1 (128-bit lane L of t[2k] holds columns 4L,
        // 4L + 1 of both rows; t[2k + 1] columns 4L + 2, 4L + 3).
        for k in 0..8 {
            t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
            t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
        }
        // Round 2: 128-bit lane L of r[4k + m] = column 4L + m of rows 4k..4k + 4.
        for k in 0..4 {
            let (a, b, c, e) = (t[4 * k], t[4 * k + 1], t[4 * k + 2], t[4 * k + 3]);
            r[4 * k] = _mm512_shuffle_ps::<0x44>(a, c);
            r[4 * k + 1] = _mm512_shuffle_ps::<0xEE>(a, c);
            r[4 * k + 2] = _mm512_shuffle_ps::<0x44>(b, e);
            r[4 * k + 3] = _mm512_shuffle_ps::<0xEE>(b, e);
        }
        // Round 3: t[8h + m] = columns m, 8 + m and t[8h + 4 + m] = columns 4 + m, 12 + m of
        // row quads 2h, 2h + 1 (as 128-bit lanes: quad 2h of the first, of the second, then
        // quad 2h + 1 of each).
        for h in 0..2 {
            for m in 0..4 {
                let (a, b) = (r[8 * h + m], r[8 * h + 4 + m]);
                t[8 * h + m] = _mm512_shuffle_f32x4::<0x88>(a, b);
                t[8 * h + 4 + m] = _mm512_shuffle_f32x4::<0xDD>(a, b);
            }
        }
        // Round 4: join row quads 0, 1 (t[m]) and 2, 3 (t[8 + m]): r[m] = column m.
        for m in 0..8 {
            let (a, b) = (t[m], t[8 + m]);
            r[m] = _mm512_shuffle_f32x4::<0x88>(a, b);
            r[8 + m] = _mm512_shuffle_f32x4::<0xDD>(a, b);
        }
        for (c, col) in r.iter().enumerate().take(d - c0) {
            _mm512_storeu_ps(dst.add((c0 + c) * LANES), *col);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_matches_scalar() {
        let Some(k) = Avx512::detect() else { return };
        for (n, d) in [(16, 16), (7, 5), (16, 32), (3, 20), (1, 1)] {
            let rs = d + 3;
            let src: Vec<f32> = (0..n * rs).map(|i| i as f32).collect();
            let mut dst = vec![-1f32; d * LANES];
            k.transpose((&src, rs), (n, d), 2.0, &mut dst).unwrap();
            for c in 0..d {
                for i in 0..LANES {
                    let want = if i < n { 2.0 * src[i * rs + c] } else { 0.0 };
                    assert_eq!(dst[c * LANES + i], want, "n {n} d {d} column {c} lane {i}");
                }
            }
        }
    }

    #[test]
    fn exp_within_an_ulp_of_portable() {
        let Some(_) = Avx512::detect() else { return };
        let xs: Vec<f32> = (-2000..=0)
            .map(|i| i as f32 * 0.05)
            .chain([f32::NEG_INFINITY, f32::NAN, -87.31, -87.29, -0.0, -1e-30])
            .collect();
        for x in xs.chunks(16) {
            let mut v = [0f32; 16];
            v[..x.len()].copy_from_slice(x);
            let mut out = [0f32; 16];
            // SAFETY: AVX-512F is present; both arrays hold 16 floats.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), exp16(_mm512_loadu_ps(v.as_ptr()))) };
            for (a, b) in v.iter().zip(out) {
                let want = super::super::rows::exp(*a);
                let ulps = (want.to_bits() as i64 - b.to_bits() as i64).abs();
                assert!(
                    ulps <= 1 || (want.is_nan() && b.is_nan()),
                    "{a}: {b} vs {want}"
                );
            }
        }
    }
}
