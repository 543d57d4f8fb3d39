//! `stability.png` (and `deepnet.png`): training loss against step, one colour per technique.

use std::path::Path;

use anyhow::Result;

use super::record::Experiment;
use super::verdict::window;
use crate::experiment::plot::{self, Panel, Series};

/// Draws the loss curves of `exp` to `path` (PNG, 1200×750).
///
/// Thin lines are the per-step losses, thick ones their running mean over the verdict window.
/// The y axis runs from just under the lowest loss to just over the highest initial loss (at
/// least the uniform loss ln 260), and losses above it (or non-finite) are drawn at the top, so
/// that a diverging curve shows as a line along the top instead of squashing the others. The
/// dashed line is the unigram entropy.
pub fn draw(exp: &Experiment, path: &Path) -> Result<()> {
    let c = &exp.config;
    let uniform = (torchscale_models::data::BYTE_VOCAB as f64).ln();
    let lowest = exp
        .runs
        .iter()
        .flat_map(|r| r.steps.iter().map(|s| s.loss))
        .filter(|l| l.is_finite())
        .fold(f64::INFINITY, f64::min);
    let y_lo = if lowest.is_finite() {
        (lowest - 0.2).max(0.0)
    } else {
        0.0
    };
    let highest_start = exp
        .runs
        .iter()
        .filter_map(|r| r.steps.first().map(|s| s.loss))
        .filter(|l| l.is_finite())
        .fold(uniform, f64::max);
    let y_hi = highest_start + 0.3;
    let x_hi = c.steps.max(2) as f64 - 1.0;
    let title = format!(
        "{}-layer decoder, d={}, ffn={}, lr {:e}, warmup {}, batch {}x{} bytes",
        c.layers, c.dim, c.ffn_dim, c.lr, c.warmup, c.batch, c.seq_len
    );
    let mut panel = Panel::new(title, "step", "training loss (nats per byte)");
    panel.x = (0.0, x_hi);
    panel.y = (y_lo, y_hi);
    let clamp = |l: f64| if l.is_finite() { l.min(y_hi) } else { y_hi };
    let w = window(c.steps);
    for (i, run) in exp.runs.iter().enumerate() {
        let raw: Vec<(f64, f64)> = run
            .steps
            .iter()
            .map(|s| (s.step as f64, clamp(s.loss)))
            .collect();
        let smooth = plot::smooth(&raw, w);
        panel.series.push(Series::faint(i, raw));
        panel.series.push(Series::new(
            format!(
                "{}: {} (final {:.3})",
                run.technique, run.summary.verdict, run.summary.final_loss
            ),
            i,
            smooth,
        ));
    }
    let u = c.thresholds.unigram_entropy;
    panel.hlines.push((u, format!("unigram entropy {u:.2}")));
    plot::draw(path, None, &[panel], 1, (1200, 750))
}
