//! Results of `cargo xtask bench train` and their Markdown tables.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::median;
use super::train_configs::{Measurement, TrainConfig};

/// One measurement of one side in one round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    /// `rust` or `torch`.
    pub side: String,
    /// 1-based round.
    pub round: usize,
    /// One-minute load average when the measurement started.
    pub load: f64,
    /// What was measured.
    pub m: Measurement,
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// CPU model and core count.
    pub machine: String,
    /// Compute threads per side.
    pub threads: usize,
    /// Timed steps per measurement.
    pub steps: usize,
    /// Untimed steps per measurement.
    pub warmup: usize,
    /// Rounds.
    pub rounds: usize,
    /// Every measurement, in order.
    pub samples: Vec<Sample>,
}

/// The one-minute load average, 0 if unknown.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// `MODEL NAME, N cores` from `/proc/cpuinfo`.
pub fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU".to_string(), |s| s.trim().to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model}, {cores} cores")
}

/// Median and range of one statistic over rounds.
#[derive(Debug, Clone, Copy)]
struct Stat {
    med: f64,
    lo: f64,
    hi: f64,
}

fn stat(mut v: Vec<f64>) -> Option<Stat> {
    if v.is_empty() {
        return None;
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some(Stat {
        med: median(&mut v),
        lo,
        hi,
    })
}

fn samples<'a>(r: &'a Report, key: &str, side: &str) -> Vec<&'a Measurement> {
    r.samples
        .iter()
        .filter(|s| s.side == side && s.m.config == key)
        .map(|s| &s.m)
        .collect()
}

fn tok_s(ms: &[&Measurement], f: impl Fn(&Measurement) -> Option<f64>) -> Option<Stat> {
    stat(
        ms.iter()
            .filter_map(|m| f(m).map(|s| m.tokens as f64 / s))
            .collect(),
    )
}

fn secs(ms: &[&Measurement], f: impl Fn(&Measurement) -> Option<f64>) -> Option<Stat> {
    stat(ms.iter().filter_map(|m| f(m)).collect())
}

fn fmt_rate(s: Option<Stat>) -> String {
    match s {
        Some(s) if s.hi - s.lo > 0.005 * s.med => {
            format!("{:.0} ({:.0}-{:.0})", s.med, s.lo, s.hi)
        }
        Some(s) => format!("{:.0}", s.med),
        None => "-".into(),
    }
}

fn fmt_secs(s: Option<Stat>) -> String {
    s.map_or("-".into(), |s| format!("{:.3}", s.med))
}

fn ratio(num: Option<Stat>, den: Option<Stat>) -> String {
    match (num, den) {
        (Some(n), Some(d)) if d.med > 0.0 => format!("{:.2}", n.med / d.med),
        _ => "-".into(),
    }
}

/// The tables: throughput per configuration with the Rust / PyTorch ratio, where the time goes,
/// and peak memory.
pub fn render(r: &Report) -> String {
    let mut keys: Vec<String> = Vec::new();
    for s in &r.samples {
        if !keys.contains(&s.m.config) {
            keys.push(s.m.config.clone());
        }
    }
    let has_torch = r.samples.iter().any(|s| s.side == "torch");
    let loads: Vec<f64> = r.samples.iter().map(|s| s.load).collect();
    let load = stat(loads);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Machine: {}; {} threads per side; {} rounds, warm-up {}, median of {} steps; \
         load average (1 min) during the run: {}",
        r.machine,
        r.threads,
        r.rounds,
        r.warmup,
        r.steps,
        load.map_or("-".into(), |l| format!(
            "median {:.2}, {:.2}-{:.2}",
            l.med, l.lo, l.hi
        ))
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "| config | metric | torchscale-rs tok/s | PyTorch tok/s | Rust / PyTorch |"
    );
    let _ = writeln!(o, "|---|---|---:|---:|---:|");
    for key in &keys {
        let rs = samples(r, key, "rust");
        let py = samples(r, key, "torch");
        let desc = TrainConfig::from_key(key).map_or(key.as_str(), |c| c.describe());
        let fwd = (tok_s(&rs, |m| m.forward), tok_s(&py, |m| m.forward));
        if fwd.0.is_some() {
            let _ = writeln!(
                o,
                "| {desc} | forward | {} | {} | {} |",
                fmt_rate(fwd.0),
                fmt_rate(fwd.1),
                ratio(fwd.0, fwd.1)
            );
        }
        let opt = rs.iter().any(|m| m.train_optimizer.is_some());
        let what = if opt {
            "train step (fwd + loss + bwd + AdamW)"
        } else {
            "forward + backward"
        };
        let st = (
            tok_s(&rs, |m| Some(m.train_step)),
            tok_s(&py, |m| Some(m.train_step)),
        );
        let _ = writeln!(
            o,
            "| {} | {what} | {} | {} | {} |",
            if fwd.0.is_some() { "same" } else { desc },
            fmt_rate(st.0),
            fmt_rate(st.1),
            ratio(st.0, st.1)
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "| config | part | torchscale-rs s | PyTorch s | Rust / PyTorch time |"
    );
    let _ = writeln!(o, "|---|---|---:|---:|---:|");
    for key in &keys {
        let rs = samples(r, key, "rust");
        let py = samples(r, key, "torch");
        type Part = fn(&Measurement) -> Option<f64>;
        let parts: [(&str, Part); 3] = [
            ("forward + loss", |m| Some(m.train_forward)),
            ("backward", |m| Some(m.train_backward)),
            ("optimizer", |m| m.train_optimizer),
        ];
        for (name, f) in parts {
            let (a, b) = (secs(&rs, f), secs(&py, f));
            if a.is_none() && b.is_none() {
                continue;
            }
            let _ = writeln!(
                o,
                "| {key} | {name} | {} | {} | {} |",
                fmt_secs(a),
                fmt_secs(b),
                ratio(a, b)
            );
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "| config | peak memory torchscale-rs GB | PyTorch GB | Rust / PyTorch |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|");
    for key in &keys {
        let peak = |side: &str| {
            samples(r, key, side)
                .iter()
                .map(|m| m.peak_rss_bytes as f64 / 1e9)
                .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.max(x))))
        };
        let (a, b) = (peak("rust"), peak("torch"));
        let _ = writeln!(
            o,
            "| {key} | {} | {} | {} |",
            a.map_or("-".into(), |x| format!("{x:.2}")),
            b.map_or("-".into(), |x| format!("{x:.2}")),
            match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => "-".into(),
            }
        );
    }
    if !has_torch {
        let _ = writeln!(
            o,
            "\n(no PyTorch side: pass --torch PYTHON, the reference venv that `cargo xtask ref-setup` makes)"
        );
    }
    o
}
