//! `MoeLayer`: gate + experts, dispatch by index, optional expert parallelism.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{Tensor, D};
use candle_nn::VarBuilder;
use torchscale_core::ffn::FeedForward;
use torchscale_core::{
    AuxOutput, Ctx, Error, Result, RouteOptions, Router, Routing, RoutingStats, Sublayer,
};

use crate::config::MoeConfig;
use crate::dispatch::{dense_combine, dense_dispatch_mask, DispatchPlan};
use crate::expert_compute::{expert_compute, ExpertCompute};
use crate::parallel::{agree_capacity, local_experts, CollectiveComm, ExpertComm};
use crate::router::{build_router, DroplessRouter, ExpertChoiceRouter, Gate, MoeRouter};

/// What one MoE call returns.
#[derive(Debug, Clone)]
pub struct MoeOutput {
    /// `[S, C]`, rows in the input's token order.
    pub output: Tensor,
    /// The load-balancing loss (rank-0, in the graph).
    pub balance_loss: Tensor,
    /// Routing statistics.
    pub stats: RoutingStats,
    /// The full routing: experts, slots, statuses, combine weights, logits and probabilities.
    pub routing: Routing,
}

/// torchscale's `MOELayer` with its gate (`gate.*`) and experts (`experts.{j}.fc1/fc2`
/// `[/ffn_layernorm]`), keys relative to the layer's `VarBuilder`.
///
/// Each expert is a feed-forward block; its `fc1`/`fc2` init is multiplied by the `expert_gain`
/// given at construction (DeepNorm's β, Sub-LN's γ).
///
/// The router is a plug-in: any [`Router`] (the layer only reads the [`Routing`] it returns).
/// [`MoeLayer::new`] builds the one `cfg.router` names ([`crate::RouterChoice`]);
/// [`MoeLayer::with_router`] and [`MoeLayer::expert_parallel_with_router`] take one built by the
/// caller, by convention with its parameters under the layer's `vb.pp("gate")`.
pub struct MoeLayer {
    cfg: MoeConfig,
    router: Box<dyn Router>,
    experts: Vec<FeedForward>,
    local: Range<usize>,
    comm: Option<Arc<dyn ExpertComm>>,
    layer: usize,
}

impl std::fmt::Debug for MoeLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoeLayer")
            .field("cfg", &self.cfg)
            .field("router", &self.router.name())
            .field("local_experts", &self.local)
            .field("layer", &self.layer)
            .finish()
    }
}

impl MoeLayer {
    /// A single-process layer holding all `E` experts, routed by the router `cfg.router`
    /// names (built under `vb.pp("gate")` by [`build_router`]).
    pub fn new(cfg: MoeConfig, expert_gain: f64, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let router = build_router(&cfg.router, &cfg, vb.pp("gate"))?;
        Self::with_router(cfg, router, expert_gain, vb)
    }

    /// A single-process layer routed by `router`, any [`Router`] (one written in user code
    /// included); `cfg.router` is ignored. Build the router's parameters with `vb.pp("gate")`
    /// so that checkpoints keep torchscale's layout. Errors when the router's expert count is
    /// not `cfg.num_experts`.
    pub fn with_router(
        cfg: MoeConfig,
        router: Box<dyn Router>,
        expert_gain: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        let e = cfg.num_experts;
        Self::build(cfg, router, expert_gain, vb, 0..e, None)
    }

    /// An expert-parallel layer: this rank holds experts `rank * E / W .. (rank + 1) * E / W`
    /// (under their global names `experts.{j}`, so one checkpoint serves every rank) and
    /// exchanges dispatched tokens through `comm`. Every rank must call `forward` with the same
    /// number of tokens (torchscale pads to the largest count first).
    ///
    /// The exchanged buffers hold `capacity` rows per expert, so ranks must agree on it: when
    /// the router's capacity depends on more than the token count ([`Router::uniform_capacity`]
    /// is false: dropless routing, most user routers) the ranks first exchange their capacities
    /// and all use the largest.
    pub fn new_parallel(
        cfg: MoeConfig,
        expert_gain: f64,
        vb: VarBuilder,
        comm: Arc<dyn ExpertComm>,
    ) -> Result<Self> {
        cfg.validate()?;
        let router = build_router(&cfg.router, &cfg, vb.pp("gate"))?;
        Self::parallel_with_router(cfg, router, expert_gain, vb, comm)
    }

    /// [`MoeLayer::new_parallel`] with a router built by the caller (see
    /// [`MoeLayer::with_router`]).
    pub fn parallel_with_router(
        cfg: MoeConfig,
        router: Box<dyn Router>,
        expert_gain: f64,
        vb: VarBuilder,
        comm: Arc<dyn ExpertComm>,
    ) -> Result<Self> {
        cfg.validate()?;
        let local = local_experts(cfg.num_experts, comm.world_size(), comm.rank())?;
        Self::build(cfg, router, expert_gain, vb, local, Some(comm))
    }

    /// [`MoeLayer::new_parallel`] on any [`torchscale_core::Collective`] (MPI, NCCL, an
    /// in-process group) through [`CollectiveComm`]: the all-to-all copies bytes between ranks
    /// and is differentiable, so every rank must also run `backward()` on a loss that depends on
    /// the layer's output. The gate is replicated (its gradient is dense: all-reduce it with the
    /// other dense gradients); the experts in [`MoeLayer::expert_parameters`] are this rank's
    /// own (their gradients already hold every rank's tokens: do not all-reduce them).
    pub fn new_expert_parallel(
        cfg: MoeConfig,
        expert_gain: f64,
        vb: VarBuilder,
        comm: Arc<dyn torchscale_core::Collective>,
    ) -> Result<Self> {
        Self::new_parallel(cfg, expert_gain, vb, Arc::new(CollectiveComm::new(comm)))
    }

    /// [`MoeLayer::new_expert_parallel`] with a router built by the caller (see
    /// [`MoeLayer::with_router`]). Every rank builds the same router (the gate is replicated).
    pub fn expert_parallel_with_router(
        cfg: MoeConfig,
        router: Box<dyn Router>,
        expert_gain: f64,
        vb: VarBuilder,
        comm: Arc<dyn torchscale_core::Collective>,
    ) -> Result<Self> {
        let comm = Arc::new(CollectiveComm::new(comm));
        Self::parallel_with_router(cfg, router, expert_gain, vb, comm)
    }

    fn build(
        cfg: MoeConfig,
        router: Box<dyn Router>,
        expert_gain: f64,
        vb: VarBuilder,
        local: Range<usize>,
        comm: Option<Arc<dyn ExpertComm>>,
    ) -> Result<Self> {
        if router.num_experts() != cfg.num_experts {
            return Err(Error::config(
                "router",
                format!(
                    "router '{}' routes to {} experts, the layer has moe_expert_count = {}",
                    router.name(),
                    router.num_experts(),
                    cfg.num_experts
                ),
            ));
        }
        let experts = local
            .clone()
            .map(|j| FeedForward::new(cfg.ffn_config(), expert_gain, vb.pp(format!("experts.{j}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            router,
            experts,
            local,
            comm,
            layer: 0,
        })
    }

    /// Sets the layer index reported in [`AuxOutput::layer`] by the [`Sublayer`] impl.
    pub fn with_layer_index(mut self, layer: usize) -> Self {
        self.layer = layer;
        self
    }

    /// The layer index used by the [`Sublayer`] impl.
    pub fn layer_index(&self) -> usize {
        self.layer
    }

    /// The configuration.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    /// The router (gate + gating rules).
    pub fn router(&self) -> &dyn Router {
        self.router.as_ref()
    }

    /// The built-in capacity router, when the layer runs one ([`crate::RouterChoice::Capacity`]).
    pub fn moe_router(&self) -> Option<&MoeRouter> {
        self.router.as_any()?.downcast_ref()
    }

    /// The gate network of a built-in router ([`MoeRouter`], [`DroplessRouter`],
    /// [`ExpertChoiceRouter`]); `None` for a router of another type.
    pub fn gate(&self) -> Option<&Gate> {
        let any = self.router.as_any()?;
        if let Some(r) = any.downcast_ref::<MoeRouter>() {
            Some(r.gate())
        } else if let Some(r) = any.downcast_ref::<DroplessRouter>() {
            Some(r.gate())
        } else {
            any.downcast_ref::<ExpertChoiceRouter>().map(|r| r.gate())
        }
    }

    /// This rank's experts, in global order.
    pub fn experts(&self) -> &[FeedForward] {
        &self.experts
    }

    /// The parameters of this rank's experts: the ones SparseClip treats as expert gradients
    /// (torchscale flags them `.expert = True`). Match them to variables by `Tensor::id`.
    pub fn expert_parameters(&self) -> Vec<Tensor> {
        self.experts.iter().flat_map(|e| e.parameters()).collect()
    }

    /// Global indices of this rank's experts.
    pub fn local_experts(&self) -> Range<usize> {
        self.local.clone()
    }

    /// The router's [`Router::prepare_step`]: for the built-in routers with an X-MoE gate,
    /// torchscale's in-place rescale of the expert embeddings `gate.wg` to row norm 1.5
    /// (torchscale does it at every forward; it leaves the logits unchanged but sets the
    /// gradient scale of `wg`). Call it before each forward to reproduce torchscale's training
    /// dynamics. Returns false when there is nothing to do.
    pub fn renormalize_gate(&self) -> Result<bool> {
        self.router.prepare_step()
    }

    /// Routes `x: [S, C]` (rows already in the caller's token order) and mixes the experts'
    /// outputs: `out[s] = Σ_kept gate[s, j] · expert_{e_j}(x[s])`; dropped choices add 0.
    pub fn forward(&self, x: &Tensor, opts: &RouteOptions) -> Result<MoeOutput> {
        let routing = self.router.route(x, opts)?;
        let mut plan = DispatchPlan::new(&routing)?;
        let output = match &self.comm {
            Some(comm) if comm.world_size() > 1 => {
                if !self.router.uniform_capacity() {
                    // Slots only grow: every kept slot stays below the agreed capacity.
                    plan.capacity = agree_capacity(comm.as_ref(), plan.capacity, x.device())?;
                }
                self.parallel_experts(x, &plan, &routing, comm.as_ref(), opts.train)?
            }
            _ => self.local_experts_compact(x, &plan, &routing, opts.train)?,
        };
        Ok(MoeOutput {
            output,
            balance_loss: routing.balance_loss.clone(),
            stats: routing.stats.clone(),
            routing,
        })
    }

    /// Each expert runs on exactly its kept tokens (experts act row by row, so the empty slots
    /// of torchscale's buffer change nothing).
    fn local_experts_compact(
        &self,
        x: &Tensor,
        plan: &DispatchPlan,
        routing: &Routing,
        train: bool,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return crate::cuda::experts_forward(&self.experts, x, routing, train);
        }
        if plan.num_kept() == 0 {
            return Ok(x.zeros_like()?);
        }
        let rows = plan.gather_compact(x)?;
        if expert_compute() == ExpertCompute::Grouped {
            let out = crate::grouped::grouped_experts(&self.experts, &rows, &plan.counts, train)?;
            return plan.combine(&out, &routing.gate);
        }
        let offsets = plan.offsets();
        let mut outs = Vec::with_capacity(self.experts.len());
        for (e, expert) in self.experts.iter().enumerate() {
            let n = plan.counts[e];
            if n > 0 {
                outs.push(expert.forward(&rows.narrow(0, offsets[e], n)?, train)?);
            }
        }
        plan.combine(&Tensor::cat(&outs, 0)?, &routing.gate)
    }

    /// torchscale's expert-parallel path: `[E, cap, C]` buffer → all-to-all → local experts on
    /// the tokens of every rank → all-to-all back → combine.
    fn parallel_experts(
        &self,
        x: &Tensor,
        plan: &DispatchPlan,
        routing: &Routing,
        comm: &dyn ExpertComm,
        train: bool,
    ) -> Result<Tensor> {
        let w = comm.world_size();
        let el = self.experts.len();
        let cap = plan.capacity;
        let c = x.dim(D::Minus1)?;
        let buf = plan.gather_buffer(x)?;
        let chunks = (0..w)
            .map(|r| Ok(buf.narrow(0, r * el * cap, el * cap)?))
            .collect::<Result<Vec<_>>>()?;
        let recv = comm.all_to_all(chunks)?;
        for t in &recv {
            if t.dims() != [el * cap, c] {
                return Err(Error::shape(
                    "all_to_all chunk",
                    format!("[{}, {c}] (equal token counts on every rank)", el * cap),
                    t.dims(),
                ));
            }
        }
        let mut outs = Vec::with_capacity(el);
        for (j, expert) in self.experts.iter().enumerate() {
            let parts = recv
                .iter()
                .map(|t| Ok(t.narrow(0, j * cap, cap)?))
                .collect::<Result<Vec<_>>>()?;
            outs.push(expert.forward(&Tensor::cat(&parts, 0)?, train)?);
        }
        let send = (0..w)
            .map(|g| {
                let parts = outs
                    .iter()
                    .map(|o| Ok(o.narrow(0, g * cap, cap)?))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&parts, 0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let back = Tensor::cat(&comm.all_to_all(send)?, 0)?;
        if plan.num_kept() == 0 {
            // Still a function of `back` (a sum over no rows: exactly 0), so that this rank's
            // backward runs the reverse exchange with the others.
            let none = back.narrow(0, 0, 0)?.sum_keepdim(0)?;
            return Ok(x.zeros_like()?.broadcast_add(&none)?);
        }
        let rows = Tensor::from_vec(plan.buffer_rows(), plan.num_kept(), x.device())?;
        plan.combine(&back.index_select(&rows, 0)?, &routing.gate)
    }

    /// The same output computed the torchscale way: dense `[S, E·cap]` dispatch mask and
    /// combine weights, `dispatched = maskᵀ · x`, every expert on its whole `cap`-row buffer,
    /// `out = combine · expert_out`. For comparison and benchmarks; single-process layers only.
    pub fn dense_onehot_forward(&self, x: &Tensor, opts: &RouteOptions) -> Result<MoeOutput> {
        if self.experts.len() != self.cfg.num_experts {
            return Err(Error::invalid(
                "dense_onehot_forward",
                "needs every expert on this rank (no expert parallelism)",
            ));
        }
        let routing = self.router.route(x, opts)?;
        let cap = routing.capacity;
        let mask = dense_dispatch_mask(&routing, x.dtype())?;
        let combine = dense_combine(&routing)?.to_dtype(x.dtype())?;
        let dispatched = mask.t()?.contiguous()?.matmul(x)?;
        let outs = self
            .experts
            .iter()
            .enumerate()
            .map(|(e, ex)| ex.forward(&dispatched.narrow(0, e * cap, cap)?, opts.train))
            .collect::<Result<Vec<_>>>()?;
        let output = combine.matmul(&Tensor::cat(&outs, 0)?)?;
        Ok(MoeOutput {
            output,
            balance_loss: routing.balance_loss.clone(),
            stats: routing.stats.clone(),
            routing,
        })
    }

    /// `[B, T, C] -> [B, T, C]` inside a stack: flattens batch-major (`s = b·T + t`), or
    /// time-major (`s = t·B + b`, torchscale's encoder) when `ctx.time_major`; takes the train
    /// flag and the second-expert uniforms from `ctx`; pushes the balance loss and statistics to
    /// `ctx.aux` under `layer`. Like torchscale, no padding mask reaches the router.
    pub fn forward_ctx(&self, x: &Tensor, ctx: &mut Ctx, layer: usize) -> Result<Tensor> {
        let (b, t, c) = match x.dims() {
            [b, t, c] => (*b, *t, *c),
            d => return Err(Error::shape("x", "[B, T, C]", d)),
        };
        let flat = if ctx.time_major {
            x.transpose(0, 1)?.contiguous()?.reshape((t * b, c))?
        } else {
            x.reshape((b * t, c))?
        };
        let opts = RouteOptions {
            train: ctx.train,
            uniform: ctx.moe_uniform,
            padding: None,
            seed: None,
        };
        let out = self.forward(&flat, &opts)?;
        ctx.aux.push(AuxOutput {
            layer,
            balance_loss: out.balance_loss,
            stats: out.stats,
            routing: Some(Box::new(out.routing)),
            input: Some(flat),
            output: Some(out.output.clone()),
        });
        if ctx.time_major {
            Ok(out
                .output
                .reshape((t, b, c))?
                .transpose(0, 1)?
                .contiguous()?)
        } else {
            Ok(out.output.reshape((b, t, c))?)
        }
    }
}

impl Sublayer for MoeLayer {
    /// [`MoeLayer::forward_ctx`] with the layer index set by [`MoeLayer::with_layer_index`].
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        self.forward_ctx(x, ctx, self.layer)
    }

    fn reseed(&self, seed: u64) {
        self.router.reseed(seed);
    }

    fn prepare_step(&self) -> Result<()> {
        self.renormalize_gate().map(|_| ())
    }

    fn expert_parameters(&self) -> Vec<Tensor> {
        MoeLayer::expert_parameters(self)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
