//! From configs to models: the stack description and the technique of each stack.

use candle_nn::VarBuilder;
use torchscale_core::{Result, Stabilizer, StackKind};

use crate::config::{DecoderConfig, EncoderConfig, EncoderDecoderConfig, Technique};
use crate::decoder::Decoder;
use crate::encoder::Encoder;
use crate::encoder_decoder::EncoderDecoder;
use crate::spec::{MoeSpec, StackSpec};
use torchscale_moe::{MoeConfig, SecondExpertPolicy};

/// Choices a torchscale config does not hold, because torchscale takes them as constructor
/// arguments (the embedding modules).
#[derive(Debug, Clone, Copy, Default)]
pub struct BuildOptions {
    /// Learned absolute positions (`embed_positions`). None: on unless the config uses xPos or a
    /// relative position bias.
    pub learned_positions: Option<bool>,
}

/// The technique object for a stack.
pub fn stabilizer(
    technique: Technique,
    stack: StackKind,
    admin_scale: &str,
    admin_param: bool,
) -> Result<Box<dyn Stabilizer>> {
    use torchscale_norm::Technique as T;
    let t = match technique {
        Technique::PostLn => T::PostLn,
        Technique::PreLn => T::PreLn,
        Technique::DeepNorm => T::DeepNorm,
        Technique::SubLn => T::SubLn,
        Technique::Admin => {
            let scale = admin_scale.parse()?;
            return Ok(Box::new(torchscale_admin::Admin::new(
                stack,
                scale,
                admin_param,
            )?));
        }
    };
    torchscale_norm::stabilizer_for(t, stack)
}

/// The encoder's stack description.
pub fn encoder_spec(c: &EncoderConfig, opts: &BuildOptions) -> StackSpec {
    let rel = c.rel_pos_buckets > 0 && c.max_rel_pos > 0;
    StackSpec {
        embed_dim: c.encoder_embed_dim,
        heads: c.encoder_attention_heads,
        ffn_dim: c.encoder_ffn_embed_dim,
        layers: c.encoder_layers,
        activation: c.activation_fn,
        dropout: c.dropout,
        attention_dropout: c.attention_dropout,
        activation_dropout: c.activation_dropout,
        drop_path_rate: c.drop_path_rate,
        layernorm_eps: c.layernorm_eps,
        layernorm_embedding: c.layernorm_embedding,
        scale_embedding: !c.no_scale_embedding,
        vocab_size: c.vocab_size,
        no_output_layer: c.no_output_layer,
        share_input_output_embed: c.share_encoder_input_output_embed,
        learned_positions: opts.learned_positions.unwrap_or(!c.xpos_rel_pos && !rel),
        max_positions: c.max_source_positions,
        rel_pos_buckets: if rel { c.rel_pos_buckets } else { 0 },
        max_rel_pos: if rel { c.max_rel_pos } else { 0 },
        xpos_scale_base: c.xpos_rel_pos.then_some(c.xpos_scale_base as f64),
        multiway: c.multiway,
        normalize_output: c.normalize_output,
        moe: moe_spec(&MoeFields::of_encoder(c)),
    }
}

/// The decoder's stack description.
pub fn decoder_spec(c: &DecoderConfig, opts: &BuildOptions) -> StackSpec {
    let rel = c.rel_pos_buckets > 0 && c.max_rel_pos > 0;
    StackSpec {
        embed_dim: c.decoder_embed_dim,
        heads: c.decoder_attention_heads,
        ffn_dim: c.decoder_ffn_embed_dim,
        layers: c.decoder_layers,
        activation: c.activation_fn,
        dropout: c.dropout,
        attention_dropout: c.attention_dropout,
        activation_dropout: c.activation_dropout,
        drop_path_rate: c.drop_path_rate,
        layernorm_eps: c.layernorm_eps,
        layernorm_embedding: c.layernorm_embedding,
        scale_embedding: !c.no_scale_embedding,
        vocab_size: c.vocab_size,
        no_output_layer: c.no_output_layer,
        share_input_output_embed: c.share_decoder_input_output_embed,
        learned_positions: opts.learned_positions.unwrap_or(!c.xpos_rel_pos && !rel),
        max_positions: c.max_target_positions,
        rel_pos_buckets: if rel { c.rel_pos_buckets } else { 0 },
        max_rel_pos: if rel { c.max_rel_pos } else { 0 },
        xpos_scale_base: c.xpos_rel_pos.then_some(c.xpos_scale_base as f64),
        multiway: c.multiway,
        normalize_output: true,
        moe: moe_spec(&MoeFields::of_decoder(c)),
    }
}

impl Encoder {
    /// Builds an encoder from a torchscale config (finalised and validated here) under `vb`.
    pub fn new(cfg: &EncoderConfig, opts: &BuildOptions, vb: VarBuilder) -> Result<Self> {
        let _span =
            tracing::debug_span!("build", model = "Encoder", layers = cfg.encoder_layers).entered();
        let cfg = cfg.clone().finalize()?;
        let st = stabilizer(
            cfg.technique(),
            cfg.stack_kind(),
            &cfg.admin_output_change_scale,
            cfg.admin_as_parameter,
        )?;
        Encoder::from_spec(encoder_spec(&cfg, opts), st, false, None, vb)
    }
}

impl Decoder {
    /// Builds a decoder from a torchscale config (finalised and validated here) under `vb`.
    pub fn new(cfg: &DecoderConfig, opts: &BuildOptions, vb: VarBuilder) -> Result<Self> {
        let _span =
            tracing::debug_span!("build", model = "Decoder", layers = cfg.decoder_layers).entered();
        let cfg = cfg.clone().finalize()?;
        let st = stabilizer(
            cfg.technique(),
            cfg.stack_kind(),
            &cfg.admin_output_change_scale,
            cfg.admin_as_parameter,
        )?;
        Decoder::from_spec(decoder_spec(&cfg, opts), st, false, None, vb)
    }
}

impl EncoderDecoder {
    /// Builds an encoder-decoder from a torchscale config (finalised and validated here).
    pub fn new(cfg: &EncoderDecoderConfig, opts: &BuildOptions, vb: VarBuilder) -> Result<Self> {
        let _span = tracing::debug_span!(
            "build",
            model = "EncoderDecoder",
            encoder_layers = cfg.encoder_layers,
            decoder_layers = cfg.decoder_layers
        )
        .entered();
        let cfg = cfg.clone().finalize()?;
        let scale = cfg.admin_output_change_scale.clone();
        let enc_st = stabilizer(
            cfg.encoder_technique(),
            cfg.encoder_stack_kind(),
            &scale,
            cfg.admin_as_parameter,
        )?;
        let dec_st = stabilizer(
            cfg.decoder_technique(),
            cfg.decoder_stack_kind(),
            &scale,
            cfg.admin_as_parameter,
        )?;
        let enc = encoder_spec(&cfg.encoder_config(), opts);
        let dec = decoder_spec(&cfg.decoder_config(), opts);
        EncoderDecoder::from_specs(enc, enc_st, dec, dec_st, cfg.share_all_embeddings, vb)
    }
}

/// The MoE fields both configs share, gathered to build the layer settings once.
struct MoeFields {
    embed_dim: usize,
    ffn_dim: usize,
    freq: usize,
    experts: usize,
    top1: bool,
    use_xmoe: bool,
    paper: bool,
    eval_fraction: f64,
    policy: String,
    normalize_before_dropping: bool,
    fp32: bool,
    activation: torchscale_core::Activation,
    activation_dropout: f64,
    dropout: f64,
    eps: f64,
}

macro_rules! moe_fields {
    ($c:expr, $dim:ident, $ffn:ident) => {
        MoeFields {
            embed_dim: $c.$dim,
            ffn_dim: $c.$ffn,
            freq: $c.moe_freq,
            experts: $c.moe_expert_count,
            top1: $c.moe_top1_expert,
            use_xmoe: $c.use_xmoe,
            paper: $c.xmoe_paper_routing,
            eval_fraction: $c.moe_eval_capacity_token_fraction,
            policy: $c.moe_second_expert_policy.clone(),
            normalize_before_dropping: $c.moe_normalize_gate_prob_before_dropping,
            fp32: $c.moe_gating_use_fp32,
            activation: $c.activation_fn,
            activation_dropout: $c.activation_dropout,
            dropout: $c.dropout,
            eps: $c.layernorm_eps,
        }
    };
}

impl MoeFields {
    fn of_encoder(c: &EncoderConfig) -> Self {
        moe_fields!(c, encoder_embed_dim, encoder_ffn_embed_dim)
    }
    fn of_decoder(c: &DecoderConfig) -> Self {
        moe_fields!(c, decoder_embed_dim, decoder_ffn_embed_dim)
    }
}

fn moe_spec(f: &MoeFields) -> Option<MoeSpec> {
    if f.freq == 0 || f.experts == 0 {
        return None;
    }
    let policy = match f.policy.as_str() {
        "sampling" => SecondExpertPolicy::Sampling,
        "random" => SecondExpertPolicy::Random,
        _ => SecondExpertPolicy::All,
    };
    let layer = MoeConfig {
        embed_dim: f.embed_dim,
        ffn_dim: f.ffn_dim,
        num_experts: f.experts,
        top1: f.top1,
        use_xmoe: f.use_xmoe,
        paper_routing: f.paper,
        eval_capacity_token_fraction: f.eval_fraction,
        second_expert_policy: policy,
        normalize_gate_prob_before_dropping: f.normalize_before_dropping,
        gating_use_fp32: f.fp32,
        activation: f.activation,
        activation_dropout: f.activation_dropout,
        dropout: f.dropout,
        layernorm_eps: f.eps,
        ..MoeConfig::default()
    };
    Some(MoeSpec {
        freq: f.freq,
        layer,
        expert_comm: None,
    })
}
