//! The experiment's record, written as `stability.json` (`deepnet.json`): its settings, and every
//! step of every run. JSON has no NaN or infinity: such values are written as `null` and read
//! back as NaN. Fields added after the first version read as their defaults from older files.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::verdict::{CurveSummary, Thresholds};
use crate::experiment::PhaseTimes;

/// The settings shared by every run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentConfig {
    /// The experiment (`stability` or `deepnet`).
    #[serde(default = "stability")]
    pub experiment: String,
    /// Decoder layers.
    pub layers: usize,
    /// Model width.
    pub dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// FFN width.
    pub ffn_dim: usize,
    /// Training steps asked for.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up updates (then inverse square root decay).
    pub warmup: u64,
    /// Sequences per step.
    pub batch: usize,
    /// Bytes per sequence.
    pub seq_len: usize,
    /// Seed of the initialisation and of the data order (the same for every technique).
    pub seed: u64,
    /// Global gradient-norm clipping threshold (0 = off).
    pub clip: f64,
    /// AdamW betas.
    pub betas: (f64, f64),
    /// Token embeddings scaled by sqrt(dim).
    pub scale_embedding: bool,
    /// Validation is run every this many steps and at the end.
    pub valid_every: usize,
    /// The training text.
    pub corpus: String,
    /// Thresholds of the verdict.
    pub thresholds: Thresholds,
    /// Techniques in run order (their display names).
    pub techniques: Vec<String>,
    /// Activation checkpointing: layers per segment (None: off).
    #[serde(default)]
    pub checkpoint_activations: Option<usize>,
    /// rayon threads the runs had.
    #[serde(default)]
    pub threads: usize,
}

fn stability() -> String {
    "stability".into()
}

fn one() -> f64 {
    1.0
}

/// One training step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step index (0-based).
    pub step: u64,
    /// Mean training NLL per byte of the step's batch (nats).
    #[serde(with = "nan_as_null")]
    pub loss: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    #[serde(with = "nan_as_null")]
    pub grad_norm: f64,
    /// Clipping coefficient applied (1: not clipped).
    #[serde(default = "one", with = "nan_as_null")]
    pub clip_coef: f64,
    /// The update was skipped (non-finite loss or gradient).
    pub skipped: bool,
    /// Wall-clock seconds of the step (the only field that differs between two runs).
    #[serde(default)]
    pub seconds: f64,
}

/// A validation measurement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ValidRecord {
    /// Updates done before the measurement.
    pub step: u64,
    /// Validation NLL per byte (nats).
    #[serde(with = "nan_as_null")]
    pub loss: f64,
}

/// One technique's run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Display name of the technique.
    pub technique: String,
    /// Trainable scalars of the model.
    pub parameters: usize,
    /// Every step run, in order.
    pub steps: Vec<StepRecord>,
    /// Validation losses.
    pub valid: Vec<ValidRecord>,
    /// Why the run stopped before its last step, if it did.
    pub stopped: Option<String>,
    /// The curve's reading.
    pub summary: CurveSummary,
    /// Wall-clock seconds of the run (model building and validation included).
    pub seconds: f64,
    /// Peak resident memory during the run (VmHWM, reset at its start), bytes; 0 if unknown.
    #[serde(default)]
    pub peak_rss_bytes: u64,
    /// Mean seconds per step by phase.
    #[serde(default)]
    pub timing: Option<PhaseTimes>,
}

impl RunRecord {
    /// The last validation loss (NaN if none).
    pub fn final_valid_loss(&self) -> f64 {
        self.valid.last().map_or(f64::NAN, |v| v.loss)
    }
}

/// The whole experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Experiment {
    /// Shared settings.
    pub config: ExperimentConfig,
    /// One run per technique.
    pub runs: Vec<RunRecord>,
}

impl Experiment {
    /// Writes pretty JSON to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        let s = serde_json::to_string_pretty(self)?;
        std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
    }

    /// Reads a file written by [`Experiment::write`].
    pub fn read(path: &Path) -> Result<Self> {
        let s =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&s).with_context(|| format!("parsing {}", path.display()))
    }
}

/// Non-finite floats as `null` (JSON has no NaN); `null` reads back as NaN.
pub(crate) mod nan_as_null {
    use super::*;

    /// Writes a non-finite value as `null`.
    pub fn serialize<S: Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    /// Reads `null` as NaN.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}
