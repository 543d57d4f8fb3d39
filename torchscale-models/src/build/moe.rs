//! The MoE settings of a stack, from the MoE fields of a config.

use torchscale_moe::{MoeConfig, RouterChoice, SecondExpertPolicy};

use crate::config::{DecoderConfig, EncoderConfig, LayerRouter};
use crate::spec::MoeSpec;

/// The MoE fields both configs share, gathered to build the layer settings once.
pub(crate) struct MoeFields {
    embed_dim: usize,
    ffn_dim: usize,
    freq: usize,
    layers: Option<Vec<usize>>,
    router: RouterChoice,
    layer_routers: Vec<LayerRouter>,
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
            layers: $c.moe_layers.clone(),
            router: $c.moe_router.clone(),
            layer_routers: $c.moe_layer_routers.clone(),
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
    pub(crate) fn of_encoder(c: &EncoderConfig) -> Self {
        moe_fields!(c, encoder_embed_dim, encoder_ffn_embed_dim)
    }
    pub(crate) fn of_decoder(c: &DecoderConfig) -> Self {
        moe_fields!(c, decoder_embed_dim, decoder_ffn_embed_dim)
    }
}

/// The stack's MoE settings; None for a dense stack.
pub(crate) fn moe_spec(f: &MoeFields) -> Option<MoeSpec> {
    let has_layers = crate::config::per_layer::has_moe_layers(f.layers.as_deref(), f.freq);
    if !has_layers || f.experts == 0 {
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
        router: f.router.clone(),
        ..MoeConfig::default()
    };
    Some(MoeSpec {
        freq: f.freq,
        layers: f.layers.clone(),
        layer,
        layer_routers: f.layer_routers.clone(),
        expert_comm: None,
    })
}
