//! Admin in a transformer written with plain `candle_nn` pieces (no torchscale models):
//! a 2-layer Post-LN encoder whose 4 residual blocks are `LN(ω·x + f(x))`. Everything comes
//! through `torchscale_admin` (candle included), as in a crate that depends on it alone.
//!
//! Run with `cargo run -p torchscale-admin --example plain_candle`.

use anyhow::Result;
use torchscale_admin::candle_core::{self, DType, Device, Tensor, D};
use torchscale_admin::candle_nn::{
    self, linear, AdamW, Linear, Module, Optimizer, ParamsAdamW, VarBuilder, VarMap,
};
use torchscale_admin::{as_residual, NormSpec, OmegaResidual};

const DIM: usize = 16;
const HEADS: usize = 4;
const FFN: usize = 32;
const LAYERS: usize = 2;

/// A minimal multi-head self-attention.
struct Attention {
    qkv: Linear,
    out: Linear,
}

impl Attention {
    fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            qkv: linear(DIM, 3 * DIM, vb.pp("qkv"))?,
            out: linear(DIM, DIM, vb.pp("out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let d = c / HEADS;
        let qkv = self.qkv.forward(x)?.reshape((b, t, 3, HEADS, d))?;
        let head = |i: usize| {
            qkv.narrow(2, i, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (head(0)?, head(1)?, head(2)?);
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
        // `ops::softmax` is composed from differentiable ops (unlike `softmax_last_dim`).
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let h = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        self.out.forward(&h)
    }
}

/// A two-layer GELU feed-forward block.
struct Ffn {
    fc1: Linear,
    fc2: Linear,
}

impl Ffn {
    fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(DIM, FFN, vb.pp("fc1"))?,
            fc2: linear(FFN, DIM, vb.pp("fc2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.gelu_erf()?)
    }
}

struct Layer {
    attn: Attention,
    attn_res: OmegaResidual,
    ffn: Ffn,
    ffn_res: OmegaResidual,
}

impl Layer {
    /// A candle-style forward: candle's `Result`, and `?` on the Admin calls.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.attn_res.forward_with(x, |z| self.attn.forward(z))?;
        Ok(self.ffn_res.forward_with(&h, |z| self.ffn.forward(z))?)
    }
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let spec = NormSpec {
        dim: DIM,
        eps: 1e-5,
        multiway: false,
    };
    // 2 layers × (attention + FFN) = 4 residual sublayers; ω = sqrt(5/ln 5 − 1) ≈ 1.451.
    // `.as_parameter(DIM)` makes ω a learnable per-channel vector; drop it for a fixed buffer.
    let admin = as_residual(2 * LAYERS).as_parameter(DIM);
    println!("admin omega at init: {:.6}", admin.omega_value()?);
    let mut layers = Vec::new();
    for l in 0..LAYERS {
        let vb = vb.pp(format!("layers.{l}"));
        layers.push(Layer {
            attn: Attention::new(vb.pp("attn"))?,
            attn_res: admin.build(spec, vb.pp("attn_ln"), vb.pp("attn_res"))?,
            ffn: Ffn::new(vb.pp("ffn"))?,
            ffn_res: admin.build(spec, vb.pp("ffn_ln"), vb.pp("ffn_res"))?,
        });
    }
    let head = linear(DIM, 1, vb.pp("head"))?;

    let x = Tensor::randn(0f32, 1.0, (2, 5, DIM), &dev)?;
    let target = Tensor::randn(0f32, 1.0, (2, 5, 1), &dev)?;
    let forward = || -> Result<Tensor> {
        let mut h = x.clone();
        for layer in &layers {
            h = layer.forward(&h)?;
        }
        let pred = head.forward(&h)?;
        Ok((pred - &target)?.sqr()?.mean_all()?)
    };

    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 1e-2,
            ..Default::default()
        },
    )?;
    let loss = forward()?;
    println!("loss before the step: {:.6}", loss.to_scalar::<f32>()?);
    opt.backward_step(&loss)?;
    let loss = forward()?;
    println!("loss after one AdamW step: {:.6}", loss.to_scalar::<f32>()?);
    let omega = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("varmap lock poisoned"))?
        .get("layers.0.attn_res.omega")
        .map(|v| v.as_tensor().mean_all()?.to_scalar::<f32>())
        .transpose()?;
    println!("mean omega of layer 0 attention after the step: {omega:?}");
    Ok(())
}
