//! `MoeConfig`: the MoE fields of a torchscale config, plus the feed-forward settings of each
//! expert.

use serde::{Deserialize, Serialize};
use torchscale_core::ffn::FfnConfig;
use torchscale_core::{Activation, Error, Result};

use crate::router::RouterChoice;

/// What happens to a token's second-best expert in top-2 routing (`moe_second_expert_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SecondExpertPolicy {
    /// The second expert is the argmax of the logits plus Gumbel noise (first expert excluded).
    Sampling,
    /// The second expert is kept only when `2 * g2 > u`, `u ~ U[0, 1)` (torchscale's default,
    /// forced by X-MoE).
    #[default]
    Random,
    /// The second expert is always kept (any other policy string in torchscale).
    All,
}

/// The configuration of one MoE layer (gate + experts).
///
/// Field names follow torchscale's config where one exists (`moe_*` without the prefix).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MoeConfig {
    /// Model width C.
    pub embed_dim: usize,
    /// Hidden width of each expert.
    pub ffn_dim: usize,
    /// Number of experts E (`moe_expert_count`).
    pub num_experts: usize,
    /// Top-1 gating (`moe_top1_expert`); top-2 otherwise.
    pub top1: bool,
    /// X-MoE low-dimensional cosine routing (`use_xmoe`); a plain `Linear(C -> E)` gate otherwise.
    pub use_xmoe: bool,
    /// Width of the X-MoE routing space (torchscale hard-codes 16).
    pub xmoe_routing_dim: usize,
    /// Paper X-MoE routing: both sides L2-normalised and divided by a learnable temperature
    /// `gate.gating_t` (init 0.07, read clamped below at 1e-4). False: torchscale's routing
    /// (only the expert embeddings are normalised, no temperature).
    pub paper_routing: bool,
    /// Eval capacity as a fraction of the tokens (`moe_eval_capacity_token_fraction`); `<= 0`
    /// uses the training rule in eval too.
    pub eval_capacity_token_fraction: f64,
    /// Top-1 training capacity factor: capacity = `int(factor * ceil(S / E))`. Top-2 always
    /// uses `2 * ceil(S / E)` in training, as torchscale does.
    pub capacity_factor: f64,
    /// `moe_second_expert_policy`.
    pub second_expert_policy: SecondExpertPolicy,
    /// `moe_normalize_gate_prob_before_dropping`: renormalise the two gate probabilities before
    /// capacity dropping (a survivor keeps its share) rather than after (a survivor gets 1).
    pub normalize_gate_prob_before_dropping: bool,
    /// `moe_gating_use_fp32`: logits and softmax in f32 (f64 input stays f64). False: in the
    /// input dtype.
    pub gating_use_fp32: bool,
    /// Expert activation (`activation_fn`).
    pub activation: Activation,
    /// Dropout after the expert activation.
    pub activation_dropout: f64,
    /// Dropout on the expert output.
    pub dropout: f64,
    /// Sub-LN: experts carry `ffn_layernorm` before `fc2`.
    pub inner_norm: bool,
    /// LayerNorm epsilon of the inner norm.
    pub layernorm_eps: f64,
    /// The routing family [`crate::MoeLayer::new`] builds (torchscale's capacity routing by
    /// default; then `top1`, `use_xmoe` and the capacity fields apply). Left out of the
    /// serialised form when it is the default.
    #[serde(skip_serializing_if = "RouterChoice::is_capacity")]
    pub router: RouterChoice,
}

impl Default for MoeConfig {
    /// torchscale 0.3.0's defaults, with X-MoE off and 8-wide placeholders for the sizes.
    fn default() -> Self {
        Self {
            embed_dim: 8,
            ffn_dim: 8,
            num_experts: 2,
            top1: false,
            use_xmoe: false,
            xmoe_routing_dim: 16,
            paper_routing: false,
            eval_capacity_token_fraction: 0.25,
            capacity_factor: 1.0,
            second_expert_policy: SecondExpertPolicy::Random,
            normalize_gate_prob_before_dropping: false,
            gating_use_fp32: true,
            activation: Activation::Gelu,
            activation_dropout: 0.0,
            dropout: 0.0,
            inner_norm: false,
            layernorm_eps: 1e-5,
            router: RouterChoice::Capacity,
        }
    }
}

impl MoeConfig {
    /// The feed-forward configuration of each expert.
    pub fn ffn_config(&self) -> FfnConfig {
        FfnConfig {
            embed_dim: self.embed_dim,
            ffn_dim: self.ffn_dim,
            activation: self.activation,
            activation_dropout: self.activation_dropout,
            dropout: self.dropout,
            inner_norm: self.inner_norm,
            layernorm_eps: self.layernorm_eps,
        }
    }

    /// Applies torchscale's post-construction rule (`use_xmoe` forces normalisation before
    /// dropping and the random policy) and checks the fields.
    pub fn validated(mut self) -> Result<Self> {
        if self.use_xmoe {
            self.normalize_gate_prob_before_dropping = true;
            self.second_expert_policy = SecondExpertPolicy::Random;
        }
        self.validate()?;
        Ok(self)
    }

    /// Checks the fields without changing them.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("embed_dim", self.embed_dim),
            ("ffn_dim", self.ffn_dim),
            ("moe_expert_count", self.num_experts),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::config(field, "must be positive"));
            }
        }
        self.router.validate(self.num_experts, "router")?;
        if self.router.is_capacity() && !self.top1 && self.num_experts < 2 {
            return Err(Error::config(
                "moe_expert_count",
                "top-2 gating needs at least 2 experts",
            ));
        }
        if self.use_xmoe && self.xmoe_routing_dim == 0 {
            return Err(Error::config("xmoe_routing_dim", "must be positive"));
        }
        if self.paper_routing && !self.use_xmoe {
            return Err(Error::config(
                "paper_routing",
                "needs use_xmoe (it changes the X-MoE gate)",
            ));
        }
        if !(self.capacity_factor.is_finite() && self.capacity_factor > 0.0) {
            return Err(Error::config(
                "capacity_factor",
                format!("must be finite and positive, got {}", self.capacity_factor),
            ));
        }
        if !self.eval_capacity_token_fraction.is_finite() {
            return Err(Error::config(
                "moe_eval_capacity_token_fraction",
                "must be finite",
            ));
        }
        for (field, p) in [
            ("activation_dropout", self.activation_dropout),
            ("dropout", self.dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::config(field, format!("must be in [0, 1), got {p}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xmoe_forces_random_policy_and_early_normalisation() {
        let cfg = MoeConfig {
            use_xmoe: true,
            second_expert_policy: SecondExpertPolicy::Sampling,
            ..Default::default()
        }
        .validated()
        .unwrap();
        assert_eq!(cfg.second_expert_policy, SecondExpertPolicy::Random);
        assert!(cfg.normalize_gate_prob_before_dropping);
    }

    #[test]
    fn bad_fields_are_named() {
        let err = MoeConfig {
            num_experts: 0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("moe_expert_count"), "{err}");
        let err = MoeConfig {
            paper_routing: true,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("paper_routing"), "{err}");
    }

    #[test]
    fn serde_uses_lowercase_policy_names() {
        let cfg: MoeConfig =
            serde_json::from_str(r#"{"second_expert_policy": "sampling", "top1": true}"#).unwrap();
        assert_eq!(cfg.second_expert_policy, SecondExpertPolicy::Sampling);
        assert!(cfg.top1);
        assert_eq!(cfg.xmoe_routing_dim, 16);
        assert_eq!(cfg.router, RouterChoice::Capacity);
    }

    #[test]
    fn router_choice_is_validated_and_serialised_only_when_set() {
        let json = serde_json::to_string(&MoeConfig::default()).unwrap();
        assert!(!json.contains("router"), "{json}");
        let cfg: MoeConfig =
            serde_json::from_str(r#"{"num_experts": 4, "router": {"kind": "dropless", "k": 3}}"#)
                .unwrap();
        assert_eq!(cfg.router, RouterChoice::Dropless { k: 3 });
        cfg.validate().unwrap();
        let err = MoeConfig {
            router: RouterChoice::Dropless { k: 5 },
            num_experts: 4,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("router.k"), "{err}");
        // One expert is fine for dropless top-1 (the top-2 rule is capacity routing's).
        MoeConfig {
            router: RouterChoice::Dropless { k: 1 },
            num_experts: 1,
            ..Default::default()
        }
        .validate()
        .unwrap();
    }
}
