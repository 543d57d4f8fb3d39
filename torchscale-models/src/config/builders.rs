//! Chainable setters for the fields the three config structs share (same names in all three).

/// Expands, inside an `impl` of a config struct, to the setters of the shared fields.
macro_rules! shared_builders {
    () => {
        /// Sets `activation_fn`.
        pub fn with_activation(mut self, activation: torchscale_core::Activation) -> Self {
            self.activation_fn = activation;
            self
        }
        /// Sets `dropout` (embeddings, sublayer outputs, FFN output).
        pub fn with_dropout(mut self, p: f64) -> Self {
            self.dropout = p;
            self
        }
        /// Sets `attention_dropout`.
        pub fn with_attention_dropout(mut self, p: f64) -> Self {
            self.attention_dropout = p;
            self
        }
        /// Sets `activation_dropout`.
        pub fn with_activation_dropout(mut self, p: f64) -> Self {
            self.activation_dropout = p;
            self
        }
        /// Sets `drop_path_rate` (stochastic depth of the last layer).
        pub fn with_drop_path_rate(mut self, p: f64) -> Self {
            self.drop_path_rate = p;
            self
        }
        /// Sets `vocab_size` (-1: no output projection).
        pub fn with_vocab_size(mut self, vocab_size: i64) -> Self {
            self.vocab_size = vocab_size;
            self
        }
        /// Sets `layernorm_eps`.
        pub fn with_layernorm_eps(mut self, eps: f64) -> Self {
            self.layernorm_eps = eps;
            self
        }
        /// Sets `deepnorm` (finalize then forces Post-LN and clears `subln`).
        pub fn with_deepnorm(mut self, on: bool) -> Self {
            self.deepnorm = on;
            self
        }
        /// Sets `subln` (finalize then forces Pre-LN and clears `deepnorm`).
        pub fn with_subln(mut self, on: bool) -> Self {
            self.subln = on;
            self
        }
        /// Sets our `admin` extension (also needs `subln`, `deepnorm` and `*_normalize_before`
        /// false; [`with_technique`](Self::with_technique) sets all of them).
        pub fn with_admin(mut self, on: bool) -> Self {
            self.admin = on;
            self
        }
        /// Sets `admin_output_change_scale` ("default", "O(logn)", "O(n)", "O(1)").
        pub fn with_admin_output_change_scale(mut self, scale: impl Into<String>) -> Self {
            self.admin_output_change_scale = scale.into();
            self
        }
        /// Sets `admin_as_parameter` (learnable per-channel ω).
        pub fn with_admin_as_parameter(mut self, on: bool) -> Self {
            self.admin_as_parameter = on;
            self
        }
        /// Sets `moe_freq` (every `freq`-th layer is MoE; 0 = dense) and `moe_expert_count`.
        pub fn with_moe(mut self, freq: usize, experts: usize) -> Self {
            self.moe_freq = freq;
            self.moe_expert_count = experts;
            self
        }
        /// Sets `moe_top1_expert` (Top-1 gate instead of Top-2).
        pub fn with_moe_top1(mut self, on: bool) -> Self {
            self.moe_top1_expert = on;
            self
        }
        /// Sets `moe_second_expert_policy` ("sampling", "random" or "all").
        pub fn with_moe_second_expert_policy(mut self, policy: impl Into<String>) -> Self {
            self.moe_second_expert_policy = policy.into();
            self
        }
        /// Sets `moe_eval_capacity_token_fraction`.
        pub fn with_moe_eval_capacity_token_fraction(mut self, fraction: f64) -> Self {
            self.moe_eval_capacity_token_fraction = fraction;
            self
        }
        /// Sets `use_xmoe` (X-MoE router; finalize adjusts the gate options).
        pub fn with_xmoe(mut self, on: bool) -> Self {
            self.use_xmoe = on;
            self
        }
        /// Sets our `xmoe_paper_routing` extension (normalised tokens and a learnable
        /// temperature, as in the X-MoE paper; needs `use_xmoe`).
        pub fn with_xmoe_paper_routing(mut self, on: bool) -> Self {
            self.xmoe_paper_routing = on;
            self
        }
        /// Sets `rel_pos_buckets` and `max_rel_pos` (T5 relative bias; both 0 = off).
        pub fn with_rel_pos(mut self, buckets: usize, max_distance: usize) -> Self {
            self.rel_pos_buckets = buckets;
            self.max_rel_pos = max_distance;
            self
        }
        /// Sets `xpos_rel_pos`.
        pub fn with_xpos(mut self, on: bool) -> Self {
            self.xpos_rel_pos = on;
            self
        }
        /// Sets `xpos_scale_base`.
        pub fn with_xpos_scale_base(mut self, base: usize) -> Self {
            self.xpos_scale_base = base;
            self
        }
        /// Sets `multiway` (BEiT-3 A/B copies).
        pub fn with_multiway(mut self, on: bool) -> Self {
            self.multiway = on;
            self
        }
        /// Sets `layernorm_embedding`.
        pub fn with_layernorm_embedding(mut self, on: bool) -> Self {
            self.layernorm_embedding = on;
            self
        }
        /// Scales token embeddings by sqrt(d) when `on` (torchscale's `no_scale_embedding = !on`).
        pub fn with_scale_embedding(mut self, on: bool) -> Self {
            self.no_scale_embedding = !on;
            self
        }
        /// Sets `no_output_layer`.
        pub fn with_no_output_layer(mut self, on: bool) -> Self {
            self.no_output_layer = on;
            self
        }
        /// Sets `bert_init` (BERT-style N(0, 0.02) re-initialisation).
        pub fn with_bert_init(mut self, on: bool) -> Self {
            self.bert_init = on;
            self
        }
        /// Whether the T5 relative-position bias is built (`rel_pos_buckets > 0 && max_rel_pos > 0`).
        pub fn has_relative_position(&self) -> bool {
            self.rel_pos_buckets > 0 && self.max_rel_pos > 0
        }
        /// Whether the stack builds an output projection (`!no_output_layer && vocab_size > 0`;
        /// the encoder of an encoder-decoder never does).
        pub fn has_output_projection(&self) -> bool {
            !self.no_output_layer && self.vocab_size > 0
        }
    };
}
pub(crate) use shared_builders;

/// Expands, inside the `impl` of a one-stack config (decoder, encoder), to the accessors and
/// setters of the per-layer extension fields (`layer_techniques`, `moe_layers`, `moe_router`,
/// `moe_layer_routers`); the encoder-decoder names them per side.
macro_rules! stack_per_layer_builders {
    () => {
        /// The technique of layer `i`: its `layer_techniques` entry, else the config's.
        pub fn layer_technique(&self, i: usize) -> Technique {
            per_layer::technique_at(&self.layer_techniques, self.technique(), i)
        }
        /// Whether layer `i` (0-based) is an MoE layer: listed in `moe_layers` when set, else
        /// `moe_freq != 0 && (i + 1) % moe_freq == 0`.
        pub fn is_moe_layer(&self, i: usize) -> bool {
            per_layer::is_moe_layer(self.moe_layers.as_deref(), self.moe_freq, i)
        }
        /// Whether any layer is an MoE layer (by `moe_layers` or `moe_freq`).
        pub fn has_moe_layers(&self) -> bool {
            per_layer::has_moe_layers(self.moe_layers.as_deref(), self.moe_freq)
        }
        /// Sets `layer_techniques`.
        pub fn with_layer_techniques(mut self, list: Vec<LayerTechnique>) -> Self {
            self.layer_techniques = list;
            self
        }
        /// Sets `moe_router` (every MoE layer's router unless `moe_layer_routers` names it).
        pub fn with_moe_router(mut self, router: RouterChoice) -> Self {
            self.moe_router = router;
            self
        }
        /// Sets `moe_layer_routers`.
        pub fn with_moe_layer_routers(mut self, list: Vec<LayerRouter>) -> Self {
            self.moe_layer_routers = list;
            self
        }
        /// The router of MoE layer `i`: its `moe_layer_routers` entry, else `moe_router`.
        pub fn moe_router_of(&self, i: usize) -> &RouterChoice {
            LayerRouter::router_of(&self.moe_layer_routers, &self.moe_router, i)
        }
        /// Sets `moe_layers` (None: every `moe_freq`-th layer).
        pub fn with_moe_layers(mut self, layers: Option<Vec<usize>>) -> Self {
            self.moe_layers = layers;
            self
        }
    };
}
pub(crate) use stack_per_layer_builders;

/// numpy's `linspace(0, rate, n)[i]`: `i · (rate / (n − 1))`, the last point exactly `rate`.
pub(crate) fn linspace_at(rate: f64, n: usize, i: usize) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    if i + 1 == n {
        return rate;
    }
    i as f64 * (rate / (n - 1) as f64)
}

#[cfg(test)]
mod tests {
    use super::linspace_at;

    #[test]
    fn linspace_matches_numpy() {
        // numpy.linspace(0, 0.1, 5) = [0, 0.025, 0.05, 0.075, 0.1]
        let want = [0.0, 0.025, 0.05, 0.075, 0.1];
        for (i, w) in want.iter().enumerate() {
            assert!((linspace_at(0.1, 5, i) - w).abs() < 1e-15);
        }
        // numpy.linspace(0, 0.3, 1) = [0.0]
        assert_eq!(linspace_at(0.3, 1, 0), 0.0);
    }
}
