//! A sublayer kind the crate does not know (a causal mean-pooling, retention-like token mixer)
//! goes into a decoder through the public API alone: a `Sublayer` impl, a site hook that adds
//! its site with the layer's stabiliser, and `LanguageModel::with_build_options`. The model
//! trains with the stock `Trainer`, every parameter gets a gradient, and its checkpoint
//! reloads with the same hooks.

mod common;

use std::any::Any;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::Linear;
use common::assert_all_grads;
use torchscale_core::linear::{apply, linear};
use torchscale_core::{Ctx, Error, Result, Site, Sublayer};
use torchscale_models::build::{BuildOptions, StackHooks};
use torchscale_models::config::DecoderConfig;
use torchscale_models::data::{ByteCorpus, BYTE_VOCAB};
use torchscale_models::decoder::DecoderInputs;
use torchscale_models::layer::SiteBlock;
use torchscale_models::lm::{LanguageModel, LossConfig};
use torchscale_models::train::{
    AdamWConfig, ClipMode, InverseSqrt, Schedule, Trainer, TrainerConfig,
};

/// `y_t = mean_{s <= t} W x_s + b`: each position mixes in the running mean of the earlier
/// ones, a stand-in for a retention block.
#[derive(Debug)]
struct CausalMean {
    proj: Linear,
}

impl Sublayer for CausalMean {
    fn forward(&self, x: &Tensor, _ctx: &mut Ctx) -> Result<Tensor> {
        let h = apply(&self.proj, x)?;
        let t = h.dim(1)?;
        let counts = Tensor::arange(1u32, t as u32 + 1, h.device())?
            .to_dtype(h.dtype())?
            .reshape((1, t, 1))?;
        Ok(h.cumsum(1)?.broadcast_div(&counts)?)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Adds a `retention` site after self-attention in every layer, wired by the layer's own
/// stabiliser (its LayerNorm is `retention_layer_norm`).
fn hooks() -> StackHooks {
    StackHooks::default().with_sites(|cx, mut sites| {
        let c = cx.spec.embed_dim;
        let mixer = CausalMean {
            proj: linear(c, c, true, 1.0, cx.vb.pp("retention").pp("proj"))?,
        };
        let site = SiteBlock::new(
            "retention",
            cx.residual(Site::Custom("retention_layer_norm"))?,
            Box::new(mixer),
        )
        .with_dropout(cx.spec.dropout)
        .with_drop_path(cx.drop_path());
        let at = sites
            .iter()
            .position(|s| s.name() == "self_attn")
            .map_or(0, |i| i + 1);
        sites.insert(at, site);
        Ok(sites)
    })
}

fn options() -> BuildOptions {
    BuildOptions {
        hooks: hooks(),
        ..Default::default()
    }
}

fn config() -> DecoderConfig {
    DecoderConfig::default()
        .with_vocab_size(BYTE_VOCAB as i64)
        .with_embed_dim(32)
        .with_heads(2)
        .with_ffn_dim(64)
        .with_layers(2)
        .with_max_positions(64)
        .with_dropout(0.1)
}

fn model(seed: u64) -> LanguageModel {
    LanguageModel::with_build_options(config(), &options(), seed, &Device::Cpu, DType::F32).unwrap()
}

fn corpus() -> ByteCorpus {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/kjv.txt");
    ByteCorpus::from_file(&path, 0.05).unwrap()
}

#[test]
fn the_site_is_built_with_the_layer_stabiliser() {
    let lm = model(0);
    for (i, layer) in lm.model.layers().iter().enumerate() {
        let names: Vec<&str> = layer.sites().iter().map(|s| s.name()).collect();
        assert_eq!(names, ["self_attn", "retention", "ffn"]);
        assert!(layer.sublayer::<CausalMean>("retention").is_some());
        for key in ["retention.proj.weight", "retention_layer_norm.weight"] {
            assert!(
                lm.store.get(&format!("layers.{i}.{key}")).is_some(),
                "{key}"
            );
        }
    }
    // The stock accessors still find torchscale's sublayers.
    assert!(lm.model.layers()[0].self_attn().is_some() && lm.model.layers()[0].ffn().is_some());
}

#[test]
fn the_stack_stays_causal() {
    let lm = model(1);
    let a = Tensor::new(&[[2u32, 40, 41, 42, 43, 44]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[[2u32, 40, 41, 99, 98, 97]], &Device::Cpu).unwrap();
    let la = lm.model.forward(&a, &DecoderInputs::default()).unwrap().x;
    let lb = lm.model.forward(&b, &DecoderInputs::default()).unwrap().x;
    let diff = |t: usize| {
        (la.narrow(1, t, 1).unwrap() - lb.narrow(1, t, 1).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_eq!(diff(0) + diff(1) + diff(2), 0.0);
    assert!(diff(3) > 0.0);
}

#[test]
fn trains_with_every_parameter_receiving_a_gradient() {
    let data = corpus();
    let lm = model(2);
    let (i, t) = data.train_batch(4, 32, 7, &Device::Cpu).unwrap();
    let mb = lm
        .micro_batch(&i, &t, true, &LossConfig::default(), 7)
        .unwrap();
    assert_all_grads(&lm.store, &mb.loss_sum, &["k_proj.bias"]);

    let mut trainer = Trainer::new(
        &lm.store,
        &lm.model.expert_parameters(),
        TrainerConfig {
            seed: 3,
            clip: ClipMode::GlobalNorm(1.0),
            max_consecutive_skips: 3,
        },
        AdamWConfig {
            lr: 3e-3,
            ..AdamWConfig::default()
        },
        Schedule::InverseSqrt(InverseSqrt::new(3e-3, 4)),
    )
    .unwrap();
    let losses: Vec<f64> = (0..16)
        .map(|_| {
            trainer
                .step(1, |ctx| {
                    let (i, t) = data.train_batch(4, 32, ctx.seed, &Device::Cpu)?;
                    lm.micro_batch(&i, &t, true, &LossConfig::default(), ctx.seed)
                })
                .unwrap()
                .nll
        })
        .collect();
    let tail = losses[13..].iter().sum::<f64>() / 3.0;
    assert!(tail < losses[0] - 0.5, "{losses:?}");
}

#[test]
fn checkpoint_reloads_with_the_same_hooks() {
    let lm = model(4);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    lm.save(&dir, None).unwrap();
    let (back, _) = LanguageModel::load_with(&dir, &options()).unwrap();
    let toks = Tensor::new(&[[2u32, 40, 41, 42]], &Device::Cpu).unwrap();
    let a = lm
        .model
        .forward(&toks, &DecoderInputs::default())
        .unwrap()
        .x;
    let b = back
        .model
        .forward(&toks, &DecoderInputs::default())
        .unwrap()
        .x;
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
    // Without the hook the file holds tensors the plain model has no place for.
    match LanguageModel::load(&dir) {
        Err(Error::UnexpectedTensor { key }) => assert!(key.contains("retention"), "{key}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
}
