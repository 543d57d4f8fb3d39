//! Builds torchscale's quickstart models (an `EncoderConfig` with vocab_size 64000, a decoder and an
//! encoder-decoder), prints a summary of each and runs a forward pass.
//!
//! `cargo run --release -p torchscale-models --example quickstart`

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use torchscale_core::init::ParamStore;
use torchscale_models::{
    BuildOptions, Decoder, DecoderConfig, DecoderInputs, Encoder, EncoderConfig, EncoderDecoder,
    EncoderDecoderConfig, EncoderInputs,
};

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
    let dev = Device::Cpu;
    let tokens = Tensor::new(&[[0u32, 5, 9, 13, 2], [0, 7, 11, 2, 1]], &dev)?;

    // torchscale's README: `config = EncoderConfig(vocab_size=64000); model = Encoder(config)`.
    let config = EncoderConfig::new().with_vocab_size(64000);
    let store = ParamStore::new(0);
    let encoder = Encoder::new(
        &config,
        &BuildOptions::default(),
        store.var_builder(DType::F32, &dev),
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
        .with_vocab_size(64000)
        .with_deepnorm(true);
    let store = ParamStore::new(0);
    let decoder = Decoder::new(
        &config,
        &BuildOptions::default(),
        store.var_builder(DType::F32, &dev),
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

    let config = EncoderDecoderConfig::new().with_vocab_size(64000);
    let store = ParamStore::new(0);
    let model = EncoderDecoder::new(
        &config,
        &BuildOptions::default(),
        store.var_builder(DType::F32, &dev),
    )?;
    summary("EncoderDecoder", &store);
    let (_, dec) = model.forward(&tokens, Some(&mask), &tokens, false)?;
    println!("encoder-decoder logits {:?}", dec.x.dims());
    Ok(())
}
