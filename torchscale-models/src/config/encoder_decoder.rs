//! `EncoderDecoderConfig`: torchscale 0.3.0's encoder-decoder configuration, field for field.

use std::path::Path;

use serde::{Deserialize, Serialize};
use torchscale_core::{Activation, Error, Result, StackKind};

use super::builders::shared_builders;
use super::per_layer::{self, LayerRouter, LayerTechnique};
use super::validate::{self, shared_view};
use super::{is_default_scale, is_false, DecoderConfig, EncoderConfig, Technique};
use torchscale_moe::RouterChoice;

/// torchscale's `EncoderDecoderConfig` (0.3.0): the `encoder_*` and `decoder_*` shape fields,
/// one set of shared fields (technique flags, MoE, positions, dropout...) for both stacks,
/// `share_all_embeddings`, both position limits; no image fields and no
/// `share_encoder_input_output_embed`.
///
/// [`encoder_config`](Self::encoder_config) and [`decoder_config`](Self::decoder_config) give the
/// per-stack views the models are built from; the techniques' constants of an encoder-decoder
/// depend on both depths, which [`encoder_stack_kind`](Self::encoder_stack_kind) and
/// [`decoder_stack_kind`](Self::decoder_stack_kind) carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EncoderDecoderConfig {
    /// Encoder width (768).
    pub encoder_embed_dim: usize,
    /// Encoder heads (12).
    pub encoder_attention_heads: usize,
    /// Encoder FFN width (3072).
    pub encoder_ffn_embed_dim: usize,
    /// Encoder layers N (12).
    pub encoder_layers: usize,
    /// Encoder Pre-LN flag (true); overridden by `deepnorm` / `subln`.
    pub encoder_normalize_before: bool,
    /// Final LayerNorm after a Pre-LN encoder (true).
    pub normalize_output: bool,
    /// Decoder width (768); must equal the encoder width (cross-attention).
    pub decoder_embed_dim: usize,
    /// Decoder heads (12).
    pub decoder_attention_heads: usize,
    /// Decoder FFN width (3072).
    pub decoder_ffn_embed_dim: usize,
    /// Decoder layers M (12).
    pub decoder_layers: usize,
    /// Decoder Pre-LN flag (true); overridden by `deepnorm` / `subln`.
    pub decoder_normalize_before: bool,
    /// FFN activation ("gelu").
    pub activation_fn: Activation,
    /// Dropout on embeddings and sublayer outputs (0).
    pub dropout: f64,
    /// Stochastic depth rate of the last layer (0).
    pub drop_path_rate: f64,
    /// Dropout on attention probabilities (0).
    pub attention_dropout: f64,
    /// Dropout after the FFN activation (0).
    pub activation_dropout: f64,
    /// Token embeddings are not scaled by sqrt(d) (true).
    pub no_scale_embedding: bool,
    /// LayerNorm on the embedding sum (false).
    pub layernorm_embedding: bool,
    /// Every `moe_freq`-th layer is MoE; 0 = dense (0).
    pub moe_freq: usize,
    /// Top-1 gate instead of Top-2 (false).
    pub moe_top1_expert: bool,
    /// Number of experts E (0).
    pub moe_expert_count: usize,
    /// Gate math in f32 (true).
    pub moe_gating_use_fp32: bool,
    /// Eval capacity fraction; used when > 0 outside training (0.25).
    pub moe_eval_capacity_token_fraction: f64,
    /// Top-2 second-expert policy: "sampling", "random" or "all" ("random").
    pub moe_second_expert_policy: String,
    /// Renormalise gate probabilities before capacity dropping (false).
    pub moe_normalize_gate_prob_before_dropping: bool,
    /// X-MoE router (false).
    pub use_xmoe: bool,
    /// T5 relative-bias buckets; 0 = off (0).
    pub rel_pos_buckets: usize,
    /// T5 relative-bias max distance; 0 = off (0).
    pub max_rel_pos: usize,
    /// DeepNet residual and init, both stacks (false).
    pub deepnorm: bool,
    /// Magneto Sub-LN, both stacks (true).
    pub subln: bool,
    /// BERT-style N(0, 0.02) re-initialisation (false).
    pub bert_init: bool,
    /// BEiT-3 multiway A/B modules (false).
    pub multiway: bool,
    /// Share encoder and decoder token embeddings; implies
    /// `share_decoder_input_output_embed` (false).
    pub share_all_embeddings: bool,
    /// Tie the decoder output projection to its token embedding (false).
    pub share_decoder_input_output_embed: bool,
    /// Encoder learned positions table size (1024).
    pub max_source_positions: usize,
    /// Decoder learned positions table size (1024).
    pub max_target_positions: usize,
    /// Suppress the output projection (false).
    pub no_output_layer: bool,
    /// Epsilon of every LayerNorm (1e-5).
    pub layernorm_eps: f64,
    /// Output vocabulary; -1 = no output projection (-1).
    pub vocab_size: i64,
    /// fairscale activation checkpointing (false); unused here.
    pub checkpoint_activations: bool,
    /// fairscale FSDP wrapping (false); unused here.
    pub fsdp: bool,
    /// Rank used to seed expert RNGs (0).
    pub ddp_rank: usize,
    /// xPos rotary positions in self-attention (false).
    pub xpos_rel_pos: bool,
    /// xPos scale base (512).
    pub xpos_scale_base: usize,
    /// torchscale HEAD only (flash-attention kernels); not serialised when false.
    #[serde(skip_serializing_if = "is_false")]
    pub flash_attention: bool,
    /// torchscale HEAD only (LongNet); kept verbatim, not serialised when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment_length: Option<serde_json::Value>,
    /// torchscale HEAD only (LongNet); kept verbatim, not serialised when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dilated_ratio: Option<serde_json::Value>,
    /// torchscale HEAD only (LongNet); not serialised when false.
    #[serde(skip_serializing_if = "is_false")]
    pub seq_parallel: bool,
    /// Extension: Admin residual `LN(ω·x + f(x))` in both stacks (false). Needs Post-LN flags.
    #[serde(skip_serializing_if = "is_false")]
    pub admin: bool,
    /// Extension: admin-torch `output_change_scale` ("default").
    #[serde(skip_serializing_if = "is_default_scale")]
    pub admin_output_change_scale: String,
    /// Extension: ω as a learnable per-channel parameter instead of a buffer (false).
    #[serde(skip_serializing_if = "is_false")]
    pub admin_as_parameter: bool,
    /// Extension: X-MoE routing as in the paper (normalised tokens, learnable temperature)
    /// instead of torchscale's (false).
    #[serde(skip_serializing_if = "is_false")]
    pub xmoe_paper_routing: bool,
    /// Extension: the encoder's per-range techniques (see
    /// [`DecoderConfig::layer_techniques`]); ranges are encoder layer indices (empty).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub encoder_layer_techniques: Vec<LayerTechnique>,
    /// Extension: the decoder's per-range techniques (empty).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub decoder_layer_techniques: Vec<LayerTechnique>,
    /// Extension: the encoder's MoE layers, in place of every `moe_freq`-th (None).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoder_moe_layers: Option<Vec<usize>>,
    /// Extension: the decoder's MoE layers, in place of every `moe_freq`-th (None).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decoder_moe_layers: Option<Vec<usize>>,
    /// Extension: the router of every MoE layer of both stacks (torchscale's capacity routing).
    #[serde(skip_serializing_if = "RouterChoice::is_capacity")]
    pub moe_router: RouterChoice,
    /// Extension: routers of single encoder MoE layers, in place of `moe_router` (empty).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub encoder_moe_layer_routers: Vec<LayerRouter>,
    /// Extension: routers of single decoder MoE layers, in place of `moe_router` (empty).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub decoder_moe_layer_routers: Vec<LayerRouter>,
}

impl Default for EncoderDecoderConfig {
    fn default() -> Self {
        Self {
            encoder_embed_dim: 768,
            encoder_attention_heads: 12,
            encoder_ffn_embed_dim: 3072,
            encoder_layers: 12,
            encoder_normalize_before: true,
            normalize_output: true,
            decoder_embed_dim: 768,
            decoder_attention_heads: 12,
            decoder_ffn_embed_dim: 3072,
            decoder_layers: 12,
            decoder_normalize_before: true,
            activation_fn: Activation::Gelu,
            dropout: 0.0,
            drop_path_rate: 0.0,
            attention_dropout: 0.0,
            activation_dropout: 0.0,
            no_scale_embedding: true,
            layernorm_embedding: false,
            moe_freq: 0,
            moe_top1_expert: false,
            moe_expert_count: 0,
            moe_gating_use_fp32: true,
            moe_eval_capacity_token_fraction: 0.25,
            moe_second_expert_policy: "random".into(),
            moe_normalize_gate_prob_before_dropping: false,
            use_xmoe: false,
            rel_pos_buckets: 0,
            max_rel_pos: 0,
            deepnorm: false,
            subln: true,
            bert_init: false,
            multiway: false,
            share_all_embeddings: false,
            share_decoder_input_output_embed: false,
            max_source_positions: 1024,
            max_target_positions: 1024,
            no_output_layer: false,
            layernorm_eps: 1e-5,
            vocab_size: -1,
            checkpoint_activations: false,
            fsdp: false,
            ddp_rank: 0,
            xpos_rel_pos: false,
            xpos_scale_base: 512,
            flash_attention: false,
            segment_length: None,
            dilated_ratio: None,
            seq_parallel: false,
            admin: false,
            admin_output_change_scale: "default".into(),
            admin_as_parameter: false,
            xmoe_paper_routing: false,
            encoder_layer_techniques: Vec::new(),
            decoder_layer_techniques: Vec::new(),
            encoder_moe_layers: None,
            decoder_moe_layers: None,
            moe_router: RouterChoice::Capacity,
            encoder_moe_layer_routers: Vec::new(),
            decoder_moe_layer_routers: Vec::new(),
        }
    }
}

/// Copies the fields both stacks share from an [`EncoderDecoderConfig`] into a stack view.
macro_rules! copy_shared {
    ($src:expr => $dst:expr) => {
        $dst.activation_fn = $src.activation_fn;
        $dst.dropout = $src.dropout;
        $dst.drop_path_rate = $src.drop_path_rate;
        $dst.attention_dropout = $src.attention_dropout;
        $dst.activation_dropout = $src.activation_dropout;
        $dst.no_scale_embedding = $src.no_scale_embedding;
        $dst.layernorm_embedding = $src.layernorm_embedding;
        $dst.moe_freq = $src.moe_freq;
        $dst.moe_top1_expert = $src.moe_top1_expert;
        $dst.moe_expert_count = $src.moe_expert_count;
        $dst.moe_gating_use_fp32 = $src.moe_gating_use_fp32;
        $dst.moe_eval_capacity_token_fraction = $src.moe_eval_capacity_token_fraction;
        $dst.moe_second_expert_policy = $src.moe_second_expert_policy.clone();
        $dst.moe_normalize_gate_prob_before_dropping = $src.moe_normalize_gate_prob_before_dropping;
        $dst.use_xmoe = $src.use_xmoe;
        $dst.rel_pos_buckets = $src.rel_pos_buckets;
        $dst.max_rel_pos = $src.max_rel_pos;
        $dst.deepnorm = $src.deepnorm;
        $dst.subln = $src.subln;
        $dst.bert_init = $src.bert_init;
        $dst.multiway = $src.multiway;
        $dst.no_output_layer = $src.no_output_layer;
        $dst.layernorm_eps = $src.layernorm_eps;
        $dst.vocab_size = $src.vocab_size;
        $dst.checkpoint_activations = $src.checkpoint_activations;
        $dst.fsdp = $src.fsdp;
        $dst.ddp_rank = $src.ddp_rank;
        $dst.xpos_rel_pos = $src.xpos_rel_pos;
        $dst.xpos_scale_base = $src.xpos_scale_base;
        $dst.flash_attention = $src.flash_attention;
        $dst.segment_length = $src.segment_length.clone();
        $dst.dilated_ratio = $src.dilated_ratio.clone();
        $dst.seq_parallel = $src.seq_parallel;
        $dst.admin = $src.admin;
        $dst.admin_output_change_scale = $src.admin_output_change_scale.clone();
        $dst.admin_as_parameter = $src.admin_as_parameter;
        $dst.xmoe_paper_routing = $src.xmoe_paper_routing;
    };
}

impl EncoderDecoderConfig {
    /// torchscale's defaults (not yet finalised; the defaults are already consistent).
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a torchscale config JSON (any subset of fields) and finalises it, like
    /// `EncoderDecoderConfig(**json)` does. A bad value is [`Error::Config`] naming its key.
    pub fn from_json_str(s: &str) -> Result<Self> {
        super::json::parse::<Self>(s)?.finalize()
    }

    /// [`from_json_str`](Self::from_json_str) on a file; I/O and syntax errors are
    /// [`Error::File`] naming the path.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        super::json::read::<Self>(path.as_ref())?.finalize()
    }

    /// Compact JSON with torchscale's keys (extension fields only when not at their default).
    pub fn to_json_string(&self) -> Result<String> {
        super::json::to_string(self)
    }

    /// torchscale 0.3.0's post-construction rules, applied to both stacks' flags (HEAD's
    /// regression touches only the encoder's): `deepnorm` forces Post-LN and clears `subln`;
    /// `subln` forces Pre-LN and clears `deepnorm`; `use_xmoe` turns on
    /// `moe_normalize_gate_prob_before_dropping` and sets the second-expert policy to "random".
    pub fn postprocess(&mut self) {
        if self.deepnorm {
            self.encoder_normalize_before = false;
            self.decoder_normalize_before = false;
            self.subln = false;
        }
        if self.subln {
            self.encoder_normalize_before = true;
            self.decoder_normalize_before = true;
            self.deepnorm = false;
        }
        if self.use_xmoe {
            self.moe_normalize_gate_prob_before_dropping = true;
            self.moe_second_expert_policy = "random".into();
        }
    }

    /// Checks every field; the error names the torchscale field at fault.
    pub fn validate(&self) -> Result<()> {
        validate::stack(
            "encoder",
            self.encoder_embed_dim,
            self.encoder_attention_heads,
            self.encoder_ffn_embed_dim,
            self.encoder_layers,
            self.xpos_rel_pos,
        )?;
        validate::stack(
            "decoder",
            self.decoder_embed_dim,
            self.decoder_attention_heads,
            self.decoder_ffn_embed_dim,
            self.decoder_layers,
            self.xpos_rel_pos,
        )?;
        // Cross-attention projects the encoder output with d_dec × d_dec weights.
        if self.decoder_embed_dim != self.encoder_embed_dim {
            return Err(Error::config(
                "decoder_embed_dim",
                format!(
                    "must equal encoder_embed_dim ({}) for cross-attention, got {}",
                    self.encoder_embed_dim, self.decoder_embed_dim
                ),
            ));
        }
        validate::positions("max_source_positions", self.max_source_positions)?;
        validate::positions("max_target_positions", self.max_target_positions)?;
        let enc_experts =
            per_layer::has_moe_layers(self.encoder_moe_layers.as_deref(), self.moe_freq);
        let dec_experts =
            per_layer::has_moe_layers(self.decoder_moe_layers.as_deref(), self.moe_freq);
        for (prefix, positions_field, embed_dim, heads, ffn_dim, positions, moe) in [
            (
                "encoder",
                "max_source_positions",
                self.encoder_embed_dim,
                self.encoder_attention_heads,
                self.encoder_ffn_embed_dim,
                self.max_source_positions,
                enc_experts,
            ),
            (
                "decoder",
                "max_target_positions",
                self.decoder_embed_dim,
                self.decoder_attention_heads,
                self.decoder_ffn_embed_dim,
                self.max_target_positions,
                dec_experts,
            ),
        ] {
            validate::sizes(&validate::StackSizes {
                prefix,
                positions_field,
                embed_dim,
                heads,
                ffn_dim,
                positions,
                vocab_size: self.vocab_size,
                experts: if moe { self.moe_expert_count } else { 0 },
                rel_pos_buckets: self.rel_pos_buckets,
            })?;
        }
        per_layer::layer_techniques(
            "encoder_layer_techniques",
            &self.encoder_layer_techniques,
            self.encoder_layers,
        )?;
        per_layer::layer_techniques(
            "decoder_layer_techniques",
            &self.decoder_layer_techniques,
            self.decoder_layers,
        )?;
        per_layer::moe_layers(
            "encoder_moe_layers",
            self.encoder_moe_layers.as_deref(),
            self.encoder_layers,
        )?;
        per_layer::moe_layers(
            "decoder_moe_layers",
            self.decoder_moe_layers.as_deref(),
            self.decoder_layers,
        )?;
        let enc_moe = per_layer::has_moe_layers(self.encoder_moe_layers.as_deref(), self.moe_freq);
        let dec_moe = per_layer::has_moe_layers(self.decoder_moe_layers.as_deref(), self.moe_freq);
        let shared = shared_view!(self, enc_moe || dec_moe);
        validate::shared(&shared)?;
        let is_moe = |list: &Option<Vec<usize>>, i| {
            per_layer::is_moe_layer(list.as_deref(), self.moe_freq, i)
        };
        per_layer::routers(
            "moe_router",
            &self.moe_router,
            "encoder_moe_layer_routers",
            &self.encoder_moe_layer_routers,
            self.moe_expert_count,
            enc_moe || dec_moe,
            |i| is_moe(&self.encoder_moe_layers, i),
        )?;
        per_layer::routers(
            "moe_router",
            &self.moe_router,
            "decoder_moe_layer_routers",
            &self.decoder_moe_layer_routers,
            self.moe_expert_count,
            false,
            |i| is_moe(&self.decoder_moe_layers, i),
        )?;
        // torchscale's EncoderLayer asserts this for MoE layers.
        if self.multiway && enc_moe {
            return Err(Error::config(
                "multiway",
                "cannot be combined with MoE layers (moe_freq > 0 or encoder_moe_layers)",
            ));
        }
        validate::xpos(
            self.xpos_rel_pos,
            self.encoder_embed_dim,
            self.encoder_attention_heads,
            self.xpos_scale_base,
            "max_source_positions",
            self.max_source_positions,
        )?;
        validate::xpos(
            self.xpos_rel_pos,
            self.decoder_embed_dim,
            self.decoder_attention_heads,
            self.xpos_scale_base,
            "max_target_positions",
            self.max_target_positions,
        )?;
        validate::admin(
            &shared,
            &[
                ("encoder_normalize_before", self.encoder_normalize_before),
                ("decoder_normalize_before", self.decoder_normalize_before),
            ],
        )
    }

    /// [`postprocess`](Self::postprocess) then [`validate`](Self::validate).
    pub fn finalize(mut self) -> Result<Self> {
        self.postprocess();
        self.validate()?;
        Ok(self)
    }

    /// The encoder stack's view: the `encoder_*` fields, `normalize_output`,
    /// `max_source_positions` and every shared field; image fields at their defaults and
    /// `share_encoder_input_output_embed = false`. In an encoder-decoder the encoder builds no
    /// output projection whatever `vocab_size` says, and its technique constants need
    /// [`encoder_stack_kind`](Self::encoder_stack_kind).
    pub fn encoder_config(&self) -> EncoderConfig {
        let mut e = EncoderConfig::default();
        e.encoder_embed_dim = self.encoder_embed_dim;
        e.encoder_attention_heads = self.encoder_attention_heads;
        e.encoder_ffn_embed_dim = self.encoder_ffn_embed_dim;
        e.encoder_layers = self.encoder_layers;
        e.encoder_normalize_before = self.encoder_normalize_before;
        e.normalize_output = self.normalize_output;
        e.max_source_positions = self.max_source_positions;
        e.layer_techniques = self.encoder_layer_techniques.clone();
        e.moe_layers = self.encoder_moe_layers.clone();
        e.moe_router = self.moe_router.clone();
        e.moe_layer_routers = self.encoder_moe_layer_routers.clone();
        copy_shared!(self => e);
        e
    }

    /// The decoder stack's view: the `decoder_*` fields, `max_target_positions` and every shared
    /// field; `share_decoder_input_output_embed` is also set by `share_all_embeddings`, as
    /// torchscale's `EncoderDecoder` does.
    pub fn decoder_config(&self) -> DecoderConfig {
        let mut d = DecoderConfig::default();
        d.decoder_embed_dim = self.decoder_embed_dim;
        d.decoder_attention_heads = self.decoder_attention_heads;
        d.decoder_ffn_embed_dim = self.decoder_ffn_embed_dim;
        d.decoder_layers = self.decoder_layers;
        d.decoder_normalize_before = self.decoder_normalize_before;
        d.max_target_positions = self.max_target_positions;
        d.share_decoder_input_output_embed =
            self.share_decoder_input_output_embed || self.share_all_embeddings;
        d.layer_techniques = self.decoder_layer_techniques.clone();
        d.moe_layers = self.decoder_moe_layers.clone();
        d.moe_router = self.moe_router.clone();
        d.moe_layer_routers = self.decoder_moe_layer_routers.clone();
        copy_shared!(self => d);
        d
    }

    /// The technique of both stacks (meaningful after [`finalize`](Self::finalize)). The two
    /// `*_normalize_before` flags can differ only when `subln`, `deepnorm` and `admin` are all
    /// off (Pre-LN encoder with Post-LN decoder or the reverse); this then returns the
    /// encoder's: use [`encoder_technique`](Self::encoder_technique) and
    /// [`decoder_technique`](Self::decoder_technique) to build such a model.
    pub fn technique(&self) -> Technique {
        self.encoder_technique()
    }
    /// The encoder's technique (meaningful after [`finalize`](Self::finalize)).
    pub fn encoder_technique(&self) -> Technique {
        Technique::from_flags(
            self.admin,
            self.deepnorm,
            self.subln,
            self.encoder_normalize_before,
        )
    }
    /// The decoder's technique (meaningful after [`finalize`](Self::finalize)).
    pub fn decoder_technique(&self) -> Technique {
        Technique::from_flags(
            self.admin,
            self.deepnorm,
            self.subln,
            self.decoder_normalize_before,
        )
    }
    /// The encoder's stack shape (its DeepNorm/Sub-LN constants depend on both depths).
    pub fn encoder_stack_kind(&self) -> StackKind {
        StackKind::EncoderOfEncDec {
            encoder_layers: self.encoder_layers,
            decoder_layers: self.decoder_layers,
        }
    }
    /// The decoder's stack shape.
    pub fn decoder_stack_kind(&self) -> StackKind {
        StackKind::DecoderOfEncDec {
            encoder_layers: self.encoder_layers,
            decoder_layers: self.decoder_layers,
        }
    }
    /// Whether layer `i` (0-based) is an MoE layer by the `moe_freq` rule, which both stacks
    /// follow unless `encoder_moe_layers` / `decoder_moe_layers` list their MoE layers (ask
    /// [`encoder_config`](Self::encoder_config) or [`decoder_config`](Self::decoder_config)
    /// for one side).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        per_layer::is_moe_layer(None, self.moe_freq, i)
    }

    /// Sets `encoder_embed_dim` and `decoder_embed_dim`.
    pub fn with_embed_dim(mut self, d: usize) -> Self {
        self.encoder_embed_dim = d;
        self.decoder_embed_dim = d;
        self
    }
    /// Sets `encoder_attention_heads` and `decoder_attention_heads`.
    pub fn with_heads(mut self, heads: usize) -> Self {
        self.encoder_attention_heads = heads;
        self.decoder_attention_heads = heads;
        self
    }
    /// Sets `encoder_ffn_embed_dim` and `decoder_ffn_embed_dim`.
    pub fn with_ffn_dim(mut self, ffn_dim: usize) -> Self {
        self.encoder_ffn_embed_dim = ffn_dim;
        self.decoder_ffn_embed_dim = ffn_dim;
        self
    }
    /// Sets `encoder_layers` and `decoder_layers`.
    pub fn with_layers(mut self, encoder_layers: usize, decoder_layers: usize) -> Self {
        self.encoder_layers = encoder_layers;
        self.decoder_layers = decoder_layers;
        self
    }
    /// Sets both `*_normalize_before` (undone by the default `subln = true`, as in torchscale).
    pub fn with_normalize_before(mut self, on: bool) -> Self {
        self.encoder_normalize_before = on;
        self.decoder_normalize_before = on;
        self
    }
    /// Sets `normalize_output` (encoder final LayerNorm).
    pub fn with_normalize_output(mut self, on: bool) -> Self {
        self.normalize_output = on;
        self
    }
    /// Sets `max_source_positions` and `max_target_positions`.
    pub fn with_max_positions(mut self, source: usize, target: usize) -> Self {
        self.max_source_positions = source;
        self.max_target_positions = target;
        self
    }
    /// Sets `share_all_embeddings`.
    pub fn with_share_all_embeddings(mut self, on: bool) -> Self {
        self.share_all_embeddings = on;
        self
    }
    /// Sets `share_decoder_input_output_embed`.
    pub fn with_share_decoder_input_output_embed(mut self, on: bool) -> Self {
        self.share_decoder_input_output_embed = on;
        self
    }
    /// Sets `admin`, `deepnorm`, `subln` and both `*_normalize_before` so that `technique` is
    /// selected for both stacks and survives [`finalize`](Self::finalize).
    pub fn with_technique(mut self, technique: Technique) -> Self {
        let (admin, deepnorm, subln, before) = technique.flags();
        self.admin = admin;
        self.deepnorm = deepnorm;
        self.subln = subln;
        self.encoder_normalize_before = before;
        self.decoder_normalize_before = before;
        self
    }

    shared_builders!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn field_of(r: Result<EncoderDecoderConfig>) -> String {
        match r {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a Config error, got {other:?}"),
        }
    }

    fn small() -> EncoderDecoderConfig {
        EncoderDecoderConfig::new()
            .with_embed_dim(32)
            .with_heads(4)
            .with_ffn_dim(64)
            .with_layers(3, 2)
    }

    /// Every default of SPEC 1.1 (EncoderDecoderConfig paragraph, 0.3.0 fields).
    #[test]
    fn defaults_match_torchscale() {
        let spec: Value = serde_json::from_str(
            r#"{
            "encoder_embed_dim": 768, "encoder_attention_heads": 12, "encoder_ffn_embed_dim": 3072,
            "encoder_layers": 12, "encoder_normalize_before": true, "normalize_output": true,
            "decoder_embed_dim": 768, "decoder_attention_heads": 12, "decoder_ffn_embed_dim": 3072,
            "decoder_layers": 12, "decoder_normalize_before": true,
            "activation_fn": "gelu", "dropout": 0.0, "drop_path_rate": 0.0,
            "attention_dropout": 0.0, "activation_dropout": 0.0, "no_scale_embedding": true,
            "layernorm_embedding": false, "moe_freq": 0, "moe_top1_expert": false,
            "moe_expert_count": 0, "moe_gating_use_fp32": true,
            "moe_eval_capacity_token_fraction": 0.25, "moe_second_expert_policy": "random",
            "moe_normalize_gate_prob_before_dropping": false, "use_xmoe": false,
            "rel_pos_buckets": 0, "max_rel_pos": 0, "deepnorm": false, "subln": true,
            "bert_init": false, "multiway": false, "share_all_embeddings": false,
            "share_decoder_input_output_embed": false, "max_source_positions": 1024,
            "max_target_positions": 1024, "no_output_layer": false, "layernorm_eps": 1e-5,
            "vocab_size": -1, "checkpoint_activations": false, "fsdp": false, "ddp_rank": 0,
            "xpos_rel_pos": false, "xpos_scale_base": 512
        }"#,
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(EncoderDecoderConfig::default()).unwrap(),
            spec
        );
        assert_eq!(
            EncoderDecoderConfig::from_json_str("{}").unwrap(),
            EncoderDecoderConfig::default()
        );
    }

    #[test]
    fn rules_apply_to_both_stacks() {
        // 0.3.0: deepnorm clears both flags (HEAD would leave the decoder Pre-LN).
        let c = small().with_deepnorm(true).finalize().unwrap();
        assert!(!c.encoder_normalize_before && !c.decoder_normalize_before && !c.subln);
        assert_eq!(
            (c.encoder_technique(), c.decoder_technique()),
            (Technique::DeepNorm, Technique::DeepNorm)
        );
        let s = small().with_normalize_before(false).finalize().unwrap();
        assert!(s.encoder_normalize_before && s.decoder_normalize_before);
        let x = small()
            .with_moe(2, 4)
            .with_xmoe(true)
            .with_moe_second_expert_policy("all")
            .finalize()
            .unwrap();
        assert!(x.moe_normalize_gate_prob_before_dropping);
        assert_eq!(x.moe_second_expert_policy, "random");
        // Different flags per stack survive when neither subln nor deepnorm is on.
        let mut mixed = small().with_subln(false);
        mixed.decoder_normalize_before = false;
        let mixed = mixed.finalize().unwrap();
        assert_eq!(
            (mixed.encoder_technique(), mixed.decoder_technique()),
            (Technique::PreLn, Technique::PostLn)
        );
        for t in [
            Technique::PostLn,
            Technique::PreLn,
            Technique::DeepNorm,
            Technique::SubLn,
            Technique::Admin,
        ] {
            let c = small().with_technique(t).finalize().unwrap();
            assert_eq!((c.encoder_technique(), c.decoder_technique()), (t, t));
        }
    }

    #[test]
    fn every_validation_error_names_its_field() {
        let mut dec_heads = small();
        dec_heads.decoder_attention_heads = 5;
        let mut dec_width = small();
        dec_width.decoder_embed_dim = 64;
        let mut dec_admin = small().with_technique(Technique::Admin);
        dec_admin.decoder_normalize_before = true;
        let mut dec_layers = small();
        dec_layers.decoder_layers = 0;
        let cases: Vec<(EncoderDecoderConfig, &str)> = vec![
            (dec_heads, "decoder_attention_heads"),
            (small().with_heads(5), "encoder_attention_heads"),
            (dec_width, "decoder_embed_dim"),
            (dec_layers, "decoder_layers"),
            (small().with_layers(0, 2), "encoder_layers"),
            (small().with_ffn_dim(0), "encoder_ffn_embed_dim"),
            (small().with_max_positions(64, 0), "max_target_positions"),
            (small().with_max_positions(0, 64), "max_source_positions"),
            (small().with_multiway(true).with_moe(2, 4), "multiway"),
            (small().with_dropout(1.0), "dropout"),
            (small().with_heads(32).with_xpos(true), "xpos_rel_pos"),
            (small().with_vocab_size(0), "vocab_size"),
            (small().with_rel_pos(32, 0), "max_rel_pos"),
            (small().with_xmoe(true), "use_xmoe"),
            (dec_admin, "admin"),
        ];
        for (cfg, field) in cases {
            assert_eq!(field_of(cfg.finalize()), field);
        }
    }

    /// Every field a view shares with the encoder-decoder config has the same value there, and
    /// the view adds only its own stack-specific keys. Two sources so that every shared field is
    /// away from its default in at least one of them.
    #[test]
    fn views_copy_every_shared_field() {
        let first = r#"{"encoder_embed_dim": 48, "decoder_embed_dim": 48, "encoder_attention_heads": 6,
            "decoder_attention_heads": 3, "encoder_ffn_embed_dim": 96, "decoder_ffn_embed_dim": 80,
            "encoder_layers": 5, "decoder_layers": 4, "normalize_output": false,
            "activation_fn": "swish", "dropout": 0.1, "drop_path_rate": 0.2,
            "attention_dropout": 0.05, "activation_dropout": 0.15, "no_scale_embedding": false,
            "layernorm_embedding": true, "moe_freq": 2, "moe_top1_expert": true,
            "moe_expert_count": 3, "moe_gating_use_fp32": false,
            "moe_eval_capacity_token_fraction": 0.5, "use_xmoe": true, "rel_pos_buckets": 16,
            "max_rel_pos": 40, "deepnorm": true, "bert_init": true,
            "share_all_embeddings": true, "max_source_positions": 77, "max_target_positions": 55,
            "no_output_layer": true, "layernorm_eps": 1e-6, "vocab_size": 99,
            "checkpoint_activations": true, "fsdp": true, "ddp_rank": 3, "xpos_rel_pos": true,
            "xpos_scale_base": 256, "flash_attention": true, "segment_length": "[8,16]",
            "seq_parallel": true, "xmoe_paper_routing": true}"#;
        let second = r#"{"encoder_embed_dim": 32, "decoder_embed_dim": 32, "encoder_attention_heads": 4,
            "decoder_attention_heads": 4, "encoder_layers": 2, "decoder_layers": 2,
            "subln": false, "encoder_normalize_before": false, "decoder_normalize_before": false,
            "multiway": true, "admin": true, "admin_output_change_scale": "O(1)",
            "admin_as_parameter": true, "dilated_ratio": "[1,2]",
            "moe_second_expert_policy": "sampling", "share_decoder_input_output_embed": true}"#;
        for json in [first, second] {
            let src = EncoderDecoderConfig::from_json_str(json).unwrap();
            let src_v = serde_json::to_value(&src).unwrap();
            let enc = src.encoder_config().finalize().unwrap();
            let dec = src.decoder_config().finalize().unwrap();
            let check = |view: Value, own: &[&str]| {
                let Value::Object(view) = view else {
                    panic!("not an object")
                };
                for (k, v) in &view {
                    match src_v.get(k) {
                        Some(s) if !own.contains(&k.as_str()) => assert_eq!(s, v, "{k}"),
                        Some(_) => {}
                        None => assert!(own.contains(&k.as_str()), "unexpected key {k}"),
                    }
                }
                // Extension and HEAD keys are serialised only off their defaults: make sure
                // the view did not drop one the source has.
                for k in src_v.as_object().into_iter().flat_map(|o| o.keys()) {
                    let stack_specific = k.starts_with("encoder_")
                        || k.starts_with("decoder_")
                        || k.starts_with("share_")
                        || (k.starts_with("max_") && k != "max_rel_pos")
                        || k == "normalize_output";
                    if !stack_specific {
                        assert!(view.contains_key(k), "view lacks {k}");
                    }
                }
            };
            check(
                serde_json::to_value(&enc).unwrap(),
                &[
                    "img_size",
                    "patch_size",
                    "in_chans",
                    "share_encoder_input_output_embed",
                ],
            );
            check(
                serde_json::to_value(&dec).unwrap(),
                &["share_decoder_input_output_embed"],
            );
            assert_eq!(enc.encoder_attention_heads, src.encoder_attention_heads);
            assert_eq!(dec.decoder_attention_heads, src.decoder_attention_heads);
            assert_eq!(enc.max_source_positions, src.max_source_positions);
            assert_eq!(dec.max_target_positions, src.max_target_positions);
            assert_eq!(enc.normalize_output, src.normalize_output);
            assert!(
                dec.share_decoder_input_output_embed,
                "set directly or by share_all_embeddings"
            );
            assert!(!enc.share_encoder_input_output_embed);
            assert_eq!(enc.technique(), src.encoder_technique());
            assert_eq!(dec.technique(), src.decoder_technique());
            assert_eq!(
                src.encoder_stack_kind(),
                StackKind::EncoderOfEncDec {
                    encoder_layers: src.encoder_layers,
                    decoder_layers: src.decoder_layers
                }
            );
            assert_eq!(
                src.decoder_stack_kind(),
                StackKind::DecoderOfEncDec {
                    encoder_layers: src.encoder_layers,
                    decoder_layers: src.decoder_layers
                }
            );
        }
    }
}
