//! What the examples print while they train: interval statistics for fairseq-style log lines,
//! the `log.jsonl` record, the end-of-run summary and printable samples.
#![allow(dead_code)]

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use torchscale_models::train::StepReport;

/// Totals over the steps since the last [`Interval::reset`].
#[derive(Debug, Clone)]
pub struct Interval {
    steps: u64,
    skipped: u64,
    clipped: u64,
    tokens: usize,
    /// Token-weighted NLL of the steps with a finite loss.
    nll_sum: f64,
    nll_tokens: usize,
    grad_norm_sum: f64,
    grad_norms: u64,
    started: Instant,
}

impl Default for Interval {
    fn default() -> Self {
        Self {
            steps: 0,
            skipped: 0,
            clipped: 0,
            tokens: 0,
            nll_sum: 0.0,
            nll_tokens: 0,
            grad_norm_sum: 0.0,
            grad_norms: 0,
            started: Instant::now(),
        }
    }
}

impl Interval {
    /// Counts one step.
    pub fn add(&mut self, r: &StepReport) {
        self.steps += 1;
        self.tokens += r.ntokens;
        self.skipped += u64::from(r.skipped.is_some());
        self.clipped += u64::from(r.skipped.is_none() && r.clip_coef < 1.0);
        if r.nll.is_finite() {
            self.nll_sum += r.nll * r.ntokens as f64;
            self.nll_tokens += r.ntokens;
        }
        if r.grad_norm.is_finite() {
            self.grad_norm_sum += r.grad_norm;
            self.grad_norms += 1;
        }
    }

    /// Starts a new interval now.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Steps counted.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Mean NLL per token over the interval (steps with a non-finite loss left out).
    pub fn mean_loss(&self) -> Option<f64> {
        (self.nll_tokens > 0).then(|| self.nll_sum / self.nll_tokens as f64)
    }

    /// Tokens per second of wall time since the interval began.
    pub fn tokens_per_sec(&self) -> f64 {
        self.tokens as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    /// The fairseq-style line, `key value` fields: `step 25/300 | loss 3.412 | ppl 30.33 |
    /// lr 1.000e-3 | tok/s 51234 | gnorm 1.234 | clip 40% | skipped 0 | wall 4.2s`.
    pub fn line(&self, step: u64, total: u64, lr: f64, wall: Duration) -> String {
        let loss = self.mean_loss();
        let gnorm = (self.grad_norms > 0).then(|| self.grad_norm_sum / self.grad_norms as f64);
        let steps = self.steps.max(1) as f64;
        format!(
            "step {step}/{total} | loss {} | ppl {} | lr {lr:.3e} | tok/s {:.0} | gnorm {} | \
             clip {:.0}% | skipped {} | wall {:.1}s",
            opt(loss, 3),
            opt(loss.map(f64::exp), 2),
            self.tokens_per_sec(),
            opt(gnorm, 3),
            100.0 * self.clipped as f64 / steps,
            self.skipped,
            wall.as_secs_f64()
        )
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) => format!("{x:.digits$}"),
        None => "-".into(),
    }
}

/// One line of `log.jsonl`: one step.
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    /// 1-based step.
    pub step: u64,
    /// Mean NLL per token of the step.
    pub loss: f64,
    /// Learning rate applied.
    pub lr: f64,
    /// Gradient norm before clipping; `null` when it was not finite (skipped step).
    pub grad_norm: Option<f64>,
    /// Whether the update was skipped.
    pub skipped: bool,
}

impl StepLog {
    /// The record of `r`.
    pub fn of(r: &StepReport) -> Self {
        Self {
            step: r.step + 1,
            loss: r.nll,
            lr: r.lr,
            grad_norm: r.grad_norm.is_finite().then_some(r.grad_norm),
            skipped: r.skipped.is_some(),
        }
    }

    /// The JSON line, newline included.
    pub fn to_line(&self) -> String {
        // A struct of numbers and bools always serialises.
        let mut s = serde_json::to_string(self).expect("StepLog serialises");
        s.push('\n');
        s
    }
}

/// The end-of-run summary.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Steps taken by this process.
    pub steps: u64,
    /// Steps whose update was skipped.
    pub skipped: u64,
    /// Target tokens trained on by this process.
    pub tokens: usize,
    /// Training wall time.
    pub wall: Duration,
    /// Mean training loss over the last interval, and how many steps it covers.
    pub train_loss: Option<(f64, u64)>,
    /// Final validation loss (NLL per token).
    pub valid_loss: Option<f64>,
    /// Whether losses are per byte (then bits per byte are printed too).
    pub per_byte: bool,
    /// Where the final checkpoint was written.
    pub checkpoint: Option<PathBuf>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.wall.as_secs_f64();
        writeln!(
            f,
            "summary: {} steps ({} skipped), {} tokens in {:.1}s, {:.0} tokens/s",
            self.steps,
            self.skipped,
            self.tokens,
            secs,
            self.tokens as f64 / secs.max(1e-9)
        )?;
        if let Some((loss, n)) = self.train_loss {
            writeln!(
                f,
                "  final train loss {loss:.3} (mean of the last {n} steps)"
            )?;
        }
        if let Some(v) = self.valid_loss {
            write!(f, "  final valid loss {v:.3}, ppl {:.2}", v.exp())?;
            if self.per_byte {
                write!(f, ", {:.3} bits/byte", v / std::f64::consts::LN_2)?;
            }
            writeln!(f)?;
        }
        if let Some(c) = &self.checkpoint {
            writeln!(f, "  checkpoint: {}", c.display())?;
        }
        Ok(())
    }
}

/// `bytes` made safe for a terminal: UTF-8 text and newlines and tabs kept, every other control
/// character (ESC, DEL, C1 codes) and every invalid byte written as an escape (`\x1b`, `\u{9b}`).
pub fn printable(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' | '\t' => out.push(c),
                c if c.is_control() && (c as u32) < 0x80 => {
                    out.push_str(&format!("\\x{:02x}", c as u32))
                }
                c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// `text` with every line indented by `"  | "`, so a sample stands apart from the lines around it.
pub fn quoted_block(text: &str) -> String {
    text.split('\n')
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
