//! One optimisation step, assembled from the training pieces: micro-batches with gradient
//! accumulation, clipping (global-norm or SparseClip), the NaN/inf guard, the schedule and AdamW;
//! optionally data parallel over a [`Collective`] (bucketed all-reduce, ZeRO-1).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};
use torchscale_clip::{GlobalNorm, SparseClip};
use torchscale_core::collective::SingleProcess;
use torchscale_core::init::ParamStore;
use torchscale_core::{Collective, Error, GradClipper, Result};

use super::data_parallel::{DataParallel, DEFAULT_BUCKET_BYTES};
use super::{
    check_grad_norm, check_grads, check_loss, AdamW, AdamWConfig, GradAccumulator, LrSchedule,
    Schedule, SkipReason, StepGuard, ZeroAdamW,
};
use crate::randomness::mix_seed;

/// How a [`Trainer`] clips gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClipMode {
    /// `torch.nn.utils.clip_grad_norm_` over every parameter; `max_norm <= 0` only measures.
    GlobalNorm(f64),
    /// SparseClip: expert gradients count `1 / max(world, E)` in the norm and are clipped with
    /// the same coefficient.
    SparseClip {
        /// Clipping threshold.
        max_norm: f64,
        /// Experts per MoE layer.
        num_experts: usize,
    },
}

/// Settings of a [`Trainer`] that are not the optimiser's or the schedule's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainerConfig {
    /// Run seed: step `s` draws its randomness from `mix_seed(seed, s)`.
    pub seed: u64,
    /// Gradient clipping.
    pub clip: ClipMode,
    /// Consecutive skipped (non-finite) steps tolerated before the run stops with an error.
    pub max_consecutive_skips: usize,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            clip: ClipMode::GlobalNorm(0.0),
            max_consecutive_skips: 8,
        }
    }
}

/// What the caller's closure returns for one micro-batch.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    /// The loss to differentiate, summed over the micro-batch's tokens (any MoE balance term
    /// already added); the trainer divides the accumulated gradient by the total token count.
    pub loss_sum: Tensor,
    /// The summed negative log-likelihood, for reporting (per-token loss and perplexity).
    pub nll_sum: f64,
    /// Tokens counted in `loss_sum`.
    pub ntokens: usize,
    /// The parameter gradients of `loss_sum`, when already computed (activation checkpointing,
    /// [`crate::lm::LanguageModel::micro_batch_checkpointed`]): the trainer then uses them
    /// instead of calling `loss_sum.backward()`, and `loss_sum` serves only for the loss checks.
    pub grads: Option<Arc<GradStore>>,
}

/// Where a micro-batch sits in the run, handed to the caller's closure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepCtx {
    /// The step (0-based, counting skipped steps).
    pub step: u64,
    /// Index of the micro-batch inside the step.
    pub micro: usize,
    /// Seed for this micro-batch's randomness (data sampling, dropout, MoE draws); the same on
    /// every rank, so that ranks can cut one global batch (see
    /// [`crate::data::ByteCorpus::train_batch_part`]).
    pub seed: u64,
    /// This process's rank in the data-parallel group (0 without one).
    pub rank: usize,
    /// Ranks in the data-parallel group (1 without one).
    pub world_size: usize,
}

/// What one [`Trainer::step`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// The step just taken (0-based).
    pub step: u64,
    /// Mean negative log-likelihood per token over the step's micro-batches.
    pub nll: f64,
    /// Tokens in the step.
    pub ntokens: usize,
    /// Learning rate applied.
    pub lr: f64,
    /// Gradient norm before clipping (as the clipper measures it).
    pub grad_norm: f64,
    /// Clipping coefficient applied (1 when not clipped).
    pub clip_coef: f64,
    /// Why the update was skipped, if it was.
    pub skipped: Option<SkipReason>,
}

/// Runs training steps over a [`ParamStore`]'s parameters.
///
/// Step `s` is a pure function of the parameters, the optimiser state and `(seed, s)`: the
/// closure gets the step's seed to sample its data and reseed the model, so a run resumed from
/// [`Trainer::state`] reproduces the uninterrupted run's losses exactly.
///
/// With [`Trainer::with_collective`] it trains data parallel: each rank runs its part of every
/// micro-batch, the gradient sums are all-reduced in flat buckets and divided by the global token
/// count, clipping sees the global norm and the skip decision is taken once for all ranks.
pub struct Trainer {
    params: Vec<(String, Var)>,
    dense: Vec<Var>,
    expert: Vec<Var>,
    opt: Optim,
    adam: AdamWConfig,
    schedule: Schedule,
    clipper: Box<dyn GradClipper>,
    guard: StepGuard,
    cfg: TrainerConfig,
    step: u64,
    comm: Arc<dyn Collective>,
    bucket_bytes: usize,
    local: HashSet<TensorId>,
    zero1: bool,
    dp: Option<DataParallel>,
}

/// The optimizer: plain AdamW, or its moments sharded over the ranks (ZeRO-1).
#[derive(Debug)]
enum Optim {
    Plain(AdamW),
    Zero(ZeroAdamW),
}

impl Optim {
    fn num_updates(&self) -> u64 {
        match self {
            Optim::Plain(o) => o.num_updates(),
            Optim::Zero(o) => o.num_updates(),
        }
    }
    fn set_lr(&mut self, lr: f64) -> Result<()> {
        match self {
            Optim::Plain(o) => o.set_lr(lr),
            Optim::Zero(o) => o.set_lr(lr),
        }
    }
    /// The update, all or nothing (`Some(reason)`: refused, nothing changed). Data parallel, the
    /// ranks agree: ZeRO-1 inside its step; the plain optimizer through `dp` (each rank updates
    /// whole parameters, and local expert parameters differ between ranks).
    fn step(&mut self, grads: &GradStore, dp: Option<&DataParallel>) -> Result<Option<SkipReason>> {
        match (self, dp) {
            (Optim::Plain(o), None) => o.step(grads),
            (Optim::Plain(o), Some(dp)) => o.step_agreed(grads, |local| {
                let first = dp.agree_skip(local.is_some())?;
                Ok(local.or(first.map(|rank| SkipReason::OtherRank { rank })))
            }),
            (Optim::Zero(o), _) => o.step(grads),
        }
    }
    fn state(&self) -> Result<HashMap<String, Tensor>> {
        match self {
            Optim::Plain(o) => o.state(),
            Optim::Zero(o) => o.state(),
        }
    }
    fn load_state(&mut self, s: &HashMap<String, Tensor>) -> Result<()> {
        match self {
            Optim::Plain(o) => o.load_state(s),
            Optim::Zero(o) => o.load_state(s),
        }
    }
}

fn make_clipper(mode: ClipMode, world: usize) -> Result<Box<dyn GradClipper>> {
    Ok(match mode {
        ClipMode::GlobalNorm(m) => Box::new(GlobalNorm::new(m)),
        ClipMode::SparseClip {
            max_norm,
            num_experts,
        } => {
            let c = SparseClip::new(max_norm, num_experts, world);
            c.expert_denominator()?;
            Box::new(c)
        }
    })
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("params", &self.params.len())
            .field("expert_params", &self.expert.len())
            .field("cfg", &self.cfg)
            .field("step", &self.step)
            .finish()
    }
}

impl Trainer {
    /// A trainer for every variable of `store`; `expert_params` (from the model's
    /// `expert_parameters()`) are matched by tensor identity and clipped as experts.
    pub fn new(
        store: &ParamStore,
        expert_params: &[Tensor],
        cfg: TrainerConfig,
        opt: AdamWConfig,
        schedule: Schedule,
    ) -> Result<Self> {
        let params = store.named_vars();
        if params.is_empty() {
            return Err(Error::invalid("ParamStore", "has no parameters to train"));
        }
        let expert_ids: std::collections::HashSet<_> =
            expert_params.iter().map(|t| t.id()).collect();
        let (expert, dense): (Vec<_>, Vec<_>) = params
            .iter()
            .map(|(_, v)| v.clone())
            .partition(|v| expert_ids.contains(&v.as_tensor().id()));
        if expert.len() != expert_ids.len() {
            return Err(Error::invalid(
                "expert_params",
                format!(
                    "{} expert tensors given, {} of them are variables of the store",
                    expert_ids.len(),
                    expert.len()
                ),
            ));
        }
        Ok(Self {
            opt: Optim::Plain(AdamW::new(params.clone(), opt)?),
            adam: opt,
            clipper: make_clipper(cfg.clip, 1)?,
            params,
            dense,
            expert,
            schedule,
            guard: StepGuard::new(cfg.max_consecutive_skips),
            cfg,
            step: 0,
            comm: Arc::new(SingleProcess),
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            local: HashSet::new(),
            zero1: false,
            dp: None,
        })
    }

    /// Trains data parallel over `comm` (every rank builds the same trainer and calls
    /// [`Trainer::step`] together). A group of one rank changes nothing. Set before the first
    /// step.
    pub fn with_collective(mut self, comm: Arc<dyn Collective>) -> Result<Self> {
        self.comm = comm;
        self.reconfigure()?;
        Ok(self)
    }

    /// Gradient bucket size in bytes of f32 (default [`DEFAULT_BUCKET_BYTES`], 25 MiB as in
    /// PyTorch's DDP): one all-reduce per bucket.
    pub fn with_bucket_bytes(mut self, bytes: usize) -> Result<Self> {
        if bytes == 0 {
            return Err(Error::config("bucket_bytes", "must be at least 1"));
        }
        self.bucket_bytes = bytes;
        self.reconfigure()?;
        Ok(self)
    }

    /// ZeRO stage 1: the AdamW moments sharded over the ranks of the collective (see
    /// [`ZeroAdamW`]). Set before the first step.
    pub fn with_zero1(mut self) -> Result<Self> {
        self.zero1 = true;
        self.reconfigure()?;
        Ok(self)
    }

    /// Parameters whose gradients are NOT all-reduced (expert-parallel experts: each rank holds
    /// its own): their squared norm is summed over ranks for clipping. Matched by tensor
    /// identity.
    pub fn with_local_params(mut self, params: &[Tensor]) -> Result<Self> {
        let ids: HashSet<_> = params.iter().map(|t| t.id()).collect();
        let known = self
            .params
            .iter()
            .filter(|(_, v)| ids.contains(&v.as_tensor().id()))
            .count();
        if known != ids.len() {
            return Err(Error::invalid(
                "local_params",
                format!(
                    "{} tensors given, {known} of them are variables of the store",
                    ids.len()
                ),
            ));
        }
        self.local = ids;
        self.reconfigure()?;
        Ok(self)
    }

    /// Rebuilds what depends on the collective and the options; only before the first step.
    fn reconfigure(&mut self) -> Result<()> {
        if self.step > 0 || self.opt.num_updates() > 0 {
            return Err(Error::invalid(
                "Trainer",
                "data-parallel options are set before the first step",
            ));
        }
        let world = self.comm.world_size();
        if self.zero1 && !self.local.is_empty() {
            return Err(Error::config(
                "zero1",
                "ZeRO-1 with parameters that are not all-reduced is not supported",
            ));
        }
        self.clipper = make_clipper(self.cfg.clip, world)?;
        self.dp = (world > 1).then(|| DataParallel {
            comm: self.comm.clone(),
            bucket_bytes: self.bucket_bytes,
            local: self.local.clone(),
        });
        let mut opt = if self.zero1 {
            Optim::Zero(ZeroAdamW::new(
                self.params.clone(),
                self.adam,
                self.comm.clone(),
            )?)
        } else {
            Optim::Plain(AdamW::new(self.params.clone(), self.adam)?)
        };
        opt.set_lr(self.opt_lr())?;
        self.opt = opt;
        Ok(())
    }

    fn opt_lr(&self) -> f64 {
        match &self.opt {
            Optim::Plain(o) => o.lr(),
            Optim::Zero(o) => o.config().lr,
        }
    }

    /// This process's rank (0 without a collective).
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Ranks training together (1 without a collective).
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// Whether this is rank 0, the one that writes checkpoints and logs.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// Steps taken so far (skipped ones included): the index of the next step.
    pub fn step_index(&self) -> u64 {
        self.step
    }

    /// Updates applied by the optimiser (skipped steps excluded).
    pub fn num_updates(&self) -> u64 {
        self.opt.num_updates()
    }

    /// Steps skipped by the guard so far in this process.
    pub fn skipped(&self) -> usize {
        self.guard.skipped()
    }

    /// The seed of micro-batch `micro` of step `step`.
    pub fn seed_for(&self, step: u64, micro: usize) -> u64 {
        mix_seed(mix_seed(self.cfg.seed, step), micro as u64)
    }

    /// One step over `micro_batches` micro-batches produced by `f`. A non-finite loss or gradient,
    /// or an update that would leave a non-finite parameter or moment, skips the update with the
    /// weights and optimizer state left exactly as they were (the report says why); too many
    /// skips in a row return `Error::NonFinite`. A schedule rate that is NaN, infinite or
    /// negative is an `Error::Config` for `lr`.
    ///
    /// Data parallel, every rank calls it together; an error on one rank aborts the collective so
    /// that the others fail too instead of waiting.
    pub fn step<F>(&mut self, micro_batches: usize, f: F) -> Result<StepReport>
    where
        F: FnMut(StepCtx) -> Result<MicroBatch>,
    {
        let out = self.step_inner(micro_batches, f);
        if let (Err(e), Some(dp)) = (&out, &self.dp) {
            dp.comm.abort(&e.to_string());
        }
        out
    }

    fn step_inner<F>(&mut self, micro_batches: usize, mut f: F) -> Result<StepReport>
    where
        F: FnMut(StepCtx) -> Result<MicroBatch>,
    {
        if micro_batches == 0 {
            return Err(Error::config("update_freq", "must be at least 1"));
        }
        let step = self.step;
        let _span = tracing::debug_span!("train_step", step, micro_batches).entered();
        let mut acc = GradAccumulator::new(self.params.iter().map(|(_, v)| v.clone()).collect());
        let (mut nll, mut ntokens, mut bad_loss) = (0f64, 0usize, None);
        for micro in 0..micro_batches {
            let ctx = StepCtx {
                step,
                micro,
                seed: self.seed_for(step, micro),
                rank: self.rank(),
                world_size: self.world_size(),
            };
            let mb = f(ctx)?;
            if bad_loss.is_none() {
                bad_loss = check_loss(&mb.loss_sum)?;
            }
            nll += mb.nll_sum;
            ntokens += mb.ntokens;
            match &mb.grads {
                Some(grads) => acc.add(grads)?,
                None => {
                    let _span = tracing::trace_span!("backward", micro).entered();
                    acc.add(&mb.loss_sum.backward()?)?;
                }
            }
        }
        let (nll, ntokens, mut grads) = match &self.dp {
            None => {
                if ntokens == 0 {
                    return Err(Error::invalid("micro-batches", "contain no target tokens"));
                }
                (nll, ntokens, acc.finish_scaled(1.0 / ntokens as f64)?)
            }
            Some(dp) => {
                let mut grads = acc.finish_scaled(1.0)?;
                let present: Vec<bool> = self
                    .params
                    .iter()
                    .map(|(_, v)| grads.get(v).is_some())
                    .collect();
                let g = dp.agree(nll, ntokens, bad_loss.is_some(), &present)?;
                if g.ntokens == 0 {
                    return Err(Error::invalid(
                        "micro-batches",
                        "contain no target tokens on any rank",
                    ));
                }
                let scale = 1.0 / g.ntokens as f64;
                dp.all_reduce_grads(&mut grads, &self.params, &g.present, scale)?;
                for (_, v) in self
                    .params
                    .iter()
                    .filter(|(_, v)| dp.local.contains(&v.id()))
                {
                    if let Some(x) = grads.get(v) {
                        let x = x.affine(scale, 0.0)?;
                        grads.insert(v, x);
                    }
                }
                if bad_loss.is_none() {
                    bad_loss = g.bad_loss_rank.map(|rank| SkipReason::OtherRank { rank });
                }
                (g.nll, g.ntokens, grads)
            }
        };
        // fairseq sets the rate of the next update from the updates done so far.
        let lr = self.schedule.lr(self.opt.num_updates());
        let mut report = StepReport {
            step,
            nll: nll / ntokens as f64,
            ntokens,
            lr,
            grad_norm: f64::NAN,
            clip_coef: 1.0,
            skipped: bad_loss,
        };
        if report.skipped.is_none() {
            let _span = tracing::trace_span!("clip").entered();
            let clip = match &self.dp {
                Some(dp) if !dp.local.is_empty() => super::data_parallel::clip_with_local(
                    dp,
                    self.cfg.clip,
                    &mut grads,
                    &self.dense,
                    &self.expert,
                )?,
                _ => self.clipper.clip(&mut grads, &self.dense, &self.expert)?,
            };
            report.grad_norm = clip.total_norm;
            report.clip_coef = clip.coef;
            report.skipped = match check_grad_norm(clip.total_norm) {
                Some(r) => Some(r),
                None => check_grads(&grads, &self.params)?,
            };
        }
        if let Some(dp) = &self.dp {
            // One decision for all ranks: expert-parallel gradients differ between ranks.
            let first = dp.agree_skip(report.skipped.is_some())?;
            if let (None, Some(rank)) = (&report.skipped, first) {
                report.skipped = Some(SkipReason::OtherRank { rank });
            }
        }
        self.step += 1;
        if report.skipped.is_none() {
            self.opt.set_lr(lr)?;
            report.skipped = self.opt.step(&grads, self.dp.as_ref())?;
        }
        if self.guard.record(report.skipped.as_ref())? {
            tracing::warn!(step, reason = ?report.skipped, "update skipped");
        }
        Ok(report)
    }

    /// The optimiser state plus the step counter, as named tensors (`trainer.step`). With ZeRO-1
    /// it gathers every rank's shard (a collective: all ranks call it; rank 0 writes the
    /// result), so that the run resumes on any number of ranks.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut s = self.opt.state()?;
        s.insert(
            STEP_KEY.to_string(),
            super::optimizer::count_tensor(self.step)?,
        );
        Ok(s)
    }

    /// Restores [`Trainer::state`]; every tensor is checked against the parameters. Every rank
    /// loads the whole state (ZeRO-1 keeps its own slice of it).
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        // Checked before anything is loaded (a negative count is an `Error::TensorValue`).
        let step = super::optimizer::read_count(state, STEP_KEY)?;
        let opt_state: HashMap<String, Tensor> = state
            .iter()
            .filter(|(k, _)| k.as_str() != STEP_KEY)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.opt.load_state(&opt_state)?;
        self.step = step;
        Ok(())
    }
}

const STEP_KEY: &str = "trainer.step";

#[cfg(test)]
#[path = "trainer_tests.rs"]
mod tests;
