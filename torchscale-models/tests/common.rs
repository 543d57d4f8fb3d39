//! Shared helpers of the integration tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use torchscale_core::init::ParamStore;
use torchscale_models::config::{DecoderConfig, EncoderConfig, EncoderDecoderConfig};

pub fn store(seed: u64) -> (ParamStore, candle_nn::VarBuilder<'static>) {
    let s = ParamStore::new(seed);
    let vb = s.var_builder(DType::F32, &Device::Cpu);
    (s, vb)
}

pub fn tiny_encoder() -> EncoderConfig {
    EncoderConfig::new()
        .with_embed_dim(16)
        .with_heads(2)
        .with_ffn_dim(32)
        .with_layers(2)
        .with_vocab_size(20)
}

pub fn tiny_decoder() -> DecoderConfig {
    DecoderConfig::new()
        .with_embed_dim(16)
        .with_heads(2)
        .with_ffn_dim(32)
        .with_layers(2)
        .with_vocab_size(20)
}

pub fn tiny_encoder_decoder() -> EncoderDecoderConfig {
    EncoderDecoderConfig::new()
        .with_embed_dim(16)
        .with_heads(2)
        .with_ffn_dim(32)
        .with_layers(2, 2)
        .with_vocab_size(20)
}

/// `[B, T]` ids in `[4, vocab)`, deterministic.
pub fn tokens(b: usize, t: usize, vocab: u32) -> Tensor {
    let v: Vec<u32> = (0..b * t)
        .map(|i| 4 + (i as u32 * 7 + 3) % (vocab - 4))
        .collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

/// A loss that depends on every output element with distinct weights.
pub fn weighted_sum(x: &Tensor) -> Tensor {
    let n = x.elem_count();
    let w: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.4)
        .collect();
    let w = Tensor::from_vec(w, x.shape(), x.device()).unwrap();
    (x * w).unwrap().sum_all().unwrap()
}

/// Every parameter of `store` has a gradient with a nonzero entry, except names matching `allowed_zero`.
pub fn assert_all_grads(store: &ParamStore, loss: &Tensor, allowed_zero: &[&str]) {
    let grads = loss.backward().unwrap();
    let mut missing = Vec::new();
    for (name, var) in store.named_vars() {
        match grads.get(var.as_tensor()) {
            None => missing.push(format!("{name} (no gradient)")),
            Some(g) => {
                let m = g
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                if m.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
                    && !allowed_zero.iter().any(|a| name.contains(a))
                {
                    missing.push(format!("{name} (all zero)"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "parameters without gradient: {missing:?}"
    );
}
