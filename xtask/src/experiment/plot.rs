//! Line charts for the experiments: one PNG of one or more panels, each with its series, dashed
//! reference lines and a legend.
//!
//! The font is DejaVu Sans, shipped in `xtask/assets/` and compiled in, so that drawing text needs
//! no system font library (CI machines have none).

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, ensure, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

/// Line colours, in series order (colour-blind-safe Okabe–Ito hues).
pub const COLORS: [RGBColor; 7] = [
    RGBColor(213, 94, 0),
    RGBColor(230, 159, 0),
    RGBColor(0, 114, 178),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
];

fn register() -> Result<()> {
    let mut res = Ok(());
    REGISTER.call_once(|| {
        res = register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| anyhow!("the embedded DejaVu Sans font did not load"));
    });
    res
}

/// One line.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text; None keeps it out of the legend.
    pub label: Option<String>,
    /// (x, y) points; a y that is not finite or lies outside the panel's range is drawn at the
    /// nearest edge (a diverging curve runs along the top instead of squashing the others).
    pub points: Vec<(f64, f64)>,
    /// Index into [`COLORS`] (modulo its length).
    pub color: usize,
    /// Stroke width in pixels.
    pub width: u32,
    /// Opacity, 0 to 1.
    pub alpha: f64,
    /// Drawn dashed.
    pub dashed: bool,
    /// A filled circle at every point.
    pub markers: bool,
}

impl Series {
    /// A solid line of width 3 in the legend.
    pub fn new(label: impl Into<String>, color: usize, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: Some(label.into()),
            points,
            color,
            width: 3,
            alpha: 1.0,
            dashed: false,
            markers: false,
        }
    }

    /// A thin, faint line outside the legend (raw values under a smoothed curve).
    pub fn faint(color: usize, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: None,
            points,
            color,
            width: 1,
            alpha: 0.25,
            dashed: false,
            markers: false,
        }
    }

    /// Drawn dashed.
    pub fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }

    /// With a filled circle at every point.
    pub fn markers(mut self) -> Self {
        self.markers = true;
        self
    }

    /// With stroke width `w`.
    pub fn width(mut self, w: u32) -> Self {
        self.width = w;
        self
    }
}

/// One chart.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Caption.
    pub title: String,
    /// x axis label.
    pub x_desc: String,
    /// y axis label.
    pub y_desc: String,
    /// x range.
    pub x: (f64, f64),
    /// y range.
    pub y: (f64, f64),
    /// The lines.
    pub series: Vec<Series>,
    /// Dashed grey horizontal lines with their legend text.
    pub hlines: Vec<(f64, String)>,
    /// Where the legend goes.
    pub legend: SeriesLabelPosition,
}

impl Panel {
    /// An empty panel; the ranges are set from the series by [`Panel::fit`] or by hand.
    pub fn new(title: impl Into<String>, x_desc: &str, y_desc: &str) -> Self {
        Self {
            title: title.into(),
            x_desc: x_desc.into(),
            y_desc: y_desc.into(),
            x: (0.0, 1.0),
            y: (0.0, 1.0),
            series: Vec::new(),
            hlines: Vec::new(),
            legend: SeriesLabelPosition::UpperRight,
        }
    }

    /// Sets the ranges to the finite points of the series and the reference lines, with a margin
    /// of `pad` (a fraction of the y span) above and below.
    pub fn fit(mut self, pad: f64) -> Self {
        let pts = self.series.iter().flat_map(|s| s.points.iter().copied());
        let (mut x0, mut x1, mut y0, mut y1) = (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        );
        for (x, y) in pts {
            if x.is_finite() {
                x0 = x0.min(x);
                x1 = x1.max(x);
            }
            if y.is_finite() {
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
        }
        for (y, _) in &self.hlines {
            y0 = y0.min(*y);
            y1 = y1.max(*y);
        }
        if !(x0.is_finite() && x1 > x0) {
            (x0, x1) = (0.0, x0.max(0.0) + 1.0);
        }
        if !(y0.is_finite() && y1 > y0) {
            let c = if y0.is_finite() { y0 } else { 0.0 };
            (y0, y1) = (c - 0.5, c + 0.5);
        }
        let m = (y1 - y0) * pad;
        self.x = (x0, x1);
        self.y = (y0 - m, y1 + m);
        self
    }
}

/// Draws `panels` to `path` (PNG), `cols` panels per row, each `panel_size` pixels, with an
/// optional caption over them all.
pub fn draw(
    path: &Path,
    caption: Option<&str>,
    panels: &[Panel],
    cols: usize,
    panel_size: (u32, u32),
) -> Result<()> {
    register()?;
    ensure!(!panels.is_empty() && cols > 0, "nothing to draw");
    let rows = panels.len().div_ceil(cols);
    let top = if caption.is_some() { 50 } else { 0 };
    let size = (panel_size.0 * cols as u32, panel_size.1 * rows as u32 + top);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    let body = if let Some(c) = caption {
        root.titled(c, ("sans-serif", 28))?
    } else {
        root.clone()
    };
    let areas = body.split_evenly((rows, cols));
    for (p, area) in panels.iter().zip(areas.iter()) {
        draw_panel(p, area)?;
    }
    root.present()?;
    Ok(())
}

fn draw_panel(
    p: &Panel,
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
) -> Result<()> {
    let (x0, x1) = p.x;
    let (y0, y1) = p.y;
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    let x_span = x1 - x0;
    let y_span = y1 - y0;
    chart
        .configure_mesh()
        .x_desc(p.x_desc.as_str())
        .y_desc(p.y_desc.as_str())
        .x_label_formatter(&|x| tick(*x, x_span))
        .y_label_formatter(&|y| tick(*y, y_span))
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 15))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let clamp = |y: f64| {
        if y.is_nan() || y > y1 {
            y1
        } else {
            y.max(y0)
        }
    };
    let mut any_label = false;
    for s in &p.series {
        let color = COLORS[s.color % COLORS.len()];
        let style = color.mix(s.alpha).stroke_width(s.width);
        let pts: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (x, clamp(y))).collect();
        let legend_style = style;
        if s.markers {
            chart.draw_series(
                pts.iter()
                    .map(|&p| Circle::new(p, 2 + s.width, color.mix(s.alpha).filled())),
            )?;
        }
        let anno = if s.dashed {
            chart.draw_series(DashedLineSeries::new(pts, 10, 6, style))?
        } else {
            chart.draw_series(LineSeries::new(pts, style))?
        };
        if let Some(l) = &s.label {
            any_label = true;
            let dashed = s.dashed;
            anno.label(l.clone()).legend(move |(x, y)| {
                // A dashed line's sample: two dashes.
                let (a, b) = if dashed {
                    ((0, 9), (15, 24))
                } else {
                    ((0, 12), (12, 24))
                };
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(a.0, 0), (a.1, 0)], legend_style)
                    + PathElement::new(vec![(b.0, 0), (b.1, 0)], legend_style)
            });
        }
    }
    for (y, label) in &p.hlines {
        any_label = true;
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x0, *y), (x1, *y)],
                8,
                6,
                BLACK.mix(0.6).stroke_width(1),
            ))?
            .label(label.clone())
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], BLACK.mix(0.6)));
    }
    if any_label {
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.5))
            .position(p.legend.clone())
            .draw()?;
    }
    Ok(())
}

/// An axis tick: as many decimals as the axis span needs.
fn tick(v: f64, span: f64) -> String {
    let decimals = if span >= 10.0 {
        0
    } else if span >= 1.0 {
        1
    } else if span >= 0.1 {
        2
    } else {
        3
    };
    format!("{v:.decimals$}")
}

/// A running mean over the last `w` points (fewer at the start); non-finite values pass through
/// unsmoothed and do not enter later means.
pub fn smooth(points: &[(f64, f64)], w: usize) -> Vec<(f64, f64)> {
    let w = w.max(1);
    (0..points.len())
        .map(|j| {
            let (x, y) = points[j];
            if !y.is_finite() {
                return (x, y);
            }
            let from = j.saturating_sub(w - 1);
            let vals: Vec<f64> = points[from..=j]
                .iter()
                .map(|p| p.1)
                .filter(|v| v.is_finite())
                .collect();
            (x, vals.iter().sum::<f64>() / vals.len() as f64)
        })
        .collect()
}
