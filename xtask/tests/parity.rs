//! Every public golden file runs through `cargo xtask parity`'s checker under the strict
//! tolerances and must PASS (a SKIP is a failure); a perturbed file must FAIL.

use std::path::PathBuf;

use xtask::parity::{check_file, Status, TolMode};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden")
}

const KINDS: &[&str] = &[
    "encoder_postln",
    "encoder_preln",
    "encoder_subln",
    "encoder_deepnorm",
    "encoder_relpos",
    "encoder_multiway",
    "decoder_subln",
    "decoder_deepnorm",
    "decoder_xpos",
    "decoder_relpos",
    "decoder_incremental",
    "decoder_incremental_xpos",
    "encoder_decoder_subln",
    "encoder_decoder_deepnorm",
    "admin_residual",
    "decoder_moe_top1",
    "decoder_moe_top2",
    "encoder_moe_top2",
    "grad_encoder_subln",
    "grad_decoder_moe_top2",
    "sparse_clip",
];

#[test]
fn every_golden_file_passes_strict() {
    let files = xtask::golden::collect_files(&[golden_dir()]).unwrap();
    let mut seen = Vec::new();
    for f in &files {
        let r = check_file(f, TolMode::Strict);
        assert_eq!(r.status, Status::Pass, "{}", r.line());
        assert!(!r.comparisons.is_empty());
        seen.push(r.kind.clone());
    }
    for k in KINDS {
        assert!(
            seen.iter().any(|s| s == k),
            "golden file of kind {k} not found"
        );
    }
}

/// Copies golden file `name` with tensor `key` scaled by `factor`, keeping the metadata, into a
/// temporary folder (removed when the returned guard drops).
fn perturbed(name: &str, key: &str, factor: f64) -> (tempfile::TempDir, PathBuf) {
    let src = golden_dir().join(format!("{name}.safetensors"));
    let (mut tensors, meta) = torchscale_models::checkpoint::read_safetensors(&src).unwrap();
    let w = tensors[key].clone();
    tensors.insert(key.into(), (w * factor).unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join(format!("{name}.safetensors"));
    candle_core::safetensors::save(&tensors, &out).unwrap();
    // Re-attach the metadata (candle's save writes none).
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    let data = safetensors::serialize(views, Some(meta)).unwrap();
    std::fs::write(&out, data).unwrap();
    (tmp, out)
}

fn assert_fails(name: &str, key: &str, factor: f64) {
    let (_tmp, path) = perturbed(name, key, factor);
    let r = check_file(&path, TolMode::Strict);
    assert_eq!(r.status, Status::Fail, "{}", r.line());
}

#[test]
fn a_wrong_weight_fails() {
    assert_fails("encoder_postln", "layers.1.final_layer_norm.weight", 1.01);
}

#[test]
fn a_wrong_gradient_fails() {
    assert_fails("grad_encoder_subln", "grad.layers.0.ffn.fc1.weight", 1.001);
    assert_fails(
        "grad_decoder_moe_top2",
        "grad.layers.0.ffn.fc2.weight",
        1.01,
    );
    assert_fails(
        "grad_decoder_moe_top2",
        "grad_laux.layers.1.moe_layer.gate.wg",
        1.1,
    );
}

#[test]
fn a_wrong_clipped_expert_gradient_fails() {
    assert_fails(
        "sparse_clip",
        "expect.clipped_sparse_intended.expert.0.0",
        1.001,
    );
}
