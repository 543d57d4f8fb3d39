//! The pieces the training experiments share (`cargo xtask stability`, `deepnet`, `scaling`,
//! `sparseclip`): the corpus and its validation batches, progress bars (or log lines when stderr
//! is not a terminal), the training loop that records every step, peak memory, phase timing
//! ([`timing`]) and line charts ([`plot`]).
//!
//! Every experiment is a pure function of its settings and seed: the models are initialised from
//! the seed, and step `s` draws its batch from `(seed, s)` through the [`Trainer`]. Only the
//! recorded times and memory differ between two runs.

pub mod plot;
pub mod timing;

use std::cell::Cell;
use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use torchscale_core::Error as CoreError;
use torchscale_models::data::ByteCorpus;
use torchscale_models::lm::LanguageModel;
use torchscale_models::train::{
    AdamWConfig, ClipMode, InverseSqrt, MicroBatch, Schedule, StepCtx, StepReport, Trainer,
    TrainerConfig,
};

use crate::stability::{unigram_entropy, StepRecord, ValidRecord};
pub use timing::PhaseTimes;

/// Held-out fraction of the corpus lines.
pub const VALID_FRACTION: f64 = 0.02;
/// Non-finite steps in a row after which a run is stopped.
pub const MAX_SKIPS: usize = 5;

/// Validation and training batches are `(input, target)` id tensors `[B, T]`.
pub type Batch = (Tensor, Tensor);

/// The training text, its byte-frequency entropy and the validation batches.
pub struct Data {
    /// The corpus (training lines and held-out lines).
    pub corpus: ByteCorpus,
    /// Entropy (nats) of the byte frequencies of the whole text: the loss of a model that
    /// ignores context.
    pub unigram_entropy: f64,
    /// Validation batches: the first `max_batches` windows of the held-out lines.
    pub valid: Vec<Batch>,
    /// The file, as given.
    pub path: String,
}

impl Data {
    /// Reads `path`, holds out [`VALID_FRACTION`] of the lines and cuts up to `max_batches`
    /// validation batches of `batch × seq_len` bytes.
    pub fn load(path: &Path, batch: usize, seq_len: usize, max_batches: usize) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading the corpus {}", path.display()))?;
        let corpus = ByteCorpus::from_text(&String::from_utf8_lossy(&bytes), VALID_FRACTION)?;
        let valid = corpus.valid_batches(batch, seq_len, max_batches, &Device::Cpu)?;
        ensure!(
            !valid.is_empty(),
            "the validation split holds no batch of {batch}×{seq_len} bytes"
        );
        Ok(Self {
            corpus,
            unigram_entropy: unigram_entropy(&bytes),
            valid,
            path: path.display().to_string(),
        })
    }

    /// Training bytes (after holding out the validation lines).
    pub fn train_bytes(&self) -> usize {
        self.corpus.train_len()
    }
}

/// The experiments' trainer for `lm`: AdamW at peak `lr` after `warmup` updates of the inverse
/// square root schedule, clipping by `clip`, `MAX_SKIPS` non-finite steps in a row at most.
pub fn inverse_sqrt_trainer(
    lm: &LanguageModel,
    expert_params: &[Tensor],
    seed: u64,
    clip: ClipMode,
    lr: f64,
    warmup: u64,
) -> Result<Trainer> {
    Ok(Trainer::new(
        &lm.store,
        expert_params,
        TrainerConfig {
            seed,
            clip,
            max_consecutive_skips: MAX_SKIPS,
        },
        AdamWConfig {
            lr,
            ..AdamWConfig::default()
        },
        Schedule::InverseSqrt(InverseSqrt::new(lr, warmup)),
    )?)
}

/// Validation NLL per byte; a diverged model's non-finite evaluation is recorded as NaN.
pub fn evaluate(lm: &LanguageModel, valid: &[Batch]) -> Result<f64> {
    match lm.evaluate(valid) {
        Ok(v) => Ok(v),
        Err(CoreError::NonFinite { .. }) => Ok(f64::NAN),
        Err(e) => Err(e.into()),
    }
}

/// Progress bars on stderr, one per run, or (hidden: `--no-progress`, tests) log lines every
/// tenth of a run instead.
pub struct Progress {
    multi: MultiProgress,
    style: ProgressStyle,
    show: bool,
}

impl Progress {
    /// Bars when `show` and stderr is a terminal (indicatif draws nothing elsewhere; log lines
    /// are written instead).
    pub fn new(show: bool) -> Result<Self> {
        let target = if show {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let style = ProgressStyle::with_template(
            "{prefix:>12} [{bar:30}] {pos:>5}/{len} {elapsed_precise} {msg}",
        )?
        .progress_chars("=> ");
        Ok(Self {
            multi: MultiProgress::with_draw_target(target),
            style,
            show,
        })
    }

    /// A bar of `len` steps labelled `name` (added in call order).
    pub fn bar(&self, name: &str, len: usize) -> Ticker {
        let bar = self.multi.add(ProgressBar::new(len as u64));
        bar.set_style(self.style.clone());
        bar.set_prefix(name.to_string());
        Ticker {
            bar,
            name: name.to_string(),
            len,
            log_every: (len / 10).max(1),
            logs: !self.show || self.multi.is_hidden(),
            start: Cell::new(Instant::now()),
        }
    }
}

/// One run's bar (or log lines).
pub struct Ticker {
    bar: ProgressBar,
    name: String,
    len: usize,
    log_every: usize,
    logs: bool,
    start: Cell<Instant>,
}

impl Ticker {
    /// The run starts now (the times in the log lines count from here).
    pub fn begin(&self) {
        self.start.set(Instant::now());
        self.bar.reset_elapsed();
    }

    /// Step `done` (1-based) of the run is done; `msg` describes it. Without a bar a log line is
    /// written every tenth of the run and at its end.
    pub fn step(&self, done: usize, msg: impl FnOnce() -> String) {
        self.bar.inc(1);
        if self.logs {
            if done.is_multiple_of(self.log_every) || done == self.len {
                tracing::info!(
                    "{} step {done}/{}: {}, {:.1} s",
                    self.name,
                    self.len,
                    msg(),
                    self.start.get().elapsed().as_secs_f64()
                );
            }
        } else {
            self.bar.set_message(msg());
        }
    }

    /// The run is over: `msg` is its result.
    pub fn finish(&self, msg: String) {
        if self.logs {
            tracing::info!(
                "{} {msg} ({:.1} s)",
                self.name,
                self.start.get().elapsed().as_secs_f64()
            );
        }
        self.bar.finish_with_message(msg);
    }

    /// Whether log lines (rather than a bar) report progress.
    pub fn logs(&self) -> bool {
        self.logs
    }
}

/// Peak resident set size of this process (`VmHWM`), bytes; 0 if unknown.
pub fn peak_rss_bytes() -> u64 {
    crate::bench::train_configs::peak_rss_bytes()
}

/// Resets the peak resident set size to the current one (`5` to `/proc/self/clear_refs`), so
/// that the next [`peak_rss_bytes`] is the peak since this call. False where Linux refuses.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// What [`train_loop`] recorded.
#[derive(Debug, Clone)]
pub struct LoopResult {
    /// Every step run.
    pub steps: Vec<StepRecord>,
    /// Validation losses (every `valid_every` steps and after the last one).
    pub valid: Vec<ValidRecord>,
    /// Why the run stopped early (too many non-finite steps in a row), if it did.
    pub stopped: Option<String>,
    /// Wall-clock seconds of the loop, validation included.
    pub seconds: f64,
    /// Mean seconds per training step by phase (validation excluded).
    pub timing: PhaseTimes,
    /// Peak resident memory since the loop started (VmHWM after a reset; 0 if unknown).
    pub peak_rss_bytes: u64,
}

/// The schedule of a [`train_loop`].
#[derive(Debug, Clone, Copy)]
pub struct LoopPlan {
    /// Training steps.
    pub steps: usize,
    /// Validation after every this many steps (and after the last).
    pub valid_every: usize,
}

/// Runs `plan.steps` steps of `trainer`, one micro-batch each from `micro`, validating with
/// `validate` every `plan.valid_every` steps and at the end. `after` sees each step's report
/// (and may fill in its record) before the bar moves on. A run that hits too many non-finite
/// steps in a row stops (recorded in [`LoopResult::stopped`]); other errors are returned.
///
/// The peak memory is reset at the start (see [`reset_peak_rss`]), and phase times are taken
/// from the library's tracing spans when the [`timing`] layer is installed (by `cargo xtask`'s
/// `main`); the step's wall time is always measured.
pub fn train_loop<F, V, A>(
    trainer: &mut Trainer,
    plan: LoopPlan,
    ticker: &Ticker,
    mut micro: F,
    mut validate: V,
    mut after: A,
) -> Result<LoopResult>
where
    F: FnMut(StepCtx) -> torchscale_core::Result<MicroBatch>,
    V: FnMut() -> Result<f64>,
    A: FnMut(&StepReport, &mut StepRecord) -> Result<()>,
{
    let reset = reset_peak_rss();
    let start = Instant::now();
    let mut phases = timing::Recorder::new();
    let mut steps = Vec::with_capacity(plan.steps);
    let mut valid = Vec::new();
    let mut stopped = None;
    for s in 0..plan.steps {
        let t0 = Instant::now();
        let mut fwd = 0.0;
        // The first step faults its memory in and fills the allocator's caches: not timed.
        let timed = s > 0;
        let result = {
            let _on = phases.record(timed);
            trainer.step(1, |ctx| {
                let t = Instant::now();
                let out = micro(ctx);
                fwd += t.elapsed().as_secs_f64();
                out
            })
        };
        let r = match result {
            Ok(r) => r,
            Err(CoreError::NonFinite { what }) => {
                stopped = Some(format!("step {s}: {what}"));
                break;
            }
            Err(e) => return Err(e.into()),
        };
        let seconds = t0.elapsed().as_secs_f64();
        if timed {
            phases.add_step(seconds, fwd);
        }
        let mut rec = StepRecord {
            step: r.step,
            loss: r.nll,
            lr: r.lr,
            grad_norm: r.grad_norm,
            clip_coef: r.clip_coef,
            skipped: r.skipped.is_some(),
            seconds,
        };
        after(&r, &mut rec)?;
        steps.push(rec);
        let done = s + 1;
        ticker.step(done, || {
            format!(
                "loss {:.3}, lr {:.2e}, |g| {:.3}, {:.2} s/step",
                r.nll, r.lr, r.grad_norm, seconds
            )
        });
        if done.is_multiple_of(plan.valid_every) && done < plan.steps {
            valid.push(ValidRecord {
                step: trainer.num_updates(),
                loss: validate()?,
            });
        }
    }
    valid.push(ValidRecord {
        step: trainer.num_updates(),
        loss: validate()?,
    });
    Ok(LoopResult {
        steps,
        valid,
        stopped,
        seconds: start.elapsed().as_secs_f64(),
        timing: phases.finish(),
        peak_rss_bytes: if reset { peak_rss_bytes() } else { 0 },
    })
}

/// Mean of the finite values of `v` (NaN if none).
pub fn finite_mean(v: impl IntoIterator<Item = f64>) -> f64 {
    let (s, n) = v
        .into_iter()
        .filter(|x| x.is_finite())
        .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

/// Mebibytes, for tables.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
