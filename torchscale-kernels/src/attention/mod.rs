//! Scaled dot-product attention `softmax(scale * q @ k^T + masks) @ v` as one kernel per
//! (batch, head), reading q, k and v in place (no head-split copies) and never keeping the
//! `[B, H, T, S]` probabilities: the backward recomputes them block by block.
//!
//! [`attention`] takes separate q, k, v; [`attention_packed`] takes the packed `[B, T, 3C]`
//! projection of self-attention and returns one gradient for it. [`attention_composed`] is the
//! candle version torchscale-core used (head split, scale q, q @ k^T, additive mask, key padding
//! set to -inf, softmax in f32, @ v); the fused kernels reproduce it.
//!
//! A query row whose keys are all masked (an empty sentence, left padding under a causal mask)
//! attends to nothing: its output is zero and its gradients are zero, on every path. PyTorch
//! (and torchscale) give NaN there, which spreads to the whole batch's loss; every row that keeps
//! a key is computed exactly as before.
//!
//! Layout: `heads` (per-head forward and backward: `gemm` products, or for small heads the direct
//! kernels of `heads/direct` and `lanes`), `op` and `packed` (the candle ops), `view` (operand
//! views, output scatter, scratch), `rows` (vectorised softmax column kernels).

mod heads;
#[cfg(target_arch = "x86_64")]
mod lanes;
mod op;
mod packed;
mod rows;
mod view;

use std::sync::Arc;

use candle_core::{bail, DType, Result, Tensor};

use crate::cpu::cpu_float;
use crate::cuda::cuda_float;
use crate::softmax::{softmax_last_dim, softmax_last_dim_composed};
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

impl Dims {
    /// Nothing to compute: the kernels leave these to the composed path.
    fn empty(&self) -> bool {
        self.t == 0 || self.s == 0 || self.d == 0
    }
}

/// Checks the masks' shapes against `[T, S]` and `[B, S]`; `who` names the caller.
fn check_masks(who: &str, opts: &AttentionOptions, (b, t, s): (usize, usize, usize)) -> Result<()> {
    if let Some(m) = &opts.attn_mask {
        if m.dims() != [t, s] {
            bail!("{who}: attn_mask {:?}, expected [{t}, {s}]", m.dims());
        }
    }
    if let Some(m) = &opts.key_padding_mask {
        if m.dims() != [b, s] {
            bail!(
                "{who}: key_padding_mask {:?}, expected [{b}, {s}]",
                m.dims()
            );
        }
    }
    Ok(())
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
    check_masks("attention", opts, (b, t, s))?;
    Ok(Dims { b, t, s, h, d })
}

/// True when the fused kernels take inputs of this dtype.
fn kernel_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// Attention of `q: [B, T, H, d]` over `k, v: [B, S, H, d]` (any strides) → `[B, T, H * d]`,
/// contiguous: the fused kernel on CPU f32 / f16 / bf16 tensors when fused kernels are on,
/// [`attention_composed`] otherwise.
///
/// On CUDA tensors (feature `cuda`, fused kernels on) it is the composed computation, whose
/// products are cuBLAS batched matmuls, with the fused CUDA softmax (one kernel each way, f32
/// inside, no f32 copy of the scores) in place of candle's composed softmax.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttentionOptions) -> Result<Tensor> {
    let dims = check(q, k, v, opts)?;
    if fused_enabled() && !dims.empty() && cuda_float(&[q, k, v]) {
        return composed_with(q, k, v, opts, true);
    }
    if !fused_enabled() || !kernel_dtype(q.dtype()) || dims.empty() || !cpu_float(&[q, k, v]) {
        return attention_composed(q, k, v, opts);
    }
    let op = op::AttentionOp::new(dims, q.dtype(), opts)?;
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
    composed_with(q, k, v, opts, false)
}

/// The composed attention, its softmax the fused one ([`softmax_last_dim`]) when `fused_softmax`.
fn composed_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttentionOptions,
    fused_softmax: bool,
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
    // Both softmaxes give a row of only -inf zeros (see the module docs).
    let probs = if fused_softmax {
        softmax_last_dim(&scores)?
    } else {
        softmax_last_dim_composed(&scores)?
    };
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h * d))
}

/// Checks the packed projection and the masks (`[T, T]`, `[B, T]`); names the argument at fault.
fn check_packed(qkv: &Tensor, heads: usize, opts: &AttentionOptions) -> Result<Dims> {
    let who = "attention_packed";
    let [b, t, w] = *qkv.dims() else {
        bail!("{who}: qkv must be [B, T, 3 * H * d], got {:?}", qkv.dims());
    };
    if heads == 0 {
        bail!("{who}: heads must be at least 1");
    }
    if w % (3 * heads) != 0 {
        bail!(
            "{who}: qkv {:?}: last dim {w} is not a multiple of 3 * heads = {}",
            qkv.dims(),
            3 * heads
        );
    }
    check_masks(who, opts, (b, t, t))?;
    let d = w / (3 * heads);
    Ok(Dims {
        b,
        t,
        s: t,
        h: heads,
        d,
    })
}

/// Self-attention over a packed projection `qkv: [B, T, 3 * H * d]` (q, k and v side by side in
/// the last dimension, as one linear with the three weights concatenated produces) → `[B, T, H * d]`.
/// Its backward returns ONE `[B, T, 3 * H * d]` gradient (so the graph has one node where the
/// unpacked path has three reshapes and three gradients).
///
/// The same as [`attention`] on `q, k, v = qkv[..., 0:C], qkv[..., C:2C], qkv[..., 2C:3C]`
/// (`C = H * d`) each reshaped to `[B, T, H, d]`; masks as in [`AttentionOptions`] with `S = T`.
/// Falls back to those narrows and [`attention_composed`] off the fused path (kernels off, not
/// CPU, f64, empty sizes); on CUDA (feature `cuda`) it takes those narrows into [`attention`]'s
/// CUDA path (cuBLAS products around the fused softmax).
pub fn attention_packed(qkv: &Tensor, heads: usize, opts: &AttentionOptions) -> Result<Tensor> {
    let dims = check_packed(qkv, heads, opts)?;
    let Dims { b, t, h, d, .. } = dims;
    if t == 0 {
        // No rows: candle's softmax refuses an empty last dim, and `[B, 0, C]` is all there is.
        return qkv.narrow(2, 0, h * d);
    }
    let on_cuda = fused_enabled() && !dims.empty() && cuda_float(&[qkv]);
    if on_cuda
        || !fused_enabled()
        || !kernel_dtype(qkv.dtype())
        || dims.empty()
        || !cpu_float(&[qkv])
    {
        let part = |i: usize| qkv.narrow(2, i * h * d, h * d)?.reshape((b, t, h, d));
        return composed_with(&part(0)?, &part(1)?, &part(2)?, opts, on_cuda);
    }
    let op = packed::PackedOp::new(dims, qkv.dtype(), opts)?;
    qkv.apply_op1_arc(Arc::new(Box::new(op)))
}
