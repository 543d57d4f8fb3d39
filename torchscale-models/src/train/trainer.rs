//! One optimisation step, assembled from the training pieces: micro-batches with gradient
//! accumulation, clipping (global-norm or SparseClip), the NaN/inf guard, the schedule and AdamW.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use torchscale_clip::{GlobalNorm, SparseClip};
use torchscale_core::init::ParamStore;
use torchscale_core::{Error, GradClipper, Result};

use super::{
    check_grad_norm, check_grads, check_loss, AdamW, AdamWConfig, GradAccumulator, LrSchedule,
    Schedule, SkipReason, StepGuard,
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
}

/// Where a micro-batch sits in the run, handed to the caller's closure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepCtx {
    /// The step (0-based, counting skipped steps).
    pub step: u64,
    /// Index of the micro-batch inside the step.
    pub micro: usize,
    /// Seed for this micro-batch's randomness (data sampling, dropout, MoE draws).
    pub seed: u64,
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
pub struct Trainer {
    params: Vec<(String, Var)>,
    dense: Vec<Var>,
    expert: Vec<Var>,
    opt: AdamW,
    schedule: Schedule,
    clipper: Box<dyn GradClipper>,
    guard: StepGuard,
    cfg: TrainerConfig,
    step: u64,
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
        let clipper: Box<dyn GradClipper> = match cfg.clip {
            ClipMode::GlobalNorm(m) => Box::new(GlobalNorm::new(m)),
            ClipMode::SparseClip {
                max_norm,
                num_experts,
            } => {
                let c = SparseClip::new(max_norm, num_experts, 1);
                c.expert_denominator()?;
                Box::new(c)
            }
        };
        Ok(Self {
            opt: AdamW::new(params.clone(), opt)?,
            params,
            dense,
            expert,
            schedule,
            clipper,
            guard: StepGuard::new(cfg.max_consecutive_skips),
            cfg,
            step: 0,
        })
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

    /// One step over `micro_batches` micro-batches produced by `f`. A non-finite loss or gradient
    /// skips the update (the report says why); too many skips in a row return
    /// `Error::NonFinite`.
    pub fn step<F>(&mut self, micro_batches: usize, mut f: F) -> Result<StepReport>
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
            };
            let mb = f(ctx)?;
            if bad_loss.is_none() {
                bad_loss = check_loss(&mb.loss_sum)?;
            }
            nll += mb.nll_sum;
            ntokens += mb.ntokens;
            let grads = {
                let _span = tracing::trace_span!("backward", micro).entered();
                mb.loss_sum.backward()?
            };
            acc.add(&grads)?;
        }
        if ntokens == 0 {
            return Err(Error::invalid("micro-batches", "contain no target tokens"));
        }
        let mut grads = acc.finish_scaled(1.0 / ntokens as f64)?;
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
            let clip = self.clipper.clip(&mut grads, &self.dense, &self.expert)?;
            report.grad_norm = clip.total_norm;
            report.clip_coef = clip.coef;
            report.skipped = match check_grad_norm(clip.total_norm) {
                Some(r) => Some(r),
                None => check_grads(&grads, &self.params)?,
            };
        }
        self.step += 1;
        if !self.guard.record(report.skipped.as_ref())? {
            self.opt.set_lr(lr);
            self.opt.step(&grads)?;
        } else {
            tracing::warn!(step, reason = ?report.skipped, "update skipped");
        }
        Ok(report)
    }

    /// The optimiser state plus the step counter, as named tensors (`trainer.step`).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut s = self.opt.state()?;
        s.insert(
            STEP_KEY.to_string(),
            Tensor::new(&[self.step as i64], &Device::Cpu)?,
        );
        Ok(s)
    }

    /// Restores [`Trainer::state`]; every tensor is checked against the parameters.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let step = state.get(STEP_KEY).ok_or_else(|| Error::MissingTensor {
            key: STEP_KEY.to_string(),
        })?;
        if step.elem_count() != 1 {
            return Err(Error::TensorShape {
                key: STEP_KEY.to_string(),
                expected: vec![1],
                got: step.dims().to_vec(),
            });
        }
        let step = step.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?[0];
        let opt_state: HashMap<String, Tensor> = state
            .iter()
            .filter(|(k, _)| k.as_str() != STEP_KEY)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.opt.load_state(&opt_state)?;
        self.step = u64::try_from(step)
            .map_err(|_| Error::invalid(STEP_KEY, format!("negative step {step}")))?;
        Ok(())
    }
}

const STEP_KEY: &str = "trainer.step";
