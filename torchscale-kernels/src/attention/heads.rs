//! The attention of one (batch, head) at a time, forward and backward, shared by the unpacked
//! ([`super::op`]) and the packed ([`super::packed`]) ops.
//!
//! Scores are kept transposed, `S^T = K @ Q^T` (`[keys, query rows]`): every product then has
//! the operand layout `gemm` runs fastest, and the softmax runs down the columns, 8 or 16 query
//! rows per vector, with no per-row horizontal reductions. The `[B, H, T, S]` probabilities are
//! never kept: the backward recomputes them block by block. Small heads on AVX-512 skip `gemm`
//! for the direct kernels of `direct` (same layout, 16 query rows per block).

#[cfg(target_arch = "x86_64")]
mod direct;

use candle_core::{DType, Result};
use rayon::prelude::*;

use super::rows::{probs_t, score_grads_t};
use super::view::{with_scratch, Dest, Scratch, View};
use super::{AttentionOptions, Dims};
use crate::gemm::{matmul, Mat};

/// Query rows per block: scores are computed `ROWS` rows at a time, so that the causal case skips
/// the keys past the diagonal and scratch stays `ROWS x S`.
const ROWS: usize = 64;

/// Where the backward writes the gradients of q, k and v (`None`: not wanted).
pub(super) type Grads<'a> = (
    Option<&'a Dest<'a>>,
    Option<&'a Dest<'a>>,
    Option<&'a Dest<'a>>,
);

/// Sizes, scale and masks of one call; the masks are constants read to the host when it is built.
pub(super) struct Heads {
    pub dims: Dims,
    scale: f32,
    /// The `[T, S]` additive mask transposed to `[S, T]`, rounded to the input dtype as the
    /// composed path does.
    mask_t: Option<Vec<f32>>,
    /// `[B, S]`, true = padded key.
    pad: Option<Vec<bool>>,
    /// Per query row: keys from this one on are all -inf in the mask.
    row_lim: Vec<usize>,
    /// Per batch: keys from this one on are all padded.
    batch_lim: Vec<usize>,
    /// Per group of 16 query rows (those of the direct kernels), the largest of its `row_lim`;
    /// then the largest of all.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    group_lim: Vec<usize>,
    all_lim: usize,
    /// Small heads on AVX-512: the direct kernels (`heads/direct`) instead of `gemm`.
    #[cfg(target_arch = "x86_64")]
    direct: Option<super::lanes::Avx512>,
}

impl Heads {
    /// Reads the masks of `opts` (shapes already checked against `dims`) for inputs of `dtype`.
    pub fn new(dims: Dims, dtype: DType, opts: &AttentionOptions) -> Result<Self> {
        let Dims { b, t, s, .. } = dims;
        let mask: Option<Vec<f32>> = match &opts.attn_mask {
            Some(m) => Some(
                m.to_dtype(dtype)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?,
            ),
            None => None,
        };
        let pad = match &opts.key_padding_mask {
            Some(m) => {
                let nz = m.ne(0u32)?.flatten_all()?.to_vec1::<u8>()?;
                Some(nz.into_iter().map(|x| x != 0).collect::<Vec<bool>>())
            }
            None => None,
        };
        let open = |ti: usize, j: usize| {
            mask.as_ref()
                .is_none_or(|m| m[ti * s + j] != f32::NEG_INFINITY)
        };
        let row_lim: Vec<usize> = (0..t)
            .map(|ti| (0..s).rposition(|j| open(ti, j)).map_or(0, |j| j + 1))
            .collect();
        // A fully masked row has zero probabilities (and gradients) everywhere, so skipping keys
        // past these limits never changes a result, even in batches with such rows.
        let batch_lim: Vec<usize> = (0..b)
            .map(|bi| {
                let padded = |j: usize| pad.as_ref().is_some_and(|p| p[bi * s + j]);
                (0..s).rposition(|j| !padded(j)).map_or(0, |j| j + 1)
            })
            .collect();
        let mask_t = mask.map(|m| {
            let mut mt = vec![0f32; s * t];
            for (ti, row) in m.chunks_exact(s.max(1)).enumerate() {
                for (j, &x) in row.iter().enumerate() {
                    mt[j * t + ti] = x;
                }
            }
            mt
        });
        let group_lim: Vec<usize> = row_lim
            .chunks(16)
            .map(|g| g.iter().copied().max().unwrap_or(0))
            .collect();
        let all_lim = group_lim.iter().copied().max().unwrap_or(0);
        Ok(Self {
            dims,
            group_lim,
            all_lim,
            scale: opts.scale as f32,
            mask_t,
            pad,
            row_lim,
            batch_lim,
            #[cfg(target_arch = "x86_64")]
            direct: direct::kernels(&dims),
        })
    }

    /// Keys that can hold a nonzero probability for query rows `r0..r1` of batch `b`.
    fn limit(&self, b: usize, r0: usize, r1: usize) -> usize {
        let rows = self.row_lim[r0..r1].iter().copied().max().unwrap_or(0);
        rows.min(self.batch_lim[b])
    }

    /// The padding of batch `b` over its first `l` keys.
    fn pad_of(&self, b: usize, l: usize) -> Option<&[bool]> {
        let s = self.dims.s;
        self.pad.as_deref().map(|p| &p[b * s..b * s + l])
    }

    /// `pt[l, rb]` = the probabilities of query rows `r0..r0 + rb` of head `(b, h)` over the
    /// first `l` keys, transposed.
    fn probs_block(
        &self,
        (b, h): (usize, usize),
        (q, k): (&View, &View),
        (r0, rb, l): (usize, usize, usize),
        pt: &mut [f32],
        stats: &mut [f32],
    ) -> Result<()> {
        let Dims { t, d, .. } = self.dims;
        let (km, qm) = (k.rows(b, h, 0), q.cols(b, h, r0));
        mm((l, rb, d), pt, false, km, qm, self.scale)?;
        let mask = self.mask_t.as_deref().map(|m| (&m[r0..], t));
        probs_t(mask, self.pad_of(b, l), rb, pt, stats);
        Ok(())
    }

    /// Forward of head `(b, h)`: `out[b, :, h]` = P @ v, block of rows by block of rows.
    fn forward_head(
        &self,
        bh: (usize, usize),
        (q, k, v): (&View, &View, &View),
        out: &Dest,
        sc: &mut Scratch,
    ) -> Result<()> {
        let Dims { t, d, .. } = self.dims;
        let (b, h) = bh;
        for r0 in (0..t).step_by(ROWS) {
            let rb = ROWS.min(t - r0);
            let l = self.limit(b, r0, r0 + rb);
            let pt = &mut sc.p[..l * rb];
            self.probs_block(bh, (q, k), (r0, rb, l), pt, &mut sc.stats)?;
            let o = &mut sc.rows[..rb * d];
            let (pm, vm) = (Mat::transposed(pt, rb), v.rows(b, h, 0));
            mm((rb, d, l), o, false, pm, vm, 1.0)?;
            out.put(bh, r0, o)?;
        }
        Ok(())
    }

    /// Backward of head `(b, h)` into whichever of `dq`, `dk`, `dv` are wanted. Every element of
    /// a wanted gradient is written (rows of keys past the block limits as 0), so the
    /// destinations need no zero-fill.
    fn backward_head(
        &self,
        bh: (usize, usize),
        (q, k, v, g): (&View, &View, &View, &View),
        (dq, dk, dv): Grads,
        sc: &mut Scratch,
    ) -> Result<()> {
        let Dims { t, s, d, .. } = self.dims;
        let (b, h) = bh;
        let sd = s * d;
        sc.dk[..sd].fill(0.0);
        sc.dv[..sd].fill(0.0);
        for r0 in (0..t).step_by(ROWS) {
            let rb = ROWS.min(t - r0);
            let l = self.limit(b, r0, r0 + rb);
            let pt = &mut sc.p[..l * rb];
            self.probs_block(bh, (q, k), (r0, rb, l), pt, &mut sc.stats)?;
            let (pt, go) = (&sc.p[..l * rb], g.rows(b, h, r0));
            if dv.is_some() {
                // dV[:l] += P^T @ dO
                mm(
                    (l, d, rb),
                    &mut sc.dv[..sd],
                    true,
                    Mat::rows(pt, rb),
                    go,
                    1.0,
                )?;
            }
            if dq.is_none() && dk.is_none() {
                continue;
            }
            // dP^T = V @ dO^T, then dS^T in place.
            let dst = &mut sc.ds[..l * rb];
            let (vm, gm) = (v.rows(b, h, 0), g.cols(b, h, r0));
            mm((l, rb, d), dst, false, vm, gm, 1.0)?;
            score_grads_t(self.pad_of(b, l), rb, pt, dst, &mut sc.stats);
            let dst = &sc.ds[..l * rb];
            if let Some(dq) = dq {
                // dQ = scale * dS @ K (all `rb` rows are written, zero when `l` is 0).
                let o = &mut sc.rows[..rb * d];
                let km = k.rows(b, h, 0);
                mm(
                    (rb, d, l),
                    o,
                    false,
                    Mat::transposed(dst, rb),
                    km,
                    self.scale,
                )?;
                dq.put(bh, r0, o)?;
            }
            if dk.is_some() {
                // dK[:l] += scale * dS^T @ Q
                let qm = q.rows(b, h, r0);
                let dk = &mut sc.dk[..sd];
                mm((l, d, rb), dk, true, Mat::rows(dst, rb), qm, self.scale)?;
            }
        }
        // All `s` rows, zero past the keys any block reached.
        if let Some(dk) = dk {
            dk.put(bh, 0, &sc.dk[..sd])?;
        }
        if let Some(dv) = dv {
            dv.put(bh, 0, &sc.dv[..sd])?;
        }
        Ok(())
    }

    /// The forward of every head into `out` (`[B, T, H, d]` positions).
    pub fn forward(&self, qkv: (&View, &View, &View), out: &Dest) -> Result<()> {
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = self.direct {
            return self.each_head(false, |bh, sc| self.forward_direct(k, bh, qkv, out, sc));
        }
        self.each_head(false, |bh, sc| self.forward_head(bh, qkv, out, sc))
    }

    /// The backward of every head, from the output gradient `g` (last of `views`), into `grads`.
    pub fn backward(&self, views: (&View, &View, &View, &View), grads: Grads) -> Result<()> {
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = self.direct {
            return self.each_head(true, |bh, sc| self.backward_direct(k, bh, views, grads, sc));
        }
        self.each_head(true, |bh, sc| self.backward_head(bh, views, grads, sc))
    }

    /// Runs `f` on every (batch, head) with this thread's scratch: over rayon's threads when the
    /// work is large enough to pay for it.
    fn each_head(
        &self,
        backward: bool,
        f: impl Fn((usize, usize), &mut Scratch) -> Result<()> + Sync,
    ) -> Result<()> {
        let Dims { b, t, s, h, d } = self.dims;
        let grow = |sc: &mut Scratch| {
            #[cfg(target_arch = "x86_64")]
            if self.direct.is_some() {
                return sc.reserve_small(direct::scratch_sizes(&self.dims, backward));
            }
            sc.reserve_gemm((ROWS.min(t), s, d, backward));
        };
        let run = |i: usize| with_scratch(grow, |sc| f((i / h, i % h), sc));
        // Below ~1M multiply-adds per product, waking rayon's workers costs about what it saves.
        let min = if crate::cpu::on_worker() {
            1 << 17
        } else {
            1 << 20
        };
        if b * h * t * s * d < min || b * h == 1 || rayon::current_num_threads() == 1 {
            (0..b * h).try_for_each(run)
        } else {
            (0..b * h).into_par_iter().try_for_each(run)
        }
    }
}

/// `dst[m, n] = scale * a @ b` (`acc`: `+=`) on the calling thread (one task per thread already).
fn mm(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    acc: bool,
    a: Mat,
    b: Mat,
    scale: f32,
) -> Result<()> {
    matmul(mnk, dst, mnk.1, acc, a, b, scale, false)
}
