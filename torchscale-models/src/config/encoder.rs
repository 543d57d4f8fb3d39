//! `EncoderConfig`: torchscale 0.3.0's encoder configuration, field for field.

use std::path::Path;

use serde::{Deserialize, Serialize};
use torchscale_core::{Activation, Error, Result, StackKind};

use super::builders::{linspace_at, shared_builders, stack_per_layer_builders};
use super::per_layer::{self, LayerRouter, LayerTechnique};
use super::validate::{self, shared_view};
use super::{is_default_scale, is_false, Technique};
use torchscale_moe::RouterChoice;

/// torchscale's `EncoderConfig` (0.3.0): same field names, types and defaults, so a torchscale
/// config JSON loads as is (unknown keys are ignored, missing keys take the defaults) and
/// serialises back to the same JSON.
///
/// Build with [`EncoderConfig::new`] and the `with_*` setters, or [`EncoderConfig::from_json_str`],
/// then call [`finalize`](EncoderConfig::finalize), which applies torchscale's post-construction
/// rules and validates. Fields torchscale has but this port does not use (image sizes, fairscale
/// switches, HEAD's LongNet fields) are kept for round-tripping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EncoderConfig {
    /// Model width d (768).
    pub encoder_embed_dim: usize,
    /// Heads H (12); must divide d.
    pub encoder_attention_heads: usize,
    /// FFN width, also of each expert (3072).
    pub encoder_ffn_embed_dim: usize,
    /// Layers N (12).
    pub encoder_layers: usize,
    /// Pre-LN when true (true); overridden by `deepnorm` / `subln` in finalize.
    pub encoder_normalize_before: bool,
    /// Final LayerNorm after a Pre-LN stack (true).
    pub normalize_output: bool,
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
    /// DeepNet residual and init (false).
    pub deepnorm: bool,
    /// Magneto Sub-LN (true).
    pub subln: bool,
    /// BERT-style N(0, 0.02) re-initialisation (false).
    pub bert_init: bool,
    /// BEiT-3 multiway A/B modules (false).
    pub multiway: bool,
    /// Tie the output projection to the token embedding (false).
    pub share_encoder_input_output_embed: bool,
    /// Learned positions table size (1024).
    pub max_source_positions: usize,
    /// Suppress the output projection (false).
    pub no_output_layer: bool,
    /// Epsilon of every LayerNorm (1e-5).
    pub layernorm_eps: f64,
    /// Output vocabulary; -1 = no output projection (-1).
    pub vocab_size: i64,
    /// BEiT-3 image size (224); unused here.
    pub img_size: usize,
    /// BEiT-3 patch size (16); unused here.
    pub patch_size: usize,
    /// BEiT-3 input channels (3); unused here.
    pub in_chans: usize,
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
    /// Extension: Admin residual `LN(ω·x + f(x))` (false). Needs Post-LN flags.
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
    /// Extension: techniques for ranges of layers (Mix-LN: Post-LN below, Pre-LN on top);
    /// layers no entry covers use the config's technique (empty).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layer_techniques: Vec<LayerTechnique>,
    /// Extension: the MoE layers (0-based), in place of every `moe_freq`-th (None).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moe_layers: Option<Vec<usize>>,
    /// Extension: the router of every MoE layer (torchscale's capacity routing).
    #[serde(skip_serializing_if = "RouterChoice::is_capacity")]
    pub moe_router: RouterChoice,
    /// Extension: routers of single MoE layers, in place of `moe_router` (empty).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub moe_layer_routers: Vec<LayerRouter>,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            encoder_embed_dim: 768,
            encoder_attention_heads: 12,
            encoder_ffn_embed_dim: 3072,
            encoder_layers: 12,
            encoder_normalize_before: true,
            normalize_output: true,
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
            share_encoder_input_output_embed: false,
            max_source_positions: 1024,
            no_output_layer: false,
            layernorm_eps: 1e-5,
            vocab_size: -1,
            img_size: 224,
            patch_size: 16,
            in_chans: 3,
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
            layer_techniques: Vec::new(),
            moe_layers: None,
            moe_router: RouterChoice::Capacity,
            moe_layer_routers: Vec::new(),
        }
    }
}

impl EncoderConfig {
    /// torchscale's defaults (not yet finalised; the defaults are already consistent).
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a torchscale config JSON (any subset of fields) and finalises it, like
    /// `EncoderConfig(**json)` does. A bad value is [`Error::Config`] naming its key.
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

    /// torchscale 0.3.0's post-construction rules, in order: `deepnorm` forces Post-LN and clears
    /// `subln`; `subln` forces Pre-LN and clears `deepnorm`; `use_xmoe` turns on
    /// `moe_normalize_gate_prob_before_dropping` and sets the second-expert policy to "random".
    pub fn postprocess(&mut self) {
        if self.deepnorm {
            self.encoder_normalize_before = false;
            self.subln = false;
        }
        if self.subln {
            self.encoder_normalize_before = true;
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
        validate::positions("max_source_positions", self.max_source_positions)?;
        validate::sizes(&validate::StackSizes {
            prefix: "encoder",
            positions_field: "max_source_positions",
            embed_dim: self.encoder_embed_dim,
            heads: self.encoder_attention_heads,
            ffn_dim: self.encoder_ffn_embed_dim,
            positions: self.max_source_positions,
            vocab_size: self.vocab_size,
            experts: if self.has_moe_layers() {
                self.moe_expert_count
            } else {
                0
            },
            rel_pos_buckets: self.rel_pos_buckets,
        })?;
        per_layer::layer_techniques(
            "layer_techniques",
            &self.layer_techniques,
            self.encoder_layers,
        )?;
        per_layer::moe_layers(
            "moe_layers",
            self.moe_layers.as_deref(),
            self.encoder_layers,
        )?;
        let shared = shared_view!(self, self.has_moe_layers());
        per_layer::routers(
            "moe_router",
            &self.moe_router,
            "moe_layer_routers",
            &self.moe_layer_routers,
            self.moe_expert_count,
            self.has_moe_layers(),
            |i| self.is_moe_layer(i),
        )?;
        validate::shared(&shared)?;
        validate::xpos(
            self.xpos_rel_pos,
            self.encoder_embed_dim,
            self.encoder_attention_heads,
            self.xpos_scale_base,
            "max_source_positions",
            self.max_source_positions,
        )?;
        // torchscale's EncoderLayer asserts this for MoE layers.
        if self.multiway && self.has_moe_layers() {
            return Err(Error::config(
                "multiway",
                "cannot be combined with MoE layers (moe_freq > 0 or moe_layers)",
            ));
        }
        validate::admin(
            &shared,
            &[("encoder_normalize_before", self.encoder_normalize_before)],
        )
    }

    /// [`postprocess`](Self::postprocess) then [`validate`](Self::validate).
    pub fn finalize(mut self) -> Result<Self> {
        self.postprocess();
        self.validate()?;
        Ok(self)
    }

    /// Sets `encoder_embed_dim`.
    pub fn with_embed_dim(mut self, d: usize) -> Self {
        self.encoder_embed_dim = d;
        self
    }
    /// Sets `encoder_attention_heads`.
    pub fn with_heads(mut self, heads: usize) -> Self {
        self.encoder_attention_heads = heads;
        self
    }
    /// Sets `encoder_ffn_embed_dim`.
    pub fn with_ffn_dim(mut self, ffn_dim: usize) -> Self {
        self.encoder_ffn_embed_dim = ffn_dim;
        self
    }
    /// Sets `encoder_layers`.
    pub fn with_layers(mut self, layers: usize) -> Self {
        self.encoder_layers = layers;
        self
    }
    /// Sets `encoder_normalize_before` (undone by the default `subln = true`, as in torchscale).
    pub fn with_normalize_before(mut self, on: bool) -> Self {
        self.encoder_normalize_before = on;
        self
    }
    /// Sets `normalize_output`.
    pub fn with_normalize_output(mut self, on: bool) -> Self {
        self.normalize_output = on;
        self
    }
    /// Sets `max_source_positions`.
    pub fn with_max_positions(mut self, n: usize) -> Self {
        self.max_source_positions = n;
        self
    }
    /// Sets `share_encoder_input_output_embed`.
    pub fn with_share_input_output_embed(mut self, on: bool) -> Self {
        self.share_encoder_input_output_embed = on;
        self
    }
    /// Sets `admin`, `deepnorm`, `subln` and `encoder_normalize_before` so that `technique` is
    /// selected and survives [`finalize`](Self::finalize).
    pub fn with_technique(mut self, technique: Technique) -> Self {
        let (admin, deepnorm, subln, before) = technique.flags();
        self.admin = admin;
        self.deepnorm = deepnorm;
        self.subln = subln;
        self.encoder_normalize_before = before;
        self
    }

    shared_builders!();

    /// The technique the flags select (meaningful after [`finalize`](Self::finalize)).
    pub fn technique(&self) -> Technique {
        Technique::from_flags(
            self.admin,
            self.deepnorm,
            self.subln,
            self.encoder_normalize_before,
        )
    }
    /// The stack shape, for the techniques' constants.
    pub fn stack_kind(&self) -> StackKind {
        StackKind::Encoder {
            layers: self.encoder_layers,
        }
    }
    /// Head dimension d / H.
    pub fn head_dim(&self) -> usize {
        self.encoder_embed_dim / self.encoder_attention_heads.max(1)
    }
    /// Token-embedding scale: 1 if `no_scale_embedding`, else sqrt(d).
    pub fn embed_scale(&self) -> f64 {
        if self.no_scale_embedding {
            1.0
        } else {
            (self.encoder_embed_dim as f64).sqrt()
        }
    }
    /// Whether the stack ends with a LayerNorm (`encoder_normalize_before && normalize_output`,
    /// with the top layer's `layer_techniques` entry in place of the flag when it has one).
    pub fn has_final_layer_norm(&self) -> bool {
        let top = self.encoder_layers.saturating_sub(1);
        let pre = LayerTechnique::technique_of(&self.layer_techniques, top)
            .map_or(self.encoder_normalize_before, |t| t.normalize_before());
        pre && self.normalize_output
    }
    /// Drop-path probability of layer `i`: numpy's `linspace(0, drop_path_rate, N)[i]`.
    pub fn drop_path_prob(&self, i: usize) -> f64 {
        linspace_at(self.drop_path_rate, self.encoder_layers, i)
    }
    stack_per_layer_builders!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn field_of(r: Result<EncoderConfig>) -> String {
        match r {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a Config error, got {other:?}"),
        }
    }

    fn small() -> EncoderConfig {
        EncoderConfig::new()
            .with_embed_dim(32)
            .with_heads(4)
            .with_ffn_dim(64)
            .with_layers(2)
    }

    /// Every default of SPEC 1.1 (EncoderConfig table, 0.3.0 fields), written out from the table.
    #[test]
    fn defaults_match_torchscale() {
        let spec: Value = serde_json::from_str(
            r#"{
            "encoder_embed_dim": 768, "encoder_attention_heads": 12, "encoder_ffn_embed_dim": 3072,
            "encoder_layers": 12, "encoder_normalize_before": true, "normalize_output": true,
            "activation_fn": "gelu", "dropout": 0.0, "drop_path_rate": 0.0,
            "attention_dropout": 0.0, "activation_dropout": 0.0, "no_scale_embedding": true,
            "layernorm_embedding": false, "moe_freq": 0, "moe_top1_expert": false,
            "moe_expert_count": 0, "moe_gating_use_fp32": true,
            "moe_eval_capacity_token_fraction": 0.25, "moe_second_expert_policy": "random",
            "moe_normalize_gate_prob_before_dropping": false, "use_xmoe": false,
            "rel_pos_buckets": 0, "max_rel_pos": 0, "deepnorm": false, "subln": true,
            "bert_init": false, "multiway": false, "share_encoder_input_output_embed": false,
            "max_source_positions": 1024, "no_output_layer": false, "layernorm_eps": 1e-5,
            "vocab_size": -1, "img_size": 224, "patch_size": 16, "in_chans": 3,
            "checkpoint_activations": false, "fsdp": false, "ddp_rank": 0,
            "xpos_rel_pos": false, "xpos_scale_base": 512
        }"#,
        )
        .unwrap();
        let ours = serde_json::to_value(EncoderConfig::default()).unwrap();
        assert_eq!(ours, spec);
        // Loading an empty object gives the same, and the defaults are already final.
        let loaded = EncoderConfig::from_json_str("{}").unwrap();
        assert_eq!(loaded, EncoderConfig::default());
        assert_eq!(loaded.technique(), Technique::SubLn);
        assert_eq!(loaded.admin_output_change_scale, "default");
    }

    #[test]
    fn deepnorm_forces_post_ln() {
        let c = small().with_deepnorm(true).finalize().unwrap();
        assert!(!c.encoder_normalize_before && !c.subln && c.deepnorm);
        assert_eq!(c.technique(), Technique::DeepNorm);
        assert!(!c.has_final_layer_norm());
    }

    #[test]
    fn subln_forces_pre_ln() {
        // SPEC 1.2: normalize_before = false alone is undone by the default subln.
        let c = small().with_normalize_before(false).finalize().unwrap();
        assert!(c.encoder_normalize_before && c.subln && !c.deepnorm);
        assert_eq!(c.technique(), Technique::SubLn);
    }

    #[test]
    fn plain_post_and_pre_ln() {
        let post = small()
            .with_subln(false)
            .with_normalize_before(false)
            .finalize()
            .unwrap();
        assert_eq!(post.technique(), Technique::PostLn);
        let pre = small().with_subln(false).finalize().unwrap();
        assert_eq!(pre.technique(), Technique::PreLn);
        assert!(pre.has_final_layer_norm());
        for t in [
            Technique::PostLn,
            Technique::PreLn,
            Technique::DeepNorm,
            Technique::SubLn,
            Technique::Admin,
        ] {
            assert_eq!(small().with_technique(t).finalize().unwrap().technique(), t);
        }
    }

    #[test]
    fn xmoe_adjusts_gate() {
        let c = small()
            .with_moe(2, 4)
            .with_moe_second_expert_policy("sampling")
            .with_xmoe(true)
            .finalize()
            .unwrap();
        assert!(c.moe_normalize_gate_prob_before_dropping);
        assert_eq!(c.moe_second_expert_policy, "random");
        assert!(!c.is_moe_layer(0) && c.is_moe_layer(1));
    }

    #[test]
    fn every_validation_error_names_its_field() {
        let cases: Vec<(EncoderConfig, &str)> = vec![
            (small().with_heads(5), "encoder_attention_heads"),
            (small().with_heads(0), "encoder_attention_heads"),
            (small().with_embed_dim(0), "encoder_embed_dim"),
            (small().with_ffn_dim(0), "encoder_ffn_embed_dim"),
            (small().with_layers(0), "encoder_layers"),
            (small().with_heads(32).with_xpos(true), "xpos_rel_pos"),
            (small().with_dropout(1.0), "dropout"),
            (small().with_attention_dropout(-0.1), "attention_dropout"),
            (small().with_activation_dropout(2.0), "activation_dropout"),
            (small().with_drop_path_rate(1.0), "drop_path_rate"),
            (small().with_xmoe(true), "use_xmoe"),
            (small().with_moe(2, 0), "moe_expert_count"),
            (small().with_moe(2, 1), "moe_expert_count"),
            (
                small().with_moe_second_expert_policy("best"),
                "moe_second_expert_policy",
            ),
            (small().with_xmoe_paper_routing(true), "xmoe_paper_routing"),
            (small().with_rel_pos(16, 0), "max_rel_pos"),
            (small().with_rel_pos(0, 8), "rel_pos_buckets"),
            (small().with_multiway(true).with_moe(2, 4), "multiway"),
            (small().with_layernorm_eps(0.0), "layernorm_eps"),
            (small().with_xpos_scale_base(0), "xpos_scale_base"),
            (small().with_vocab_size(0), "vocab_size"),
            (small().with_vocab_size(-2), "vocab_size"),
            (small().with_max_positions(0), "max_source_positions"),
            (small().with_admin(true), "admin"),
            (
                small()
                    .with_admin(true)
                    .with_subln(false)
                    .with_deepnorm(true),
                "admin",
            ),
            (small().with_admin(true).with_subln(false), "admin"),
            (
                small().with_admin_output_change_scale("O(n^2)"),
                "admin_output_change_scale",
            ),
        ];
        for (cfg, field) in cases {
            assert_eq!(field_of(cfg.finalize()), field);
        }
        // Fine: top-1 with one expert, -1 vocabulary, MoE-free top-2 expert count.
        assert!(small()
            .with_moe(2, 1)
            .with_moe_top1(true)
            .finalize()
            .is_ok());
        assert!(small().with_vocab_size(-1).finalize().is_ok());
        assert!(small()
            .with_moe_second_expert_policy("all")
            .finalize()
            .is_ok());
    }

    #[test]
    fn json_errors_name_the_field() {
        assert_eq!(
            field_of(EncoderConfig::from_json_str(r#"{"activation_fn": "tanh"}"#)),
            "activation_fn"
        );
        assert_eq!(
            field_of(EncoderConfig::from_json_str(r#"{"encoder_layers": -3}"#)),
            "encoder_layers"
        );
        assert_eq!(
            field_of(EncoderConfig::from_json_str(
                r#"{"encoder_embed_dim": 30, "encoder_attention_heads": 4}"#
            )),
            "encoder_attention_heads"
        );
        let c = EncoderConfig::from_json_str(r#"{"activation_fn": "swish", "some_future_key": 1}"#)
            .unwrap();
        assert_eq!(c.activation_fn, Activation::Swish);
    }

    #[test]
    fn extensions_round_trip_and_stay_hidden_at_default() {
        let c = small()
            .with_technique(Technique::Admin)
            .with_admin_output_change_scale("O(1)")
            .with_admin_as_parameter(true)
            .finalize()
            .unwrap();
        let s = c.to_json_string().unwrap();
        assert_eq!(EncoderConfig::from_json_str(&s).unwrap(), c);
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["admin"], json!(true));
        assert_eq!(v["admin_output_change_scale"], json!("O(1)"));
        let plain: Value = serde_json::from_str(&small().to_json_string().unwrap()).unwrap();
        for k in [
            "admin",
            "admin_output_change_scale",
            "admin_as_parameter",
            "xmoe_paper_routing",
            "flash_attention",
            "segment_length",
        ] {
            assert!(plain.get(k).is_none(), "{k} serialised at its default");
        }
    }

    #[test]
    fn derived_quantities() {
        let c = small()
            .with_scale_embedding(true)
            .with_drop_path_rate(0.2)
            .with_layers(3)
            .with_rel_pos(16, 8);
        assert_eq!(c.head_dim(), 8);
        assert!((c.embed_scale() - 32f64.sqrt()).abs() < 1e-12);
        assert_eq!(c.drop_path_prob(1), 0.1);
        assert_eq!(c.drop_path_prob(2), 0.2);
        assert!(c.has_relative_position());
        assert!(!c.has_output_projection());
        assert!(c.clone().with_vocab_size(10).has_output_projection());
        assert_eq!(c.stack_kind(), StackKind::Encoder { layers: 3 });
    }

    #[test]
    fn from_json_file_names_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{not json").unwrap();
        match EncoderConfig::from_json_file(&bad) {
            Err(Error::File { path, .. }) => assert!(path.ends_with("bad.json")),
            other => panic!("{other:?}"),
        }
        let good = dir.join("good.json");
        std::fs::write(&good, small().to_json_string().unwrap()).unwrap();
        assert_eq!(
            EncoderConfig::from_json_file(&good).unwrap(),
            small().finalize().unwrap()
        );
    }
}
