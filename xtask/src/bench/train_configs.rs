//! The configurations of `cargo xtask bench train` and the Rust side's measurement of one of them.
//!
//! The three large configurations and their step definitions are those of
//! `../shared/ref/bench_torch.py`; `deep` is the 48 x 64 byte-level decoder of
//! `cargo xtask stability` (where per-op overhead, not FLOPs, sets the pace).

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};
use torchscale_core::init::{seeded_rng, ParamStore, SeededRng};
use torchscale_models::config::{DecoderConfig, EncoderConfig};
use torchscale_models::lm::{LanguageModel, LossConfig};
use torchscale_models::train::{AdamW, AdamWConfig};
use torchscale_models::{BuildOptions, DecoderInputs, Encoder, EncoderInputs};

use super::median;

/// One benchmark configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrainConfig {
    /// (a) Magneto (Sub-LN) decoder LM, 6 x 512, 8 heads, FFN 2048, vocab 32000, batch 8 x 256.
    MagnetoLm,
    /// (b) The same with X-MoE top-2, 8 experts, every other layer.
    MagnetoXmoe,
    /// (c) DeepNorm encoder, 12 x 256, 4 heads, FFN 1024, batch 16 x 128, features only,
    /// forward + backward of `mean(out * w)`, no optimizer.
    DeepnormEncoder,
    /// (d) Magneto decoder LM, 48 x 64, 4 heads, FFN 256, byte vocabulary (260), batch 8 x 32.
    DeepNarrow,
    /// A tiny decoder (2 x 32, batch 2 x 16) for the `--quick` smoke test.
    Quick,
}

impl TrainConfig {
    /// The full benchmark's configurations, in table order.
    pub const FULL: [TrainConfig; 4] = [
        TrainConfig::MagnetoLm,
        TrainConfig::MagnetoXmoe,
        TrainConfig::DeepnormEncoder,
        TrainConfig::DeepNarrow,
    ];

    /// The short name used on the command line and by the PyTorch driver.
    pub fn key(self) -> &'static str {
        match self {
            TrainConfig::MagnetoLm => "a",
            TrainConfig::MagnetoXmoe => "b",
            TrainConfig::DeepnormEncoder => "c",
            TrainConfig::DeepNarrow => "d",
            TrainConfig::Quick => "quick",
        }
    }

    /// Parses [`TrainConfig::key`].
    pub fn from_key(s: &str) -> Result<Self> {
        Ok(match s {
            "a" => TrainConfig::MagnetoLm,
            "b" => TrainConfig::MagnetoXmoe,
            "c" => TrainConfig::DeepnormEncoder,
            "d" => TrainConfig::DeepNarrow,
            "quick" => TrainConfig::Quick,
            other => bail!("unknown config `{other}` (a, b, c, d, quick)"),
        })
    }

    /// A one-line description for tables.
    pub fn describe(self) -> &'static str {
        match self {
            TrainConfig::MagnetoLm => "Magneto decoder LM 6 x 512, vocab 32k, batch 8 x 256",
            TrainConfig::MagnetoXmoe => "same + X-MoE top-2, 8 experts, every other layer",
            TrainConfig::DeepnormEncoder => "DeepNorm encoder 12 x 256, batch 16 x 128",
            TrainConfig::DeepNarrow => "Magneto decoder LM 48 x 64, byte vocab, batch 8 x 32",
            TrainConfig::Quick => "quick: decoder 2 x 32, batch 2 x 16",
        }
    }

    /// Whether the timed step ends with an optimizer update (the encoder's does not).
    pub fn has_optimizer(self) -> bool {
        self != TrainConfig::DeepnormEncoder
    }

    fn decoder(self) -> Option<(DecoderConfig, usize, usize)> {
        let base = |layers, dim, heads, ffn, vocab: usize| {
            DecoderConfig::new()
                .with_vocab_size(vocab as i64)
                .with_embed_dim(dim)
                .with_heads(heads)
                .with_ffn_dim(ffn)
                .with_layers(layers)
                .with_max_positions(1024)
                .with_dropout(0.0)
                .with_attention_dropout(0.0)
                .with_activation_dropout(0.0)
        };
        match self {
            TrainConfig::MagnetoLm => Some((base(6, 512, 8, 2048, 32000), 8, 256)),
            TrainConfig::MagnetoXmoe => Some((
                base(6, 512, 8, 2048, 32000).with_xmoe(true).with_moe(2, 8),
                8,
                256,
            )),
            TrainConfig::DeepNarrow => Some((base(48, 64, 4, 256, 260), 8, 32)),
            TrainConfig::Quick => Some((base(2, 32, 2, 64, 260), 2, 16)),
            TrainConfig::DeepnormEncoder => None,
        }
    }
}

/// Median seconds of each part of a step, and the process's peak memory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Measurement {
    /// Configuration key.
    pub config: String,
    /// Inference forward (evaluation mode); absent for the encoder.
    pub forward: Option<f64>,
    /// Training forward plus loss.
    pub train_forward: f64,
    /// Backward pass.
    pub train_backward: f64,
    /// Optimizer update (absent for the encoder).
    pub train_optimizer: Option<f64>,
    /// The whole step (median of the per-step sums).
    pub train_step: f64,
    /// The last step's loss (a sanity value: finite, near ln V at init).
    pub loss: f64,
    /// Tokens per step.
    pub tokens: usize,
    /// Peak resident memory of the process (VmHWM), bytes.
    pub peak_rss_bytes: u64,
}

/// Peak resident set size of this process (`VmHWM` in `/proc/self/status`), 0 if unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn random_ids(rng: &mut SeededRng, b: usize, t: usize, vocab: usize) -> Result<Tensor> {
    let v: Vec<u32> = (0..b * t)
        .map(|_| rng.random_range(4..vocab as u32))
        .collect();
    Ok(Tensor::from_vec(v, (b, t), &Device::Cpu)?)
}

#[derive(Default)]
struct Parts {
    forward: Vec<f64>,
    train_forward: Vec<f64>,
    backward: Vec<f64>,
    optimizer: Vec<f64>,
    step: Vec<f64>,
    loss: f64,
}

/// Builds `config`, runs `warmup` untimed steps, then times `steps` steps (medians reported).
pub fn measure(config: TrainConfig, warmup: usize, steps: usize) -> Result<Measurement> {
    let mut rng = seeded_rng(0, 0);
    let mut parts = Parts::default();
    let tokens;
    if let Some((cfg, b, t)) = config.decoder() {
        tokens = b * t;
        let vocab = cfg.vocab_size as usize;
        let lm = LanguageModel::new(cfg, 0)?;
        let input = random_ids(&mut rng, b, t, vocab)?;
        let target = random_ids(&mut rng, b, t, vocab)?;
        for i in 0..warmup + steps {
            let t0 = Instant::now();
            let out = lm.model.forward(&input, &DecoderInputs::default())?;
            std::hint::black_box(&out.x);
            drop(out);
            if i >= warmup {
                parts.forward.push(t0.elapsed().as_secs_f64());
            }
        }
        let mut opt = AdamW::new(
            lm.store.named_vars(),
            AdamWConfig {
                lr: 1e-4,
                ..Default::default()
            },
        )?;
        let loss_cfg = LossConfig {
            label_smoothing: 0.0,
            moe_loss_weight: 0.01,
        };
        for i in 0..warmup + steps {
            let t0 = Instant::now();
            let mb = lm.micro_batch(&input, &target, true, &loss_cfg, i as u64)?;
            // A mean over tokens, as F.cross_entropy's default reduction.
            let loss = (&mb.loss_sum / mb.ntokens as f64)?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            let t2 = Instant::now();
            opt.step(&grads)?;
            parts.loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            drop(grads);
            drop(loss);
            drop(mb);
            let t3 = Instant::now();
            if i >= warmup {
                parts.train_forward.push((t1 - t0).as_secs_f64());
                parts.backward.push((t2 - t1).as_secs_f64());
                parts.optimizer.push((t3 - t2).as_secs_f64());
                parts.step.push((t3 - t0).as_secs_f64());
            }
        }
    } else {
        let (b, t) = (16, 128);
        tokens = b * t;
        let cfg = EncoderConfig::new()
            .with_vocab_size(32000)
            .with_embed_dim(256)
            .with_heads(4)
            .with_ffn_dim(1024)
            .with_layers(12)
            .with_deepnorm(true)
            .with_max_positions(1024)
            .with_dropout(0.0)
            .with_attention_dropout(0.0)
            .with_activation_dropout(0.0)
            .with_no_output_layer(true);
        let store = ParamStore::new(0);
        let opts = BuildOptions {
            learned_positions: Some(true),
            ..Default::default()
        };
        let enc = Encoder::new(&cfg, &opts, store.var_builder(DType::F32, &Device::Cpu))?;
        let toks = random_ids(&mut rng, b, t, 32000)?;
        // Fixed loss weights, seeded like the model (candle's own generator cannot be seeded).
        let w = ParamStore::new(1)
            .var_builder(DType::F32, &Device::Cpu)
            .get_with_hints(
                (b, t, 256),
                "w",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?
            .detach();
        let inp = EncoderInputs {
            train: true,
            ..Default::default()
        };
        for i in 0..warmup + steps {
            let t0 = Instant::now();
            let out = enc.forward(&toks, &inp)?;
            let loss = (&out.encoder_out * &w)?.mean_all()?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            parts.loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            drop(grads);
            drop(loss);
            drop(out);
            let t2 = Instant::now();
            if i >= warmup {
                parts.train_forward.push((t1 - t0).as_secs_f64());
                parts.backward.push((t2 - t1).as_secs_f64());
                parts.step.push((t2 - t0).as_secs_f64());
            }
        }
    }
    let opt_med = |v: &mut Vec<f64>| (!v.is_empty()).then(|| median(v));
    Ok(Measurement {
        config: config.key().to_string(),
        forward: opt_med(&mut parts.forward),
        train_forward: median(&mut parts.train_forward),
        train_backward: median(&mut parts.backward),
        train_optimizer: opt_med(&mut parts.optimizer),
        train_step: median(&mut parts.step),
        loss: parts.loss,
        tokens,
        peak_rss_bytes: peak_rss_bytes(),
    })
}
