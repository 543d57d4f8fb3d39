//! `stability.png`: training loss against step, one colour per technique.
//!
//! The font is DejaVu Sans, shipped in `xtask/assets/` and compiled in, so that drawing text needs
//! no system font library (CI machines have none).

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::record::Experiment;
use super::verdict::window;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

/// Line colours, in technique order (colour-blind-safe Okabe–Ito hues).
const COLORS: [RGBColor; 6] = [
    RGBColor(213, 94, 0),
    RGBColor(230, 159, 0),
    RGBColor(0, 114, 178),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
];

fn register() -> Result<()> {
    let mut res = Ok(());
    REGISTER.call_once(|| {
        res = register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| anyhow!("the embedded DejaVu Sans font did not load"));
    });
    res
}

/// Draws the loss curves of `exp` to `path` (PNG, 1200×750).
///
/// Thin lines are the per-step losses, thick ones their running mean over the verdict window.
/// The y axis runs from just under the lowest loss to just over the highest initial loss (at
/// least the uniform loss ln 260), and losses above it (or non-finite) are drawn at the top, so that a diverging curve shows as a
/// line along the top instead of squashing the others. The dashed line is the unigram entropy.
pub fn draw(exp: &Experiment, path: &Path) -> Result<()> {
    register()?;
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

    let root = BitMapBackend::new(path, (1200, 750)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "{}-layer decoder, d={}, ffn={}, lr {:e}, warmup {}, batch {}x{} bytes",
        c.layers, c.dim, c.ffn_dim, c.lr, c.warmup, c.batch, c.seq_len
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_hi, y_lo..y_hi)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("training loss (nats per byte)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.1}"))
        .axis_desc_style(("sans-serif", 20))
        .label_style(("sans-serif", 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;

    let clamp = |l: f64| if l.is_finite() { l.min(y_hi) } else { y_hi };
    let w = window(c.steps);
    for (i, run) in exp.runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let raw: Vec<(f64, f64)> = run
            .steps
            .iter()
            .map(|s| (s.step as f64, clamp(s.loss)))
            .collect();
        chart.draw_series(LineSeries::new(raw.clone(), color.mix(0.25)))?;
        let smooth: Vec<(f64, f64)> = (0..raw.len())
            .map(|j| {
                let from = j.saturating_sub(w - 1);
                let m = raw[from..=j].iter().map(|p| p.1).sum::<f64>() / (j + 1 - from) as f64;
                (raw[j].0, m)
            })
            .collect();
        let label = format!(
            "{}: {} (final {:.3})",
            run.technique, run.summary.verdict, run.summary.final_loss
        );
        chart
            .draw_series(LineSeries::new(smooth, color.stroke_width(3)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
    }
    let u = c.thresholds.unigram_entropy;
    chart
        .draw_series(DashedLineSeries::new(
            vec![(0.0, u), (x_hi, u)],
            8,
            6,
            BLACK.mix(0.6).stroke_width(1),
        ))?
        .label(format!("unigram entropy {u:.2}"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], BLACK.mix(0.6)));
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 18))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.5))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}
