//! Builds torchscale's quickstart models (an `EncoderConfig` with vocab_size 64000, a decoder and an
//! encoder-decoder), prints a summary of each and runs a forward pass.
//!
//! `cargo run --release -p torchscale-models --example quickstart`
//! (`-- --device cuda --dtype bf16` on a CUDA build).

#[path = "common/cli.rs"]
mod cli;

use anyhow::{Context, Result};
use candle_core::Tensor;
use clap::Parser;
use torchscale_core::init::ParamStore;
use torchscale_models::{
    BuildOptions, Decoder, DecoderConfig, DecoderInputs, Encoder, EncoderConfig, EncoderDecoder,
    EncoderDecoderConfig, EncoderInputs,
};

/// Builds torchscale's quickstart Encoder, Decoder and EncoderDecoder, prints their parameters
/// and runs a forward pass through each.
#[derive(Debug, Parser)]
#[command(name = "quickstart", version, max_term_width = 100)]
struct Cli {
    /// Vocabulary size of the three models (torchscale's README uses 64000)
    #[arg(long, value_name = "N", default_value_t = 64000)]
    vocab_size: i64,
    /// Parameters' and activations' dtype
    #[arg(long, value_enum, default_value_t = cli::DTypeArg::F32)]
    dtype: cli::DTypeArg,
    /// cpu, cuda or cuda:N (CUDA needs a build with --features cuda)
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    device: cli::DeviceArg,
}

fn summary(name: &str, store: &ParamStore) {
    let vars = store.named_vars();
    let n: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    println!(
        "{name}: {} tensors, {:.1}M parameters",
        vars.len(),
        n as f64 / 1e6
    );
    for (k, v) in vars
        .iter()
        .filter(|(k, _)| !k.contains("layers.") || k.contains("layers.0."))
    {
        println!("  {k:<48} {:?}", v.dims());
    }
}

fn main() -> Result<()> {
    let args = Cli::parse();
    cli::init_tracing();
    let dev = args
        .device
        .open()
        .with_context(|| format!("--device {}", args.device))?;
    let dtype = args.dtype.dtype();
    let vocab = args.vocab_size;
    let tokens = Tensor::new(&[[0u32, 5, 9, 13, 2], [0, 7, 11, 2, 1]], &dev)?;

    // torchscale's README: `config = EncoderConfig(vocab_size=64000); model = Encoder(config)`.
    let config = EncoderConfig::new().with_vocab_size(vocab);
    let store = ParamStore::new(0);
    let encoder = Encoder::new(
        &config,
        &BuildOptions::default(),
        store.var_builder(dtype, &dev),
    )?;
    summary(
        &format!("Encoder ({})", encoder.stabilizer().name()),
        &store,
    );
    let mask = tokens.eq(1u32)?;
    let out = encoder.forward(
        &tokens,
        &EncoderInputs {
            padding_mask: Some(&mask),
            ..Default::default()
        },
    )?;
    println!("encoder logits {:?}\n", out.encoder_out.dims());

    let config = DecoderConfig::new()
        .with_vocab_size(vocab)
        .with_deepnorm(true);
    let store = ParamStore::new(0);
    let decoder = Decoder::new(
        &config,
        &BuildOptions::default(),
        store.var_builder(dtype, &dev),
    )?;
    summary(
        &format!("Decoder ({})", decoder.stabilizer().name()),
        &store,
    );
    println!(
        "decoder logits {:?}\n",
        decoder
            .forward(&tokens, &DecoderInputs::default())?
            .x
            .dims()
    );

    let config = EncoderDecoderConfig::new().with_vocab_size(vocab);
    let store = ParamStore::new(0);
    let model = EncoderDecoder::new(
        &config,
        &BuildOptions::default(),
        store.var_builder(dtype, &dev),
    )?;
    summary("EncoderDecoder", &store);
    let (_, dec) = model.forward(&tokens, Some(&mask), &tokens, false)?;
    println!("encoder-decoder logits {:?}", dec.x.dims());
    Ok(())
}
