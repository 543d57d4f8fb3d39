//! The fixed inputs both sides run on: seeded tokens, padding masks and MoE uniforms.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};
use candle_core::{Device, Tensor};

use super::checkpoint::{Checkpoint, ModelConfig};

/// SplitMix64: a tiny seeded generator for tokens and uniforms (reproducible, no dependency).
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1) with 24 bits (exact in f32).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 40) as f64 / (1u64 << 24) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    /// Uniform integer in [lo, hi).
    pub fn below(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next_u64() % (hi - lo) as u64) as i64
    }
}

const BATCH: usize = 2;
const TGT_LEN: usize = 16;
const SRC_LEN: usize = 12;
const SRC_PAD: usize = 3;

/// Fixed inputs for a model: `input.prev_output_tokens` (decoders; starts with `</s>` = 2),
/// `input.src_tokens` and `input.encoder_padding_mask` (encoders; the second row ends with
/// padding), and `input.moe_uniform.<module>` for every top-2 random-policy MoE layer.
pub fn make_inputs(ck: &Checkpoint, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = SplitMix::new(seed);
    let mut out = HashMap::new();
    let (vocab, src_max, tgt_max) = match &ck.config {
        ModelConfig::Decoder(c) => (c.vocab_size, 0, c.max_target_positions),
        ModelConfig::Encoder(c) => (c.vocab_size, c.max_source_positions, 0),
        ModelConfig::EncoderDecoder(c) => {
            (c.vocab_size, c.max_source_positions, c.max_target_positions)
        }
    };
    if vocab <= 4 {
        bail!("vocab_size = {vocab}: the check draws tokens from [4, vocab)");
    }
    let dev = &Device::Cpu;
    if tgt_max > 0 {
        let t = TGT_LEN.min(tgt_max);
        let ids: Vec<i64> = (0..BATCH * t)
            .map(|i| if i % t == 0 { 2 } else { rng.below(4, vocab) })
            .collect();
        out.insert(
            "input.prev_output_tokens".into(),
            Tensor::from_vec(ids, (BATCH, t), dev)?,
        );
    }
    if src_max > 0 {
        let s = SRC_LEN.min(src_max);
        let pad = if s > SRC_PAD + 1 { SRC_PAD } else { 0 };
        let mut ids = Vec::with_capacity(BATCH * s);
        let mut mask = Vec::with_capacity(BATCH * s);
        for b in 0..BATCH {
            for t in 0..s {
                let padded = b == BATCH - 1 && t >= s - pad;
                ids.push(if padded { 1 } else { rng.below(4, vocab) });
                mask.push(padded as u8);
            }
        }
        out.insert(
            "input.src_tokens".into(),
            Tensor::from_vec(ids, (BATCH, s), dev)?,
        );
        out.insert(
            "input.encoder_padding_mask".into(),
            Tensor::from_vec(mask, (BATCH, s), dev)?,
        );
    }
    let tokens = match &ck.config {
        ModelConfig::Encoder(_) => out.get("input.src_tokens"),
        _ => out.get("input.prev_output_tokens"),
    }
    .map(|t| t.elem_count())
    .unwrap_or(0);
    for i in random_moe_layers(&ck.config) {
        let u: Vec<f32> = (0..tokens).map(|_| rng.uniform() as f32).collect();
        out.insert(
            format!("input.moe_uniform.layers.{i}.moe_layer"),
            Tensor::from_vec(u, tokens, dev)?,
        );
    }
    Ok(out)
}

/// The layers whose MoE gate draws uniforms in eval mode (top-2, random second-expert policy).
pub(super) fn random_moe_layers(config: &ModelConfig) -> Vec<usize> {
    let (layers, freq, experts, top1, policy) = match config {
        ModelConfig::Decoder(c) => (
            c.decoder_layers,
            c.moe_freq,
            c.moe_expert_count,
            c.moe_top1_expert,
            c.moe_second_expert_policy.as_str(),
        ),
        ModelConfig::Encoder(c) => (
            c.encoder_layers,
            c.moe_freq,
            c.moe_expert_count,
            c.moe_top1_expert,
            c.moe_second_expert_policy.as_str(),
        ),
        ModelConfig::EncoderDecoder(c) => (
            c.encoder_layers.max(c.decoder_layers),
            c.moe_freq,
            c.moe_expert_count,
            c.moe_top1_expert,
            c.moe_second_expert_policy.as_str(),
        ),
    };
    if freq == 0 || experts == 0 || top1 || policy != "random" {
        return vec![];
    }
    (0..layers).filter(|i| (i + 1) % freq == 0).collect()
}

/// The per-layer uniforms of `inputs` (`None` where a layer draws none).
pub(super) fn uniforms(inputs: &HashMap<String, Tensor>, layers: usize) -> Vec<Option<Tensor>> {
    (0..layers)
        .map(|i| {
            inputs
                .get(&format!("input.moe_uniform.layers.{i}.moe_layer"))
                .cloned()
        })
        .collect()
}

/// The input `key`, or an error naming it.
pub(super) fn input<'a>(inputs: &'a HashMap<String, Tensor>, key: &str) -> Result<&'a Tensor> {
    inputs
        .get(key)
        .ok_or_else(|| anyhow!("inputs have no `{key}`"))
}
