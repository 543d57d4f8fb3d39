//! The models checked when no `--checkpoint` is given.

use torchscale_models::config::{DecoderConfig, EncoderConfig, EncoderDecoderConfig, Technique};

use super::checkpoint::ModelConfig;

/// One generated case: name, config, learned positions.
pub type Case = (&'static str, ModelConfig, bool);

/// The models built when no `--checkpoint` is given.
pub fn default_cases() -> Vec<Case> {
    let lm = |d: usize, layers: usize, tied: bool| {
        DecoderConfig::new()
            .with_vocab_size(260)
            .with_embed_dim(d)
            .with_heads(4)
            .with_ffn_dim(4 * d)
            .with_layers(layers)
            .with_max_positions(128)
            .with_share_input_output_embed(tied)
    };
    let mut encdec = EncoderDecoderConfig::new()
        .with_vocab_size(260)
        .with_embed_dim(64)
        .with_heads(4)
        .with_ffn_dim(256)
        .with_layers(2, 2)
        .with_max_positions(64, 64);
    let encdec_deepnorm = encdec
        .clone()
        .with_layers(3, 2)
        .with_technique(Technique::DeepNorm)
        .with_share_all_embeddings(true);
    encdec.layernorm_embedding = true;
    let mut encoder = EncoderConfig::new()
        .with_vocab_size(260)
        .with_embed_dim(64)
        .with_heads(4)
        .with_ffn_dim(256)
        .with_layers(2)
        .with_max_positions(64);
    encoder.no_scale_embedding = false;
    vec![
        (
            "decoder_subln_lm_tied",
            ModelConfig::Decoder(lm(128, 3, true)),
            true,
        ),
        (
            "decoder_subln_lm_untied",
            ModelConfig::Decoder(lm(64, 2, false)),
            true,
        ),
        (
            "decoder_deepnorm",
            ModelConfig::Decoder(lm(64, 4, false).with_technique(Technique::DeepNorm)),
            true,
        ),
        (
            "decoder_xmoe_top2",
            ModelConfig::Decoder(lm(64, 4, false).with_moe(2, 4).with_xmoe(true)),
            true,
        ),
        (
            "decoder_xpos",
            ModelConfig::Decoder(lm(64, 2, true).with_xpos(true)),
            false,
        ),
        ("encoder_subln", ModelConfig::Encoder(encoder), true),
        (
            "encoder_decoder_subln",
            ModelConfig::EncoderDecoder(encdec),
            true,
        ),
        (
            "encoder_decoder_deepnorm_shared",
            ModelConfig::EncoderDecoder(encdec_deepnorm),
            true,
        ),
    ]
}
