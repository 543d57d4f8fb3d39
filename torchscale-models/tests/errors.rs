//! Bad configs, bad inputs and bad checkpoints give typed errors that name the culprit.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use torchscale_core::Error;
use torchscale_models::build::BuildOptions;
use torchscale_models::checkpoint::{load_file, load_into, save_file};
use torchscale_models::decoder::{Decoder, DecoderInputs, IncrementalState};
use torchscale_models::encoder::{Encoder, EncoderInputs};

fn config_field(e: Error) -> String {
    match e {
        Error::Config { field, .. } => field,
        other => panic!("expected a config error, got {other}"),
    }
}

#[test]
fn bad_configs_name_their_field() {
    let (_, vb) = store(0);
    let o = BuildOptions::default();
    let e = Encoder::new(&tiny_encoder().with_heads(3), &o, vb.clone()).unwrap_err();
    assert_eq!(config_field(e), "encoder_attention_heads");
    let e = Decoder::new(&tiny_decoder().with_layers(0), &o, vb.clone()).unwrap_err();
    assert_eq!(config_field(e), "decoder_layers");
    // head dim 16/4 = 4 is even; 18/6 = 3 is odd.
    let e = Decoder::new(
        &tiny_decoder()
            .with_embed_dim(18)
            .with_heads(6)
            .with_xpos(true),
        &o,
        vb.clone(),
    )
    .unwrap_err();
    assert_eq!(config_field(e), "xpos_rel_pos");
    let e = torchscale_models::config::DecoderConfig::from_json_str(r#"{"activation_fn": "tanh"}"#)
        .unwrap_err();
    assert!(e.to_string().contains("activation_fn"), "{e}");
}

#[test]
fn bad_inputs_name_their_shape() {
    let (_, vb) = store(0);
    let m = Encoder::new(&tiny_encoder(), &BuildOptions::default(), vb).unwrap();
    let src = tokens(2, 5, 20);
    let bad_mask = Tensor::zeros((2, 4), DType::U8, &Device::Cpu).unwrap();
    match m
        .forward(
            &src,
            &EncoderInputs {
                padding_mask: Some(&bad_mask),
                ..Default::default()
            },
        )
        .unwrap_err()
    {
        Error::Shape { what, got, .. } => {
            assert_eq!((what.as_str(), got), ("encoder_padding_mask", vec![2, 4]))
        }
        e => panic!("{e}"),
    }
    let flat = Tensor::zeros(5, DType::U32, &Device::Cpu).unwrap();
    assert!(
        matches!(m.forward(&flat, &EncoderInputs::default()).unwrap_err(), Error::Shape { what, .. } if what == "src_tokens")
    );
    let out_of_vocab = Tensor::new(&[[4u32, 25]], &Device::Cpu).unwrap();
    assert!(
        matches!(m.forward(&out_of_vocab, &EncoderInputs::default()).unwrap_err(), Error::Invalid { what, .. } if what == "src_tokens")
    );
    let too_long = tokens(1, 1100, 20);
    assert!(matches!(
        m.forward(&too_long, &EncoderInputs::default()).unwrap_err(),
        Error::Invalid { .. }
    ));
}

#[test]
fn incremental_state_mismatch_is_an_error() {
    let (_, vb) = store(0);
    let m = Decoder::new(&tiny_decoder(), &BuildOptions::default(), vb).unwrap();
    let mut state = IncrementalState::new(false);
    m.forward_incremental(&tokens(1, 1, 20), &DecoderInputs::default(), &mut state)
        .unwrap();
    // Skipping a token: the cache has 1 step, a 3-token prefix needs 2.
    let e = m
        .forward_incremental(&tokens(1, 3, 20), &DecoderInputs::default(), &mut state)
        .unwrap_err();
    assert!(matches!(e, Error::Invalid { what, .. } if what == "incremental_state"));
}

fn saved_decoder(
    dir: &std::path::Path,
) -> (
    std::path::PathBuf,
    Decoder,
    torchscale_core::init::ParamStore,
) {
    let (store, vb) = store(3);
    let m = Decoder::new(&tiny_decoder(), &BuildOptions::default(), vb).unwrap();
    let path = dir.join("ckpt.safetensors");
    save_file(&store, &m.buffers().unwrap(), &[], HashMap::new(), &path).unwrap();
    (path, m, store)
}

#[test]
fn checkpoint_missing_misshaped_unexpected_corrupt() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    let (path, m, store) = saved_decoder(dir);
    let (mut tensors, _) = torchscale_models::checkpoint::read_safetensors(&path).unwrap();
    let buffers = m.buffers().unwrap();

    let mut missing = tensors.clone();
    missing.remove("layers.1.ffn.fc2.bias");
    match load_into(&store, &missing, &buffers, &[]).unwrap_err() {
        Error::MissingTensor { key } => assert_eq!(key, "layers.1.ffn.fc2.bias"),
        e => panic!("{e}"),
    }
    let mut misshaped = tensors.clone();
    misshaped.insert(
        "layers.0.self_attn.q_proj.weight".into(),
        Tensor::zeros((16, 8), DType::F32, &Device::Cpu).unwrap(),
    );
    match load_into(&store, &misshaped, &buffers, &[]).unwrap_err() {
        Error::TensorShape { key, expected, got } => {
            assert_eq!(
                (key.as_str(), expected, got),
                (
                    "layers.0.self_attn.q_proj.weight",
                    vec![16, 16],
                    vec![16, 8]
                )
            )
        }
        e => panic!("{e}"),
    }
    tensors.insert(
        "layers.9.extra.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(
        matches!(load_into(&store, &tensors, &buffers, &[]).unwrap_err(), Error::UnexpectedTensor { key } if key == "layers.9.extra.weight")
    );

    let corrupt = dir.join("corrupt.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&corrupt, bytes).unwrap();
    assert!(matches!(
        load_file(&store, &corrupt, &buffers, &[]).unwrap_err(),
        Error::File { .. }
    ));
    assert!(matches!(
        load_file(&store, &dir.join("absent.safetensors"), &buffers, &[]).unwrap_err(),
        Error::File { .. }
    ));
}

#[test]
fn checkpoint_roundtrip_gives_same_outputs() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    let (path, m, _) = saved_decoder(dir);
    let ids = tokens(2, 5, 20);
    let want = m.forward(&ids, &DecoderInputs::default()).unwrap().x;
    let (store2, vb2) = store(99);
    let m2 = Decoder::new(&tiny_decoder(), &BuildOptions::default(), vb2).unwrap();
    assert!(
        m2.forward(&ids, &DecoderInputs::default())
            .unwrap()
            .x
            .sub(&want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 1e-3
    );
    load_file(&store2, &path, &m2.buffers().unwrap(), &[]).unwrap();
    let got = m2.forward(&ids, &DecoderInputs::default()).unwrap().x;
    assert_eq!(
        got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn failed_write_leaves_previous_checkpoint_intact() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    let (path, _, _) = saved_decoder(dir);
    let before = std::fs::read(&path).unwrap();
    // A directory squats on the temporary file's name, so the write fails midway.
    let tmp = dir.join("blocker");
    std::fs::create_dir_all(&tmp).unwrap();
    let err = torchscale_models::checkpoint::write_atomic(&tmp, &path, b"garbage").unwrap_err();
    assert!(matches!(err, Error::File { .. }));
    assert_eq!(std::fs::read(&path).unwrap(), before);
}
