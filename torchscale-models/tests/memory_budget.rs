//! Sizes from a config meet memory before anything is allocated (issue #14): configs far beyond
//! the machine are typed errors, never an abort or a panic; the count the budget uses is the
//! exact parameter count of the built model.
//!
//! Run under an address-space limit, these tests prove no refused config allocates:
//! `prlimit --as=8000000000 cargo test -p torchscale-models --test memory_budget`.

mod common;

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::Init;
use torchscale_core::init::ParamStore;
use torchscale_core::Error;
use torchscale_models::build::budget::{decoder_size, encoder_decoder_size, encoder_size};
use torchscale_models::build::ModelSize;
use torchscale_models::config::{
    DecoderConfig, EncoderConfig, EncoderDecoderConfig, LayerTechnique, Technique,
};
use torchscale_models::lm::{LanguageModel, LossConfig, CONFIG_FILE};
use torchscale_models::{BuildOptions, Decoder, Encoder, EncoderDecoder};

use common::{tiny_decoder, tiny_encoder, tiny_encoder_decoder};

/// Every refusal must come well within this (no table is filled, no layer built).
const QUICK: Duration = Duration::from_secs(5);

fn scalars(store: &ParamStore) -> (u128, u128) {
    store.named_vars().iter().fold((0, 0), |(n, b), (_, v)| {
        let e = v.elem_count() as u128;
        (n + e, b + e * v.dtype().size_in_bytes() as u128)
    })
}

/// Builds with `build` in `dtype` and checks the store against `size`: the parameter count
/// exactly, and bytes = count × dtype size.
fn assert_exact(
    name: &str,
    size: ModelSize,
    dtype: DType,
    build: impl FnOnce(candle_nn::VarBuilder<'static>) -> torchscale_core::Result<()>,
) {
    let store = ParamStore::new(0);
    build(store.var_builder(dtype, &Device::Cpu)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let (count, bytes) = scalars(&store);
    assert_eq!(size.params, count, "{name}: parameter count");
    assert_eq!(size.param_bytes(dtype), bytes, "{name}: bytes");
}

fn decoders() -> Vec<(&'static str, DecoderConfig)> {
    vec![
        ("dense sub-ln (default)", tiny_decoder()),
        (
            "post-ln",
            tiny_decoder()
                .with_subln(false)
                .with_normalize_before(false),
        ),
        ("deepnorm", tiny_decoder().with_deepnorm(true)),
        ("admin", tiny_decoder().with_technique(Technique::Admin)),
        (
            "admin learnable omega",
            tiny_decoder()
                .with_technique(Technique::Admin)
                .with_admin_as_parameter(true),
        ),
        ("moe top-2", tiny_decoder().with_layers(4).with_moe(2, 4)),
        (
            "x-moe paper routing",
            tiny_decoder()
                .with_moe(1, 3)
                .with_xmoe(true)
                .with_xmoe_paper_routing(true),
        ),
        (
            "moe list",
            tiny_decoder()
                .with_layers(5)
                .with_moe(1, 2)
                .with_moe_layers(Some(vec![3, 0])),
        ),
        (
            "tied, rel-pos, embedding norm",
            tiny_decoder()
                .with_share_input_output_embed(true)
                .with_rel_pos(16, 32)
                .with_layernorm_embedding(true),
        ),
        ("no output layer", tiny_decoder().with_no_output_layer(true)),
        ("multiway", tiny_decoder().with_multiway(true)),
        (
            "mixed techniques",
            tiny_decoder().with_layers(4).with_layer_techniques(vec![
                LayerTechnique::new(0..2, Technique::PostLn),
                LayerTechnique::new(3..4, Technique::DeepNorm),
            ]),
        ),
        ("xpos", tiny_decoder().with_xpos(true)),
    ]
}

fn encoders() -> Vec<(&'static str, EncoderConfig)> {
    vec![
        ("dense sub-ln (default)", tiny_encoder()),
        (
            "multiway, rel-pos, embedding norm",
            tiny_encoder()
                .with_multiway(true)
                .with_rel_pos(8, 16)
                .with_layernorm_embedding(true),
        ),
        (
            "multiway admin learnable omega",
            tiny_encoder()
                .with_multiway(true)
                .with_technique(Technique::Admin)
                .with_admin_as_parameter(true),
        ),
        ("moe", tiny_encoder().with_moe(1, 2)),
        ("tied", tiny_encoder().with_share_input_output_embed(true)),
        ("no final norm", tiny_encoder().with_normalize_output(false)),
    ]
}

fn encoder_decoders() -> Vec<(&'static str, EncoderDecoderConfig)> {
    let mut moe_list = tiny_encoder_decoder().with_moe(1, 2);
    moe_list.decoder_moe_layers = Some(vec![1]);
    vec![
        ("dense sub-ln (default)", tiny_encoder_decoder()),
        (
            "shared embeddings, rel-pos",
            tiny_encoder_decoder()
                .with_share_all_embeddings(true)
                .with_share_decoder_input_output_embed(true)
                .with_rel_pos(8, 16),
        ),
        ("deepnorm", tiny_encoder_decoder().with_deepnorm(true)),
        ("moe list", moe_list),
        (
            "admin learnable omega, multiway",
            tiny_encoder_decoder()
                .with_technique(Technique::Admin)
                .with_admin_as_parameter(true)
                .with_multiway(true),
        ),
    ]
}

#[test]
fn the_count_is_the_built_models_parameter_count() {
    for learned in [true, false] {
        let opts = BuildOptions {
            learned_positions: Some(learned),
            ..Default::default()
        };
        for dtype in [DType::F32, DType::BF16] {
            for (name, cfg) in decoders() {
                let size = decoder_size(&cfg, &opts).unwrap();
                assert_exact(name, size, dtype, |vb| {
                    Decoder::new(&cfg, &opts, vb).map(drop)
                });
            }
            for (name, cfg) in encoders() {
                let size = encoder_size(&cfg, &opts).unwrap();
                assert_exact(name, size, dtype, |vb| {
                    Encoder::new(&cfg, &opts, vb).map(drop)
                });
            }
            for (name, cfg) in encoder_decoders() {
                let size = encoder_decoder_size(&cfg, &opts).unwrap();
                assert_exact(name, size, dtype, |vb| {
                    EncoderDecoder::new(&cfg, &opts, vb).map(drop)
                });
            }
        }
    }
}

#[test]
fn the_count_of_a_language_model_and_of_an_expert_parallel_rank() {
    let cfg = tiny_decoder().with_moe(1, 4);
    let lm = LanguageModel::new(cfg.clone(), 0).unwrap();
    let size = decoder_size(
        &cfg,
        &BuildOptions {
            learned_positions: Some(true),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(size.params, lm.num_parameters() as u128);
    // Each of 2 ranks holds half the experts; its count is its own store's.
    // Building makes no collective call, so the ranks are built one after the other.
    let counts: Vec<usize> = torchscale_core::LocalGroup::new(2)
        .into_iter()
        .map(|g| {
            let comm = std::sync::Arc::new(g);
            let lm = LanguageModel::expert_parallel(
                cfg.clone(),
                true,
                0,
                &Device::Cpu,
                DType::F32,
                comm,
            );
            lm.unwrap().num_parameters()
        })
        .collect();
    // fc1, fc2 and Sub-LN's inner norm of width F (C = 16, F = 32).
    let expert = 2 * 16 * 32 + 32 + 16 + 2 * 32;
    assert_eq!(counts.len(), 2);
    for n in counts {
        assert_eq!(n as u128, size.params - 2 * 2 * expert);
    }
}

/// The refusal must be `want` (checked by `is`) and come quickly.
fn refused<T>(
    what: &str,
    run: impl FnOnce() -> torchscale_core::Result<T>,
    is: impl Fn(&Error) -> bool,
) -> Error {
    let t = Instant::now();
    let e = match run() {
        Ok(_) => panic!("{what}: not refused"),
        Err(e) => e,
    };
    assert!(t.elapsed() < QUICK, "{what}: took {:?}", t.elapsed());
    assert!(is(&e), "{what}: {e:?}");
    e
}

fn over_budget_naming(field: &'static str) -> impl Fn(&Error) -> bool {
    move |e| matches!(e, Error::MemoryBudget { sized_by, needed, budget, .. } if sized_by.contains(field) && *needed > *budget as u128)
}

fn config_error(field: &'static str) -> impl Fn(&Error) -> bool {
    move |e| matches!(e, Error::Config { field: f, .. } if f == field)
}

fn build_decoder(cfg: &DecoderConfig) -> torchscale_core::Result<()> {
    let store = ParamStore::new(0);
    Decoder::new(
        cfg,
        &BuildOptions::default(),
        store.var_builder(DType::F32, &Device::Cpu),
    )
    .map(drop)
}

#[test]
fn the_issues_configs_are_typed_errors() {
    // Ordinary-looking sizes whose tensors exceed the machine: refused by the budget.
    let wide = DecoderConfig::default()
        .with_embed_dim(42030)
        .with_heads(10)
        .with_vocab_size(64);
    refused(
        "embed_dim 42030",
        || build_decoder(&wide),
        over_budget_naming("decoder_embed_dim"),
    );
    let long = DecoderConfig::default()
        .with_vocab_size(64)
        .with_max_positions(1 << 28);
    refused(
        "2^28 positions",
        || build_decoder(&long),
        over_budget_naming("max_target_positions"),
    );
    let deep = tiny_decoder().with_layers(1_000_000_000);
    let e = refused(
        "10^9 layers",
        || build_decoder(&deep),
        over_budget_naming("decoder_layers"),
    );
    assert!(e.to_string().contains("1000000000 layers"), "{e}");
    // Sizes whose arithmetic overflows: refused at validation, naming the field.
    let huge_positions = tiny_decoder().with_max_positions((1 << 60) - 7);
    refused(
        "2^60 positions",
        || build_decoder(&huge_positions),
        config_error("max_target_positions"),
    );
    let huge_vocab = tiny_decoder().with_vocab_size(i64::MAX);
    refused(
        "vocab 2^63-1",
        || build_decoder(&huge_vocab),
        config_error("vocab_size"),
    );
    let overflow = tiny_decoder().with_embed_dim(1 << 40).with_ffn_dim(1 << 40);
    refused(
        "embed x ffn",
        || build_decoder(&overflow),
        config_error("decoder_embed_dim"),
    );
    // xPos scales that overflow f32 within the model's positions.
    let xpos = tiny_decoder().with_xpos(true).with_xpos_scale_base(1);
    refused(
        "xpos base 1",
        || xpos.clone().finalize(),
        config_error("xpos_scale_base"),
    );
    refused(
        "xpos base 1",
        || build_decoder(&xpos),
        config_error("xpos_scale_base"),
    );
    // The same through the other constructors.
    let enc = tiny_encoder().with_layers(1_000_000_000);
    let store = ParamStore::new(0);
    let vb = store.var_builder(DType::F32, &Device::Cpu);
    refused(
        "encoder 10^9 layers",
        || Encoder::new(&enc, &BuildOptions::default(), vb.clone()).map(drop),
        over_budget_naming("encoder_layers"),
    );
    let ed = tiny_encoder_decoder().with_layers(2, 1_000_000_000);
    refused(
        "enc-dec 10^9 layers",
        || EncoderDecoder::new(&ed, &BuildOptions::default(), vb.clone()).map(drop),
        over_budget_naming("decoder_layers"),
    );
    let ed = tiny_encoder_decoder().with_vocab_size(i64::MAX);
    refused(
        "enc-dec vocab",
        || EncoderDecoder::new(&ed, &BuildOptions::default(), vb.clone()).map(drop),
        config_error("vocab_size"),
    );
    refused(
        "language model 10^9 layers",
        || LanguageModel::new(deep.clone(), 0),
        over_budget_naming("decoder_layers"),
    );
    assert!(store.named_vars().is_empty(), "a refused build allocated");
}

#[test]
fn the_budget_override_refuses_and_admits_by_the_byte() {
    let cfg = tiny_decoder();
    let size = decoder_size(&cfg, &BuildOptions::default()).unwrap();
    let needed = size.bytes(DType::F32);
    let with = |budget: u64| BuildOptions {
        memory_budget: Some(budget),
        ..Default::default()
    };
    let store = ParamStore::new(0);
    let vb = store.var_builder(DType::F32, &Device::Cpu);
    let e = Decoder::new(&cfg, &with(needed as u64 - 1), vb.clone()).unwrap_err();
    match &e {
        Error::MemoryBudget {
            needed: n, budget, ..
        } => {
            assert_eq!((*n, *budget), (needed, needed as u64 - 1));
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains(&format!("needs {needed} bytes")), "{msg}");
    assert!(msg.contains("decoder_embed_dim 16"), "{msg}");
    assert!(store.named_vars().is_empty());
    Decoder::new(&cfg, &with(needed as u64), vb).unwrap();
    // A normal model passes under the default budget (the memory available).
    LanguageModel::new(cfg, 0).unwrap();
}

#[test]
fn a_refused_vocab_leaves_the_store_usable() {
    let store = ParamStore::new(3);
    let vb = store.var_builder(DType::F32, &Device::Cpu);
    let opts = BuildOptions::default();
    let huge = tiny_decoder().with_vocab_size(i64::MAX);
    refused(
        "vocab 2^63-1",
        || Decoder::new(&huge, &opts, vb.clone()).map(drop),
        config_error("vocab_size"),
    );
    // Straight at the store, below the config checks: the table the issue's config asked for.
    let randn = Init::Randn {
        mean: 0.0,
        stdev: 1.0,
    };
    for shape in [(i64::MAX as usize, 16), (i64::MAX as usize, 1)] {
        let e = vb
            .get_with_hints(shape, "embed_tokens.weight", randn)
            .unwrap_err();
        assert!(e.to_string().contains("embed_tokens.weight"), "{e}");
    }
    // Then the same store builds a good model, the one a fresh store with that seed builds.
    let good = tiny_decoder();
    let model = Decoder::new(&good, &opts, vb).unwrap();
    let fresh = ParamStore::new(3);
    Decoder::new(&good, &opts, fresh.var_builder(DType::F32, &Device::Cpu)).unwrap();
    assert_eq!(store.named_vars().len(), fresh.named_vars().len());
    for ((k, a), (_, b)) in store.named_vars().iter().zip(fresh.named_vars()) {
        let d = (a.as_tensor() - b.as_tensor()).unwrap().abs().unwrap();
        let d = d
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{k}");
    }
    let ids = Tensor::new(&[[0u32, 2, 3]], &Device::Cpu).unwrap();
    let out = model.forward(&ids, &Default::default()).unwrap();
    assert_eq!(out.x.dims(), &[1, 3, 20]);
}

#[test]
fn a_checkpoint_whose_config_disagrees_with_its_weights_fails_on_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let lm = LanguageModel::new(tiny_decoder().with_max_positions(32), 0).unwrap();
    lm.save(&ck, None).unwrap();
    let path = ck.join(CONFIG_FILE);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["max_target_positions"] = serde_json::json!(1_000_000_000_000u64);
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    let shape_error = |e: &Error| {
        matches!(e, Error::TensorShape { key, expected, got }
            if key == "embed_positions.weight"
                && expected == &[1_000_000_000_002, 16]
                && got == &[34, 16])
    };
    let e = refused(
        "LanguageModel::load",
        || LanguageModel::load(&ck),
        shape_error,
    );
    let msg = e.to_string();
    assert!(
        msg.contains("[1000000000002, 16]") && msg.contains("[34, 16]"),
        "{msg}"
    );
    refused(
        "LanguageModel::from_pretrained",
        || LanguageModel::from_pretrained(&ck, &Device::Cpu, DType::F32),
        shape_error,
    );
    refused(
        "Decoder::from_pretrained",
        || Decoder::from_pretrained(&ck, &BuildOptions::default(), &Device::Cpu, DType::F32),
        shape_error,
    );
    // A config with more layers than the weights hold names the first missing tensor.
    json["max_target_positions"] = serde_json::json!(32);
    json["decoder_layers"] = serde_json::json!(1_000_000_000u64);
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    refused(
        "10^9 layers",
        || LanguageModel::load(&ck),
        |e| matches!(e, Error::MissingTensor { key } if key.starts_with("layers.2.")),
    );
    // Restored, it loads.
    json["decoder_layers"] = serde_json::json!(2);
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    let (back, _) = LanguageModel::load(&ck).unwrap();
    assert_eq!(back.num_parameters(), lm.num_parameters());
}

#[test]
fn a_batch_over_the_budget_is_refused_naming_batch_and_seq_len() {
    let cfg = tiny_decoder();
    let params = decoder_size(&cfg, &BuildOptions::default())
        .unwrap()
        .bytes(DType::F32) as u64;
    let opts = BuildOptions {
        memory_budget: Some(params + 1_000_000),
        ..Default::default()
    };
    let lm = LanguageModel::with_build_options(cfg, &opts, 0, &Device::Cpu, DType::F32).unwrap();
    // B × T × (L × (16·C + 2·F + 2·H·T) + 3·V) × 4 bytes.
    assert_eq!(
        lm.activation_bytes(2, 8),
        2 * 8 * (2 * (16 * 16 + 2 * 32 + 2 * 2 * 8) + 3 * 20) * 4
    );
    let small = Tensor::zeros((2, 8), DType::U32, &Device::Cpu).unwrap();
    lm.micro_batch(&small, &small, true, &LossConfig::default(), 0)
        .unwrap();
    let big = Tensor::zeros((64, 512), DType::U32, &Device::Cpu).unwrap();
    let e = refused(
        "micro-batch",
        || lm.micro_batch(&big, &big, true, &LossConfig::default(), 0),
        |e| matches!(e, Error::MemoryBudget { sized_by, .. } if sized_by.contains("batch 64, seq_len 512")),
    );
    assert!(e.to_string().contains("micro-batch"), "{e}");
}

#[test]
fn on_an_accelerator_the_device_and_the_host_are_checked_apart() {
    use torchscale_models::build::budget::{check, stack_floor};
    use torchscale_models::build::{decoder_spec, Budget, StackRole};
    let opts = BuildOptions::default();
    let floor = |cfg: DecoderConfig| {
        let spec = decoder_spec(&cfg.finalize().unwrap(), &opts);
        (stack_floor(&spec, StackRole::Decoder), spec)
    };
    let accel = |device: Option<u64>| Budget {
        cpu: false,
        device,
        host: 16 << 30,
    };
    let (size, spec) = floor(tiny_decoder());
    let by = || torchscale_models::build::budget::sized_by(&spec, StackRole::Decoder);
    // Device memory unknown: only the host's share is checked.
    check(size, DType::F32, accel(None), "tiny", by()).unwrap();
    let e = check(size, DType::F32, accel(Some(100)), "tiny", by()).unwrap_err();
    assert!(e.to_string().contains("on the device"), "{e}");
    // 10^9 layers of objects, or a 2^28-row table drawn on the host, do not fit the host.
    for (cfg, field) in [
        (tiny_decoder().with_layers(1_000_000_000), "decoder_layers"),
        (
            DecoderConfig::default()
                .with_vocab_size(64)
                .with_max_positions(1 << 28),
            "max_target_positions",
        ),
    ] {
        let (size, spec) = floor(cfg);
        let by = torchscale_models::build::budget::sized_by(&spec, StackRole::Decoder);
        let e = check(size, DType::BF16, accel(None), "deep", by).unwrap_err();
        assert!(over_budget_naming(field)(&e), "{e}");
        assert!(e.to_string().contains("on the host"), "{e}");
    }
}
