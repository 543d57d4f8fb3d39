//! Activation checkpointing gives the plain run's loss and gradients: every parameter, dense and
//! MoE (X-MoE top-2 whose `random` second-expert policy draws), dropout on, Pre-LN, Sub-LN,
//! DeepNorm and Post-LN, segments of 1 layer and of 3 over a depth that 3 does not divide;
//! through the trainer; and on a decoder with an encoder output (the memory's gradient).

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use common::{tokens, weighted_sum};
use torchscale_core::Error;
use torchscale_models::build::BuildOptions;
use torchscale_models::config::{DecoderConfig, EncoderDecoderConfig, Technique};
use torchscale_models::decoder::{DecoderInputs, Memory};
use torchscale_models::encoder::EncoderInputs;
use torchscale_models::encoder_decoder::EncoderDecoder;
use torchscale_models::lm::{LanguageModel, LossConfig};
use torchscale_models::train::{AdamWConfig, ClipMode, HeadLoss, Schedule, Trainer, TrainerConfig};

/// Checkpointed gradients may differ from the plain ones by this much, relative to the largest
/// plain gradient entry (the sums run in another order).
const TOL: f64 = 1e-5;
const VOCAB: u32 = 40;

fn base(layers: usize) -> DecoderConfig {
    DecoderConfig::default()
        .with_vocab_size(VOCAB as i64)
        .with_embed_dim(16)
        .with_heads(2)
        .with_ffn_dim(32)
        .with_layers(layers)
        .with_dropout(0.1)
        .with_attention_dropout(0.1)
        .with_activation_dropout(0.1)
}

fn moe(layers: usize) -> DecoderConfig {
    base(layers)
        .with_moe(1, 4)
        .with_xmoe(true)
        .with_moe_second_expert_policy("random")
}

fn batch() -> (Tensor, Tensor) {
    let input = tokens(3, 7, VOCAB);
    let target = tokens(3, 8, VOCAB).narrow(1, 1, 7).unwrap();
    (input, target)
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// The largest entry of `a - b` over every parameter, relative to the largest entry of `a`; both
/// stores must hold a gradient for the same parameters.
fn relative_diff(lm: &LanguageModel, a: &GradStore, b: &GradStore) -> f64 {
    let (mut diff, mut scale) = (0f64, 0f64);
    for (name, v) in lm.store.named_vars() {
        match (a.get(&v), b.get(&v)) {
            (Some(ga), Some(gb)) => {
                diff = diff.max(max_abs(&(ga - gb).unwrap()));
                scale = scale.max(max_abs(ga));
            }
            (None, None) => {}
            (x, y) => panic!(
                "{name}: plain gradient {}, checkpointed {}",
                x.is_some(),
                y.is_some()
            ),
        }
    }
    assert!(scale > 0.0);
    diff / scale
}

/// Plain and checkpointed gradients of one training micro-batch (seeded `seed`).
fn both(lm: &LanguageModel, k: usize, seed: u64) -> (GradStore, GradStore) {
    let (input, target) = batch();
    let loss = LossConfig::default();
    let plain = lm.micro_batch(&input, &target, true, &loss, seed).unwrap();
    let plain_grads = plain.loss_sum.backward().unwrap();
    let ck = lm
        .micro_batch_checkpointed(&input, &target, true, &loss, seed, k)
        .unwrap();
    let (a, b) = (scalar(&plain.loss_sum), scalar(&ck.loss_sum));
    assert!((a - b).abs() <= 1e-6 * a.abs(), "loss {a} vs {b}");
    // Not bit-equal: X-MoE's per-call rescale of its gate's rows moves them by an ulp.
    let (a, b) = (plain.nll_sum, ck.nll_sum);
    assert!((a - b).abs() <= 1e-6 * a.abs(), "nll {a} vs {b}");
    assert_eq!(plain.ntokens, ck.ntokens);
    let ck_grads = std::sync::Arc::try_unwrap(ck.grads.expect("precomputed gradients")).unwrap();
    // Detached: a gradient still in the graph would keep its segment's activations alive.
    for (name, v) in lm.store.named_vars() {
        if let Some(g) = ck_grads.get(&v) {
            assert!(!g.track_op(), "{name}'s gradient holds a graph");
        }
    }
    assert!(!ck.loss_sum.track_op());
    // Only parameters: candle's store also holds the gradients of untracked operands (dropout
    // masks), activation-sized, which must not be carried along.
    assert_eq!(ck_grads.get_ids().count(), lm.store.named_vars().len());
    // Every parameter is trained: a checkpointed run that lost one would pass the comparison.
    assert_eq!(
        lm.store
            .named_vars()
            .iter()
            .filter(|(_, v)| plain_grads.get(v).is_none())
            .count(),
        0
    );
    (plain_grads, ck_grads)
}

/// Checks every k on `cfg` and returns the largest relative difference seen.
fn check(what: &str, cfg: DecoderConfig, ks: &[usize]) -> f64 {
    let lm = LanguageModel::new(cfg, 5).unwrap();
    let mut worst = 0f64;
    for &k in ks {
        let (plain, ck) = both(&lm, k, 17);
        let d = relative_diff(&lm, &plain, &ck);
        eprintln!("{what}, {k} layer(s) per segment: max |grad diff| / max |grad| = {d:.2e}");
        assert!(d <= TOL, "{what} k={k}: {d:e}");
        worst = worst.max(d);
    }
    // The draws matter: another seed moves the gradients far beyond the tolerance, so the
    // equality above needs the recomputation to repeat the forward's draws.
    let (plain, _) = both(&lm, 1, 17);
    let (other, _) = both(&lm, 1, 18);
    assert!(relative_diff(&lm, &plain, &other) > 100.0 * TOL, "{what}");
    worst
}

#[test]
fn dense_pre_ln_with_dropout() {
    check("dense Pre-LN", base(5), &[1, 3, 5, 8]);
}

#[test]
fn moe_xmoe_top2_random_with_dropout() {
    check("X-MoE top-2 random", moe(5), &[1, 3]);
}

#[test]
fn moe_router_draws_alone_are_repeated() {
    // No dropout at all: only the routers' second-expert draws differ between seeds.
    let cfg = moe(4)
        .with_dropout(0.0)
        .with_attention_dropout(0.0)
        .with_activation_dropout(0.0);
    check("X-MoE top-2 random, no dropout", cfg, &[3]);
}

#[test]
fn sub_ln_deepnorm_and_post_ln() {
    check("Sub-LN", base(4).with_subln(true), &[1, 3]);
    check("DeepNorm", base(4).with_deepnorm(true), &[1, 3]);
    check("Post-LN", base(4).with_technique(Technique::PostLn), &[3]);
}

#[test]
fn shared_embeddings_and_relative_positions() {
    // Parameters used at several places (the tied embedding, the relative position bias of every
    // layer) collect their gradient from every segment.
    let cfg = base(3)
        .with_share_input_output_embed(true)
        .with_rel_pos(8, 16);
    check("tied embeddings, relative positions", cfg, &[2]);
}

#[test]
fn zero_layers_per_segment_is_a_config_error() {
    let lm = LanguageModel::new(base(2), 1).unwrap();
    let (input, target) = batch();
    let e = lm
        .micro_batch_checkpointed(&input, &target, true, &LossConfig::default(), 1, 0)
        .unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e}");
}

#[test]
fn evaluation_mode_matches_too() {
    let lm = LanguageModel::new(base(3), 2).unwrap();
    let (input, target) = batch();
    let loss = LossConfig::default();
    let plain = lm.micro_batch(&input, &target, false, &loss, 0).unwrap();
    let pg = plain.loss_sum.backward().unwrap();
    let ck = lm
        .micro_batch_checkpointed(&input, &target, false, &loss, 0, 2)
        .unwrap();
    assert_eq!(scalar(&plain.loss_sum), scalar(&ck.loss_sum));
    assert!(relative_diff(&lm, &pg, ck.grads.as_ref().unwrap()) <= TOL);
}

#[test]
fn trainer_steps_match() {
    let run = |checkpointed: bool| {
        let lm = LanguageModel::new(moe(3), 9).unwrap();
        let mut t = Trainer::new(
            &lm.store,
            &lm.model.expert_parameters(),
            TrainerConfig {
                seed: 3,
                clip: ClipMode::GlobalNorm(1.0),
                max_consecutive_skips: 2,
            },
            AdamWConfig {
                lr: 1e-3,
                ..AdamWConfig::default()
            },
            Schedule::Constant(1e-3),
        )
        .unwrap();
        let (input, target) = batch();
        (0..3)
            .map(|_| {
                let r = t
                    .step(2, |ctx| {
                        let loss = LossConfig::default();
                        if checkpointed {
                            lm.micro_batch_checkpointed(&input, &target, true, &loss, ctx.seed, 2)
                        } else {
                            lm.micro_batch(&input, &target, true, &loss, ctx.seed)
                        }
                    })
                    .unwrap();
                assert_eq!(r.skipped, None);
                (r.nll, r.grad_norm)
            })
            .collect::<Vec<_>>()
    };
    let (plain, ck) = (run(false), run(true));
    for ((n0, g0), (n1, g1)) in plain.iter().zip(&ck) {
        assert!((n0 - n1).abs() <= 1e-5 * n0, "nll {n0} vs {n1}");
        assert!((g0 - g1).abs() <= 1e-4 * g0, "grad norm {g0} vs {g1}");
    }
}

fn with_memory<'a>(enc: &'a Tensor, pad: &'a Tensor) -> DecoderInputs<'a> {
    DecoderInputs {
        memory: Some(Memory {
            encoder_out: enc,
            padding_mask: Some(pad),
        }),
        train: true,
        ..Default::default()
    }
}

#[test]
fn decoder_with_encoder_output() {
    let store = torchscale_core::init::ParamStore::new(4);
    let cfg = EncoderDecoderConfig::new()
        .with_embed_dim(16)
        .with_heads(2)
        .with_ffn_dim(32)
        .with_layers(2, 3)
        .with_vocab_size(VOCAB as i64)
        .with_dropout(0.1);
    let m = EncoderDecoder::new(
        &cfg,
        &BuildOptions::default(),
        store.var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    let src = tokens(2, 5, VOCAB);
    let pad = Tensor::from_vec(vec![0u8, 0, 0, 0, 0, 0, 0, 0, 1, 1], (2, 5), &Device::Cpu).unwrap();
    let prev = tokens(2, 6, VOCAB);
    let encode = || {
        m.encoder
            .forward(
                &src,
                &EncoderInputs {
                    padding_mask: Some(&pad),
                    train: true,
                    ..Default::default()
                },
            )
            .unwrap()
            .encoder_out
    };
    // Plain: the encoder and the decoder in one graph.
    m.reseed(8);
    let enc = encode();
    m.decoder.reseed(21);
    let out = m.decoder.forward(&prev, &with_memory(&enc, &pad)).unwrap();
    let plain = weighted_sum(&out.x).backward().unwrap();
    // Checkpointed decoder, then the encoder's backward from the memory's gradient.
    m.reseed(8);
    let enc = encode();
    let ck = m
        .decoder
        .backward_checkpointed(&prev, &with_memory(&enc, &pad), 2, 21, |logits, _| {
            Ok(HeadLoss {
                loss: weighted_sum(logits),
                aux_weight: 0.0,
            })
        })
        .unwrap();
    let mut grads = ck.grads;
    let mg = ck.memory_grad.expect("the memory's gradient");
    assert!(!mg.track_op());
    grads
        .extend((enc * mg).unwrap().sum_all().unwrap().backward().unwrap())
        .unwrap();
    let (mut diff, mut scale) = (0f64, 0f64);
    for (name, v) in store.named_vars() {
        let a = plain.get(&v).unwrap_or_else(|| panic!("{name}"));
        let b = grads.get(&v).unwrap_or_else(|| panic!("{name}"));
        diff = diff.max(max_abs(&(a - b).unwrap()));
        scale = scale.max(max_abs(a));
    }
    eprintln!(
        "encoder-decoder: max |grad diff| / max |grad| = {:.2e}",
        diff / scale
    );
    assert!(diff <= TOL * scale);
}

#[test]
fn bad_inputs_fail_as_in_the_plain_call() {
    let lm = LanguageModel::new(base(2), 1).unwrap();
    let (input, target) = batch();
    let loss = LossConfig::default();
    let out_of_range = Tensor::new(&[[2u32, VOCAB + 5, 3]], &Device::Cpu).unwrap();
    let cases = [
        (input.clone(), target.narrow(1, 0, 5).unwrap()),
        (out_of_range.clone(), out_of_range.ones_like().unwrap()),
        (input.to_dtype(DType::F32).unwrap(), target.clone()),
    ];
    for (i, t) in cases {
        let plain = lm.micro_batch(&i, &t, true, &loss, 1).unwrap_err();
        let ck = lm
            .micro_batch_checkpointed(&i, &t, true, &loss, 1, 1)
            .unwrap_err();
        assert_eq!(
            std::mem::discriminant(&plain),
            std::mem::discriminant(&ck),
            "{plain} / {ck}"
        );
        let plain = plain.to_string();
        let ck = ck.to_string();
        assert_eq!(
            plain.replace("micro_batch(", "micro_batch_checkpointed("),
            ck
        );
    }
}
