//! torchscale's `MultiheadAttention`: self- and cross-attention with key padding masks, causal
//! masks, an incremental cache, relative position bias, xPos, Sub-LN and multiway projections.
//!
//! One deliberate difference from torchscale: a query row whose keys are all masked (an empty
//! sentence, left padding under the causal mask, a fully padded source in cross-attention)
//! attends to nothing. Its attention output is zero (the module then returns `out_proj`'s bias
//! there) and its gradients are zero, on the fused and the composed paths alike; torchscale gives
//! NaN, which spreads to the whole batch's loss. Every other row is computed exactly as before.

pub mod cache;
pub mod relpos;
pub mod xpos;

use candle_core::Tensor;
use candle_nn::{Linear, VarBuilder};

pub use cache::KvCache;
pub use relpos::RelativePositionBias;
pub use xpos::Xpos;

use crate::dropout::dropout;
use crate::layer_norm::LayerNorm;
use crate::linear::{apply, linear};
use crate::multiway::{Branch, Multiway};
use crate::{Error, Result};

/// Shape and options of one attention module.
#[derive(Debug, Clone, Copy)]
pub struct AttentionConfig {
    /// Model width C.
    pub embed_dim: usize,
    /// Number of heads H (C must be divisible by H).
    pub num_heads: usize,
    /// Self-attention (true) or encoder-decoder attention (false).
    pub self_attention: bool,
    /// Sub-LN: `inner_attn_ln` before `out_proj` (self-attention only).
    pub inner_norm: bool,
    /// xPos scale base, if xPos is on (self-attention only).
    pub xpos_scale_base: Option<f64>,
    /// Multiway A/B copies of the projections and the inner norm.
    pub multiway: bool,
    /// Dropout on the attention probabilities.
    pub attention_dropout: f64,
    /// LayerNorm epsilon.
    pub layernorm_eps: f64,
}

/// Init gains of the projections: torchscale scales `v_proj` and `out_proj` (weights and biases),
/// never `q_proj` or `k_proj`.
#[derive(Debug, Clone, Copy)]
pub struct AttentionGains {
    /// Gain of `v_proj`.
    pub v: f64,
    /// Gain of `out_proj`.
    pub out: f64,
}

impl Default for AttentionGains {
    fn default() -> Self {
        Self { v: 1.0, out: 1.0 }
    }
}

/// Per-call inputs besides the query and key/value tensors.
#[derive(Debug, Clone, Default)]
pub struct AttentionInputs<'a> {
    /// `[B, S]`, nonzero = padded key (any dtype).
    pub key_padding_mask: Option<&'a Tensor>,
    /// Additive `[T, S]` mask (causal: -inf above the diagonal).
    pub attn_mask: Option<&'a Tensor>,
    /// Relative position bias `[H, T, S]` or `[B, H, T, S]`, added after masking.
    pub rel_pos: Option<&'a Tensor>,
    /// With a cache: true when the whole prompt is processed at once.
    pub is_first_step: bool,
    /// Multiway branch.
    pub branch: Branch,
    /// Training mode (attention dropout).
    pub train: bool,
}

/// Multi-head attention with torchscale's parameter names (`q_proj`, `k_proj`, `v_proj`,
/// `out_proj`, `inner_attn_ln`, `xpos.scale`).
#[derive(Debug, Clone)]
pub struct MultiheadAttention {
    q_proj: Multiway<Linear>,
    k_proj: Multiway<Linear>,
    v_proj: Multiway<Linear>,
    out_proj: Multiway<Linear>,
    inner_attn_ln: Option<Multiway<LayerNorm>>,
    xpos: Option<Xpos>,
    cfg: AttentionConfig,
    head_dim: usize,
}

impl MultiheadAttention {
    /// Builds the module under `vb`.
    pub fn new(cfg: AttentionConfig, gains: AttentionGains, vb: VarBuilder) -> Result<Self> {
        let c = cfg.embed_dim;
        if cfg.num_heads == 0 || !c.is_multiple_of(cfg.num_heads) {
            return Err(Error::config(
                "attention_heads",
                format!("embed dim {c} is not divisible by {} heads", cfg.num_heads),
            ));
        }
        let head_dim = c / cfg.num_heads;
        let mw = cfg.multiway;
        let k_proj = Multiway::new(mw, vb.pp("k_proj"), |vb| linear(c, c, true, 1.0, vb))?;
        let v_proj = Multiway::new(mw, vb.pp("v_proj"), |vb| linear(c, c, true, gains.v, vb))?;
        let q_proj = Multiway::new(mw, vb.pp("q_proj"), |vb| linear(c, c, true, 1.0, vb))?;
        let out_proj = Multiway::new(mw, vb.pp("out_proj"), |vb| {
            linear(c, c, true, gains.out, vb)
        })?;
        let inner_attn_ln = if cfg.inner_norm && cfg.self_attention {
            Some(Multiway::new(mw, vb.pp("inner_attn_ln"), |vb| {
                LayerNorm::new(c, cfg.layernorm_eps, vb)
            })?)
        } else {
            None
        };
        let xpos = match cfg.xpos_scale_base {
            Some(base) if cfg.self_attention => {
                if !head_dim.is_multiple_of(2) {
                    return Err(Error::config(
                        "xpos_rel_pos",
                        format!("xPos needs an even head dim, got {head_dim}"),
                    ));
                }
                Some(Xpos::new(head_dim, base)?)
            }
            _ => None,
        };
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            out_proj,
            inner_attn_ln,
            xpos,
            cfg,
            head_dim,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AttentionConfig {
        &self.cfg
    }

    /// The xPos module, if any (its `scale` is a checkpoint buffer).
    pub fn xpos(&self) -> Option<&Xpos> {
        self.xpos.as_ref()
    }

    /// Attends from `query: [B, T, C]` to `key_value: [B, S, C]`; with `cache`, new keys/values are
    /// appended to it first. Returns `[B, T, C]`.
    pub fn forward(
        &self,
        query: &Tensor,
        key_value: &Tensor,
        inputs: &AttentionInputs,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let want_q = format!("[B, T, {}]", self.cfg.embed_dim);
        let (b, t, c) = match query.dims() {
            &[b, t, c] if c == self.cfg.embed_dim => (b, t, c),
            got => return Err(Error::shape("query", want_q, got)),
        };
        let s = match key_value.dims() {
            &[kb, s, kc] if kb == b && kc == c => s,
            got => return Err(Error::shape("key", format!("[{b}, S, {c}]"), got)),
        };
        if key_value.dtype() != query.dtype() {
            return Err(Error::DType {
                what: "key".into(),
                expected: query.dtype(),
                got: key_value.dtype(),
            });
        }
        let h = self.cfg.num_heads;
        let d = self.head_dim;
        let br = inputs.branch;
        // The cache and the masks are checked here, once, whichever path computes the attention:
        // a cache of another batch or width would otherwise fail deep inside as "cat".
        let cached = match cache.as_ref() {
            Some(kv) => kv.check("cache", b, h, d, query.dtype())?,
            None => 0,
        };
        let src_len = s + cached;
        if let Some(mask) = inputs.attn_mask {
            if mask.dims() != [t, src_len] {
                return Err(Error::shape(
                    "attn_mask",
                    format!("[{t}, {src_len}]"),
                    mask.dims(),
                ));
            }
        }
        if let Some(kpm) = inputs.key_padding_mask {
            if kpm.dims() != [b, src_len] {
                return Err(Error::shape(
                    "key_padding_mask",
                    format!("[{b}, {src_len}]"),
                    kpm.dims(),
                ));
            }
        }
        if self.packed_ok(query, key_value, inputs, cache.is_none()) {
            if let Some(out) = self.packed_self_attention(query, inputs)? {
                return self.finish(out, br);
            }
        }
        // [B, T, H, d] views of the projections: no head-split copies.
        let q = self.q_proj.apply(query, br, apply)?.reshape((b, t, h, d))?;
        let k = self
            .k_proj
            .apply(key_value, br, apply)?
            .reshape((b, s, h, d))?;
        let v = self
            .v_proj
            .apply(key_value, br, apply)?
            .reshape((b, s, h, d))?;
        let out = if self.fused_core(inputs) {
            self.core_fused(q, k, v, inputs, cache)?
        } else {
            self.core_composed(q, k, v, inputs, cache)?
        };
        self.finish(out, br)
    }

    /// Sub-LN's inner norm, then the output projection.
    fn finish(&self, out: Tensor, br: Branch) -> Result<Tensor> {
        let out = match &self.inner_attn_ln {
            Some(ln) => ln.apply(&out, br, |ln, x| ln.forward(x))?,
            None => out,
        };
        self.out_proj.apply(&out, br, apply)
    }

    /// Plain self-attention in training or a full forward (no cache, xPos, relative bias,
    /// attention dropout or multiway copies) takes the packed path: one projection with the three
    /// weights side by side and one attention kernel on its output, so the graph holds two nodes
    /// where the general path holds nine.
    fn packed_ok(
        &self,
        query: &Tensor,
        key_value: &Tensor,
        inputs: &AttentionInputs,
        no_cache: bool,
    ) -> bool {
        no_cache
            && self.cfg.self_attention
            && self.xpos.is_none()
            && query.id() == key_value.id()
            && matches!(self.q_proj, Multiway::Single(_))
            && self.fused_core(inputs)
    }

    /// The packed path; `None` when the projections' biases differ in presence (never with
    /// torchscale's modules).
    fn packed_self_attention(
        &self,
        x: &Tensor,
        inputs: &AttentionInputs,
    ) -> Result<Option<Tensor>> {
        let (q, k, v) = (self.q_proj.a(), self.k_proj.a(), self.v_proj.a());
        let w = Tensor::cat(&[q.weight(), k.weight(), v.weight()], 0)?;
        let b = match (q.bias(), k.bias(), v.bias()) {
            (Some(bq), Some(bk), Some(bv)) => Some(Tensor::cat(&[bq, bk, bv], 0)?),
            (None, None, None) => None,
            _ => return Ok(None),
        };
        let qkv = torchscale_kernels::linear(x, &w, b.as_ref())?;
        let opts = torchscale_kernels::attention::AttentionOptions {
            scale: (self.head_dim as f64).powf(-0.5),
            attn_mask: inputs.attn_mask.cloned(),
            key_padding_mask: inputs.key_padding_mask.cloned(),
        };
        Ok(Some(torchscale_kernels::attention::attention_packed(
            &qkv,
            self.cfg.num_heads,
            &opts,
        )?))
    }

    /// The fused kernel covers everything but a relative position bias and attention dropout in
    /// training.
    fn fused_core(&self, inputs: &AttentionInputs) -> bool {
        torchscale_kernels::fused_enabled()
            && inputs.rel_pos.is_none()
            && !(inputs.train && self.cfg.attention_dropout > 0.0)
    }

    /// Appends to the cache (kept `[B, H, S, d]`) and applies xPos; returns `[B, H, ., d]` views.
    fn keys_and_queries(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        inputs: &AttentionInputs,
        cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, Tensor, Tensor, bool)> {
        let d = self.head_dim;
        let (mut k, mut v) = (k.transpose(1, 2)?, v.transpose(1, 2)?);
        let incremental = cache.is_some();
        if let Some(cache) = cache {
            (k, v) = cache.append(&k, &v)?;
        }
        let mut q = q.transpose(1, 2)?;
        let scaled = if let Some(xpos) = &self.xpos {
            let src_len = k.dim(2)?;
            let offset = if incremental && !inputs.is_first_step {
                src_len - 1
            } else {
                0
            };
            k = xpos.forward(&k, 0, true)?;
            q = xpos.forward(&(q * (d as f64).powf(-0.5))?, offset, false)?;
            true
        } else {
            false
        };
        Ok((q, k, v, scaled))
    }

    fn core_fused(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        inputs: &AttentionInputs,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let mut opts = torchscale_kernels::attention::AttentionOptions {
            scale: (self.head_dim as f64).powf(-0.5),
            attn_mask: inputs.attn_mask.cloned(),
            key_padding_mask: inputs.key_padding_mask.cloned(),
        };
        if cache.is_none() && self.xpos.is_none() {
            // The kernel reads [B, T, H, d] views as they are: no transposes in the graph.
            return Ok(torchscale_kernels::attention::attention(&q, &k, &v, &opts)?);
        }
        let (q, k, v, scaled) = self.keys_and_queries(q, k, v, inputs, cache)?;
        if scaled {
            opts.scale = 1.0;
        }
        Ok(torchscale_kernels::attention::attention(
            &q.transpose(1, 2)?,
            &k.transpose(1, 2)?,
            &v.transpose(1, 2)?,
            &opts,
        )?)
    }

    /// torchscale's composed attention, kept for relative position bias and attention dropout.
    fn core_composed(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        inputs: &AttentionInputs,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t, h, d) = q.dims4()?;
        let (q, k, v, scaled) = self.keys_and_queries(q, k, v, inputs, cache)?;
        let q = if scaled {
            q
        } else {
            (q * (d as f64).powf(-0.5))?
        };
        let mut scores = q.contiguous()?.matmul(&k.contiguous()?.t()?)?; // [B, H, T, S]
        let dtype = scores.dtype();
        if let Some(mask) = inputs.attn_mask {
            scores = scores.broadcast_add(&mask.to_dtype(dtype)?)?;
        }
        if let Some(kpm) = inputs.key_padding_mask {
            let masked = kpm.ne(0u32)?.unsqueeze(1)?.unsqueeze(1)?; // [B,1,1,S]
            let neg = Tensor::new(f32::NEG_INFINITY, scores.device())?
                .to_dtype(dtype)?
                .broadcast_as(scores.shape())?;
            scores = masked
                .broadcast_as(scores.shape())?
                .where_cond(&neg, &scores)?;
        }
        if let Some(rel) = inputs.rel_pos {
            let rel = match rel.rank() {
                3 => rel.unsqueeze(0)?,
                _ => rel.clone(),
            };
            scores = scores.broadcast_add(&rel.to_dtype(dtype)?)?;
        }
        let probs = softmax_f32(&scores)?;
        let probs = dropout(&probs, self.cfg.attention_dropout, inputs.train)?;
        let out = probs.matmul(&v.contiguous()?)?; // [B, H, T, d]
        Ok(out.transpose(1, 2)?.reshape((b, t, h * d))?)
    }
}

/// Softmax over the last dimension in f32, cast back; fused with its backward on the CPU
/// (`torchscale_kernels::softmax_last_dim`), composed candle ops elsewhere (candle's own fused
/// softmax has no backward). A row of only `-inf` gives zeros, not NaN.
pub fn softmax_f32(x: &Tensor) -> Result<Tensor> {
    Ok(torchscale_kernels::softmax_last_dim(x)?)
}

/// The additive causal mask `[T, T]`: -inf strictly above the diagonal.
pub fn causal_mask(t: usize, device: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(v, (t, t), device)?)
}
