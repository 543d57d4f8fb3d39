//! A small transformer block written with `candle_nn` only — self-attention and an
//! MLP, each a Post-LN residual — made Admin (`LN(x·ω + f(x))`) by `torchscale-admin`.
//!
//! Everything here is plain candle: candle's `Result`, `Module`, `VarBuilder` over a `VarMap`.
//! torchscale-admin calls take `?` directly, and its residual wraps closures that return
//! candle's `Result`.

use candle_core::{Result, Tensor, D};
use candle_nn::{linear, Linear, Module, VarBuilder};
use torchscale_admin::{as_residual, NormSpec, OmegaResidual};

/// Single-head self-attention, `out(softmax(q kᵀ / √d) v)`.
pub struct SelfAttention {
    qkv: Linear,
    out: Linear,
}

impl SelfAttention {
    /// `qkv` and `out` projections of width `dim`.
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            qkv: linear(dim, 3 * dim, vb.pp("qkv"))?,
            out: linear(dim, dim, vb.pp("out"))?,
        })
    }
}

impl Module for SelfAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let qkv = self.qkv.forward(x)?;
        let q = qkv.narrow(D::Minus1, 0, d)?;
        let k = qkv.narrow(D::Minus1, d, d)?;
        let v = qkv.narrow(D::Minus1, 2 * d, d)?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
        // `ops::softmax` is composed of differentiable ops (unlike `softmax_last_dim`).
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        self.out.forward(&probs.matmul(&v)?)
    }
}

/// `fc2(gelu(fc1 x))`.
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    /// `dim -> hidden -> dim`.
    pub fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(dim, hidden, vb.pp("fc1"))?,
            fc2: linear(hidden, dim, vb.pp("fc2"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.gelu_erf()?)
    }
}

/// One layer: `h = LN₁(x·ω + attn(x))`, `y = LN₂(h·ω + mlp(h))`.
pub struct Block {
    /// The attention sublayer.
    pub attn: SelfAttention,
    /// Its Admin residual.
    pub attn_res: OmegaResidual,
    /// The MLP sublayer.
    pub mlp: Mlp,
    /// Its Admin residual.
    pub mlp_res: OmegaResidual,
}

impl Block {
    /// A block of a stack of `num_layers` such blocks (2 residual sublayers each), with a
    /// learnable per-channel ω.
    pub fn new(dim: usize, hidden: usize, num_layers: usize, vb: VarBuilder) -> Result<Self> {
        let spec = NormSpec {
            dim,
            eps: 1e-5,
            multiway: false,
        };
        let admin = as_residual(2 * num_layers).as_parameter(dim);
        Ok(Self {
            attn: SelfAttention::new(dim, vb.pp("attn"))?,
            attn_res: admin.build(spec, vb.pp("attn_ln"), vb.pp("attn_res"))?,
            mlp: Mlp::new(dim, hidden, vb.pp("mlp"))?,
            mlp_res: admin.build(spec, vb.pp("mlp_ln"), vb.pp("mlp_res"))?,
        })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.attn_res.forward_with(x, |z| self.attn.forward(z))?;
        Ok(self.mlp_res.forward_with(&h, |z| self.mlp.forward(z))?)
    }
}
