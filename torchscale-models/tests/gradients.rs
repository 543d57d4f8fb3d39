//! A gradient reaches every trainable parameter of every model kind and technique.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use torchscale_models::build::BuildOptions;
use torchscale_models::config::Technique;
use torchscale_models::decoder::{Decoder, DecoderInputs};
use torchscale_models::encoder::{Encoder, EncoderInputs};
use torchscale_models::encoder_decoder::EncoderDecoder;

const TECHNIQUES: [Technique; 5] = [
    Technique::PostLn,
    Technique::PreLn,
    Technique::DeepNorm,
    Technique::SubLn,
    Technique::Admin,
];

// k_proj's bias only shifts every score of a query row equally, which softmax ignores: its exact
// gradient is zero (FORMAT.md section 6), so it may come out as exact zeros.
const ZERO_OK: &[&str] = &["k_proj.bias"];

#[test]
fn encoder_every_technique() {
    for t in TECHNIQUES {
        let (store, vb) = store(1);
        let cfg = tiny_encoder()
            .with_technique(t)
            .with_layernorm_embedding(true);
        let m = Encoder::new(&cfg, &BuildOptions::default(), vb).unwrap();
        let src = tokens(2, 5, 20);
        let mask =
            Tensor::from_vec(vec![0u8, 0, 0, 0, 0, 0, 0, 0, 1, 1], (2, 5), &Device::Cpu).unwrap();
        let out = m
            .forward(
                &src,
                &EncoderInputs {
                    padding_mask: Some(&mask),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_all_grads(&store, &weighted_sum(&out.encoder_out), ZERO_OK);
    }
}

#[test]
fn encoder_relpos_multiway() {
    let (store, vb) = store(2);
    let cfg = tiny_encoder()
        .with_rel_pos(8, 16)
        .with_multiway(true)
        .with_layernorm_embedding(true);
    let m = Encoder::new(
        &cfg,
        &BuildOptions {
            learned_positions: Some(true),
            ..Default::default()
        },
        vb,
    )
    .unwrap();
    let inp = EncoderInputs {
        branch: torchscale_core::Branch::SplitAt(2),
        ..Default::default()
    };
    let out = m.forward(&tokens(2, 5, 20), &inp).unwrap();
    assert_all_grads(&store, &weighted_sum(&out.encoder_out), ZERO_OK);
}

#[test]
fn decoder_every_technique_and_xpos() {
    for (t, xpos) in TECHNIQUES
        .iter()
        .map(|t| (*t, false))
        .chain([(Technique::SubLn, true)])
    {
        let (store, vb) = store(3);
        let cfg = tiny_decoder().with_technique(t).with_xpos(xpos);
        let m = Decoder::new(&cfg, &BuildOptions::default(), vb).unwrap();
        let out = m
            .forward(&tokens(2, 6, 20), &DecoderInputs::default())
            .unwrap();
        // The padding row of the token table never receives gradient (nn.Embedding(padding_idx)).
        assert_all_grads(&store, &weighted_sum(&out.x), ZERO_OK);
    }
}

#[test]
fn decoder_relpos() {
    let (store, vb) = store(4);
    let m = Decoder::new(
        &tiny_decoder().with_rel_pos(8, 16),
        &BuildOptions::default(),
        vb,
    )
    .unwrap();
    let out = m
        .forward(&tokens(2, 6, 20), &DecoderInputs::default())
        .unwrap();
    assert_all_grads(&store, &weighted_sum(&out.x), ZERO_OK);
}

#[test]
fn encoder_decoder_every_technique() {
    for t in TECHNIQUES {
        let (store, vb) = store(5);
        let m = EncoderDecoder::new(
            &tiny_encoder_decoder().with_technique(t),
            &BuildOptions::default(),
            vb,
        )
        .unwrap();
        let (_, dec) = m
            .forward(&tokens(2, 5, 20), None, &tokens(2, 4, 20), false)
            .unwrap();
        assert_all_grads(&store, &weighted_sum(&dec.x), ZERO_OK);
    }
}

#[test]
fn padding_row_gets_no_gradient() {
    let (store, vb) = store(6);
    let m = Decoder::new(&tiny_decoder(), &BuildOptions::default(), vb).unwrap();
    let mut ids = tokens(1, 4, 20).to_vec2::<u32>().unwrap();
    ids[0][2] = 1; // a padding token in the input
    let ids = Tensor::new(ids, &Device::Cpu).unwrap();
    let out = m.forward(&ids, &DecoderInputs::default()).unwrap();
    let grads = weighted_sum(&out.x).backward().unwrap();
    let emb = store.get("embed_tokens.weight").unwrap();
    let g = grads
        .get(emb.as_tensor())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let row1: Vec<f32> = g.get(1).unwrap().to_vec1().unwrap();
    assert!(
        row1.iter().all(|v| *v == 0.0),
        "padding row gradient {row1:?}"
    );
    let row_used: Vec<f32> = g
        .get(
            ids.get(0)
                .unwrap()
                .get(0)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap() as usize,
        )
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(row_used.iter().any(|v| *v != 0.0));
}

#[test]
fn moe_models_reach_gate_and_experts() {
    for top1 in [false, true] {
        let (store, vb) = store(7);
        let cfg = tiny_decoder()
            .with_layers(2)
            .with_moe(2, 4)
            .with_xmoe(true)
            .with_moe_top1(top1);
        let m = Decoder::new(&cfg, &BuildOptions::default(), vb).unwrap();
        let out = m
            .forward(
                &tokens(4, 8, 20),
                &DecoderInputs {
                    train: true,
                    ..Default::default()
                },
            )
            .unwrap();
        let l_aux = out.l_aux[1].clone().expect("layer 1 is MoE");
        let loss = (weighted_sum(&out.x) + l_aux).unwrap();
        // An expert that received no token in this batch legitimately gets no gradient.
        let grads = loss.backward().unwrap();
        for (name, var) in store.named_vars() {
            let g = grads.get(var.as_tensor());
            if name.contains("experts.") {
                continue;
            }
            let m = g
                .map(|g| {
                    g.abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                })
                .unwrap_or(0.0);
            assert!(
                m > 0.0 || name.contains("k_proj.bias"),
                "{name} has no gradient (top1={top1})"
            );
        }
        let used: Vec<usize> = out.aux[0]
            .stats
            .tokens_per_expert
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(e, _)| e)
            .collect();
        assert!(!used.is_empty());
        for e in used {
            let w = store
                .get(&format!("layers.1.moe_layer.experts.{e}.fc1.weight"))
                .unwrap();
            assert!(
                grads.get(w.as_tensor()).is_some(),
                "expert {e} received tokens but no gradient"
            );
        }
    }
}
