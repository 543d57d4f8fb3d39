//! The `admin_residual` golden case: admin-torch's `OmegaResidual` in a Post-LN stack of
//! torchscale attention / FFN sublayers (FORMAT.md section 4.1).

use std::collections::HashMap;

use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use torchscale_admin::{Omega, OmegaResidual};
use torchscale_core::attention::{
    AttentionConfig, AttentionGains, AttentionInputs, MultiheadAttention,
};
use torchscale_core::ffn::{FeedForward, FfnConfig};
use torchscale_core::layer_norm::LayerNorm;
use torchscale_core::Multiway;
use torchscale_models::config::EncoderConfig;

use crate::golden::GoldenFile;

/// Runs the stack `x_{i+1} = LN_i(x_i·ω + f_i(x_i))` and returns every stored intermediate.
pub fn run(f: &GoldenFile, cfg: &EncoderConfig) -> Result<HashMap<String, Tensor>> {
    let vb = VarBuilder::from_tensors(f.weights(""), DType::F32, &Device::Cpu);
    let n = f.keys_with("expect.f_x.").len();
    if n == 0 {
        return Err(anyhow!("no expect.f_x.* tensors"));
    }
    let c = cfg.encoder_embed_dim;
    let mut x = f.get("input.x")?.clone();
    let mask = f.get("input.key_padding_mask")?;
    let mut out = HashMap::new();
    for i in 0..n {
        let sub = vb.pp("sublayers").pp(i);
        let fx = if sub.contains_tensor("q_proj.weight") {
            let acfg = AttentionConfig {
                embed_dim: c,
                num_heads: cfg.encoder_attention_heads,
                self_attention: true,
                inner_norm: false,
                xpos_scale_base: None,
                multiway: false,
                attention_dropout: 0.0,
                layernorm_eps: cfg.layernorm_eps,
            };
            let attn = MultiheadAttention::new(acfg, AttentionGains::default(), sub)?;
            let inputs = AttentionInputs {
                key_padding_mask: Some(mask),
                ..Default::default()
            };
            attn.forward(&x, &x, &inputs, None)?
        } else {
            let fcfg = FfnConfig {
                embed_dim: c,
                ffn_dim: cfg.encoder_ffn_embed_dim,
                activation: cfg.activation_fn,
                activation_dropout: 0.0,
                dropout: 0.0,
                inner_norm: false,
                layernorm_eps: cfg.layernorm_eps,
            };
            FeedForward::new(fcfg, 1.0, sub)?.forward(&x, false)?
        };
        let omega = Omega::buffer(f64::NAN, vb.pp("residuals").pp(i))?;
        let ln = LayerNorm::new(c, cfg.layernorm_eps, vb.pp("layer_norms").pp(i))?;
        let res = OmegaResidual::new(omega, Multiway::Single(ln));
        out.insert(format!("expect.x.{i}"), x.clone());
        out.insert(format!("expect.f_x.{i}"), fx.clone());
        out.insert(format!("expect.residual_out.{i}"), res.combine(&x, &fx)?);
        x = res.forward(&x, &mut |_| Ok(fx.clone()))?;
        out.insert(format!("expect.out.{i}"), x.clone());
    }
    out.insert("expect.output".into(), x);
    Ok(out)
}
