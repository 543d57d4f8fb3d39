//! A language model given bad input: a non-finite sampling temperature, a broken `config.json`
//! in a checkpoint, a checkpoint path that is a regular file. Each is a typed error that names
//! the field or the path, and nothing on disk is harmed.

use std::path::Path;

use torchscale_core::Error;
use torchscale_models::config::DecoderConfig;
use torchscale_models::data::{ByteCorpus, BYTE_VOCAB};
use torchscale_models::lm::{LanguageModel, CONFIG_FILE};

fn tiny() -> LanguageModel {
    let cfg = DecoderConfig::default()
        .with_vocab_size(BYTE_VOCAB as i64)
        .with_embed_dim(16)
        .with_heads(2)
        .with_ffn_dim(32)
        .with_layers(1)
        .with_max_positions(32);
    LanguageModel::new(cfg, 0).unwrap()
}

#[test]
fn generate_refuses_a_non_finite_temperature() {
    let lm = tiny();
    let prompt = ByteCorpus::encode("ab");
    for temperature in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        match lm.generate(&prompt, 3, temperature, 0, 1) {
            Err(Error::Config { field, .. }) => assert_eq!(field, "temperature"),
            other => panic!("{temperature}: {other:?}"),
        }
    }
    assert_eq!(lm.generate(&prompt, 3, 0.0, 0, 1).unwrap().len(), 3);
    assert_eq!(lm.generate(&prompt, 3, 0.7, 5, 1).unwrap().len(), 3);
}

#[test]
fn a_bad_config_json_names_its_path() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    tiny().save(&dir, None).unwrap();
    let cfg = dir.join(CONFIG_FILE);
    let shown = cfg.display().to_string();
    let text = std::fs::read_to_string(&cfg).unwrap();

    // Not JSON.
    std::fs::write(&cfg, "{\"decoder_layers\": 1,").unwrap();
    match LanguageModel::load(&dir).unwrap_err() {
        Error::File { path, .. } => assert_eq!(Path::new(&path), cfg),
        other => panic!("{other:?}"),
    }
    // A value of the wrong type, and one that fails validation: the field, with the path.
    for (from, to, field) in [
        (
            "\"decoder_layers\": 1",
            "\"decoder_layers\": \"one\"",
            "decoder_layers",
        ),
        (
            "\"decoder_layers\": 1",
            "\"decoder_layers\": 0",
            "decoder_layers",
        ),
    ] {
        let bad = text.replacen(from, to, 1);
        assert_ne!(bad, text, "the config holds {from}");
        std::fs::write(&cfg, bad).unwrap();
        match LanguageModel::load(&dir).unwrap_err() {
            Error::Config { field: f, reason } => {
                assert_eq!(f, field);
                assert!(reason.contains(&shown), "{reason}");
            }
            other => panic!("{to}: {other:?}"),
        }
    }
    // Missing.
    std::fs::remove_file(&cfg).unwrap();
    match LanguageModel::load(&dir).unwrap_err() {
        Error::File { path, .. } => assert_eq!(Path::new(&path), cfg),
        other => panic!("{other:?}"),
    }
}

#[test]
fn saving_onto_a_regular_file_leaves_it_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ckpt");
    let bytes: Vec<u8> = (0..=255u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    match tiny().save(&path, None).unwrap_err() {
        Error::FileOp { path: p, .. } => assert_eq!(Path::new(&p), path),
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("ckpt")]);
}
