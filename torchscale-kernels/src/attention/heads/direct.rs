//! Small heads (see [`kernels`]) without `gemm`: each group of [`LANES`] query rows of a
//! (batch, head) runs the scores, the masked softmax and the products of
//! [`super::super::lanes`] in registers and L1. Rows of k, v, q and the output gradient are read
//! in place (copied to dense scratch only when their columns are strided); q and the output
//! gradient are also transposed per group. Groups of 16 rows let the causal case skip the keys
//! past each group's last row.

use candle_core::Result;

use super::super::lanes::{Avx512, LANES};
use super::super::view::{Scratch, View};
use super::{Dest, Dims, Grads, Heads};

// `Heads::group_lim` is kept per 16 query rows: the groups here.
const _: () = assert!(LANES == 16);

/// The widest head the direct kernels take.
const MAX_D: usize = 128;
/// The most keys the direct kernels take.
const MAX_S: usize = 192;
/// The most key elements (`s * d`) per head the direct kernels take.
const MAX_SD: usize = 8192;

/// The direct kernels, when heads of these sizes take them and the CPU runs AVX-512F
/// (elsewhere `gemm` does all sizes).
///
/// The switch point, measured per call single-threaded with a causal mask against the `gemm`
/// path (forward, forward + backward): 2.1x, 1.9x at B8 T32 H4 d16; 1.5x, 1.3x at d64; 1.4x,
/// 1.3x at T64 d128; 1.2x, 1.1x at T192 d32; 1.07x at T128 d64; even at T128 d128 and T192 d64;
/// 0.9x at T256 d32 and 0.6x at T512 d16, where `gemm`'s packed register blocking wins.
pub(super) fn kernels(dims: &Dims) -> Option<Avx512> {
    if dims.d <= MAX_D && dims.s <= MAX_S && dims.s * dims.d <= MAX_SD {
        Avx512::detect()
    } else {
        None
    }
}

/// `(lanes, s, d, dp, backward)`: the scratch sizes of the direct kernels.
pub(super) fn scratch_sizes(dims: &Dims, backward: bool) -> (usize, usize, usize, usize, bool) {
    (LANES, dims.s, dims.d, padded(dims.d), backward)
}

/// `d` rounded up to whole vectors (the row stride of the scratch rows).
fn padded(d: usize) -> usize {
    d.div_ceil(LANES) * LANES
}

/// Rows `r0..r0 + n` of `x` (head `bh`) as a slice and row stride: in place when its columns are
/// contiguous, else copied into `buf` (row stride `padded(d)`).
fn rows_of<'a>(
    x: &'a View,
    bh: (usize, usize),
    (r0, n, d): (usize, usize, usize),
    buf: &'a mut [f32],
) -> Result<(&'a [f32], usize)> {
    if let Some(rows) = x.row_block(bh, (r0, n, d))? {
        return Ok(rows);
    }
    let dp = padded(d);
    x.copy_rows(bh, (r0, n, d), 1.0, buf, dp)?;
    Ok((buf, dp))
}

/// `dst` = rows `g0..g0 + rb` of `x` (head `bh`) transposed to `[d, LANES]`, times `scale`, zero
/// past `rb`.
fn transposed(
    kn: Avx512,
    x: &View,
    bh: (usize, usize),
    (g0, rb, d): (usize, usize, usize),
    scale: f32,
    dst: &mut [f32],
) -> Result<()> {
    match x.row_block(bh, (g0, rb, d))? {
        Some(rows) => kn.transpose(rows, (rb, d), scale, dst),
        None => x.copy_cols(bh, (g0, rb, d), scale, dst, LANES),
    }
}

impl Heads {
    /// [`Heads::limit`] of the rows of group `g` of batch `b`, or of all rows (`None`).
    fn group_limit(&self, b: usize, g: Option<usize>) -> usize {
        let rows = g.map_or(self.all_lim, |g| self.group_lim[g]);
        rows.min(self.batch_lim[b])
    }

    /// Per query row of the group at `g0` (`rb` rows) of batch `b`: the keys it can weigh (as
    /// [`Heads::limit`] of one row).
    fn row_limits(&self, b: usize, g0: usize, rb: usize) -> [usize; LANES] {
        let mut lims = [self.dims.s; LANES];
        let cap = self.batch_lim[b];
        for (l, &r) in lims.iter_mut().zip(&self.row_lim[g0..g0 + rb]) {
            *l = r.min(cap);
        }
        lims
    }

    /// `pt` (`[l, LANES]`) = the probabilities of rows `g0..g0 + rb` over the first `l` keys,
    /// transposed (lanes past `rb` hold padding, never read back); `k` holds k's rows, `qt` is
    /// scratch for the group's q transposed.
    fn group_probs(
        &self,
        kn: Avx512,
        (b, h): (usize, usize),
        (q, k): (&View, (&[f32], usize)),
        (g0, rb): (usize, usize),
        (qt, pt): (&mut [f32], &mut [f32]),
    ) -> Result<()> {
        let Dims { t, d, .. } = self.dims;
        transposed(kn, q, (b, h), (g0, rb, d), self.scale, qt)?;
        kn.scores(k.0, k.1, d, qt, pt)?;
        let mask = self.mask_t.as_deref().map(|m| (&m[g0..], t));
        kn.probs(mask, rb, self.pad_of(b, pt.len() / LANES), pt)
    }

    /// The forward of head `(b, h)` by the direct kernels.
    pub(super) fn forward_direct(
        &self,
        kn: Avx512,
        bh: (usize, usize),
        (q, k, v): (&View, &View, &View),
        out: &Dest,
        sc: &mut Scratch,
    ) -> Result<()> {
        let Dims { t, d, .. } = self.dims;
        let dp = padded(d);
        let b = bh.0;
        let keys = self.group_limit(b, None);
        let Scratch {
            p,
            qt,
            rows,
            k: kbuf,
            v: vbuf,
            ..
        } = sc;
        let km = rows_of(k, bh, (0, keys, d), kbuf)?;
        let vm = rows_of(v, bh, (0, keys, d), vbuf)?;
        for g0 in (0..t).step_by(LANES) {
            let rb = LANES.min(t - g0);
            let pt = &mut p[..self.group_limit(b, Some(g0 / LANES)) * LANES];
            self.group_probs(kn, bh, (q, km), (g0, rb), (qt, pt))?;
            let o = &mut rows[..rb * dp];
            let lims = self.row_limits(b, g0, rb);
            kn.rows_acc(pt, &lims[..rb], vm, (d, 1.0), (o, dp))?;
            out.put_lanes(kn, bh, g0, o, dp)?;
        }
        Ok(())
    }

    /// The backward of head `(b, h)` by the direct kernels, into whichever of `dq`, `dk`, `dv`
    /// are wanted; every element of each is written (keys past the limits as 0).
    pub(super) fn backward_direct(
        &self,
        kn: Avx512,
        bh: (usize, usize),
        (q, k, v, g): (&View, &View, &View, &View),
        (dq, dk, dv): Grads,
        sc: &mut Scratch,
    ) -> Result<()> {
        let Dims { t, s, d, .. } = self.dims;
        let dp = padded(d);
        let b = bh.0;
        let keys = self.group_limit(b, None);
        let Scratch {
            p,
            ds,
            qt,
            gt,
            rows,
            k: kbuf,
            v: vbuf,
            qr,
            gr,
            dk: dks,
            dv: dvs,
            ..
        } = sc;
        let km = rows_of(k, bh, (0, keys, d), kbuf)?;
        let vm = rows_of(v, bh, (0, keys, d), vbuf)?;
        let (dks, dvs) = (&mut dks[..s * dp], &mut dvs[..s * dp]);
        dks.fill(0.0);
        dvs.fill(0.0);
        for g0 in (0..t).step_by(LANES) {
            let rb = LANES.min(t - g0);
            let l = self.group_limit(b, Some(g0 / LANES));
            let pt = &mut p[..l * LANES];
            self.group_probs(kn, bh, (q, km), (g0, rb), (qt, pt))?;
            if dv.is_some() {
                // dV[:l] += P^T dO
                let gm = rows_of(g, bh, (g0, rb, d), gr)?;
                kn.keys_acc((pt, l), rb, gm, d, (dvs, dp))?;
            }
            if dq.is_none() && dk.is_none() {
                continue;
            }
            // dP^T = V dO^T, then dS^T in place.
            transposed(kn, g, bh, (g0, rb, d), 1.0, gt)?;
            let dst = &mut ds[..l * LANES];
            kn.scores(vm.0, vm.1, d, gt, dst)?;
            kn.score_grads(self.pad_of(b, l), pt, dst)?;
            if let Some(dq) = dq {
                // dQ = scale dS K
                let o = &mut rows[..rb * dp];
                let lims = self.row_limits(b, g0, rb);
                kn.rows_acc(dst, &lims[..rb], km, (d, self.scale), (o, dp))?;
                dq.put_lanes(kn, bh, g0, o, dp)?;
            }
            if dk.is_some() {
                // dK[:l] += dS^T Q (scaled once at the end)
                let qm = rows_of(q, bh, (g0, rb, d), qr)?;
                kn.keys_acc((dst, l), rb, qm, d, (dks, dp))?;
            }
        }
        if let Some(dk) = dk {
            dks.iter_mut().for_each(|x| *x *= self.scale);
            dk.put_lanes(kn, bh, 0, dks, dp)?;
        }
        if let Some(dv) = dv {
            dv.put_lanes(kn, bh, 0, dvs, dp)?;
        }
        Ok(())
    }
}
