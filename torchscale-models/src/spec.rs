//! The resolved description of one stack (encoder or decoder), derived from a config once it has
//! been finalised and validated. The model code reads only this, not the config structs.

use torchscale_core::{Activation, StackKind};

/// MoE settings of a stack.
#[derive(Debug, Clone)]
pub struct MoeSpec {
    /// Layer `i` is MoE when `(i + 1) % freq == 0`, unless `layers` lists the MoE layers.
    pub freq: usize,
    /// The MoE layers, in place of the `freq` rule (a config's `moe_layers`).
    pub layers: Option<Vec<usize>>,
    /// The layer settings (experts, gate, capacity, router) of every MoE layer, except the
    /// router of those in `layer_routers`.
    pub layer: torchscale_moe::MoeConfig,
    /// Routers of single MoE layers (a config's `moe_layer_routers`).
    pub layer_routers: Vec<crate::config::LayerRouter>,
    /// Expert parallelism: the ranks that share the experts (each builds `E / W` of them and
    /// exchanges tokens through this collective); `None` holds every expert here.
    pub expert_comm: Option<std::sync::Arc<dyn torchscale_core::Collective>>,
}

impl MoeSpec {
    /// The settings of MoE layer `i`: `layer` with its router from `layer_routers`.
    pub fn layer_config(&self, i: usize) -> torchscale_moe::MoeConfig {
        let mut cfg = self.layer.clone();
        if let Some(r) = self.layer_routers.iter().find(|r| r.layer == i) {
            cfg.router = r.router.clone();
        }
        cfg
    }
}

/// Everything a stack needs to be built.
#[derive(Debug, Clone)]
pub struct StackSpec {
    /// The whole stack's shape (an encoder-decoder's sides know both depths); every stabiliser
    /// of the stack is built for it.
    pub kind: StackKind,
    /// Width C.
    pub embed_dim: usize,
    /// Heads H.
    pub heads: usize,
    /// FFN width.
    pub ffn_dim: usize,
    /// Number of layers.
    pub layers: usize,
    /// Activation of the FFN.
    pub activation: Activation,
    /// Dropout on embeddings and sublayer outputs.
    pub dropout: f64,
    /// Dropout on attention probabilities.
    pub attention_dropout: f64,
    /// Dropout after the FFN activation.
    pub activation_dropout: f64,
    /// Stochastic depth rate; layer `i` uses `linspace(0, rate, layers)[i]`.
    pub drop_path_rate: f64,
    /// LayerNorm epsilon.
    pub layernorm_eps: f64,
    /// LayerNorm on the embeddings.
    pub layernorm_embedding: bool,
    /// Scale the token embedding by sqrt(C) (torchscale's `no_scale_embedding = false`).
    pub scale_embedding: bool,
    /// Vocabulary (for the output projection; <= 0: none).
    pub vocab_size: i64,
    /// Suppress the output projection.
    pub no_output_layer: bool,
    /// Tie the output projection to the token embedding.
    pub share_input_output_embed: bool,
    /// Learned absolute positions (`embed_positions`), with `max_positions` rows (+2).
    pub learned_positions: bool,
    /// Size of the learned positions table.
    pub max_positions: usize,
    /// T5 relative bias buckets (0: none).
    pub rel_pos_buckets: usize,
    /// T5 relative bias max distance.
    pub max_rel_pos: usize,
    /// xPos scale base, if xPos is on.
    pub xpos_scale_base: Option<f64>,
    /// Multiway (BEiT-3) A/B copies.
    pub multiway: bool,
    /// Encoder only: the final LayerNorm exists when the technique has one and this is true.
    pub normalize_output: bool,
    /// MoE layers, if any.
    pub moe: Option<MoeSpec>,
}

impl StackSpec {
    /// Whether layer `i` is an MoE layer.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        match &self.moe {
            Some(m) => crate::config::per_layer::is_moe_layer(m.layers.as_deref(), m.freq, i),
            None => false,
        }
    }

    /// Drop-path rate of layer `i`.
    pub fn drop_path(&self, i: usize) -> f64 {
        if self.layers <= 1 {
            return 0.0;
        }
        self.drop_path_rate * i as f64 / (self.layers - 1) as f64
    }

    /// The token embedding scale.
    pub fn embed_scale(&self) -> f64 {
        if self.scale_embedding {
            (self.embed_dim as f64).sqrt()
        } else {
            1.0
        }
    }

    /// Relative position bias enabled.
    pub fn rel_pos(&self) -> bool {
        self.rel_pos_buckets > 0 && self.max_rel_pos > 0
    }
}
