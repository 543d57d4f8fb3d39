//! The `Router` trait: token features in, expert choices (as indices) out.
//!
//! The discrete part of a routing (which expert, which slot, kept or not) is small and lives on
//! the host as plain vectors; the continuous part (logits, probabilities, combine weights, the
//! balance loss) stays in candle's graph so that the gate receives gradients.

use std::any::Any;

use candle_core::Tensor;

use crate::Result;

/// Routing statistics of one MoE call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoutingStats {
    /// Assignments kept per expert (after capacity), first and second choices together.
    pub tokens_per_expert: Vec<usize>,
    /// Assignments dropped by capacity (first and second choices together).
    pub dropped: usize,
    /// First choices dropped by capacity.
    pub dropped_first: usize,
    /// Second choices dropped by capacity (after the second-expert policy kept them).
    pub dropped_second: usize,
    /// Non-padding tokens that ended up with no expert at all (their MoE output is 0).
    pub tokens_without_expert: usize,
    /// Slots per expert.
    pub capacity: usize,
    /// Mean entropy of the gate distribution over all tokens, in nats.
    pub entropy: f64,
}

/// What an MoE sublayer reports besides its output.
#[derive(Debug, Clone)]
pub struct AuxOutput {
    /// Layer index in its stack.
    pub layer: usize,
    /// The load-balancing loss (a scalar tensor in the graph).
    pub balance_loss: Tensor,
    /// Routing statistics.
    pub stats: RoutingStats,
    /// The full routing decision, for diagnostics (torchscale's hooks record the same).
    pub routing: Option<Box<Routing>>,
    /// The `[S, C]` rows the layer routed, in its token order.
    pub input: Option<Tensor>,
    /// The `[S, C]` rows it returned.
    pub output: Option<Tensor>,
}

/// What became of one expert choice of one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChoiceStatus {
    /// Routed: the token occupies `slot` in its expert's buffer.
    Kept,
    /// Routed, but its slot was `>= capacity`.
    DroppedByCapacity,
    /// A second choice that the `random` second-expert policy did not keep.
    NotSampled,
    /// The token is padding and is never routed.
    Padding,
}

impl ChoiceStatus {
    /// True for [`ChoiceStatus::Kept`].
    pub fn is_kept(self) -> bool {
        self == ChoiceStatus::Kept
    }
}

/// The routing of `S` tokens to `E` experts with `k` choices each, as indices.
///
/// Per-choice vectors have `S * k` entries, choice `j` of token `s` at `s * k + j` (j = 0 is the
/// first choice).
#[derive(Debug, Clone)]
pub struct Routing {
    /// Number of experts E.
    pub num_experts: usize,
    /// Choice slots per token: 1 or 2 for GShard / X-MoE, `k` for dropless top-k, `E` for
    /// expert-choice routing (slot `j` of a token stands for expert `j`, kept when that expert
    /// picked the token).
    pub k: usize,
    /// Slots per expert.
    pub capacity: usize,
    /// Expert of each choice.
    pub expert: Vec<u32>,
    /// Position of each choice in its expert's buffer, counted before dropping (so it may be
    /// `>= capacity` for a dropped choice; 0 for padding and unsampled choices).
    pub slot: Vec<u32>,
    /// What became of each choice.
    pub status: Vec<ChoiceStatus>,
    /// `[S, k]` combine weight of each choice, in the graph of the gate; 0 where not kept.
    pub gate: Tensor,
    /// `[S, E]` gate logits (f32, or f64 for f64 input).
    pub logits: Tensor,
    /// `[S, E]` softmax of the logits.
    pub probs: Tensor,
    /// `[S]` best expert by logit once the first choice is excluded (noise-free; diagnostics).
    pub runner_up: Vec<u32>,
    /// `[S]` the random second-expert policy's decision (`2 g2 > u`), when that policy ran.
    pub sampled: Option<Vec<bool>>,
    /// Load-balancing loss (rank-0 tensor, in the graph of the gate).
    pub balance_loss: Tensor,
    /// Statistics.
    pub stats: RoutingStats,
}

impl Routing {
    /// Number of tokens S.
    pub fn num_tokens(&self) -> usize {
        self.expert.len().checked_div(self.k).unwrap_or(0)
    }

    /// True when choice `j` of token `s` is kept.
    pub fn is_kept(&self, s: usize, j: usize) -> bool {
        self.status
            .get(s * self.k + j)
            .is_some_and(|st| st.is_kept())
    }

    /// `(token, choice, expert, slot)` of every kept choice, in token order.
    pub fn kept_choices(&self) -> Vec<(usize, usize, usize, usize)> {
        let mut out = Vec::new();
        for (i, st) in self.status.iter().enumerate() {
            if st.is_kept() {
                out.push((
                    i / self.k,
                    i % self.k,
                    self.expert[i] as usize,
                    self.slot[i] as usize,
                ));
            }
        }
        out
    }
}

/// Options of one routing call.
#[derive(Debug, Clone, Default)]
pub struct RouteOptions<'a> {
    /// Training mode (selects the capacity rule).
    pub train: bool,
    /// Uniform draws in `[0, 1)` for the second-expert policy: `[S]` for `random`
    /// (keep iff `2 g2 > u`), `[S, E]` for `sampling` (turned into Gumbel noise). Drawn from a
    /// generator when absent (see `seed`).
    pub uniform: Option<&'a Tensor>,
    /// `[S]` nonzero = padding token (never routed).
    pub padding: Option<&'a Tensor>,
    /// When `uniform` is absent: draw from a generator seeded with this value for this call;
    /// when this is absent too, the router's own seeded generator is used.
    pub seed: Option<u64>,
}

/// Maps token features `[S, C]` to expert choices: the plug-in seam of the MoE layer.
///
/// A router owns its gate parameters (built from a `VarBuilder` under `moe_layer.gate`), decides
/// on the host which expert slot each token takes, and keeps the combine weights and the balance
/// loss in candle's graph so that the gate is trained. The MoE layer only reads the returned
/// [`Routing`], so any implementation (top-k with capacity, dropless, expert-choice, one written
/// in user code) runs in it unchanged.
pub trait Router: Send + Sync {
    /// Number of experts E.
    fn num_experts(&self) -> usize;
    /// Choice slots per token in the returned [`Routing::k`].
    fn top_k(&self) -> usize;
    /// Routes `x: [S, C]`.
    fn route(&self, x: &Tensor, opts: &RouteOptions) -> Result<Routing>;
    /// A short name for logs and reports.
    fn name(&self) -> &str {
        "router"
    }
    /// Reseeds the router's own random draws (a trainer calls it once per step so that a step
    /// is a function of its seed). No-op for deterministic routers.
    fn reseed(&self, _seed: u64) {}
    /// Work done before each training forward; X-MoE rescales its expert embeddings here as
    /// torchscale does. Returns whether anything changed.
    fn prepare_step(&self) -> Result<bool> {
        Ok(false)
    }
    /// True when [`Routing::capacity`] depends only on the number of tokens and the train flag
    /// (torchscale's capacity rule, expert choice), so that ranks routing equally many tokens
    /// agree on it. An expert-parallel layer exchanges the capacity between ranks before
    /// sizing its all-to-all buffers when this is false (the safe default).
    fn uniform_capacity(&self) -> bool {
        false
    }
    /// The concrete router, for callers that need its own API
    /// (`as_any().and_then(|a| a.downcast_ref::<MyRouter>())`). `None` by default.
    fn as_any(&self) -> Option<&dyn Any> {
        None
    }
}
