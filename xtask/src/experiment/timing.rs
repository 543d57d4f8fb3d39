//! Where a training step's time goes: forward, backward, clipping and the optimizer, from the
//! library's own tracing spans (`backward` and `clip` in the trainer, `optimizer_step` in AdamW,
//! `checkpointed_backward` with activation checkpointing).
//!
//! [`layer`] is a `tracing` layer that adds up the lifetimes of those spans while a
//! [`Recorder`] is recording; `cargo xtask`'s `main` installs it next to the log output. Without
//! it (tests calling the experiments directly) only the step and the caller's forward closure are
//! timed and the other phases read NaN. Recording and the sums are per thread: the trainer opens
//! and closes its spans on the thread that calls `step`, and runs on other threads (parallel
//! tests) do not mix.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::filter::{filter_fn, Filtered};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The spans timed (target `torchscale_models::…`).
const SPANS: [&str; 4] = [
    "backward",
    "clip",
    "optimizer_step",
    "checkpointed_backward",
];

static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static RECORDING: Cell<bool> = const { Cell::new(false) };
    static TOTALS: RefCell<HashMap<&'static str, f64>> = RefCell::new(HashMap::new());
}

/// The layer that times the trainer's spans; install it once, beside the log output.
pub fn layer<S>() -> Filtered<SpanTimer, impl tracing_subscriber::layer::Filter<S>, S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    INSTALLED.store(true, Ordering::Relaxed);
    SpanTimer.with_filter(filter_fn(|m| {
        m.is_span() && m.target().starts_with("torchscale_models") && SPANS.contains(&m.name())
    }))
}

/// See [`layer`].
#[derive(Debug, Clone, Copy)]
pub struct SpanTimer;

struct Start(Instant);

impl<S> Layer<S> for SpanTimer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, _attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if RECORDING.get() {
            if let Some(span) = ctx.span(id) {
                span.extensions_mut().insert(Start(Instant::now()));
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(start) = span.extensions().get::<Start>().map(|s| s.0) else {
            return;
        };
        let dt = start.elapsed().as_secs_f64();
        let name = span.metadata().name();
        TOTALS.with_borrow_mut(|t| *t.entry(name).or_default() += dt);
    }
}

fn take_totals() -> HashMap<&'static str, f64> {
    TOTALS.with_borrow_mut(std::mem::take)
}

/// Mean seconds per training step, by phase.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PhaseTimes {
    /// Steps timed (every step but the first, which faults its memory in).
    pub steps: usize,
    /// The whole step.
    #[serde(with = "crate::stability::nan_as_null")]
    pub step: f64,
    /// The caller's micro-batch closure: sampling the batch, the forward pass and the loss. With
    /// activation checkpointing the forward pass runs inside the checkpointed backward call and
    /// is counted in `backward` with the recomputation; this is then only the batch sampling.
    #[serde(with = "crate::stability::nan_as_null")]
    pub forward: f64,
    /// The backward pass (NaN without the timing layer).
    #[serde(with = "crate::stability::nan_as_null")]
    pub backward: f64,
    /// Measuring and clipping the gradient norm (NaN without the timing layer).
    #[serde(with = "crate::stability::nan_as_null")]
    pub clip: f64,
    /// The AdamW update, its finite check included (NaN without the timing layer).
    #[serde(with = "crate::stability::nan_as_null")]
    pub optimizer: f64,
    /// The rest: gradient accumulation and scaling, the loss and gradient checks, bookkeeping
    /// (NaN without the timing layer).
    #[serde(with = "crate::stability::nan_as_null")]
    pub other: f64,
}

/// Adds up phase times over a run's steps.
pub struct Recorder {
    steps: usize,
    step: f64,
    closure: f64,
    spans: HashMap<&'static str, f64>,
}

/// Records the spans of its scope (see [`Recorder::record`]).
pub struct Recording(bool);

impl Drop for Recording {
    fn drop(&mut self) {
        if self.0 {
            RECORDING.set(false);
        }
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// A recorder with nothing recorded (spans closed earlier are discarded).
    pub fn new() -> Self {
        take_totals();
        Self {
            steps: 0,
            step: 0.0,
            closure: 0.0,
            spans: HashMap::new(),
        }
    }

    /// Spans opened while the returned guard lives are timed, if `on`.
    pub fn record(&mut self, on: bool) -> Recording {
        if on {
            RECORDING.set(true);
        }
        Recording(on)
    }

    /// One timed step: its wall time and its micro-batch closure's; the spans closed since the
    /// last call are added to it.
    pub fn add_step(&mut self, step: f64, closure: f64) {
        self.steps += 1;
        self.step += step;
        self.closure += closure;
        for (k, v) in take_totals() {
            *self.spans.entry(k).or_default() += v;
        }
    }

    /// The means per step.
    pub fn finish(self) -> PhaseTimes {
        let n = self.steps as f64;
        if self.steps == 0 {
            return PhaseTimes {
                steps: 0,
                step: f64::NAN,
                forward: f64::NAN,
                backward: f64::NAN,
                clip: f64::NAN,
                optimizer: f64::NAN,
                other: f64::NAN,
            };
        }
        let span = |k: &str| self.spans.get(k).copied().unwrap_or(0.0) / n;
        let ckpt = span("checkpointed_backward");
        let step = self.step / n;
        let forward = self.closure / n - ckpt;
        if !INSTALLED.load(Ordering::Relaxed) {
            return PhaseTimes {
                steps: self.steps,
                step,
                forward,
                backward: f64::NAN,
                clip: f64::NAN,
                optimizer: f64::NAN,
                other: f64::NAN,
            };
        }
        let backward = span("backward") + ckpt;
        let clip = span("clip");
        let optimizer = span("optimizer_step");
        PhaseTimes {
            steps: self.steps,
            step,
            forward,
            backward,
            clip,
            optimizer,
            other: step - forward - backward - clip - optimizer,
        }
    }
}
