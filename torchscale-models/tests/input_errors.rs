//! Bad inputs at the public boundary give typed errors that name the argument (and its shape
//! or dtype): token ids that are not integers or not in the vocabulary, masks and encoder
//! outputs of the wrong shape, inputs the model would ignore, caches from another model or
//! batch, a bad beam order. A candle error from inside a call names the call and its inputs.
//! Good inputs still work.

mod common;

use std::any::Any;

use candle_core::{DType, Device, Tensor};
use common::*;
use torchscale_core::{Ctx, Error, Result as TsResult, Site, Sublayer};
use torchscale_models::build::{BuildOptions, StackHooks};
use torchscale_models::config::DecoderConfig;
use torchscale_models::decoder::{Decoder, DecoderInputs, IncrementalState, Memory};
use torchscale_models::encoder::{Encoder, EncoderInputs};
use torchscale_models::layer::SiteBlock;
use torchscale_models::lm::{LanguageModel, LossConfig};
use torchscale_models::EncoderDecoder;

const CPU: Device = Device::Cpu;

fn decoder(cfg: &DecoderConfig, seed: u64) -> Decoder {
    let (_, vb) = store(seed);
    Decoder::new(cfg, &BuildOptions::default(), vb).unwrap()
}

fn encoder_decoder() -> EncoderDecoder {
    let (_, vb) = store(1);
    EncoderDecoder::new(&tiny_encoder_decoder(), &BuildOptions::default(), vb).unwrap()
}

/// The argument an input error names, and the error's message.
fn named(e: &Error) -> (&str, String) {
    let what = match e {
        Error::Shape { what, .. } | Error::DType { what, .. } | Error::Invalid { what, .. } => {
            what.as_str()
        }
        other => panic!("expected an input error, got {other:?}"),
    };
    (what, e.to_string())
}

fn assert_invalid(e: Error, what: &str, parts: &[&str]) {
    assert!(matches!(e, Error::Invalid { .. }), "not Invalid: {e:?}");
    let (w, msg) = named(&e);
    assert_eq!(w, what, "{msg}");
    for p in parts {
        assert!(msg.contains(p), "`{p}` not in: {msg}");
    }
}

fn assert_shape(e: Error, what: &str, got: &[usize]) {
    match &e {
        Error::Shape {
            what: w, got: g, ..
        } => {
            assert_eq!((w.as_str(), g.as_slice()), (what, got), "{e}")
        }
        other => panic!("expected a shape error for {what}, got {other:?}"),
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn token_ids_are_integers_of_rank_two_within_the_vocabulary() {
    let m = decoder(&tiny_decoder(), 0);
    let none = DecoderInputs::default();
    let good = tokens(2, 7, 20);
    let want = m.forward(&good, &none).unwrap().x;

    // f32 ids used to be truncated silently.
    let float = good.to_dtype(DType::F32).unwrap();
    let e = m.forward(&float, &none).unwrap_err();
    assert_invalid(e, "prev_output_tokens", &["integers", "[2, 7] f32"]);

    // Every integer dtype gives the same logits.
    for dt in [DType::U8, DType::I64, DType::I32] {
        let x = m.forward(&good.to_dtype(dt).unwrap(), &none).unwrap().x;
        assert_eq!(max_diff(&x, &want), 0.0, "{dt:?}");
    }

    // The first bad id, where it is, and the input.
    let neg = Tensor::new(&[[4i64, 5, 6], [7, 8, -3]], &CPU).unwrap();
    let e = m.forward(&neg, &none).unwrap_err();
    assert_invalid(
        e,
        "prev_output_tokens",
        &["token id -3 at [1, 2]", "vocabulary 20", "[2, 3] i64"],
    );
    let big = Tensor::new(&[[4u32, 25, 30]], &CPU).unwrap();
    let e = m.forward(&big, &none).unwrap_err();
    assert_invalid(e, "prev_output_tokens", &["token id 25 at [0, 1]"]);

    let flat = Tensor::new(&[4u32, 5], &CPU).unwrap();
    assert_shape(
        m.forward(&flat, &none).unwrap_err(),
        "prev_output_tokens",
        &[2],
    );
    let empty = Tensor::zeros((2, 0), DType::U32, &CPU).unwrap();
    assert_shape(
        m.forward(&empty, &none).unwrap_err(),
        "prev_output_tokens",
        &[2, 0],
    );

    // The encoder's are `src_tokens`.
    let (_, vb) = store(0);
    let enc = Encoder::new(&tiny_encoder(), &BuildOptions::default(), vb).unwrap();
    let e = enc.forward(&float, &EncoderInputs::default()).unwrap_err();
    assert_invalid(e, "src_tokens", &["[2, 7] f32"]);
    let e = enc.forward(&big, &EncoderInputs::default()).unwrap_err();
    assert_invalid(e, "src_tokens", &["token id 25 at [0, 1]"]);
    let e = enc
        .forward(&tokens(1, 1100, 20), &EncoderInputs::default())
        .unwrap_err();
    assert_invalid(e, "src_tokens", &["position"]);
}

#[test]
fn masks_match_their_tokens() {
    let m = decoder(&tiny_decoder(), 0);
    let toks = tokens(2, 7, 20);
    let short = Tensor::zeros((2, 6), DType::U8, &CPU).unwrap();
    let e = m
        .forward(
            &toks,
            &DecoderInputs {
                self_attn_padding_mask: Some(&short),
                ..Default::default()
            },
        )
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("[2, 7]"), "{msg}");
    assert_shape(e, "self_attn_padding_mask", &[2, 6]);
    let float = Tensor::zeros((2, 7), DType::F32, &CPU).unwrap();
    let e = m
        .forward(
            &toks,
            &DecoderInputs {
                self_attn_padding_mask: Some(&float),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert_invalid(e, "self_attn_padding_mask", &["f32"]);
    let ok = Tensor::zeros((2, 7), DType::U8, &CPU).unwrap();
    m.forward(
        &toks,
        &DecoderInputs {
            self_attn_padding_mask: Some(&ok),
            ..Default::default()
        },
    )
    .unwrap();

    let (_, vb) = store(0);
    let enc = Encoder::new(&tiny_encoder(), &BuildOptions::default(), vb).unwrap();
    let e = enc
        .forward(
            &toks,
            &EncoderInputs {
                padding_mask: Some(&float),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert_invalid(e, "encoder_padding_mask", &["f32"]);
    let e = enc
        .forward(
            &toks,
            &EncoderInputs {
                attn_mask: Some(&short),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert_shape(e, "attn_mask", &[2, 6]);
}

#[test]
fn encoder_out_is_checked_on_every_path() {
    let ed = encoder_decoder();
    let src = tokens(2, 5, 20);
    let prev = tokens(2, 4, 20);
    let enc = ed.encoder.forward(&src, &EncoderInputs::default()).unwrap();
    let memory = |out: &Tensor, mask: Option<&Tensor>| {
        let inputs = DecoderInputs {
            memory: Some(Memory {
                encoder_out: out,
                padding_mask: mask,
            }),
            ..Default::default()
        };
        let full = ed.decoder.forward(&prev, &inputs).map(|o| o.x);
        let mut state = IncrementalState::new(true);
        let step = ed
            .decoder
            .forward_incremental(&prev, &inputs, &mut state)
            .map(|o| o.x);
        (full, step)
    };

    let (full, step) = memory(&enc.encoder_out, Some(&enc.encoder_padding_mask));
    assert!(max_diff(&full.unwrap(), &step.unwrap()) < 1e-5);

    let other_batch = enc.encoder_out.narrow(0, 0, 1).unwrap();
    let narrow = enc.encoder_out.narrow(2, 0, 8).unwrap();
    let flat = enc.encoder_out.flatten_from(1).unwrap();
    for (bad, dims) in [
        (&other_batch, vec![1, 5, 16]),
        (&narrow, vec![2, 5, 8]),
        (&flat, vec![2, 80]),
    ] {
        let (full, step) = memory(bad, None);
        let msg = full.as_ref().unwrap_err().to_string();
        assert!(msg.contains("[2, S, 16]"), "{msg}");
        assert_shape(full.unwrap_err(), "encoder_out", &dims);
        assert_shape(step.unwrap_err(), "encoder_out", &dims);
    }
    let f64_out = enc.encoder_out.to_dtype(DType::F64).unwrap();
    let (full, step) = memory(&f64_out, None);
    for e in [full.unwrap_err(), step.unwrap_err()] {
        assert!(
            matches!(&e, Error::DType { what, got: DType::F64, .. } if what == "encoder_out"),
            "{e:?}"
        );
    }
    let mask = enc.encoder_padding_mask.narrow(1, 0, 4).unwrap();
    let (full, step) = memory(&enc.encoder_out, Some(&mask));
    assert_shape(full.unwrap_err(), "encoder_padding_mask", &[2, 4]);
    assert_shape(step.unwrap_err(), "encoder_padding_mask", &[2, 4]);
    let fmask = enc.encoder_padding_mask.to_dtype(DType::F32).unwrap();
    let (full, _) = memory(&enc.encoder_out, Some(&fmask));
    assert_invalid(full.unwrap_err(), "encoder_padding_mask", &["f32"]);

    // Source and target of different batches: named before the encoder runs.
    let e = ed
        .forward(&src, None, &tokens(3, 4, 20), false)
        .unwrap_err();
    assert_shape(e, "prev_output_tokens", &[3, 4]);
    let (_, dec) = ed.forward(&src, None, &prev, false).unwrap();
    assert_eq!(dec.x.dims(), &[2, 4, 20]);
}

#[test]
fn unused_inputs_are_refused() {
    // A decoder-only model has no cross-attention to read the memory.
    let m = decoder(&tiny_decoder(), 0);
    let toks = tokens(2, 4, 20);
    let out = Tensor::zeros((2, 5, 16), DType::F32, &CPU).unwrap();
    let inputs = DecoderInputs {
        memory: Some(Memory {
            encoder_out: &out,
            padding_mask: None,
        }),
        ..Default::default()
    };
    assert_invalid(
        m.forward(&toks, &inputs).unwrap_err(),
        "encoder_out",
        &["no cross-attention"],
    );
    assert!(!m.has_cross_attention());
    assert!(encoder_decoder().decoder.has_cross_attention());

    // More uniforms than layers; uniforms for a dense layer; uniforms of the wrong shape.
    let cfg = tiny_decoder()
        .with_moe(2, 4)
        .with_moe_second_expert_policy("random");
    let m = decoder(&cfg, 0);
    let moe: Vec<bool> = m.layers().iter().map(|l| l.moe().is_some()).collect();
    let (dense, routed) = (
        moe.iter().position(|&x| !x).unwrap(),
        moe.iter().position(|&x| x).unwrap(),
    );
    let u = |n: usize| Some(Tensor::full(0.5f32, n, &CPU).unwrap());
    let run = |uniforms: Vec<Option<Tensor>>| {
        m.forward(
            &toks,
            &DecoderInputs {
                moe_uniforms: uniforms,
                ..Default::default()
            },
        )
    };
    let mut too_many = vec![None; 3];
    too_many[routed] = u(8);
    assert_invalid(
        run(too_many).unwrap_err(),
        "moe_uniforms",
        &["3 entries", "2 layers"],
    );
    let mut on_dense = vec![None; 2];
    on_dense[dense] = u(8);
    assert_invalid(
        run(on_dense).unwrap_err(),
        &format!("moe_uniforms[{dense}]"),
        &["no MoE layer"],
    );
    let mut wrong = vec![None; 2];
    wrong[routed] = u(5);
    assert_shape(
        run(wrong).unwrap_err(),
        &format!("moe_uniforms[{routed}]"),
        &[5],
    );
    let mut right = vec![None; 2];
    right[routed] = u(8);
    run(right).unwrap();

    // A branch for multiway copies the encoder does not have.
    let (_, vb) = store(0);
    let enc = Encoder::new(&tiny_encoder(), &BuildOptions::default(), vb).unwrap();
    let e = enc
        .forward(
            &toks,
            &EncoderInputs {
                branch: torchscale_core::Branch::B,
                ..Default::default()
            },
        )
        .unwrap_err();
    assert_invalid(e, "branch", &["multiway"]);
}

/// Runs `prefix_len` steps of incremental decoding of `toks` into a fresh state.
fn state_after(m: &Decoder, toks: &Tensor, prefix_len: usize) -> IncrementalState {
    let mut state = IncrementalState::new(false);
    for i in 1..=prefix_len {
        m.forward_incremental(
            &toks.narrow(1, 0, i).unwrap(),
            &DecoderInputs::default(),
            &mut state,
        )
        .unwrap();
    }
    state
}

#[test]
fn caches_are_checked_against_the_model() {
    let two = decoder(&tiny_decoder(), 0);
    let four = decoder(&tiny_decoder().with_layers(4), 0);
    let toks = tokens(2, 5, 20);
    let none = DecoderInputs::default();
    let prefix = toks.narrow(1, 0, 4).unwrap();

    // A 4-layer cache is not resized to fit a 2-layer decoder.
    let mut state = state_after(&four, &toks, 3);
    let e = two
        .forward_incremental(&prefix, &none, &mut state)
        .unwrap_err();
    assert_invalid(e, "incremental_state", &["4 layers", "has 2"]);
    assert_eq!(state.layers.len(), 4);

    // Another batch size.
    let mut state = state_after(&two, &toks, 3);
    let e = two
        .forward_incremental(&prefix.narrow(0, 0, 1).unwrap(), &none, &mut state)
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("[1, 2, S, 8]"), "{msg}");
    assert_shape(e, "incremental_state.layers[0].prev_key", &[2, 2, 3, 8]);

    // Another head count (same width): the cache's heads and head width must match.
    let four_heads = decoder(&tiny_decoder().with_heads(4), 0);
    let mut state = state_after(&four_heads, &toks, 3);
    let e = two
        .forward_incremental(&prefix, &none, &mut state)
        .unwrap_err();
    assert_shape(e, "incremental_state.layers[0].prev_key", &[2, 4, 3, 4]);

    // Keys without values.
    let mut state = state_after(&two, &toks, 3);
    state.layers[1].prev_value = None;
    let e = two
        .forward_incremental(&prefix, &none, &mut state)
        .unwrap_err();
    assert_invalid(e, "incremental_state.layers[1]", &["no prev_value"]);

    // Layers holding different numbers of steps.
    let mut state = state_after(&two, &toks, 3);
    let shorter = state_after(&two, &toks, 2);
    state.layers[1] = shorter.layers[1].clone();
    let e = two
        .forward_incremental(&prefix, &none, &mut state)
        .unwrap_err();
    assert_invalid(e, "incremental_state", &["layers[1] holds 2 steps"]);

    // A first step needs an empty cache.
    let mut state = state_after(&two, &toks, 3);
    state.is_first_step = true;
    let e = two
        .forward_incremental(&prefix, &none, &mut state)
        .unwrap_err();
    assert_invalid(e, "incremental_state", &["first step"]);

    // The good path still equals the full forward.
    let full = two.forward(&toks, &none).unwrap().x;
    let mut state = state_after(&two, &toks, 4);
    let last = two.forward_incremental(&toks, &none, &mut state).unwrap().x;
    assert!(max_diff(&last, &full.narrow(1, 4, 1).unwrap()) < 1e-5);
    assert_eq!(state.len(), 5);
}

#[test]
fn reorder_checks_its_order() {
    let m = decoder(&tiny_decoder(), 0);
    let toks = tokens(3, 4, 20);
    let mut state = state_after(&m, &toks, 3);
    for (bad, parts) in [
        (Tensor::new(&[0f32, 1.0, 2.0], &CPU).unwrap(), "f32"),
        (Tensor::new(&[[0u32, 1, 2]], &CPU).unwrap(), "[1, 3]"),
        (Tensor::new(&[0u32, 3, 1], &CPU).unwrap(), "index 3 at [1]"),
        (
            Tensor::new(&[0i64, -1, 1], &CPU).unwrap(),
            "index -1 at [1]",
        ),
    ] {
        let e = state.reorder(&bad).unwrap_err();
        let (what, msg) = named(&e);
        assert_eq!(what, "order", "{msg}");
        assert!(msg.contains(parts), "`{parts}` not in {msg}");
        assert_eq!(state.layers[0].batch(), Some(3), "left as it was");
    }
    // Beams: row 2 three times, then one more step on the reordered batch.
    state
        .reorder(&Tensor::new(&[2u32, 2, 2], &CPU).unwrap())
        .unwrap();
    let row = toks.narrow(0, 2, 1).unwrap();
    let beams = Tensor::cat(&[&row, &row, &row], 0).unwrap();
    let step = m
        .forward_incremental(&beams, &DecoderInputs::default(), &mut state)
        .unwrap()
        .x;
    let full = m.forward(&beams, &DecoderInputs::default()).unwrap().x;
    assert!(max_diff(&step, &full.narrow(1, 3, 1).unwrap()) < 1e-5);
}

/// A sublayer that fails inside candle: it concatenates tensors of different widths.
#[derive(Debug)]
struct BrokenCat;

impl Sublayer for BrokenCat {
    fn forward(&self, x: &Tensor, _ctx: &mut Ctx) -> TsResult<Tensor> {
        let half = x.narrow(2, 0, 1)?;
        Ok(Tensor::cat(&[x, &half], 1)?)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[test]
fn candle_errors_name_the_call_and_its_inputs() {
    let hooks = StackHooks::default().with_sites(|cx, mut sites| {
        sites.push(SiteBlock::new(
            "broken",
            cx.residual(Site::Custom("broken_layer_norm"))?,
            Box::new(BrokenCat),
        ));
        Ok(sites)
    });
    let opts = BuildOptions {
        hooks,
        ..Default::default()
    };
    let (_, vb) = store(0);
    let m = Decoder::new(&tiny_decoder(), &opts, vb).unwrap();
    let toks = tokens(2, 7, 20);
    let e = m.forward(&toks, &DecoderInputs::default()).unwrap_err();
    match &e {
        Error::Context { context, source } => {
            assert_eq!(context, "Decoder::forward(prev_output_tokens [2, 7] u32)");
            assert!(source.to_string().contains("cat"), "{source}");
        }
        other => panic!("expected Context, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.starts_with("Decoder::forward(prev_output_tokens [2, 7] u32): shape mismatch in cat"),
        "{msg}"
    );
    let mut state = IncrementalState::new(true);
    let e = m
        .forward_incremental(&toks, &DecoderInputs::default(), &mut state)
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("Decoder::forward_incremental(prev_output_tokens [2, 7] u32)"),
        "{e}"
    );
    // Through candle's `?` the context survives.
    let back: candle_core::Error = e.into();
    assert!(back.to_string().contains("forward_incremental"), "{back}");
}

fn lm() -> LanguageModel {
    let cfg = tiny_decoder().with_max_positions(32);
    LanguageModel::new(cfg, 0).unwrap()
}

#[test]
fn language_model_names_input_target_and_prompt() {
    let lm = lm();
    let loss = LossConfig::default();
    let input = tokens(2, 6, 20);
    let target = tokens(2, 7, 20).narrow(1, 1, 6).unwrap();
    lm.micro_batch(&input, &target, false, &loss, 0).unwrap();

    let e = lm
        .micro_batch(
            &input.to_dtype(DType::F32).unwrap(),
            &target,
            false,
            &loss,
            0,
        )
        .unwrap_err();
    assert_invalid(e, "input", &["input [2, 6] f32"]);
    let big = (input.clone() + 30.0).unwrap();
    let e = lm.micro_batch(&big, &target, false, &loss, 0).unwrap_err();
    assert_invalid(e, "input", &["token id", "at [0, 0]", "(input [2, 6] u32)"]);
    let e = lm
        .micro_batch(
            &input,
            &target.to_dtype(DType::F32).unwrap(),
            false,
            &loss,
            0,
        )
        .unwrap_err();
    assert_invalid(e, "target", &["f32"]);
    let e = lm
        .micro_batch(&input, &(target.clone() + 40.0).unwrap(), false, &loss, 0)
        .unwrap_err();
    assert_invalid(e, "target", &["token id"]);
    let e = lm
        .micro_batch(&input, &target.narrow(1, 0, 5).unwrap(), false, &loss, 0)
        .unwrap_err();
    assert_shape(e, "target", &[2, 5]);

    // evaluate says which batch.
    let batches = vec![
        (input.clone(), target.clone()),
        (input.clone(), target.narrow(1, 0, 5).unwrap()),
    ];
    assert_shape(
        lm.evaluate(&batches).unwrap_err(),
        "batches[1].target",
        &[2, 5],
    );
    assert!(lm.evaluate(&batches[..1]).unwrap().is_finite());

    // generate: the prompt's ids, with the first bad one.
    let e = lm.generate(&[4, 5, 99, 100], 3, 0.0, 0, 1).unwrap_err();
    assert_invalid(e, "prompt", &["token id 99 at [2]", "vocabulary 20"]);
    assert_eq!(lm.generate(&[4, 5], 3, 0.0, 0, 1).unwrap().len(), 3);
}
