//! Catalogue: bad configs. Each row is a config (JSON, as a user or a checkpoint hands it over)
//! with the typed error it must give — the variant and the field it names — or, for the rows
//! that check recovery, success. Sizes no machine has are refused before anything is allocated:
//! those rows run in their own process under an address-space limit
//! ([`catalogue::check_isolated`]), so that a regression aborts one row, not the test binary.

mod catalogue;

use candle_core::{DType, Device, Tensor};
use catalogue::{accepted, check, check_isolated, refused, Case};
use torchscale_core::init::ParamStore;
use torchscale_core::Result;
use torchscale_models::build::BuildOptions;
use torchscale_models::config::{DecoderConfig, EncoderConfig, EncoderDecoderConfig};
use torchscale_models::decoder::{Decoder, DecoderInputs};
use torchscale_models::encoder::Encoder;
use torchscale_models::encoder_decoder::EncoderDecoder;

/// An explicit budget far below what the huge rows ask for.
const SMALL_BUDGET: u64 = 1 << 30;

fn budget(bytes: u64) -> BuildOptions {
    BuildOptions {
        memory_budget: Some(bytes),
        ..Default::default()
    }
}

/// A small decoder config with `extra` fields set on top (JSON object text without braces).
fn decoder_json(extra: &str) -> String {
    let base = r#""decoder_embed_dim": 16, "decoder_attention_heads": 2,
        "decoder_ffn_embed_dim": 32, "decoder_layers": 2, "vocab_size": 20,
        "max_target_positions": 16"#;
    if extra.is_empty() {
        format!("{{{base}}}")
    } else {
        format!("{{{base}, {extra}}}")
    }
}

/// Parses `json` as a decoder config and builds it with `opts` on a fresh store, then runs
/// a forward pass of 3 tokens.
fn build_decoder(json: &str, opts: &BuildOptions) -> Result<()> {
    let cfg = DecoderConfig::from_json_str(json)?;
    let store = ParamStore::new(0);
    let m = Decoder::new(&cfg, opts, store.var_builder(DType::F32, &Device::Cpu))?;
    let ids = Tensor::new(&[[2u32, 3, 4]], &Device::Cpu)?;
    m.forward(&ids, &DecoderInputs::default())?;
    Ok(())
}

/// A `(name, input, extra JSON fields, variant, words)` row built as a decoder with `opts`.
fn decoder_row(
    name: &'static str,
    extra: &'static str,
    variant: &'static str,
    words: &'static [&'static str],
    opts: BuildOptions,
) -> Case {
    let json = decoder_json(extra);
    refused(name, json.clone(), variant, words, move || {
        build_decoder(&json, &opts)
    })
}

/// Fields whose values no model can be built with, and values of the wrong type.
#[test]
fn bad_fields_are_refused_naming_the_field() {
    let d = BuildOptions::default;
    let cases = vec![
        decoder_row(
            "decoder_layers 0",
            r#""decoder_layers": 0"#,
            "Config",
            &["decoder_layers"],
            d(),
        ),
        decoder_row(
            "decoder_layers of the wrong type",
            r#""decoder_layers": "two""#,
            "Config",
            &["decoder_layers"],
            d(),
        ),
        decoder_row(
            "decoder_layers negative",
            r#""decoder_layers": -1"#,
            "Config",
            &["decoder_layers"],
            d(),
        ),
        decoder_row(
            "heads that do not divide the width",
            r#""decoder_attention_heads": 3"#,
            "Config",
            &["decoder_attention_heads"],
            d(),
        ),
        decoder_row(
            "xpos_scale_base 1",
            r#""xpos_rel_pos": true, "xpos_scale_base": 1, "max_target_positions": 1024"#,
            "Config",
            &["xpos_scale_base"],
            d(),
        ),
        decoder_row(
            "xpos_scale_base 0",
            r#""xpos_rel_pos": true, "xpos_scale_base": 0"#,
            "Config",
            &["xpos_scale_base"],
            d(),
        ),
        decoder_row(
            "dropout 1",
            r#""dropout": 1.0"#,
            "Config",
            &["dropout"],
            d(),
        ),
        decoder_row(
            "unknown activation",
            r#""activation_fn": "tanh""#,
            "Config",
            &["activation_fn"],
            d(),
        ),
        decoder_row(
            "layer_techniques past the last layer",
            r#""layer_techniques": [{"layers": [1, 5], "technique": "post_ln"}]"#,
            "Config",
            &["layer_techniques"],
            d(),
        ),
        decoder_row(
            "layer_techniques with an unknown technique",
            r#""layer_techniques": [{"layers": [0, 1], "technique": "rms_norm"}]"#,
            "Config",
            &["layer_techniques"],
            d(),
        ),
        decoder_row(
            "moe_layers past the last layer",
            r#""moe_expert_count": 2, "moe_freq": 1, "moe_layers": [7]"#,
            "Config",
            &["moe_layers"],
            d(),
        ),
        decoder_row(
            "dropless router with k 0",
            r#""moe_expert_count": 2, "moe_freq": 1, "moe_router": {"kind": "dropless", "k": 0}"#,
            "Config",
            &["moe_router"],
            d(),
        ),
        decoder_row(
            "expert-choice router with a capacity factor of 0",
            r#""moe_expert_count": 2, "moe_freq": 1,
               "moe_router": {"kind": "expert_choice", "capacity_factor": 0.0}"#,
            "Config",
            &["moe_router"],
            d(),
        ),
        decoder_row(
            "a router for a dense layer",
            r#""moe_expert_count": 2, "moe_freq": 2,
               "moe_layer_routers": [{"layer": 0, "router": {"kind": "dropless", "k": 1}}]"#,
            "Config",
            &["moe_layer_routers"],
            d(),
        ),
        refused(
            "encoder with encoder_embed_dim 0",
            r#"{"encoder_embed_dim": 0, "vocab_size": 20}"#,
            "Config",
            &["encoder_embed_dim"],
            || {
                let cfg =
                    EncoderConfig::from_json_str(r#"{"encoder_embed_dim": 0, "vocab_size": 20}"#)?;
                let store = ParamStore::new(0);
                let vb = store.var_builder(DType::F32, &Device::Cpu);
                Encoder::new(&cfg, &BuildOptions::default(), vb).map(|_| ())
            },
        ),
        refused(
            "encoder-decoder with an unknown router kind",
            r#"{"moe_router": {"kind": "top_3"}}"#,
            "Config",
            &["moe_router"],
            || {
                EncoderDecoderConfig::from_json_str(r#"{"moe_router": {"kind": "top_3"}}"#)
                    .map(|_| ())
            },
        ),
        refused(
            "not JSON",
            r#"{"decoder_layers": 2,"#,
            "Invalid",
            &["config JSON"],
            || DecoderConfig::from_json_str(r#"{"decoder_layers": 2,"#).map(|_| ()),
        ),
        refused(
            "NaN in the JSON",
            r#"{"dropout": NaN}"#,
            "Invalid",
            &["config JSON"],
            || DecoderConfig::from_json_str(r#"{"dropout": NaN}"#).map(|_| ()),
        ),
    ];
    check("bad_configs", cases);
}

/// Sizes far beyond the machine: refused by the memory budget or the tensor-size rule before
/// any allocation, whatever the budget; each row in its own process under a memory limit.
#[test]
fn huge_sizes_are_refused_before_allocating() {
    let small = || budget(SMALL_BUDGET);
    let d = BuildOptions::default;
    let cases = vec![
        decoder_row(
            "decoder_embed_dim 42030, small budget",
            r#""decoder_embed_dim": 42030, "decoder_ffn_embed_dim": 3072, "decoder_layers": 6,
               "vocab_size": 64000"#,
            "MemoryBudget",
            &["decoder_embed_dim 42030"],
            small(),
        ),
        decoder_row(
            "decoder_embed_dim 42030, default budget",
            r#""decoder_embed_dim": 42030, "decoder_ffn_embed_dim": 3072, "decoder_layers": 6,
               "vocab_size": 64000"#,
            "MemoryBudget",
            &["decoder_embed_dim 42030"],
            d(),
        ),
        decoder_row(
            "max_target_positions 2^28",
            r#""max_target_positions": 268435456"#,
            "MemoryBudget",
            &["max_target_positions 268435456"],
            small(),
        ),
        decoder_row(
            "decoder_layers 10^9",
            r#""decoder_layers": 1000000000"#,
            "MemoryBudget",
            &["decoder_layers 1000000000"],
            d(),
        ),
        decoder_row(
            "max_target_positions near 2^60",
            r#""max_target_positions": 1152921504606846973"#,
            "Config",
            &["max_target_positions"],
            d(),
        ),
        decoder_row(
            "vocab_size 2^63 - 1",
            r#""vocab_size": 9223372036854775807"#,
            "Config",
            &["vocab_size"],
            d(),
        ),
        decoder_row(
            "moe_expert_count 10^6",
            r#""moe_expert_count": 1000000, "moe_freq": 1"#,
            "MemoryBudget",
            &["moe_expert_count 1000000"],
            small(),
        ),
        refused(
            "encoder-decoder with encoder_layers 10^9",
            r#"{"encoder_layers": 1000000000, "vocab_size": 20, ...small widths}"#,
            "MemoryBudget",
            &["encoder_layers 1000000000"],
            || {
                let cfg = EncoderDecoderConfig::from_json_str(
                    r#"{"encoder_embed_dim": 16, "encoder_attention_heads": 2,
                        "encoder_ffn_embed_dim": 32, "encoder_layers": 1000000000,
                        "decoder_embed_dim": 16, "decoder_attention_heads": 2,
                        "decoder_ffn_embed_dim": 32, "decoder_layers": 2, "vocab_size": 20}"#,
                )?;
                let store = ParamStore::new(0);
                let vb = store.var_builder(DType::F32, &Device::Cpu);
                EncoderDecoder::new(&cfg, &BuildOptions::default(), vb).map(|_| ())
            },
        ),
        accepted(
            "vocab_size 2^63 - 1, then a good build on the same store",
            decoder_json(r#""vocab_size": 9223372036854775807"#) + ", then the same without it",
            || {
                let store = ParamStore::new(0);
                let vb = store.var_builder(DType::F32, &Device::Cpu);
                let good = DecoderConfig::from_json_str(&decoder_json(""))?;
                let huge = good.clone().with_vocab_size(i64::MAX);
                let e = Decoder::new(&huge, &BuildOptions::default(), vb.clone())
                    .expect_err("vocab_size 2^63 - 1 must be refused");
                assert!(e.to_string().contains("vocab_size"), "{e}");
                assert!(
                    store.named_vars().is_empty(),
                    "the refused build left parameters behind"
                );
                let m = Decoder::new(&good, &BuildOptions::default(), vb)?;
                let ids = Tensor::new(&[[2u32, 3, 4]], &Device::Cpu)?;
                m.forward(&ids, &DecoderInputs::default())?;
                Ok(())
            },
        ),
    ];
    check_isolated(
        "bad_configs (huge)",
        "huge_sizes_are_refused_before_allocating",
        cases,
    );
}
