//! Reading a loss curve: final loss, best loss and the trained / stalled / diverged verdict
//! (definitions in the [parent module](super)'s doc).

use serde::{Deserialize, Serialize};

/// How a run ended, from its numbers alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Learned more than the byte frequencies and did not blow up.
    Trained,
    /// Finite throughout but no better than predicting bytes by their frequency.
    Stalled,
    /// Non-finite steps, or the loss went back up.
    Diverged,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Trained => "trained",
            Verdict::Stalled => "stalled",
            Verdict::Diverged => "diverged",
        })
    }
}

/// The thresholds of [`classify`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Entropy (nats) of the corpus's byte frequencies: the loss of a model that ignores context.
    pub unigram_entropy: f64,
    /// A final loss above `unigram_entropy - stall_margin` is a stall.
    pub stall_margin: f64,
    /// A final loss more than this above the best (smoothed) loss of the run is a divergence.
    pub relapse: f64,
}

impl Thresholds {
    /// The experiment's thresholds: stall margin 0.1 nats, relapse 0.5 nats.
    pub fn new(unigram_entropy: f64) -> Self {
        Self {
            unigram_entropy,
            stall_margin: 0.1,
            relapse: 0.5,
        }
    }
}

/// What [`classify`] read off a curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurveSummary {
    /// Loss of the first step (before any update).
    #[serde(with = "super::record::nan_as_null")]
    pub initial_loss: f64,
    /// Mean loss of the last [`window`] steps (NaN if any of them is non-finite or none ran).
    #[serde(with = "super::record::nan_as_null")]
    pub final_loss: f64,
    /// Lowest mean loss over any [`window`] consecutive steps.
    #[serde(with = "super::record::nan_as_null")]
    pub best_loss: f64,
    /// Largest finite gradient norm (NaN if none).
    #[serde(with = "super::record::nan_as_null")]
    pub max_grad_norm: f64,
    /// Steps whose update was skipped (non-finite loss or gradient).
    pub skipped: usize,
    /// The verdict.
    pub verdict: Verdict,
}

/// The smoothing window for `steps` planned steps: a twentieth of the run, at least one step.
pub fn window(steps: usize) -> usize {
    (steps / 20).max(1)
}

/// Classifies one run. `losses` and `grad_norms` are per executed step; `planned` is the number
/// of steps asked for (a run that stopped early has fewer losses); `skipped` counts skipped
/// updates.
pub fn classify(
    losses: &[f64],
    grad_norms: &[f64],
    skipped: usize,
    planned: usize,
    t: &Thresholds,
) -> CurveSummary {
    let w = window(planned);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let final_loss =
        if losses.len() >= w && losses[losses.len() - w..].iter().all(|x| x.is_finite()) {
            mean(&losses[losses.len() - w..])
        } else {
            f64::NAN
        };
    let best_loss = losses
        .windows(w)
        .filter(|s| s.iter().all(|x| x.is_finite()))
        .map(mean)
        .fold(f64::NAN, f64::min);
    let initial_loss = losses.first().copied().unwrap_or(f64::NAN);
    let max_grad_norm = grad_norms
        .iter()
        .copied()
        .filter(|g| g.is_finite())
        .fold(f64::NAN, f64::max);
    let stopped = losses.len() < planned;
    // A NaN final loss (or initial loss) counts as diverged.
    let went_down = final_loss.is_finite() && final_loss < initial_loss;
    let held = final_loss <= best_loss + t.relapse;
    let diverged = stopped || skipped > 0 || !went_down || !held;
    let verdict = if diverged {
        Verdict::Diverged
    } else if final_loss > t.unigram_entropy - t.stall_margin {
        Verdict::Stalled
    } else {
        Verdict::Trained
    };
    CurveSummary {
        initial_loss,
        final_loss,
        best_loss,
        max_grad_norm,
        skipped,
        verdict,
    }
}

/// Entropy in nats of the byte frequencies of `bytes` (0 for an empty slice).
pub fn unigram_entropy(bytes: &[u8]) -> f64 {
    let mut counts = [0usize; 256];
    for &b in bytes {
        counts[b as usize] += 1;
    }
    let n = bytes.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum()
}
