//! Every public golden file runs through `cargo xtask parity`'s checker under the strict
//! tolerances; each dense kind must PASS (a SKIP there is a failure).

use std::path::PathBuf;

use xtask::parity::{check_file, Status, TolMode};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden")
}

const DENSE: &[&str] = &[
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
];

#[test]
fn dense_and_moe_golden_files_pass_strict() {
    let files = xtask::golden::collect_files(&[golden_dir()]).unwrap();
    let mut seen = Vec::new();
    for f in &files {
        let r = check_file(f, TolMode::Strict);
        if DENSE.contains(&r.kind.as_str()) {
            assert_eq!(r.status, Status::Pass, "{}", r.line());
            assert!(!r.comparisons.is_empty());
            seen.push(r.kind.clone());
        } else {
            assert_ne!(r.status, Status::Fail, "{}", r.line());
        }
    }
    for k in DENSE {
        assert!(
            seen.iter().any(|s| s == k),
            "golden file of kind {k} not found"
        );
    }
}

#[test]
fn a_wrong_weight_fails() {
    // The checker must be able to fail: perturb one LayerNorm weight and expect FAIL.
    let src = golden_dir().join("encoder_postln.safetensors");
    let (mut tensors, meta) = torchscale_models::checkpoint::read_safetensors(&src).unwrap();
    let key = "layers.1.final_layer_norm.weight";
    let w = tensors[key].clone();
    tensors.insert(key.into(), (w * 1.01).unwrap());
    let dir = std::env::temp_dir().join(format!("tsrs-parity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("perturbed.safetensors");
    candle_core::safetensors::save(&tensors, &out).unwrap();
    // Re-attach the metadata (candle's save writes none).
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    let data = safetensors::serialize(views, Some(meta)).unwrap();
    std::fs::write(&out, data).unwrap();
    let r = check_file(&out, TolMode::Strict);
    assert_eq!(r.status, Status::Fail, "{}", r.line());
}
