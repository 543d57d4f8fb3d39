//! Scaled dot-product attention `softmax(scale * q @ k^T + masks) @ v` as one kernel per
//! (batch, head), reading q, k and v in place (no head-split copies) and never keeping the
//! `[B, H, T, S]` probabilities: the backward recomputes them block by block.
//!
//! [`attention_composed`] is the candle version torchscale-core used (head split, scale q, q @ k^T,
//! additive mask, key padding set to -inf, softmax in f32, @ v); the fused kernel reproduces it,
//! NaN rows included (a row whose keys are all masked gives NaN, as in PyTorch).

use std::borrow::Cow;
use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use crate::cpu::{as_f32, cpu_float, storage_from_f32, tensor_from_f32};
use crate::gemm::{matmul, Mat};
use crate::switch::fused_enabled;

/// Options of one fused attention call.
#[derive(Debug, Clone)]
pub struct AttentionOptions {
    /// Factor applied to q before `q @ k^T` (torchscale: `head_dim^-0.5`).
    pub scale: f64,
    /// Additive `[T, S]` mask of any float dtype (causal: -inf above the diagonal); a constant,
    /// it gets no gradient.
    pub attn_mask: Option<Tensor>,
    /// `[B, S]` of any dtype, nonzero = padded key (its score becomes -inf).
    pub key_padding_mask: Option<Tensor>,
}

impl AttentionOptions {
    /// Options with `scale` and no masks.
    pub fn new(scale: f64) -> Self {
        Self {
            scale,
            attn_mask: None,
            key_padding_mask: None,
        }
    }
}

/// Sizes of one call: batch, query length, key length, heads, head dim.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    s: usize,
    h: usize,
    d: usize,
}

/// Checks ranks, sizes, dtypes and mask shapes; names the tensor at fault.
fn check(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttentionOptions) -> Result<Dims> {
    let rank4 = |name: &str, x: &Tensor| -> Result<(usize, usize, usize, usize)> {
        match *x.dims() {
            [a, b, c, d] => Ok((a, b, c, d)),
            _ => bail!(
                "attention: {name} must be [B, len, H, d], got {:?}",
                x.dims()
            ),
        }
    };
    let (b, t, h, d) = rank4("q", q)?;
    let (kb, s, kh, kd) = rank4("k", k)?;
    if (kb, kh, kd) != (b, h, d) {
        bail!(
            "attention: k {:?} does not match q {:?} in B, H or d",
            k.dims(),
            q.dims()
        );
    }
    if v.dims() != k.dims() {
        bail!(
            "attention: v {:?} must have the shape of k {:?}",
            v.dims(),
            k.dims()
        );
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        let (qt, kt, vt) = (q.dtype(), k.dtype(), v.dtype());
        bail!("attention: q, k, v must share a dtype, got {qt:?}, {kt:?}, {vt:?}");
    }
    if let Some(m) = &opts.attn_mask {
        if m.dims() != [t, s] {
            bail!("attention: attn_mask {:?}, expected [{t}, {s}]", m.dims());
        }
    }
    if let Some(m) = &opts.key_padding_mask {
        if m.dims() != [b, s] {
            bail!(
                "attention: key_padding_mask {:?}, expected [{b}, {s}]",
                m.dims()
            );
        }
    }
    Ok(Dims { b, t, s, h, d })
}

/// Attention of `q: [B, T, H, d]` over `k, v: [B, S, H, d]` (any strides) → `[B, T, H * d]`,
/// contiguous: the fused kernel on CPU f32 / f16 / bf16 tensors when fused kernels are on,
/// [`attention_composed`] otherwise.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttentionOptions) -> Result<Tensor> {
    let dims = check(q, k, v, opts)?;
    let kernel_dtype = matches!(q.dtype(), DType::F32 | DType::F16 | DType::BF16);
    let empty = dims.t == 0 || dims.s == 0 || dims.d == 0;
    if !fused_enabled() || !kernel_dtype || empty || !cpu_float(&[q, k, v]) {
        return attention_composed(q, k, v, opts);
    }
    let op = AttentionOp::new(dims, q.dtype(), opts)?;
    q.apply_op3_arc(k, v, Arc::new(Box::new(op)))
}

/// The composed candle attention torchscale-core computed (the reference the kernel is tested
/// against): heads split by copies, q scaled first, scores masked, softmax in f32, cast back.
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttentionOptions,
) -> Result<Tensor> {
    let Dims { b, t, h, d, .. } = check(q, k, v, opts)?;
    let heads = |x: &Tensor| x.transpose(1, 2)?.contiguous();
    let q = (heads(q)? * opts.scale)?;
    let (k, v) = (heads(k)?, heads(v)?);
    let mut scores = q.matmul(&k.t()?)?; // [B, H, T, S]
    let dtype = scores.dtype();
    if let Some(mask) = &opts.attn_mask {
        scores = scores.broadcast_add(&mask.to_dtype(dtype)?)?;
    }
    if let Some(kpm) = &opts.key_padding_mask {
        let padded = kpm.ne(0u32)?.unsqueeze(1)?.unsqueeze(1)?; // [B, 1, 1, S]
        let neg = Tensor::new(f32::NEG_INFINITY, scores.device())?
            .to_dtype(dtype)?
            .broadcast_as(scores.shape())?;
        scores = padded
            .broadcast_as(scores.shape())?
            .where_cond(&neg, &scores)?;
    }
    let probs = if dtype == DType::F64 {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    } else {
        candle_nn::ops::softmax(&scores.to_dtype(DType::F32)?, D::Minus1)?.to_dtype(dtype)?
    };
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h * d))
}

/// Query rows per block: scores are computed `ROWS` rows at a time, so that the causal case skips
/// the keys past the diagonal and scratch stays `ROWS x S`.
const ROWS: usize = 64;

/// The fused op; the masks are constants read to the host when it is built.
///
/// Scores are kept transposed, `S^T = K @ Q^T` (`[keys, query rows]`): every product then has
/// the operand layout `gemm` runs fastest, and the softmax runs down the columns, 8 or 16 query
/// rows per vector, with no per-row horizontal reductions.
struct AttentionOp {
    dims: Dims,
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
    /// Per batch: some row has every key masked (NaN row). The composed backward then spreads NaN
    /// over all of dv and dk, so no key may be skipped.
    no_skip: Vec<bool>,
}

impl AttentionOp {
    fn new(dims: Dims, dtype: DType, opts: &AttentionOptions) -> Result<Self> {
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
        let mut batch_lim = vec![s; b];
        let mut no_skip = vec![false; b];
        for bi in 0..b {
            let padded = |j: usize| pad.as_ref().is_some_and(|p| p[bi * s + j]);
            batch_lim[bi] = (0..s).rposition(|j| !padded(j)).map_or(0, |j| j + 1);
            no_skip[bi] = (0..t).any(|ti| !(0..row_lim[ti]).any(|j| open(ti, j) && !padded(j)));
        }
        let mask_t = mask.map(|m| (0..s * t).map(|i| m[(i % t) * s + i / t]).collect());
        Ok(Self {
            dims,
            scale: opts.scale as f32,
            mask_t,
            pad,
            row_lim,
            batch_lim,
            no_skip,
        })
    }

    /// Keys that can hold a nonzero probability for query rows `r0..r1` of batch `b`.
    fn limit(&self, b: usize, r0: usize, r1: usize) -> usize {
        if self.no_skip[b] {
            return self.dims.s;
        }
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
    #[allow(clippy::too_many_arguments)]
    fn probs_block(
        &self,
        (b, h): (usize, usize),
        (q, k): (&View, &View),
        (r0, rb, l): (usize, usize, usize),
        pt: &mut [f32],
        stats: &mut [f32],
    ) -> Result<()> {
        let Dims { t, d, .. } = self.dims;
        mm(
            (l, rb, d),
            pt,
            false,
            k.rows(b, h, 0),
            q.cols(b, h, r0),
            self.scale,
        )?;
        let mask = self.mask_t.as_deref().map(|m| (&m[r0..], t));
        probs_t(mask, self.pad_of(b, l), rb, pt, stats);
        Ok(())
    }

    /// Forward of head `(b, h)`: `out[b, :, h]` = P @ v, block of rows by block of rows.
    fn forward_head(
        &self,
        (b, h): (usize, usize),
        (q, k, v): (&View, &View, &View),
        out: &Scatter,
        sc: &mut Scratch,
    ) -> Result<()> {
        let Dims { t, h: nh, d, .. } = self.dims;
        for r0 in (0..t).step_by(ROWS) {
            let rb = ROWS.min(t - r0);
            let l = self.limit(b, r0, r0 + rb);
            let pt = &mut sc.p[..l * rb];
            self.probs_block((b, h), (q, k), (r0, rb, l), pt, &mut sc.stats)?;
            let o = &mut sc.rows[..rb * d];
            mm(
                (rb, d, l),
                o,
                false,
                Mat::transposed(pt, rb),
                v.rows(b, h, 0),
                1.0,
            )?;
            out.put((b * t + r0) * nh * d + h * d, nh * d, o, d)?;
        }
        Ok(())
    }

    /// Backward of head `(b, h)` into whichever of `dq`, `dk`, `dv` are wanted.
    fn backward_head(
        &self,
        (b, h): (usize, usize),
        (q, k, v, g): (&View, &View, &View, &View),
        (dq, dk, dv): (Option<&Scatter>, Option<&Scatter>, Option<&Scatter>),
        sc: &mut Scratch,
    ) -> Result<()> {
        let Dims { t, s, h: nh, d, .. } = self.dims;
        let (c, sd) = (nh * d, s * d);
        sc.dk[..sd].fill(0.0);
        sc.dv[..sd].fill(0.0);
        for r0 in (0..t).step_by(ROWS) {
            let rb = ROWS.min(t - r0);
            let l = self.limit(b, r0, r0 + rb);
            let pt = &mut sc.p[..l * rb];
            self.probs_block((b, h), (q, k), (r0, rb, l), pt, &mut sc.stats)?;
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
            mm(
                (l, rb, d),
                dst,
                false,
                v.rows(b, h, 0),
                g.cols(b, h, r0),
                1.0,
            )?;
            score_grads_t(self.pad_of(b, l), rb, pt, dst, &mut sc.stats);
            let dst = &sc.ds[..l * rb];
            if let Some(dq) = dq {
                // dQ = scale * dS @ K
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
                dq.put((b * t + r0) * c + h * d, c, o, d)?;
            }
            if dk.is_some() {
                // dK[:l] += scale * dS^T @ Q
                let qm = q.rows(b, h, r0);
                mm(
                    (l, d, rb),
                    &mut sc.dk[..sd],
                    true,
                    Mat::rows(dst, rb),
                    qm,
                    self.scale,
                )?;
            }
        }
        if let Some(dk) = dk {
            dk.put(b * s * c + h * d, c, &sc.dk[..sd], d)?;
        }
        if let Some(dv) = dv {
            dv.put(b * s * c + h * d, c, &sc.dv[..sd], d)?;
        }
        Ok(())
    }

    /// Runs `f` on every (batch, head) with this thread's scratch: over rayon's threads when the
    /// work is large enough to pay for it.
    fn each_head(
        &self,
        backward: bool,
        f: impl Fn((usize, usize), &mut Scratch) -> Result<()> + Sync,
    ) -> Result<()> {
        let Dims { b, t, s, h, d } = self.dims;
        let run =
            |i: usize| with_scratch((ROWS.min(t), s, d, backward), |sc| f((i / h, i % h), sc));
        // Below ~1M multiply-adds per product, waking rayon's workers costs about what it saves.
        if b * h * t * s * d < 1 << 20 || b * h == 1 || rayon::current_num_threads() == 1 {
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

/// Scratch buffers of one (batch, head) task.
#[derive(Default)]
struct Scratch {
    p: Vec<f32>,
    stats: Vec<f32>,
    ds: Vec<f32>,
    rows: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Scratch above this many floats is freed after use rather than kept by its thread.
const KEEP: usize = 4 << 20;

thread_local! {
    /// Kept between calls: fresh buffers on every call cost as much in page faults as the
    /// softmax itself.
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Runs `f` with this thread's scratch, grown to `rows` query rows over `s` keys of head dim `d`
/// (the backward needs three more buffers).
fn with_scratch<R>(
    (rows, s, d, backward): (usize, usize, usize, bool),
    f: impl FnOnce(&mut Scratch) -> R,
) -> R {
    let grow = |sc: &mut Scratch| {
        let fit = |v: &mut Vec<f32>, n: usize| {
            if v.len() < n {
                v.resize(n, 0.0);
            }
        };
        fit(&mut sc.p, rows * s);
        fit(&mut sc.stats, 2 * rows);
        fit(&mut sc.rows, rows * d);
        if backward {
            fit(&mut sc.ds, rows * s);
            fit(&mut sc.dk, s * d);
            fit(&mut sc.dv, s * d);
        }
    };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut sc) => {
            grow(&mut sc);
            let r = f(&mut sc);
            let held = [&sc.p, &sc.ds, &sc.rows, &sc.dk, &sc.dv, &sc.stats].map(|v| v.len());
            if held.iter().sum::<usize>() > KEEP {
                *sc = Scratch::default();
            }
            r
        }
        Err(_) => {
            let mut sc = Scratch::default();
            grow(&mut sc);
            f(&mut sc)
        }
    })
}

/// A `[B, len, H, d]` operand as f32 with its strides: f32 storage is read in place whatever its
/// layout, other dtypes are converted to a contiguous copy.
struct View<'a> {
    data: Cow<'a, [f32]>,
    off: usize,
    st: [usize; 4],
}

impl<'a> View<'a> {
    fn new(s: &'a CpuStorage, l: &Layout) -> Result<Self> {
        let contiguous = |dims: &[usize]| -> Result<[usize; 4]> {
            match *dims {
                [_, a, b, c] => Ok([a * b * c, b * c, c, 1]),
                _ => bail!("attention: operand {dims:?} is not rank 4"),
            }
        };
        Ok(match s {
            CpuStorage::F32(v) => View {
                data: Cow::Borrowed(v.as_slice()),
                off: l.start_offset(),
                st: match *l.stride() {
                    [a, b, c, d] => [a, b, c, d],
                    _ => contiguous(l.dims())?,
                },
            },
            _ => View {
                data: as_f32(s, l)?,
                off: 0,
                st: contiguous(l.dims())?,
            },
        })
    }

    fn from_slice(data: &'a [f32], dims: [usize; 4]) -> Self {
        let [_, a, b, c] = dims;
        View {
            data: Cow::Borrowed(data),
            off: 0,
            st: [a * b * c, b * c, c, 1],
        }
    }

    /// The slice from element `[b, r0, h, 0]` on (empty when out of range: matmul then errors).
    fn at(&self, b: usize, h: usize, r0: usize) -> &[f32] {
        let i = self.off + b * self.st[0] + r0 * self.st[1] + h * self.st[2];
        self.data.get(i..).unwrap_or(&[])
    }

    /// Rows `r0..` of head `(b, h)` as a `[len, d]` matrix.
    fn rows(&self, b: usize, h: usize, r0: usize) -> Mat<'_> {
        Mat {
            data: self.at(b, h, r0),
            rs: self.st[1],
            cs: self.st[3],
        }
    }

    /// Rows `r0..` of head `(b, h)` transposed, as a `[d, len]` matrix.
    fn cols(&self, b: usize, h: usize, r0: usize) -> Mat<'_> {
        Mat {
            data: self.at(b, h, r0),
            rs: self.st[3],
            cs: self.st[1],
        }
    }
}

/// An output buffer the (batch, head) tasks write into concurrently, each to its own elements
/// (head `h` owns columns `h * d..(h + 1) * d` of every row), through raw pointers only so that no
/// two tasks hold overlapping `&mut` slices.
struct Scatter<'a> {
    ptr: *mut f32,
    len: usize,
    _buf: PhantomData<&'a mut [f32]>,
}

// SAFETY: `put` only writes through the pointer, each task to its own elements (see `put`), and
// the borrow of the buffer outlives every task.
unsafe impl Send for Scatter<'_> {}
unsafe impl Sync for Scatter<'_> {}

impl<'a> Scatter<'a> {
    fn new(v: &'a mut [f32]) -> Self {
        Self {
            ptr: v.as_mut_ptr(),
            len: v.len(),
            _buf: PhantomData,
        }
    }

    /// Copies the rows of `src` (row length `n`) to `start + r * ld`. Each task of one call writes
    /// a different head's columns, so no element is written twice.
    fn put(&self, start: usize, ld: usize, src: &[f32], n: usize) -> Result<()> {
        let rows = src.len() / n.max(1);
        if rows > 0 && start + (rows - 1) * ld + n > self.len {
            bail!("attention: output block out of range");
        }
        for (r, row) in src.chunks_exact(n).enumerate() {
            // SAFETY: in bounds (checked above); disjoint from other tasks' writes.
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), self.ptr.add(start + r * ld), n) };
        }
        Ok(())
    }
}

/// `exp(x)` for f32 in a form that vectorises (Cephes' range reduction and polynomial, about one
/// ulp): 0 below -87.3, +inf above 88.3 (softmax arguments are <= 0), NaN stays NaN.
#[inline(always)]
fn exp(x: f32) -> f32 {
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
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),*) => $body:ident) => {
        $(#[$m])*
        fn $name($($a: $t),*) {
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
    /// scratch. A column of -inf gives NaN, as the composed path does.
    fn probs_t(
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
    for row in pt.chunks_exact_mut(rb) {
        for ((x, m), s) in row.iter_mut().zip(max.iter()).zip(sum.iter_mut()) {
            *x = exp(*x - m);
            *s += *x;
        }
    }
    for s in sum.iter_mut() {
        *s = 1.0 / *s;
    }
    for row in pt.chunks_exact_mut(rb) {
        for (x, s) in row.iter_mut().zip(sum.iter()) {
            *x *= s;
        }
    }
}

multiversion! {
    /// Turns `dst` (`dP^T`, laid out as `pt`) into `dS^T = P * (dP - colsum(dP * P))`, zero at
    /// padded keys (the composed `where_cond` gives them no gradient, even in a NaN row);
    /// `stats`: `rb` scratch.
    fn score_grads_t(pad: Option<&[bool]>, rb: usize, pt: &[f32], dst: &mut [f32], stats: &mut [f32])
        => score_grads_t_body
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

/// The CPU storage behind a tensor.
fn cpu(s: &Storage) -> Result<&CpuStorage> {
    match s {
        Storage::Cpu(s) => Ok(s),
        _ => bail!("fused attention called on a non-CPU tensor"),
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "torchscale-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Dims { b, t, h, d, .. } = self.dims;
        let (q, k, v) = (View::new(s1, l1)?, View::new(s2, l2)?, View::new(s3, l3)?);
        let mut out = vec![0f32; b * t * h * d];
        let dst = Scatter::new(&mut out);
        self.each_head(false, |bh, sc| {
            self.forward_head(bh, (&q, &k, &v), &dst, sc)
        })?;
        Ok((
            storage_from_f32(out, s1.dtype())?,
            Shape::from((b, t, h * d)),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Dims { b, t, s, h, d } = self.dims;
        let want = [q.track_op(), k.track_op(), v.track_op()];
        if !want.iter().any(|w| *w) {
            return Ok((None, None, None));
        }
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (qv, kv, vv) = (
            View::new(cpu(&qs)?, ql)?,
            View::new(cpu(&ks)?, kl)?,
            View::new(cpu(&vs)?, vl)?,
        );
        let g = as_f32(cpu(&gs)?, gl)?;
        if g.len() != b * t * h * d {
            bail!(
                "attention: gradient {:?}, expected [{b}, {t}, {}]",
                grad.dims(),
                h * d
            );
        }
        let gv = View::from_slice(&g, [b, t, h, d]);
        let buf = |on: bool, len: usize| if on { vec![0f32; len] } else { Vec::new() };
        let mut dq = buf(want[0], b * t * h * d);
        let mut dk = buf(want[1], b * s * h * d);
        let mut dv = buf(want[2], b * s * h * d);
        let (sq, sk, sv) = (
            Scatter::new(&mut dq),
            Scatter::new(&mut dk),
            Scatter::new(&mut dv),
        );
        let pick = |on: bool, x| if on { Some(x) } else { None };
        let grads = (pick(want[0], &sq), pick(want[1], &sk), pick(want[2], &sv));
        self.each_head(true, |bh, sc| {
            self.backward_head(bh, (&qv, &kv, &vv, &gv), grads, sc)
        })?;
        drop((qs, ks, vs, gs));
        let dtype = q.dtype();
        let wrap = |on: bool, x: Vec<f32>, len: usize| -> Result<Option<Tensor>> {
            if on {
                Ok(Some(tensor_from_f32(x, (b, len, h, d), dtype)?))
            } else {
                Ok(None)
            }
        };
        Ok((
            wrap(want[0], dq, t)?,
            wrap(want[1], dk, s)?,
            wrap(want[2], dv, s)?,
        ))
    }
}
