//! From configs to models: the stack description, the technique of each layer, and the choices
//! made in code ([`StackHooks`]).

mod available_memory;
pub mod budget;
mod hooks;
mod moe;
mod plan;
pub mod shapes;

pub(crate) use available_memory::RecentAvailableMemory;
pub use available_memory::{available_memory, FALLBACK_BUDGET};
pub use budget::{Budget, ModelSize, StackRole};
pub use hooks::{RouterHook, SiteHook, StabilizerHook, StackHooks};
pub use plan::{stack_plan, StackPlan};

use candle_nn::VarBuilder;
use torchscale_core::{Result, Stabilizer, StackKind};

use crate::config::{DecoderConfig, EncoderConfig, EncoderDecoderConfig, Technique};
use crate::decoder::Decoder;
use crate::encoder::Encoder;
use crate::encoder_decoder::EncoderDecoder;
use crate::spec::StackSpec;
use moe::{moe_spec, MoeFields};

/// Choices a torchscale config does not hold: those torchscale takes as constructor arguments
/// (the embedding modules), and those only code can make (a stabiliser, a router or a sublayer
/// defined by the user, through [`StackHooks`]).
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Learned absolute positions (`embed_positions`). None: on unless the config uses xPos or a
    /// relative position bias.
    pub learned_positions: Option<bool>,
    /// Per-layer stabiliser, router and site hooks (none by default).
    pub hooks: StackHooks,
    /// Bytes the model may take ([`budget`]): a config whose parameters need more is refused
    /// before anything is allocated. None: the memory available when the build starts
    /// ([`available_memory`]).
    pub memory_budget: Option<u64>,
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
        kind: c.stack_kind(),
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
        kind: c.stack_kind(),
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
    /// Builds an encoder from a torchscale config (finalised and validated here) under `vb`,
    /// within the memory budget of `opts` ([`budget`]).
    pub fn new(cfg: &EncoderConfig, opts: &BuildOptions, vb: VarBuilder) -> Result<Self> {
        let _span =
            tracing::debug_span!("build", model = "Encoder", layers = cfg.encoder_layers).entered();
        let cfg = cfg.clone().finalize()?;
        let spec = encoder_spec(&cfg, opts);
        let role = StackRole::Encoder;
        let (budget, dtype) = (Budget::resolve(opts, vb.device()), vb.dtype());
        let what = "Encoder parameters";
        let floor = budget::stack_floor(&spec, role);
        budget::check(floor, dtype, budget, what, budget::sized_by(&spec, role))?;
        let plan = encoder_plan(&cfg, &spec, opts)?;
        budget::check_stack(&spec, &plan, role, dtype, budget, what)?;
        Encoder::from_plan(spec, plan, false, None, vb)
    }
}

/// The layer plan of an encoder stack built from `cfg` (finalised) and `spec`.
pub(crate) fn encoder_plan(
    cfg: &EncoderConfig,
    spec: &StackSpec,
    opts: &BuildOptions,
) -> Result<StackPlan> {
    stack_plan(
        cfg.technique(),
        &cfg.layer_techniques,
        spec,
        &cfg.admin_output_change_scale,
        cfg.admin_as_parameter,
        &opts.hooks,
    )
}

impl Decoder {
    /// Builds a decoder from a torchscale config (finalised and validated here) under `vb`,
    /// within the memory budget of `opts` ([`budget`]).
    pub fn new(cfg: &DecoderConfig, opts: &BuildOptions, vb: VarBuilder) -> Result<Self> {
        let _span =
            tracing::debug_span!("build", model = "Decoder", layers = cfg.decoder_layers).entered();
        let cfg = cfg.clone().finalize()?;
        let spec = decoder_spec(&cfg, opts);
        let plan = checked_decoder_plan(&cfg, &spec, opts, vb.dtype(), vb.device())?;
        Decoder::from_plan(spec, plan, false, None, vb)
    }
}

/// [`decoder_plan`] within the memory budget of `opts` for parameters of `dtype` on `device`: the stack's
/// lower bound is checked before the plan is made, its exact size after.
pub fn checked_decoder_plan(
    cfg: &DecoderConfig,
    spec: &StackSpec,
    opts: &BuildOptions,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<StackPlan> {
    let role = StackRole::Decoder;
    let budget = Budget::resolve(opts, device);
    let what = "Decoder parameters";
    let floor = budget::stack_floor(spec, role);
    budget::check(floor, dtype, budget, what, budget::sized_by(spec, role))?;
    let plan = decoder_plan(cfg, spec, opts)?;
    budget::check_stack(spec, &plan, role, dtype, budget, what)?;
    Ok(plan)
}

/// The layer plan of a decoder-only stack built from `cfg` (finalised) and `spec`.
pub fn decoder_plan(
    cfg: &DecoderConfig,
    spec: &StackSpec,
    opts: &BuildOptions,
) -> Result<StackPlan> {
    stack_plan(
        cfg.technique(),
        &cfg.layer_techniques,
        spec,
        &cfg.admin_output_change_scale,
        cfg.admin_as_parameter,
        &opts.hooks,
    )
}

impl EncoderDecoder {
    /// Builds an encoder-decoder from a torchscale config (finalised and validated here),
    /// within the memory budget of `opts` ([`budget`]).
    pub fn new(cfg: &EncoderDecoderConfig, opts: &BuildOptions, vb: VarBuilder) -> Result<Self> {
        let _span = tracing::debug_span!(
            "build",
            model = "EncoderDecoder",
            encoder_layers = cfg.encoder_layers,
            decoder_layers = cfg.decoder_layers
        )
        .entered();
        let cfg = cfg.clone().finalize()?;
        let (enc, dec) = encoder_decoder_specs(&cfg, opts);
        let (enc_role, dec_role) = encoder_decoder_roles(&cfg);
        let (budget, dtype) = (Budget::resolve(opts, vb.device()), vb.dtype());
        let what = "EncoderDecoder parameters";
        let sized_by = || {
            format!(
                "{}; {}",
                budget::sized_by(&enc, enc_role),
                budget::sized_by(&dec, dec_role)
            )
        };
        let floor = budget::stack_floor(&enc, enc_role).plus(budget::stack_floor(&dec, dec_role));
        budget::check(floor, dtype, budget, what, sized_by())?;
        let (enc_plan, dec_plan) = encoder_decoder_plans(&cfg, &enc, &dec, opts)?;
        let size = budget::stack_size(&enc, &enc_plan, enc_role)
            .plus(budget::stack_size(&dec, &dec_plan, dec_role));
        budget::check(size, dtype, budget, what, sized_by())?;
        EncoderDecoder::from_plans(enc, enc_plan, dec, dec_plan, cfg.share_all_embeddings, vb)
    }
}

/// The two stack descriptions of an encoder-decoder (`cfg` finalised): each side's constants
/// depend on both depths.
pub(crate) fn encoder_decoder_specs(
    cfg: &EncoderDecoderConfig,
    opts: &BuildOptions,
) -> (StackSpec, StackSpec) {
    let mut enc = encoder_spec(&cfg.encoder_config(), opts);
    enc.kind = cfg.encoder_stack_kind();
    let mut dec = decoder_spec(&cfg.decoder_config(), opts);
    dec.kind = cfg.decoder_stack_kind();
    (enc, dec)
}

/// The roles of an encoder-decoder's stacks.
pub(crate) fn encoder_decoder_roles(cfg: &EncoderDecoderConfig) -> (StackRole, StackRole) {
    (
        StackRole::EncoderOfEncDec,
        StackRole::DecoderOfEncDec {
            shared_tokens: cfg.share_all_embeddings,
        },
    )
}

/// The layer plans of an encoder-decoder's stacks (`cfg` finalised).
pub(crate) fn encoder_decoder_plans(
    cfg: &EncoderDecoderConfig,
    enc: &StackSpec,
    dec: &StackSpec,
    opts: &BuildOptions,
) -> Result<(StackPlan, StackPlan)> {
    let scale = &cfg.admin_output_change_scale;
    let enc_plan = stack_plan(
        cfg.encoder_technique(),
        &cfg.encoder_layer_techniques,
        enc,
        scale,
        cfg.admin_as_parameter,
        &opts.hooks,
    )?;
    let dec_plan = stack_plan(
        cfg.decoder_technique(),
        &cfg.decoder_layer_techniques,
        dec,
        scale,
        cfg.admin_as_parameter,
        &opts.hooks,
    )?;
    Ok((enc_plan, dec_plan))
}
