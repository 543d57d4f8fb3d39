//! The `Router` trait: token features in, expert choices (as indices) out.

use candle_core::Tensor;

use crate::Result;

/// Routing statistics of one MoE call.
#[derive(Debug, Clone, Default)]
pub struct RoutingStats {
    /// Tokens kept per expert (after capacity).
    pub tokens_per_expert: Vec<usize>,
    /// Assignments dropped by capacity (first and second choices together).
    pub dropped: usize,
    /// Mean entropy of the gate distribution, in nats.
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
}

/// The routing of `S` tokens to `E` experts with `k` choices each, as indices.
#[derive(Debug, Clone)]
pub struct Routing {
    /// `[S, k]` u32 expert of each choice.
    pub expert: Tensor,
    /// `[S, k]` u32 slot of each choice in its expert's buffer (meaningful where kept).
    pub slot: Tensor,
    /// `[S, k]` f32 combine weight of each choice (differentiable; 0 where dropped).
    pub gate: Tensor,
    /// `[S, k]` u8, 1 where the choice is kept.
    pub kept: Tensor,
    /// Slots per expert.
    pub capacity: usize,
    /// Load-balancing loss (scalar).
    pub balance_loss: Tensor,
    /// Statistics.
    pub stats: RoutingStats,
}

/// Options of one routing call.
#[derive(Debug, Clone, Default)]
pub struct RouteOptions<'a> {
    /// Training mode (selects the capacity rule).
    pub train: bool,
    /// `[S]` uniforms for the random second-expert policy; drawn internally when absent.
    pub uniform: Option<&'a Tensor>,
    /// `[S]` nonzero = padding token (never routed).
    pub padding: Option<&'a Tensor>,
}

/// Maps token features `[S, C]` to expert choices with capacity.
pub trait Router: Send + Sync {
    /// Number of experts E.
    fn num_experts(&self) -> usize;
    /// Routes `x: [S, C]`.
    fn route(&self, x: &Tensor, opts: &RouteOptions) -> Result<Routing>;
}
