//! Training with the fused kernels gives the composed path's losses: the same seeds, batches,
//! dropout masks and MoE draws, step by step, for a Magneto (Sub-LN) decoder with dropout, a
//! DeepNorm decoder and an X-MoE decoder with SparseClip.

use std::path::Path;

use candle_core::Device;
use torchscale_kernels::with_fused;
use torchscale_models::config::DecoderConfig;
use torchscale_models::data::{ByteCorpus, BYTE_VOCAB};
use torchscale_models::lm::{LanguageModel, LossConfig};
use torchscale_models::train::{
    AdamWConfig, ClipMode, InverseSqrt, Schedule, Trainer, TrainerConfig,
};

fn corpus() -> ByteCorpus {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/kjv.txt");
    ByteCorpus::from_file(&path, 0.05).unwrap()
}

fn base() -> DecoderConfig {
    DecoderConfig::default()
        .with_vocab_size(BYTE_VOCAB as i64)
        .with_embed_dim(32)
        .with_heads(2)
        .with_ffn_dim(64)
        .with_layers(2)
        .with_max_positions(64)
}

/// Per-step (nll, grad norm, clip coefficient) of `steps` steps from a fresh model.
fn losses(cfg: &DecoderConfig, moe: bool, steps: usize, fused: bool) -> Vec<(f64, f64, f64)> {
    with_fused(fused, || {
        let data = corpus();
        let lm = LanguageModel::new(cfg.clone(), 7).unwrap();
        let clip = if moe {
            ClipMode::SparseClip {
                max_norm: 1.0,
                num_experts: 2,
            }
        } else {
            ClipMode::GlobalNorm(1.0)
        };
        let mut t = Trainer::new(
            &lm.store,
            &lm.model.expert_parameters(),
            TrainerConfig {
                seed: 3,
                clip,
                max_consecutive_skips: 1,
            },
            AdamWConfig {
                lr: 3e-3,
                weight_decay: 0.01,
                ..AdamWConfig::default()
            },
            Schedule::InverseSqrt(InverseSqrt::new(3e-3, 4)),
        )
        .unwrap();
        let loss = LossConfig {
            label_smoothing: 0.1,
            moe_loss_weight: 0.01,
        };
        (0..steps)
            .map(|_| {
                let r = t
                    .step(2, |ctx| {
                        let (i, tg) = data.train_batch(4, 32, ctx.seed, &Device::Cpu)?;
                        lm.micro_batch(&i, &tg, true, &loss, ctx.seed)
                    })
                    .unwrap();
                (r.nll, r.grad_norm, r.clip_coef)
            })
            .collect()
    })
}

fn same_run(name: &str, cfg: DecoderConfig, moe: bool) {
    let steps = 6;
    let fused = losses(&cfg, moe, steps, true);
    let composed = losses(&cfg, moe, steps, false);
    for (s, (f, c)) in fused.iter().zip(&composed).enumerate() {
        for (what, a, b) in [
            ("nll", f.0, c.0),
            ("grad norm", f.1, c.1),
            ("clip", f.2, c.2),
        ] {
            assert!(
                a.is_finite() && (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{name} step {s} {what}: fused {a} vs composed {b}"
            );
        }
    }
    // The runs train: the last loss is below the first.
    assert!(fused[steps - 1].0 < fused[0].0, "{name}: {fused:?}");
}

#[test]
fn magneto_with_dropout() {
    let cfg = base()
        .with_subln(true)
        .with_dropout(0.1)
        .with_attention_dropout(0.1)
        .with_activation_dropout(0.1);
    same_run("magneto", cfg, false);
}

#[test]
fn deepnorm() {
    same_run("deepnorm", base().with_deepnorm(true), false);
}

#[test]
fn xmoe_sparse_clip() {
    same_run(
        "xmoe",
        base().with_subln(true).with_moe(2, 2).with_xmoe(true),
        true,
    );
}
