//! The Rust side of `cargo xtask export-check` (no Python needed): the checkpoint it writes has
//! torchscale's layout (FORMAT.md), reloads strictly into a fresh model with identical outputs,
//! the comparison fails on a perturbed reference, and a missing interpreter is a clear error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use torchscale_models::checkpoint::read_safetensors;
use xtask::export_check::{
    compare_dir, default_cases, find_python, make_inputs, prepare, run_ours, Checkpoint,
    ModelConfig, Options, MODEL_FILE, OURS_FILE, REFERENCE_FILE,
};
use xtask::golden::Tolerance;

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("export_check")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn case(name: &str) -> (ModelConfig, bool) {
    default_cases()
        .into_iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, c, l)| (c, l))
        .unwrap()
}

fn saved(name: &str, seed: u64) -> (Checkpoint, PathBuf) {
    let (cfg, learned) = case(name);
    let ck = Checkpoint::new(cfg, learned, seed).unwrap();
    ck.perturb_norms(seed + 1).unwrap();
    // One folder per (case, seed): tests run in parallel and several save the same case.
    let dir = tmp(&format!("{name}-{seed}"));
    ck.save(&dir).unwrap();
    (ck, dir)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn every_case_reloads_strictly_with_identical_outputs() {
    for (i, (name, _, _)) in default_cases().into_iter().enumerate() {
        let (ck, dir) = saved(name, 10 + i as u64);
        let back = Checkpoint::load(&dir).unwrap();
        assert_eq!(back.config.class(), ck.config.class(), "{name}");
        for (key, var) in ck.store.named_vars() {
            let other = back
                .store
                .get(&key)
                .unwrap_or_else(|| panic!("{name}: {key}"));
            assert_eq!(
                max_abs(var.as_tensor(), other.as_tensor()),
                0.0,
                "{name}: {key}"
            );
        }
        let inputs = make_inputs(&ck, 3).unwrap();
        let a = run_ours(&ck, &inputs).unwrap();
        let b = run_ours(&back, &inputs).unwrap();
        assert!(!a.is_empty(), "{name}");
        for (k, t) in &a {
            assert_eq!(max_abs(t, &b[k]), 0.0, "{name}: {k}");
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{name}: {k}");
        }
        // Every tensor in the file is a parameter, a buffer or a tie torchscale also stores.
        let (tensors, _) = read_safetensors(&dir.join(MODEL_FILE)).unwrap();
        let expected =
            ck.store.named_vars().len() + ck.buffers().unwrap().len() + ck.aliases().len();
        assert_eq!(tensors.len(), expected, "{name}");
    }
}

#[test]
fn tied_decoder_lm_has_torchscale_layout() {
    let (ck, dir) = saved("decoder_subln_lm_tied", 1);
    let ModelConfig::Decoder(cfg) = &ck.config else {
        panic!("not a decoder")
    };
    let (t, meta) = read_safetensors(&dir.join(MODEL_FILE)).unwrap();
    assert_eq!(meta["model_class"], "Decoder");
    assert_eq!(meta["learned_positions"], "true");
    // torchscale's state_dict holds the tied table under both modules.
    assert_eq!(
        ck.aliases(),
        vec![(
            "output_projection.weight".to_string(),
            "embed_tokens.weight".to_string()
        )]
    );
    assert_eq!(
        max_abs(&t["output_projection.weight"], &t["embed_tokens.weight"]),
        0.0
    );
    // PositionalEmbedding(max_positions + 2, dim).
    assert_eq!(
        t["embed_positions.weight"].dims(),
        &[cfg.max_target_positions + 2, cfg.decoder_embed_dim]
    );
    // TextEmbedding(vocab, dim, padding_idx=1): row 1 is zero.
    let row1 = t["embed_tokens.weight"].get(1).unwrap().abs().unwrap();
    assert_eq!(row1.max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0);
    // Sub-LN keys; LayerNorms perturbed away from (1, 0).
    for k in [
        "layers.0.self_attn.inner_attn_ln.weight",
        "layers.0.ffn.ffn_layernorm.bias",
        "layer_norm.weight",
    ] {
        assert!(t.contains_key(k), "{k}");
    }
    let ln = t["layer_norm.weight"].ones_like().unwrap();
    assert!(max_abs(&t["layer_norm.weight"], &ln) > 0.05);
    // config.json: torchscale's field names, finalised values.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(json["decoder_embed_dim"], 128);
    assert_eq!(json["vocab_size"], 260);
    assert_eq!(json["share_decoder_input_output_embed"], true);
    assert_eq!(json["subln"], true);
    assert_eq!(json["decoder_normalize_before"], true);
}

#[test]
fn shared_encoder_decoder_and_xpos_layouts() {
    let (_, dir) = saved("encoder_decoder_deepnorm_shared", 2);
    let (t, meta) = read_safetensors(&dir.join(MODEL_FILE)).unwrap();
    assert_eq!(meta["model_class"], "EncoderDecoder");
    let e = &t["encoder.embed_tokens.weight"];
    assert_eq!(max_abs(&t["decoder.embed_tokens.weight"], e), 0.0);
    assert_eq!(max_abs(&t["decoder.output_projection.weight"], e), 0.0);
    // An encoder inside an encoder-decoder has no output projection; DeepNorm has no final LN.
    assert!(!t.contains_key("encoder.output_projection.weight"));
    assert!(!t.contains_key("decoder.layer_norm.weight"));
    assert!(t.contains_key("decoder.layers.0.encoder_attn.k_proj.weight"));

    // xPos: no absolute positions; the scale buffer is zeta_m = (2m + 0.4 d) / (1.4 d).
    let (ck, dir) = saved("decoder_xpos", 3);
    let ModelConfig::Decoder(cfg) = &ck.config else {
        panic!("not a decoder")
    };
    let (t, meta) = read_safetensors(&dir.join(MODEL_FILE)).unwrap();
    assert_eq!(meta["learned_positions"], "false");
    assert!(!t.contains_key("embed_positions.weight"));
    let d = (cfg.decoder_embed_dim / cfg.decoder_attention_heads) as f64;
    for l in 0..cfg.decoder_layers {
        let s: Vec<f32> = t[&format!("layers.{l}.self_attn.xpos.scale")]
            .to_vec1()
            .unwrap();
        assert_eq!(s.len() as f64, d / 2.0);
        for (m, v) in s.iter().enumerate() {
            let want = (2.0 * m as f64 + 0.4 * d) / (1.4 * d);
            assert!(
                (*v as f64 - want).abs() < 1e-6,
                "layer {l} m {m}: {v} vs {want}"
            );
        }
    }
}

#[test]
fn inputs_follow_the_golden_conventions() {
    let (cfg, learned) = case("decoder_xmoe_top2");
    let ck = Checkpoint::new(cfg, learned, 4).unwrap();
    let inp = make_inputs(&ck, 5).unwrap();
    let toks = &inp["input.prev_output_tokens"];
    let (b, t) = toks.dims2().unwrap();
    let ids: Vec<Vec<i64>> = toks.to_vec2().unwrap();
    for row in &ids {
        assert_eq!(row[0], 2, "decoder inputs start with </s>");
        assert!(row[1..].iter().all(|&x| (4..260).contains(&x)));
    }
    // moe_freq 2: layers 1 and 3 route; one uniform per token each, in [0, 1).
    let mut keys: Vec<&String> = inp.keys().filter(|k| k.contains("moe_uniform")).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "input.moe_uniform.layers.1.moe_layer",
            "input.moe_uniform.layers.3.moe_layer"
        ]
    );
    let u: Vec<f32> = inp[keys[0]].to_vec1().unwrap();
    assert_eq!(u.len(), b * t);
    assert!(u.iter().all(|x| (0.0..1.0).contains(x)));

    let (cfg, learned) = case("encoder_subln");
    let ck = Checkpoint::new(cfg, learned, 4).unwrap();
    let inp = make_inputs(&ck, 5).unwrap();
    // Right padding with token 1, and the mask is exactly src == 1.
    let src = &inp["input.src_tokens"];
    let mask = inp["input.encoder_padding_mask"]
        .to_dtype(DType::I64)
        .unwrap();
    let is_pad = src.eq(1i64).unwrap().to_dtype(DType::I64).unwrap();
    assert_eq!(
        max_abs(
            &mask.to_dtype(DType::F32).unwrap(),
            &is_pad.to_dtype(DType::F32).unwrap()
        ),
        0.0
    );
    assert!(mask.sum_all().unwrap().to_scalar::<i64>().unwrap() > 0);
}

fn write_reference(work: &Path, shift: f64) {
    let (ours, _) = read_safetensors(&work.join(OURS_FILE)).unwrap();
    let refs: HashMap<String, Tensor> = ours
        .iter()
        .filter_map(|(k, t)| {
            k.strip_prefix("ours.")
                .map(|s| (s.to_string(), (t + shift).unwrap()))
        })
        .collect();
    candle_core::safetensors::save(&refs, work.join(REFERENCE_FILE)).unwrap();
}

#[test]
fn comparison_passes_identical_and_fails_perturbed() {
    let (_, dir) = saved("encoder_decoder_subln", 6);
    let ck = Checkpoint::load(&dir).unwrap();
    let work = tmp("encoder_decoder_subln_work");
    prepare(&ck, &dir, &work).unwrap();

    write_reference(&work, 0.0);
    let r = compare_dir("x", &work, Tolerance::STRICT_FORWARD).unwrap();
    let keys: Vec<&str> = r.comparisons.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["logits", "logits_masked"]);
    assert!(r.pass(), "{}", r.line());
    assert!(r.comparisons.iter().all(|c| c.max_abs == 0.0));

    // A shift of 1e-4 exceeds atol 5e-6 + 1e-5 |x| for every logit of magnitude below ~9.5.
    write_reference(&work, 1e-4);
    let r = compare_dir("x", &work, Tolerance::STRICT_FORWARD).unwrap();
    assert!(!r.pass(), "{}", r.line());
    for c in &r.comparisons {
        assert!((c.max_abs - 1e-4).abs() < 1e-5, "{}: {}", c.key, c.max_abs);
    }
    assert!(r.line().contains("FAIL"));
}

#[test]
fn strict_load_rejects_missing_and_unexpected_tensors() {
    let (_, dir) = saved("decoder_subln_lm_untied", 7);
    let path = dir.join(MODEL_FILE);
    let (mut t, meta) = read_safetensors(&path).unwrap();
    let write = |t: &HashMap<String, Tensor>| {
        let views: Vec<(String, Tensor)> = t.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let data: Vec<(String, Vec<u8>, Vec<usize>)> = views
            .iter()
            .map(|(k, v)| {
                let f: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
                (
                    k.clone(),
                    f.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    v.dims().to_vec(),
                )
            })
            .collect();
        let views = data.iter().map(|(k, b, s)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        });
        std::fs::write(
            &path,
            safetensors::serialize(views, Some(meta.clone())).unwrap(),
        )
        .unwrap();
    };
    let w = t.remove("layers.1.ffn.fc2.weight").unwrap();
    write(&t);
    let err = format!("{:#}", Checkpoint::load(&dir).unwrap_err());
    assert!(err.contains("layers.1.ffn.fc2.weight"), "{err}");

    t.insert("layers.1.ffn.fc2.weight".into(), w.clone());
    t.insert("layers.9.ffn.fc2.weight".into(), w);
    write(&t);
    let err = format!("{:#}", Checkpoint::load(&dir).unwrap_err());
    assert!(err.contains("layers.9.ffn.fc2.weight"), "{err}");
}

#[test]
fn missing_interpreter_is_a_clear_error() {
    let err = find_python(Some(Path::new("/nonexistent/bin/python")), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/bin/python"), "{err}");
    // The command that makes the environment, for the folder the user named.
    assert!(
        err.contains("`cargo xtask ref-setup --venv /nonexistent`") && err.contains("--python"),
        "{err}"
    );
    assert!(err.contains("bash xtask/scripts/setup_ref.sh"), "{err}");

    let home = tmp("empty_home");
    std::fs::create_dir_all(&home).unwrap();
    let err = find_python(None, Some(&home)).unwrap_err().to_string();
    // Shown under `~`, not as this machine's home folder.
    assert!(
        err.contains("no Python interpreter at ~/.cache/torchscale-ref-venv/bin/python"),
        "{err}"
    );
    assert!(!err.contains(&home.display().to_string()), "{err}");
    assert!(err.contains("`cargo xtask ref-setup`"), "{err}");

    // An interpreter that exists is accepted as given.
    let fake = home.join("python");
    std::fs::write(&fake, "").unwrap();
    assert_eq!(find_python(Some(&fake), None).unwrap(), fake);
}

#[test]
fn options_parse() {
    let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let o = Options::parse(&args(&[
        "--checkpoint",
        "runs/x",
        "--out",
        "o",
        "--python",
        "p",
    ]))
    .unwrap();
    assert_eq!(o.checkpoint.as_deref(), Some(Path::new("runs/x")));
    assert_eq!(o.out, PathBuf::from("o"));
    assert_eq!(o.python.as_deref(), Some(Path::new("p")));
    assert!(o.out.ends_with("o"));
    let d = Options::parse(&[]).unwrap();
    assert!(d.out.ends_with("target/export-check"));
    assert!(Options::parse(&args(&["--out"])).is_err());
    assert!(Options::parse(&args(&["--bogus"])).is_err());
    assert!(Options::parse(&args(&["--tolerance", "loose"])).is_err());
}
