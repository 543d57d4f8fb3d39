//! The vectorised column kernels of one block of transposed scores: masked softmax forward
//! ([`probs_t`]) and the softmax backward ([`score_grads_t`]), compiled for AVX-512F or AVX2 + FMA
//! when the CPU has them.

/// `exp(x)` for f32 in a form that vectorises (Cephes' range reduction and polynomial, about one
/// ulp): 0 below -87.3, +inf above 88.3 (softmax arguments are <= 0), NaN stays NaN.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let xc = x.clamp(-87.3, 88.3);
    let t = xc * std::f32::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_2e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let two_n = f32::from_bits((t.to_bits().wrapping_sub(0x4B40_0000 - 127)) << 23);
    let y = e * two_n;
    if x < -87.3 {
        0.0
    } else if x > 88.3 {
        f32::INFINITY
    } else {
        y
    }
}

/// Defines `$name(args)`, which runs `$body(args)` compiled for AVX-512F, or AVX2 + FMA, when the
/// CPU has them: the loops of `$body` (inlined) then vectorise to the wider registers.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),*) => $body:ident) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($a: $t),*) {
                    $body($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) {
                    $body($($a),*)
                }
                use std::arch::is_x86_feature_detected as has;
                if has!("avx512f") {
                    // SAFETY: the CPU has the feature `avx512` is compiled for.
                    return unsafe { avx512($($a),*) };
                }
                if has!("avx2") && has!("fma") {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($a),*) };
                }
            }
            $body($($a),*)
        }
    };
}

multiversion! {
    /// Masks and softmaxes `pt`, scores transposed (row `j` = key `j`, `rb` query rows wide),
    /// down its columns. `mask`: the transposed mask from the block's first query row on, and
    /// its row stride; `pad`: the batch's padding over the block's keys; `stats`: `2 * rb`
    /// scratch. A column of -inf (a query row with every key masked) gives zeros, as the composed
    /// path does.
    pub(super) fn probs_t(
        mask: Option<(&[f32], usize)>,
        pad: Option<&[bool]>,
        rb: usize,
        pt: &mut [f32],
        stats: &mut [f32]
    ) => probs_t_body
}

#[inline(always)]
fn probs_t_body(
    mask: Option<(&[f32], usize)>,
    pad: Option<&[bool]>,
    rb: usize,
    pt: &mut [f32],
    stats: &mut [f32],
) {
    let (max, sum) = stats[..2 * rb].split_at_mut(rb);
    max.fill(f32::NEG_INFINITY);
    sum.fill(0.0);
    for (j, row) in pt.chunks_exact_mut(rb).enumerate() {
        if let Some((m, ld)) = mask {
            for (x, m) in row.iter_mut().zip(&m[j * ld..]) {
                *x += m;
            }
        }
        if pad.is_some_and(|p| p[j]) {
            row.fill(f32::NEG_INFINITY);
        }
        // `f32::max`, not a compare and select: that one becomes a masked store, which stalls
        // the next row's load of `max`.
        for (m, x) in max.iter_mut().zip(row.iter()) {
            *m = m.max(*x);
        }
    }
    // A column of only -inf subtracts 0 (its `exp` is then 0, not `exp(NaN)`) and scales by 0
    // (not `1 / 0`): zeros. Columns that keep a key are untouched: finite max, sum >= 1.
    for m in max.iter_mut() {
        if *m == f32::NEG_INFINITY {
            *m = 0.0;
        }
    }
    for row in pt.chunks_exact_mut(rb) {
        for ((x, m), s) in row.iter_mut().zip(max.iter()).zip(sum.iter_mut()) {
            *x = exp(*x - m);
            *s += *x;
        }
    }
    for s in sum.iter_mut() {
        *s = if *s == 0.0 { 0.0 } else { 1.0 / *s };
    }
    for row in pt.chunks_exact_mut(rb) {
        for (x, s) in row.iter_mut().zip(sum.iter()) {
            *x *= s;
        }
    }
}

multiversion! {
    /// Turns `dst` (`dP^T`, laid out as `pt`) into `dS^T = P * (dP - colsum(dP * P))`, zero at
    /// padded keys (the composed `where_cond` gives them no gradient) and in columns of
    /// fully masked rows (whose `P` is zero);
    /// `stats`: `rb` scratch.
    pub(super) fn score_grads_t(
        pad: Option<&[bool]>,
        rb: usize,
        pt: &[f32],
        dst: &mut [f32],
        stats: &mut [f32]
    ) => score_grads_t_body
}

#[inline(always)]
fn score_grads_t_body(
    pad: Option<&[bool]>,
    rb: usize,
    pt: &[f32],
    dst: &mut [f32],
    stats: &mut [f32],
) {
    let dot = &mut stats[..rb];
    dot.fill(0.0);
    for (p, g) in pt.chunks_exact(rb).zip(dst.chunks_exact(rb)) {
        for ((s, p), g) in dot.iter_mut().zip(p).zip(g) {
            *s += p * g;
        }
    }
    for (j, (p, g)) in pt
        .chunks_exact(rb)
        .zip(dst.chunks_exact_mut(rb))
        .enumerate()
    {
        if pad.is_some_and(|pad| pad[j]) {
            g.fill(0.0);
            continue;
        }
        for ((g, p), s) in g.iter_mut().zip(p).zip(dot.iter()) {
            *g = p * (*g - s);
        }
    }
}
