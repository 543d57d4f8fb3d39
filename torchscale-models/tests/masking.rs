//! Fully masked attention rows never give NaN: a fully padded sentence in a batch, left padding
//! under the decoder's causal mask, cross-attention to a fully padded source, and incremental
//! decoding over left padding give finite logits, a finite loss and finite gradients, and leave
//! every other sentence's logits exactly as they are without the padded one (fused kernels on and
//! off). torchscale gives NaN there, which spreads to the whole batch's loss.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use torchscale_core::init::ParamStore;
use torchscale_kernels::with_fused;
use torchscale_models::build::BuildOptions;
use torchscale_models::{
    Decoder, DecoderInputs, Encoder, EncoderDecoder, EncoderInputs, IncrementalState,
};

/// fairseq's padding index.
const PAD: u32 = 1;

/// Three sentences of 6 tokens: 0 full, 1 only padding, 2 left-padded by 2; with their padding
/// mask (1 = padded).
fn batch() -> (Tensor, Tensor) {
    let mut toks = tokens(3, 6, 20)
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    let mut pad = vec![0u8; 18];
    for i in (6..12).chain(12..14) {
        toks[i] = PAD;
        pad[i] = 1;
    }
    (
        Tensor::from_vec(toks, (3, 6), &Device::Cpu).unwrap(),
        Tensor::from_vec(pad, (3, 6), &Device::Cpu).unwrap(),
    )
}

/// [`batch`] with sentence 1 a real, unpadded one instead.
fn batch_with_live_row_1() -> (Tensor, Tensor) {
    let (toks, pad) = batch();
    let live = Tensor::new(&[[5u32, 9, 13, 17, 6, 8]], &Device::Cpu).unwrap();
    let toks = Tensor::cat(
        &[
            &toks.narrow(0, 0, 1).unwrap(),
            &live,
            &toks.narrow(0, 2, 1).unwrap(),
        ],
        0,
    )
    .unwrap();
    let zero = Tensor::zeros((1, 6), DType::U8, &Device::Cpu).unwrap();
    let pad = Tensor::cat(
        &[
            &pad.narrow(0, 0, 1).unwrap(),
            &zero,
            &pad.narrow(0, 2, 1).unwrap(),
        ],
        0,
    )
    .unwrap();
    (toks, pad)
}

/// Sentences 0 and 2 of `with_dead` (sentence 1 fully padded) equal those of `with_live`
/// (sentence 1 real) bit for bit, and those of `alone` (a batch of the two) to rounding: the
/// products of a different batch size may group their sums differently.
fn assert_others_unchanged(what: &str, with_dead: &Tensor, with_live: &Tensor, alone: &Tensor) {
    let (dead, live) = (
        values(&without_row_1(with_dead)),
        values(&without_row_1(with_live)),
    );
    assert_eq!(dead, live, "{what}: sentence 1 changed the others");
    for (a, b) in dead.iter().zip(values(alone)) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{what}: {a} vs {b} alone"
        );
    }
}

/// Rows 0 and 2 of a `[3, ...]` tensor.
fn without_row_1(x: &Tensor) -> Tensor {
    let idx = Tensor::new(&[0u32, 2], x.device()).unwrap();
    x.index_select(&idx, 0).unwrap()
}

fn values(x: &Tensor) -> Vec<f32> {
    x.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_finite(what: &str, x: &Tensor) {
    assert!(
        values(x).iter().all(|v| v.is_finite()),
        "{what}: not finite"
    );
}

/// Cross entropy of `logits: [B, T, V]` against `targets: [B, T]` over the unpadded positions.
fn loss(logits: &Tensor, targets: &Tensor, pad: &Tensor) -> Tensor {
    let v = logits.dim(2).unwrap();
    let keep: Vec<u32> = values(pad)
        .iter()
        .enumerate()
        .filter(|(_, &p)| p == 0.0)
        .map(|(i, _)| i as u32)
        .collect();
    let keep = Tensor::new(keep.as_slice(), &Device::Cpu).unwrap();
    let l = logits
        .reshape(((), v))
        .unwrap()
        .index_select(&keep, 0)
        .unwrap();
    let t = targets
        .flatten_all()
        .unwrap()
        .index_select(&keep, 0)
        .unwrap();
    candle_nn::loss::cross_entropy(&l, &t).unwrap()
}

/// Every parameter's gradient of `loss` is finite.
fn assert_finite_grads(what: &str, store: &ParamStore, loss: &Tensor) {
    let grads = loss.backward().unwrap();
    for (name, var) in store.named_vars() {
        if let Some(g) = grads.get(var.as_tensor()) {
            assert_finite(&format!("{what}: gradient of {name}"), g);
        }
    }
}

#[test]
fn decoder_batch_with_a_fully_padded_sentence() {
    let (store, vb) = store(11);
    let m = Decoder::new(&tiny_decoder(), &BuildOptions::default(), vb).unwrap();
    let (toks, pad) = batch();
    for on in [true, false] {
        with_fused(on, || {
            let run = |toks: &Tensor, pad: &Tensor| {
                let inp = DecoderInputs {
                    self_attn_padding_mask: Some(pad),
                    ..Default::default()
                };
                m.forward(toks, &inp).unwrap().x
            };
            let logits = run(&toks, &pad);
            assert_finite(&format!("fused {on}: logits"), &logits);
            let l = loss(&logits, &toks, &pad);
            assert_finite(&format!("fused {on}: loss"), &l);
            assert_finite_grads(&format!("fused {on}"), &store, &l);
            let alone = run(&without_row_1(&toks), &without_row_1(&pad));
            let (lt, lp) = batch_with_live_row_1();
            let live = run(&lt, &lp);
            assert_others_unchanged(&format!("fused {on}"), &logits, &live, &alone);
        });
    }
}

#[test]
fn incremental_decoding_over_left_padding() {
    let (_, vb) = store(12);
    let m = Decoder::new(&tiny_decoder(), &BuildOptions::default(), vb).unwrap();
    let (toks, pad) = batch();
    for on in [true, false] {
        with_fused(on, || {
            let full = m
                .forward(
                    &toks,
                    &DecoderInputs {
                        self_attn_padding_mask: Some(&pad),
                        ..Default::default()
                    },
                )
                .unwrap()
                .x;
            let mut state = IncrementalState::new(false);
            for i in 0..6 {
                let kpm = pad.narrow(1, 0, i + 1).unwrap();
                let inp = DecoderInputs {
                    self_attn_padding_mask: Some(&kpm),
                    ..Default::default()
                };
                let step = m
                    .forward_incremental(&toks.narrow(1, 0, i + 1).unwrap(), &inp, &mut state)
                    .unwrap()
                    .x;
                assert_finite(&format!("fused {on} step {i}"), &step);
                let want = values(&full.narrow(1, i, 1).unwrap());
                for (a, b) in values(&step).iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-4, "fused {on} step {i}: {a} vs {b}");
                }
            }
        });
    }
}

#[test]
fn encoder_batch_with_a_fully_padded_sentence() {
    let (store, vb) = store(13);
    let m = Encoder::new(&tiny_encoder(), &BuildOptions::default(), vb).unwrap();
    let (toks, pad) = batch();
    for on in [true, false] {
        with_fused(on, || {
            let run = |toks: &Tensor, pad: &Tensor| {
                let inp = EncoderInputs {
                    padding_mask: Some(pad),
                    ..Default::default()
                };
                m.forward(toks, &inp).unwrap().encoder_out
            };
            let out = run(&toks, &pad);
            assert_finite(&format!("fused {on}: encoder_out"), &out);
            assert_finite_grads(&format!("fused {on}"), &store, &weighted_sum(&out));
            let alone = run(&without_row_1(&toks), &without_row_1(&pad));
            let (lt, lp) = batch_with_live_row_1();
            let live = run(&lt, &lp);
            assert_others_unchanged(&format!("fused {on}"), &out, &live, &alone);
        });
    }
}

#[test]
fn encoder_decoder_with_a_fully_padded_source() {
    let (store, vb) = store(14);
    let m = EncoderDecoder::new(&tiny_encoder_decoder(), &BuildOptions::default(), vb).unwrap();
    let (src, src_pad) = batch();
    // Targets without padding: only the source of sentence 1 is empty (every cross-attention row
    // of it is fully masked).
    let prev = tokens(3, 4, 20);
    for on in [true, false] {
        with_fused(on, || {
            let (_, dec) = m.forward(&src, Some(&src_pad), &prev, false).unwrap();
            assert_finite(&format!("fused {on}: logits"), &dec.x);
            let no_pad = Tensor::zeros((3, 4), DType::U8, &Device::Cpu).unwrap();
            let l = loss(&dec.x, &prev, &no_pad);
            assert_finite(&format!("fused {on}: loss"), &l);
            assert_finite_grads(&format!("fused {on}"), &store, &l);
            let (_, alone) = m
                .forward(
                    &without_row_1(&src),
                    Some(&without_row_1(&src_pad)),
                    &without_row_1(&prev),
                    false,
                )
                .unwrap();
            let (ls, lp) = batch_with_live_row_1();
            let (_, live) = m.forward(&ls, Some(&lp), &prev, false).unwrap();
            assert_others_unchanged(&format!("fused {on}"), &dec.x, &live.x, &alone.x);
        });
    }
}
