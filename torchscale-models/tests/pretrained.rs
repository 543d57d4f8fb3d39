//! `from_pretrained` on folders written by our own save: the loaded model gives the saved
//! model's logits bit for bit, in every dtype; bad folders give typed errors naming the key,
//! field or path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use torchscale_core::init::ParamStore;
use torchscale_core::Error;
use torchscale_models::checkpoint::{read_safetensors, save_file, serialize};
use torchscale_models::{
    BuildOptions, Decoder, DecoderConfig, DecoderInputs, Encoder, EncoderConfig, EncoderDecoder,
    EncoderDecoderConfig, EncoderInputs, LanguageModel,
};

const V: i64 = 40;

fn lm_config() -> DecoderConfig {
    DecoderConfig::new()
        .with_vocab_size(V)
        .with_embed_dim(16)
        .with_heads(2)
        .with_ffn_dim(32)
        .with_layers(2)
        .with_max_positions(32)
        .with_share_input_output_embed(true)
}

fn tokens() -> Tensor {
    Tensor::new(
        &[[2u32, 7, 9, 30, 4, 11], [2, 5, 5, 39, 12, 1]],
        &Device::Cpu,
    )
    .unwrap()
}

fn logits(model: &Decoder) -> Vec<Vec<Vec<f32>>> {
    let x = model
        .forward(&tokens(), &DecoderInputs::default())
        .unwrap()
        .x;
    x.to_dtype(DType::F32).unwrap().to_vec3().unwrap()
}

fn saved_lm(dtype: DType) -> (tempfile::TempDir, PathBuf, LanguageModel) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lm");
    let lm = LanguageModel::with_dtype(lm_config(), true, 3, &Device::Cpu, dtype).unwrap();
    lm.save(&dir, None).unwrap();
    (tmp, dir, lm)
}

/// Rewrites `dir/model.safetensors` through `edit`, keeping its metadata.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let (mut tensors, meta) = read_safetensors(&path).unwrap();
    edit(&mut tensors);
    let mut list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    std::fs::write(&path, serialize(&list, meta).unwrap()).unwrap();
}

fn load_decoder(dir: &Path) -> torchscale_core::Result<Decoder> {
    Decoder::from_pretrained(dir, &BuildOptions::default(), &Device::Cpu, DType::F32)
}

#[test]
fn decoder_and_lm_from_an_lm_checkpoint_give_its_logits_exactly() {
    let (_tmp, dir, lm) = saved_lm(DType::F32);
    let want = logits(&lm.model);
    assert_eq!(logits(&load_decoder(&dir).unwrap()), want);
    let back = LanguageModel::from_pretrained(&dir, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(logits(&back.model), want);
    // Trainable: the same parameters, as Vars of the store.
    assert_eq!(back.num_parameters(), lm.num_parameters());
    assert_eq!(back.store.named_vars().len(), lm.store.named_vars().len());
}

#[test]
fn checkpoints_keep_f32_f16_bf16_bit_exactly() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let (_tmp, dir, lm) = saved_lm(dtype);
        let (file, _) = read_safetensors(&dir.join("model.safetensors")).unwrap();
        assert_eq!(file["embed_tokens.weight"].dtype(), dtype, "stored dtype");
        let back = LanguageModel::from_pretrained(&dir, &Device::Cpu, dtype).unwrap();
        for (name, var) in lm.store.named_vars() {
            let got = back.store.get(&name).unwrap();
            assert_eq!(got.dtype(), dtype);
            // Widening f16 / bf16 to f32 is exact, so equal f32 values mean equal bits.
            let a: Vec<f32> = var
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f32> = got
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(a, b, "{name} in {dtype:?}");
        }
        let inference =
            Decoder::from_pretrained(&dir, &BuildOptions::default(), &Device::Cpu, dtype).unwrap();
        assert_eq!(logits(&inference), logits(&lm.model), "{dtype:?}");
    }
}

#[test]
fn an_f32_checkpoint_loads_into_bf16_rounded() {
    let (_tmp, dir, lm) = saved_lm(DType::F32);
    let back = LanguageModel::from_pretrained(&dir, &Device::Cpu, DType::BF16).unwrap();
    let w = back.store.get("layers.0.ffn.fc1.weight").unwrap();
    assert_eq!(w.dtype(), DType::BF16);
    let want = lm
        .store
        .get("layers.0.ffn.fc1.weight")
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let (a, b): (Vec<f32>, Vec<f32>) = (
        w.flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap(),
        want.flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap(),
    );
    assert_eq!(a, b);
}

#[test]
fn encoder_from_its_checkpoint_gives_its_logits_exactly() {
    let cfg = EncoderConfig::new()
        .with_vocab_size(V)
        .with_embed_dim(16)
        .with_heads(2)
        .with_ffn_dim(32)
        .with_layers(2)
        .with_rel_pos(8, 16)
        .with_deepnorm(true);
    let store = ParamStore::new(5);
    let opts = BuildOptions::default();
    let model = Encoder::new(&cfg, &opts, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let meta = HashMap::from([("model_class".to_string(), "Encoder".to_string())]);
    save_file(
        &store,
        &model.buffers().unwrap(),
        &[],
        meta,
        &tmp.path().join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        cfg.to_json_string().unwrap(),
    )
    .unwrap();
    let mask = tokens().eq(1u32).unwrap();
    let run = |m: &Encoder| -> Vec<Vec<Vec<f32>>> {
        let inp = EncoderInputs {
            padding_mask: Some(&mask),
            ..Default::default()
        };
        m.forward(&tokens(), &inp)
            .unwrap()
            .encoder_out
            .to_vec3()
            .unwrap()
    };
    let back = Encoder::from_pretrained(tmp.path(), &opts, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(run(&back), run(&model));
}

#[test]
fn encoder_decoder_with_shared_embeddings_gives_its_logits_exactly() {
    let mut cfg = EncoderDecoderConfig::new()
        .with_vocab_size(V)
        .with_xpos(false);
    cfg.encoder_embed_dim = 16;
    cfg.decoder_embed_dim = 16;
    cfg.encoder_attention_heads = 2;
    cfg.decoder_attention_heads = 2;
    cfg.encoder_ffn_embed_dim = 32;
    cfg.decoder_ffn_embed_dim = 32;
    cfg.encoder_layers = 2;
    cfg.decoder_layers = 1;
    cfg.max_source_positions = 16;
    cfg.max_target_positions = 16;
    cfg.share_all_embeddings = true;
    let store = ParamStore::new(9);
    let opts = BuildOptions::default();
    let model =
        EncoderDecoder::new(&cfg, &opts, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    assert!(
        store.get("decoder.embed_tokens.weight").is_none(),
        "one shared table"
    );
    let tmp = tempfile::tempdir().unwrap();
    // torchscale's state_dict lists the shared table under every module using it.
    let aliases = [
        ("decoder.embed_tokens.weight", "encoder.embed_tokens.weight"),
        (
            "decoder.output_projection.weight",
            "encoder.embed_tokens.weight",
        ),
    ];
    save_file(
        &store,
        &model.buffers().unwrap(),
        &aliases,
        HashMap::new(),
        &tmp.path().join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        cfg.to_json_string().unwrap(),
    )
    .unwrap();
    let src = tokens();
    let mask = src.eq(1u32).unwrap();
    let prev = src.narrow(1, 0, 4).unwrap();
    let run = |m: &EncoderDecoder| -> Vec<Vec<Vec<f32>>> {
        m.forward(&src, Some(&mask), &prev, false)
            .unwrap()
            .1
            .x
            .to_vec3()
            .unwrap()
    };
    let back =
        EncoderDecoder::from_pretrained(tmp.path(), &opts, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(run(&back), run(&model));

    // A tied copy that disagrees with its table is refused.
    let path = tmp.path().to_path_buf();
    edit_weights(&path, |t| {
        let w = t["decoder.output_projection.weight"].clone();
        t.insert(
            "decoder.output_projection.weight".into(),
            (w + 1.0).unwrap(),
        );
    });
    match EncoderDecoder::from_pretrained(&path, &opts, &Device::Cpu, DType::F32).unwrap_err() {
        Error::Invalid { what, .. } => assert_eq!(what, "decoder.output_projection.weight"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn sharded_and_prefixed_checkpoints_load() {
    let (tmp, dir, lm) = saved_lm(DType::F32);
    let want = logits(&lm.model);
    let (tensors, meta) = read_safetensors(&dir.join("model.safetensors")).unwrap();
    let mut list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));

    // Two shards and an index, in the layout Hugging Face uses.
    let sharded = tmp.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    let half = list.len() / 2;
    let mut map = serde_json::Map::new();
    for (i, part) in [&list[..half], &list[half..]].into_iter().enumerate() {
        let name = format!("model-{:05}-of-00002.safetensors", i + 1);
        std::fs::write(sharded.join(&name), serialize(part, meta.clone()).unwrap()).unwrap();
        for (k, _) in part {
            map.insert(k.clone(), name.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    std::fs::copy(dir.join("config.json"), sharded.join("config.json")).unwrap();
    assert_eq!(logits(&load_decoder(&sharded).unwrap()), want);

    // fairseq's LM keeps the decoder under `decoder.`, a wrapper under `model.`.
    let prefixed = tmp.path().join("prefixed");
    std::fs::create_dir_all(&prefixed).unwrap();
    let renamed: Vec<(String, Tensor)> = list
        .iter()
        .map(|(k, t)| (format!("model.decoder.{k}"), t.clone()))
        .collect();
    std::fs::write(
        prefixed.join("model.safetensors"),
        serialize(&renamed, meta).unwrap(),
    )
    .unwrap();
    std::fs::copy(dir.join("config.json"), prefixed.join("config.json")).unwrap();
    assert_eq!(logits(&load_decoder(&prefixed).unwrap()), want);
    let lm2 = LanguageModel::from_pretrained(&prefixed, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(logits(&lm2.model), want);
}

#[test]
fn the_padding_row_comes_from_the_file() {
    // nn.Embedding zeroes its padding row at construction; load_state_dict then writes the
    // file's row, so a checkpoint whose row 1 is not zero keeps it.
    let (_tmp, dir, _lm) = saved_lm(DType::F32);
    edit_weights(&dir, |t| {
        let w = t["embed_tokens.weight"].clone();
        let row = Tensor::full(0.25f32, (1, 16), &Device::Cpu).unwrap();
        w.slice_set(&row, 0, 1).unwrap();
        t.insert("output_projection.weight".into(), w.copy().unwrap());
    });
    let model = load_decoder(&dir).unwrap();
    let row: Vec<f32> = model
        .embed_tokens()
        .weight()
        .get(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(row, vec![0.25f32; 16]);
}

#[test]
fn config_errors_name_the_path_and_field() {
    let (_tmp, dir, _lm) = saved_lm(DType::F32);
    let cfg = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();

    std::fs::remove_file(&cfg).unwrap();
    match load_decoder(&dir).unwrap_err() {
        Error::File { path, .. } => assert_eq!(Path::new(&path), cfg),
        other => panic!("{other:?}"),
    }

    std::fs::write(&cfg, "{\"decoder_layers\": 2,").unwrap();
    match load_decoder(&dir).unwrap_err() {
        Error::File { path, reason } => {
            assert_eq!(Path::new(&path), cfg);
            assert!(reason.contains("JSON"), "{reason}");
        }
        other => panic!("{other:?}"),
    }

    let bad = text.replacen("\"decoder_layers\": 2", "\"decoder_layers\": \"two\"", 1);
    assert_ne!(bad, text, "the config names decoder_layers");
    std::fs::write(&cfg, bad).unwrap();
    match load_decoder(&dir).unwrap_err() {
        Error::Config { field, reason } => {
            assert_eq!(field, "decoder_layers");
            assert!(reason.contains(&cfg.display().to_string()), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    match LanguageModel::from_pretrained(&dir, &Device::Cpu, DType::F32).unwrap_err() {
        Error::Config { field, .. } => assert_eq!(field, "decoder_layers"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn weight_errors_name_the_key() {
    let (_tmp, dir, _lm) = saved_lm(DType::F32);

    edit_weights(&dir, |t| {
        t.remove("layers.1.ffn.fc2.bias");
    });
    match load_decoder(&dir).unwrap_err() {
        Error::MissingTensor { key } => assert_eq!(key, "layers.1.ffn.fc2.bias"),
        other => panic!("{other:?}"),
    }
    match LanguageModel::from_pretrained(&dir, &Device::Cpu, DType::F32).unwrap_err() {
        Error::MissingTensor { key } => assert_eq!(key, "layers.1.ffn.fc2.bias"),
        other => panic!("{other:?}"),
    }

    edit_weights(&dir, |t| {
        t.insert(
            "layers.1.ffn.fc2.bias".into(),
            Tensor::zeros(17, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    match load_decoder(&dir).unwrap_err() {
        Error::TensorShape { key, expected, got } => {
            assert_eq!(key, "layers.1.ffn.fc2.bias");
            assert_eq!((expected, got), (vec![16], vec![17]));
        }
        other => panic!("{other:?}"),
    }

    edit_weights(&dir, |t| {
        t.insert(
            "layers.1.ffn.fc2.bias".into(),
            Tensor::zeros(16, DType::F32, &Device::Cpu).unwrap(),
        );
        t.insert(
            "layers.7.extra.weight".into(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    match load_decoder(&dir).unwrap_err() {
        Error::UnexpectedTensor { key } => assert_eq!(key, "layers.7.extra.weight"),
        other => panic!("{other:?}"),
    }
    match LanguageModel::from_pretrained(&dir, &Device::Cpu, DType::F32).unwrap_err() {
        Error::UnexpectedTensor { key } => assert_eq!(key, "layers.7.extra.weight"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn folder_errors_name_the_path() {
    let (_tmp, dir, _lm) = saved_lm(DType::F32);
    // A Decoder checkpoint is not an Encoder.
    match Encoder::from_pretrained(&dir, &BuildOptions::default(), &Device::Cpu, DType::F32)
        .unwrap_err()
    {
        Error::File { path, reason } => {
            assert!(path.ends_with("model.safetensors"), "{path}");
            assert!(reason.contains("Decoder"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    match load_decoder(&dir).unwrap_err() {
        Error::File { path, .. } => assert!(path.ends_with("model.safetensors"), "{path}"),
        other => panic!("{other:?}"),
    }
    let nowhere = dir.join("nowhere");
    match load_decoder(&nowhere).unwrap_err() {
        Error::File { path, .. } => assert_eq!(Path::new(&path), nowhere),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_moe_lm_checkpoint_loads_with_its_experts_and_gate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("moe");
    let cfg = lm_config().with_moe(1, 4);
    let lm = LanguageModel::with_dtype(cfg, true, 5, &Device::Cpu, DType::F32).unwrap();
    let names: Vec<String> = lm.store.named_vars().into_iter().map(|(n, _)| n).collect();
    assert!(
        names.iter().any(|n| n.contains("experts.3.")) && names.iter().any(|n| n.contains("gate")),
        "the test model has no experts or gate: {names:?}"
    );
    lm.save(&dir, None).unwrap();
    let want = logits(&lm.model);
    assert_eq!(logits(&load_decoder(&dir).unwrap()), want);
    let back = LanguageModel::from_pretrained(&dir, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(logits(&back.model), want);
    assert_eq!(back.num_parameters(), lm.num_parameters());
    // An expert missing from the file is an error that names it.
    let gone = names
        .iter()
        .find(|n| n.contains("experts.3."))
        .unwrap()
        .clone();
    edit_weights(&dir, |t| {
        t.remove(&gone);
    });
    match LanguageModel::from_pretrained(&dir, &Device::Cpu, DType::F32) {
        Err(Error::MissingTensor { key }) => assert!(gone.ends_with(&key), "{key} vs {gone}"),
        other => panic!("expected MissingTensor for {gone}, got {other:?}"),
    }
}
