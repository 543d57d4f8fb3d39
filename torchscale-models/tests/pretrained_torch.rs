//! PyTorch torchscale checkpoints (`.pt`, made by `fixtures/pretrained/make_fixtures.py` from
//! real torchscale 0.3.0 models) converted without Python by `convert_pt`, loaded with
//! `from_pretrained`, give torchscale's stored logits within FORMAT.md's strict forward
//! tolerance (atol 5e-6, rtol 1e-5).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use torchscale_core::Error;
use torchscale_models::checkpoint::read_safetensors;
use torchscale_models::pretrained::read_pt;
use torchscale_models::{
    convert_pt, BuildOptions, Decoder, DecoderInputs, Encoder, EncoderDecoder, EncoderInputs,
    LanguageModel, ModelClass,
};

const ATOL: f64 = 5e-6;
const RTOL: f64 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pretrained")
        .join(name)
}

fn expect(case: &str) -> HashMap<String, Tensor> {
    read_safetensors(&fixture(&format!("{case}.expect.safetensors")))
        .unwrap()
        .0
}

/// Converts `<case>.pt` with `<case>.config.json` into a fresh folder.
fn convert(
    case: &str,
    pt: &str,
    class: ModelClass,
    dtype: Option<DType>,
) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join(case);
    convert_pt(
        &fixture(pt),
        &fixture(&format!("{case}.config.json")),
        class,
        &out,
        dtype,
    )
    .unwrap();
    (tmp, out)
}

fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}");
    let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let mut worst = 0f64;
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let (a, b) = (*a as f64, *b as f64);
        let err = (a - b).abs();
        assert!(
            err <= ATOL + RTOL * b.abs(),
            "{what}[{i}]: got {a}, torchscale {b}"
        );
        worst = worst.max(err);
    }
    // The logits are not trivially small, so the tolerance is a real constraint.
    let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(scale > 0.5, "{what}: logits of magnitude {scale}");
    eprintln!("{what}: max abs error {worst:.2e} (logits up to {scale:.2})");
}

#[test]
fn decoder_from_a_fairseq_style_pt_gives_torchscales_logits() {
    // {"model": state_dict, "extra": ...} with `decoder.` keys, xPos buffers, tied output.
    let case = "decoder_xpos_tied";
    let (_tmp, dir) = convert(case, "decoder_xpos_tied.pt", ModelClass::Decoder, None);
    let (file, meta) = read_safetensors(&dir.join("model.safetensors")).unwrap();
    assert_eq!(meta["model_class"], "Decoder");
    assert_eq!(meta["learned_positions"], "false");
    assert!(file.contains_key("layers.0.self_attn.xpos.scale"));
    assert!(
        file.contains_key("output_projection.weight"),
        "tied copy kept"
    );
    assert!(
        !file.keys().any(|k| k.starts_with("decoder.")),
        "prefix stripped"
    );

    let e = expect(case);
    let prev = &e["input.prev_output_tokens"];
    let model =
        Decoder::from_pretrained(&dir, &BuildOptions::default(), &Device::Cpu, DType::F32).unwrap();
    let got = model.forward(prev, &DecoderInputs::default()).unwrap().x;
    assert_close(&got, &e["expect.logits"], "Decoder logits");

    let lm = LanguageModel::from_pretrained(&dir, &Device::Cpu, DType::F32).unwrap();
    let got = lm.model.forward(prev, &DecoderInputs::default()).unwrap().x;
    assert_close(&got, &e["expect.logits"], "LanguageModel logits");
}

#[test]
fn encoder_from_a_plain_state_dict_gives_torchscales_logits() {
    let case = "encoder_relpos";
    let (_tmp, dir) = convert(case, "encoder_relpos.pt", ModelClass::Encoder, None);
    let e = expect(case);
    let model =
        Encoder::from_pretrained(&dir, &BuildOptions::default(), &Device::Cpu, DType::F32).unwrap();
    let inputs = EncoderInputs {
        padding_mask: Some(&e["input.encoder_padding_mask"]),
        ..Default::default()
    };
    let got = model
        .forward(&e["input.src_tokens"], &inputs)
        .unwrap()
        .encoder_out;
    assert_close(&got, &e["expect.logits"], "Encoder logits");
}

#[test]
fn encoder_decoder_with_all_embeddings_shared_gives_torchscales_logits() {
    let case = "encoder_decoder_shared";
    let (_tmp, dir) = convert(
        case,
        "encoder_decoder_shared.pt",
        ModelClass::EncoderDecoder,
        None,
    );
    let e = expect(case);
    let model =
        EncoderDecoder::from_pretrained(&dir, &BuildOptions::default(), &Device::Cpu, DType::F32)
            .unwrap();
    // torchscale's `model(src, prev)`: no padding mask reaches the encoder.
    let got = model
        .forward_torchscale(&e["input.src_tokens"], &e["input.prev_output_tokens"])
        .unwrap()
        .x;
    assert_close(&got, &e["expect.logits"], "EncoderDecoder logits");
}

/// `decoder_xpos_tied.f16.pt` is also a regression file: the zip crate's archive-offset search
/// rejects it, so candle's `PthTensors` cannot open it; `read_pt` reads it from byte 0.
#[test]
fn f16_and_bf16_pt_files_convert_as_themselves() {
    let (_t32, dir32) = convert(
        "decoder_xpos_tied",
        "decoder_xpos_tied.pt",
        ModelClass::Decoder,
        None,
    );
    let (f32s, _) = read_safetensors(&dir32.join("model.safetensors")).unwrap();
    for (tag, dtype) in [("bf16", DType::BF16), ("f16", DType::F16)] {
        let pt = format!("decoder_xpos_tied.{tag}.pt");
        let (_tmp, dir) = convert("decoder_xpos_tied", &pt, ModelClass::Decoder, None);
        let (half, _) = read_safetensors(&dir.join("model.safetensors")).unwrap();
        assert_eq!(half.len(), f32s.len());
        for (k, t) in &half {
            assert_eq!(t.dtype(), dtype, "{k} stored as {tag}");
            // torch rounds f32 to half to nearest even, as candle does: the same bits.
            let want = f32s[k]
                .to_dtype(dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let got = t.to_dtype(DType::F32).unwrap();
            let (g, w): (Vec<f32>, Vec<f32>) = (
                got.flatten_all().unwrap().to_vec1().unwrap(),
                want.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(g, w, "{k} ({tag})");
        }
        // And the model loads in that dtype.
        let m =
            Decoder::from_pretrained(&dir, &BuildOptions::default(), &Device::Cpu, dtype).unwrap();
        assert_eq!(m.embed_tokens().weight().dtype(), dtype);
    }
    // Converting to a chosen dtype: f32 in, bf16 out.
    let (_tmp, dir) = convert(
        "decoder_xpos_tied",
        "decoder_xpos_tied.pt",
        ModelClass::Decoder,
        Some(DType::BF16),
    );
    let (bf, _) = read_safetensors(&dir.join("model.safetensors")).unwrap();
    assert!(bf.values().all(|t| t.dtype() == DType::BF16));
}

#[test]
fn read_pt_finds_nested_and_plain_state_dicts() {
    let nested = read_pt(&fixture("decoder_xpos_tied.pt")).unwrap();
    assert!(nested
        .iter()
        .any(|(k, _)| k == "decoder.embed_tokens.weight"));
    let plain = read_pt(&fixture("encoder_relpos.pt")).unwrap();
    assert!(plain
        .iter()
        .any(|(k, _)| k == "layers.0.self_attn.q_proj.weight"));
    let not_pt = fixture("encoder_relpos.config.json");
    match read_pt(&not_pt).unwrap_err() {
        Error::File { path, .. } => assert_eq!(Path::new(&path), not_pt),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_state_dict_that_does_not_fit_its_config_is_refused_and_nothing_written() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("config.json");
    let text = std::fs::read_to_string(fixture("decoder_xpos_tied.config.json")).unwrap();
    let three = text.replacen("\"decoder_layers\": 2", "\"decoder_layers\": 3", 1);
    assert_ne!(three, text);
    std::fs::write(&cfg, three).unwrap();
    let out = tmp.path().join("out");
    let err = convert_pt(
        &fixture("decoder_xpos_tied.pt"),
        &cfg,
        ModelClass::Decoder,
        &out,
        None,
    )
    .unwrap_err();
    match err {
        Error::MissingTensor { key } => assert!(key.starts_with("layers.2."), "{key}"),
        other => panic!("{other:?}"),
    }
    assert!(!out.exists());
    // The wrong class: an encoder state_dict is not a decoder.
    let err = convert_pt(
        &fixture("encoder_relpos.pt"),
        &fixture("decoder_xpos_tied.config.json"),
        ModelClass::Decoder,
        &out,
        None,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::MissingTensor { .. }
                | Error::UnexpectedTensor { .. }
                | Error::TensorShape { .. }
        ),
        "{err:?}"
    );
    assert!(!out.exists());
}

/// The Python converter (`scripts/convert_torchscale.py`) writes the same folders as
/// `convert_pt`. It needs torch, which CI lacks: run with the reference interpreter,
/// `cargo test -p torchscale-models --test pretrained_torch -- --ignored`
/// (`TORCHSCALE_REF_PYTHON`, default `~/.cache/torchscale-ref-venv/bin/python`).
#[test]
#[ignore = "needs a Python with torch and safetensors (the reference interpreter)"]
fn the_python_converter_writes_the_same_folders() {
    let python = std::env::var_os("TORCHSCALE_REF_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/torchscale-ref-venv/bin/python"))
        })
        .filter(|p| p.is_file())
        .expect("no reference interpreter: set TORCHSCALE_REF_PYTHON");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/convert_torchscale.py");
    let cases = [
        (
            "decoder_xpos_tied",
            "decoder_xpos_tied.pt",
            ModelClass::Decoder,
        ),
        (
            "decoder_xpos_tied",
            "decoder_xpos_tied.bf16.pt",
            ModelClass::Decoder,
        ),
        ("encoder_relpos", "encoder_relpos.pt", ModelClass::Encoder),
        (
            "encoder_decoder_shared",
            "encoder_decoder_shared.pt",
            ModelClass::EncoderDecoder,
        ),
    ];
    for (case, pt, class) in cases {
        let (tmp, ours) = convert(case, pt, class, None);
        let theirs = tmp.path().join("python");
        let status = std::process::Command::new(&python)
            .arg(&script)
            .arg(fixture(pt))
            .arg("--config")
            .arg(fixture(&format!("{case}.config.json")))
            .arg("--class")
            .arg(class.name())
            .arg("--out")
            .arg(&theirs)
            .status()
            .unwrap();
        assert!(status.success(), "{pt}: {status}");
        let (a, meta_a) = read_safetensors(&ours.join("model.safetensors")).unwrap();
        let (b, meta_b) = read_safetensors(&theirs.join("model.safetensors")).unwrap();
        assert_eq!(meta_a, meta_b, "{pt}");
        let mut keys: Vec<&String> = a.keys().collect();
        keys.sort();
        let mut theirs_keys: Vec<&String> = b.keys().collect();
        theirs_keys.sort();
        assert_eq!(keys, theirs_keys, "{pt}");
        for k in keys {
            assert_eq!(a[k].dtype(), b[k].dtype(), "{pt} {k}");
            let (x, y): (Vec<f32>, Vec<f32>) = (
                a[k].flatten_all()
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
                b[k].flatten_all()
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
            );
            assert_eq!(x, y, "{pt} {k}");
        }
    }
}
