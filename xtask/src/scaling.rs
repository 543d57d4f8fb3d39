//! `cargo xtask scaling`: depth scaling of Magneto (Sub-LN) decoders, TorchScale's Figure 1a in
//! miniature. Byte-level decoders of 6, 12, 24 and 48 layers at one width are trained from the
//! same seed on the same batches (the same tokens seen), and their validation loss is measured
//! along the way; the curves go to `scaling.png` (against tokens seen, and the final loss against
//! depth), every step to `scaling.json`, and a table is printed.
//!
//! The corpus (`data/kjv.txt`, 711 kB of the King James Bible, 695 kB after the held-out lines)
//! bounds what such a run can show: the table gives the epochs each run made over the training
//! bytes and the gap between its final training and validation losses, so that over-fitting
//! shows as a finding rather than passing for a depth effect.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Result};
use clap::Parser;
use serde::{Deserialize, Serialize};
use torchscale_models::config::{DecoderConfig, Technique};
use torchscale_models::data::BYTE_VOCAB;
use torchscale_models::lm::{LanguageModel, LossConfig};
use torchscale_models::train::ClipMode;

use crate::cli::{count, non_negative};
use crate::experiment::plot::{self, Panel, Series};
use crate::experiment::{self, mib, Data, LoopPlan, PhaseTimes, Progress};
use crate::paths::{shown, workspace_root};
use crate::stability::{
    nan_as_null, parse_technique, set_threads, technique_name, window, StepRecord, ValidRecord,
};

/// The command line of `cargo xtask scaling`. `--quick` swaps in the smoke-test sizes; any other
/// flag given overrides them.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "scaling",
    about = "Depth scaling (TorchScale Figure 1a in miniature): Magneto (Sub-LN) decoders of 6, 12, \
             24 and 48 layers trained on the same tokens, validation loss curves"
)]
pub struct ScalingArgs {
    /// Smoke-test sizes: 1 and 2 layers of width 32, 4 steps of 2x16 bytes
    #[arg(long)]
    pub quick: bool,
    /// Decoder depths, comma separated [default: 6,12,24,48]
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = count)]
    pub depths: Option<Vec<usize>>,
    /// Model width [default: 64]
    #[arg(long, value_name = "D", value_parser = count)]
    pub dim: Option<usize>,
    /// Attention heads; must divide --dim [default: 4]
    #[arg(long, value_name = "H", value_parser = count)]
    pub heads: Option<usize>,
    /// FFN width [default: 256]
    #[arg(long, value_name = "F", value_parser = count)]
    pub ffn: Option<usize>,
    /// Training steps of every depth [default: 1500]
    #[arg(long, value_name = "S", value_parser = count)]
    pub steps: Option<usize>,
    /// Peak learning rate [default: 2e-3]
    #[arg(long, value_name = "X", value_parser = non_negative, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Warm-up updates of the inverse square root schedule [default: 100]
    #[arg(long, value_name = "W")]
    pub warmup: Option<u64>,
    /// Sequences per step [default: 8]
    #[arg(long, value_name = "B", value_parser = count)]
    pub batch: Option<usize>,
    /// Bytes per sequence [default: 64]
    #[arg(long, value_name = "T", value_parser = count)]
    pub seq: Option<usize>,
    /// Global-norm clipping threshold, 0 = off [default: 1]
    #[arg(long, value_name = "C", value_parser = non_negative, allow_negative_numbers = true)]
    pub clip: Option<f64>,
    /// The technique (Magneto is Sub-LN) [default: subln]
    #[arg(long, value_name = "NAME", value_parser = crate::stability::technique_arg)]
    pub technique: Option<Technique>,
    /// Seed of the initialisation and of the data order [default: 1]
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Measure the validation loss every K steps (and at the end) [default: 75]
    #[arg(long, value_name = "K", value_parser = count)]
    pub valid_every: Option<usize>,
    /// Validation batches per measurement [default: 16]
    #[arg(long, value_name = "N", value_parser = count)]
    pub valid_batches: Option<usize>,
    /// The training text [default: data/kjv.txt]
    #[arg(long, value_name = "FILE")]
    pub corpus: Option<PathBuf>,
    /// Output folder for scaling.json and scaling.png [default: target/scaling]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// CPU threads [default: RAYON_NUM_THREADS, else all cores]
    #[arg(long, value_name = "N", value_parser = count)]
    pub threads: Option<usize>,
    /// No progress bars (log lines on stderr instead)
    #[arg(long)]
    pub no_progress: bool,
    /// Redraw the figure (under --out) and reprint the table from a JSON record written
    /// earlier, without training
    #[arg(long, value_name = "JSON")]
    pub replot: Option<PathBuf>,
}

/// The settings of the scaling experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingOpts {
    /// Decoder depths, in run order.
    pub depths: Vec<usize>,
    /// Model width.
    pub dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// FFN width.
    pub ffn_dim: usize,
    /// Training steps of every depth.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up updates.
    pub warmup: u64,
    /// Sequences per step.
    pub batch: usize,
    /// Bytes per sequence.
    pub seq_len: usize,
    /// Global-norm clipping threshold (0 = off).
    pub clip: f64,
    /// The technique (display name in the record).
    #[serde(with = "technique_serde")]
    pub technique: Technique,
    /// Seed of the initialisation and of the data order.
    pub seed: u64,
    /// Validation every this many steps (and at the end).
    pub valid_every: usize,
    /// Validation batches per measurement.
    pub valid_batches: usize,
    /// The training text.
    pub corpus: PathBuf,
    /// Output folder.
    pub out: PathBuf,
    /// Draw progress bars (on a terminal).
    #[serde(skip)]
    pub progress: bool,
    /// CPU threads (None: `RAYON_NUM_THREADS`, else all cores); applied by [`main`] only.
    #[serde(skip)]
    pub threads: Option<usize>,
    /// Redraw the figure and reprint the table from this record instead of training.
    #[serde(skip)]
    pub replot: Option<PathBuf>,
}

mod technique_serde {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Technique, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(technique_name(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Technique, D::Error> {
        let s = String::deserialize(d)?;
        parse_technique(&s).map_err(serde::de::Error::custom)
    }
}

impl Default for ScalingOpts {
    /// The full run: depths 6 to 48 at width 64, 1,500 steps of 8×64 bytes (768k tokens, 1.1
    /// passes over the 695k training bytes).
    fn default() -> Self {
        Self {
            depths: vec![6, 12, 24, 48],
            dim: 64,
            heads: 4,
            ffn_dim: 256,
            steps: 1500,
            lr: 2e-3,
            warmup: 100,
            batch: 8,
            seq_len: 64,
            clip: 1.0,
            technique: Technique::SubLn,
            seed: 1,
            valid_every: 75,
            valid_batches: 16,
            corpus: workspace_root().join("data/kjv.txt"),
            out: workspace_root().join("target/scaling"),
            progress: true,
            threads: None,
            replot: None,
        }
    }
}

impl ScalingOpts {
    /// The `--quick` sizes: depths 1 and 2 of width 32, 4 steps of 2×16 bytes.
    pub fn quick() -> Self {
        Self {
            depths: vec![1, 2],
            dim: 32,
            heads: 2,
            ffn_dim: 64,
            steps: 4,
            warmup: 2,
            batch: 2,
            seq_len: 16,
            valid_every: 2,
            valid_batches: 2,
            ..Self::default()
        }
    }

    /// Parses the flags after `scaling` (see [`ScalingArgs`]).
    pub fn parse(args: &[String]) -> Result<Self> {
        crate::cli::parse_flags::<ScalingArgs>("scaling", args)?.into_opts()
    }

    /// The decoder of `layers` layers at these sizes (no dropout, learned positions, token
    /// embeddings scaled by sqrt(d) as in the stability experiment).
    pub fn decoder_config(&self, layers: usize) -> DecoderConfig {
        DecoderConfig::default()
            .with_vocab_size(BYTE_VOCAB as i64)
            .with_embed_dim(self.dim)
            .with_heads(self.heads)
            .with_ffn_dim(self.ffn_dim)
            .with_layers(layers)
            .with_max_positions(self.seq_len.max(1024))
            .with_scale_embedding(true)
            .with_technique(self.technique)
    }

    /// Tokens (target bytes) of one step.
    pub fn tokens_per_step(&self) -> usize {
        self.batch * self.seq_len
    }
}

impl ScalingArgs {
    /// The settings: the defaults (or `--quick`'s), then every flag given.
    pub fn into_opts(self) -> Result<ScalingOpts> {
        let mut o = if self.quick {
            ScalingOpts::quick()
        } else {
            ScalingOpts::default()
        };
        macro_rules! set {
            ($($field:ident <- $flag:ident),*) => {
                $(if let Some(v) = self.$flag { o.$field = v; })*
            };
        }
        set!(depths <- depths, dim <- dim, heads <- heads, ffn_dim <- ffn, steps <- steps,
             lr <- lr, warmup <- warmup, batch <- batch, seq_len <- seq, clip <- clip,
             technique <- technique, seed <- seed, valid_every <- valid_every,
             valid_batches <- valid_batches, corpus <- corpus, out <- out);
        o.threads = self.threads.or(o.threads);
        o.replot = self.replot;
        o.progress &= !self.no_progress;
        ensure!(!o.depths.is_empty(), "--depths is empty");
        ensure!(
            o.dim % o.heads == 0,
            "--heads {} must divide --dim {}",
            o.heads,
            o.dim
        );
        Ok(o)
    }
}

/// One depth's run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepthRun {
    /// Decoder layers.
    pub layers: usize,
    /// Trainable scalars.
    pub parameters: usize,
    /// Every step.
    pub steps: Vec<StepRecord>,
    /// Validation losses.
    pub valid: Vec<ValidRecord>,
    /// Why the run stopped early, if it did.
    pub stopped: Option<String>,
    /// Mean training loss of the last twentieth of the steps.
    #[serde(with = "nan_as_null")]
    pub final_train_loss: f64,
    /// The last validation loss.
    #[serde(with = "nan_as_null")]
    pub final_valid_loss: f64,
    /// The lowest validation loss and the step it was measured after.
    #[serde(with = "nan_as_null")]
    pub best_valid_loss: f64,
    /// Updates done before the best validation loss.
    pub best_valid_step: u64,
    /// Wall-clock seconds (building and validation included).
    pub seconds: f64,
    /// Peak resident memory during the run, bytes (0 if unknown).
    pub peak_rss_bytes: u64,
    /// Mean seconds per step by phase.
    pub timing: PhaseTimes,
}

/// The whole experiment, as written to `scaling.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingRecord {
    /// The settings.
    pub config: ScalingOpts,
    /// Training bytes of the corpus (after holding out the validation lines).
    pub train_bytes: usize,
    /// Tokens each run saw.
    pub tokens_seen: usize,
    /// Entropy of the byte frequencies (nats).
    pub unigram_entropy: f64,
    /// One run per depth.
    pub runs: Vec<DepthRun>,
}

impl ScalingRecord {
    /// Passes over the training bytes each run made.
    pub fn epochs(&self) -> f64 {
        self.tokens_seen as f64 / self.train_bytes.max(1) as f64
    }

    /// Writes pretty JSON to `path`.
    pub fn write(&self, path: &std::path::Path) -> Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)?)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
    }

    /// Reads a file written by [`ScalingRecord::write`].
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let s = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        Ok(serde_json::from_str(&s)?)
    }
}

/// `cargo xtask scaling [flags]`: runs, writes `scaling.json` and `scaling.png`, prints the table.
pub fn main(opts: &ScalingOpts) -> Result<ScalingRecord> {
    if let Some(json) = &opts.replot {
        let rec = ScalingRecord::read(json)?;
        let png = opts.out.join("scaling.png");
        std::fs::create_dir_all(&opts.out)?;
        draw(&rec, &png)?;
        print!("{}", table(&rec));
        println!("drew {} from {}", shown(&png), shown(json));
        return Ok(rec);
    }
    set_threads(opts.threads);
    let start = Instant::now();
    let rec = torchscale_kernels::runtime::in_pool(|| run(opts))?;
    print!("{}", table(&rec));
    println!(
        "wrote {} and {} in {:.0} s",
        shown(&opts.out.join("scaling.json")),
        shown(&opts.out.join("scaling.png")),
        start.elapsed().as_secs_f64()
    );
    Ok(rec)
}

/// Trains every depth and writes `scaling.json` and `scaling.png` to `opts.out`.
pub fn run(opts: &ScalingOpts) -> Result<ScalingRecord> {
    let data = experiment::Data::load(&opts.corpus, opts.batch, opts.seq_len, opts.valid_batches)?;
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", opts.out.display()))?;
    let progress = Progress::new(opts.progress)?;
    let tickers: Vec<_> = opts
        .depths
        .iter()
        .map(|l| progress.bar(&format!("{l} layers"), opts.steps))
        .collect();
    let mut rec = ScalingRecord {
        config: opts.clone(),
        train_bytes: data.train_bytes(),
        tokens_seen: opts.steps * opts.tokens_per_step(),
        unigram_entropy: data.unigram_entropy,
        runs: Vec::new(),
    };
    for (&layers, ticker) in opts.depths.iter().zip(&tickers) {
        let run = train_depth(opts, layers, &data, ticker)?;
        ticker.finish(format!(
            "train {:.3}, valid {:.3} (best {:.3})",
            run.final_train_loss, run.final_valid_loss, run.best_valid_loss
        ));
        rec.runs.push(run);
        rec.write(&opts.out.join("scaling.json"))?;
    }
    draw(&rec, &opts.out.join("scaling.png"))?;
    Ok(rec)
}

fn train_depth(
    opts: &ScalingOpts,
    layers: usize,
    data: &Data,
    ticker: &experiment::Ticker,
) -> Result<DepthRun> {
    let start = Instant::now();
    ticker.begin();
    let dev = candle_core::Device::Cpu;
    let lm = LanguageModel::new(opts.decoder_config(layers), opts.seed)?;
    let mut trainer = experiment::inverse_sqrt_trainer(
        &lm,
        &lm.model.expert_parameters(),
        opts.seed,
        ClipMode::GlobalNorm(opts.clip),
        opts.lr,
        opts.warmup,
    )?;
    let loss_cfg = LossConfig {
        label_smoothing: 0.0,
        moe_loss_weight: 0.0,
    };
    let out = experiment::train_loop(
        &mut trainer,
        LoopPlan {
            steps: opts.steps,
            valid_every: opts.valid_every,
        },
        ticker,
        |ctx| {
            let (i, t) = data
                .corpus
                .train_batch(opts.batch, opts.seq_len, ctx.seed, &dev)?;
            lm.micro_batch(&i, &t, true, &loss_cfg, ctx.seed)
        },
        || experiment::evaluate(&lm, &data.valid),
        |_, _| Ok(()),
    )?;
    let w = window(opts.steps);
    let tail = &out.steps[out.steps.len().saturating_sub(w)..];
    let final_train_loss = experiment::finite_mean(tail.iter().map(|s| s.loss));
    let best = out
        .valid
        .iter()
        .filter(|v| v.loss.is_finite())
        .min_by(|a, b| a.loss.total_cmp(&b.loss));
    Ok(DepthRun {
        layers,
        parameters: lm.num_parameters(),
        final_valid_loss: out.valid.last().map_or(f64::NAN, |v| v.loss),
        best_valid_loss: best.map_or(f64::NAN, |v| v.loss),
        best_valid_step: best.map_or(0, |v| v.step),
        final_train_loss,
        steps: out.steps,
        valid: out.valid,
        stopped: out.stopped,
        seconds: start.elapsed().as_secs_f64(),
        peak_rss_bytes: out.peak_rss_bytes,
        timing: out.timing,
    })
}

/// The printed table: one line per depth.
pub fn table(rec: &ScalingRecord) -> String {
    let c = &rec.config;
    let mut s = format!(
        "{} decoders, d={}, ffn={}, heads={}, {} steps of {}x{} bytes ({} tokens, {:.2} epochs of \
         {} training bytes), lr {:e}, warmup {}, clip {}, seed {}\n\
         train = mean of the last {} steps; H1 (unigram entropy) = {:.3}\n\n",
        technique_name(c.technique),
        c.dim,
        c.ffn_dim,
        c.heads,
        c.steps,
        c.batch,
        c.seq_len,
        rec.tokens_seen,
        rec.epochs(),
        rec.train_bytes,
        c.lr,
        c.warmup,
        c.clip,
        c.seed,
        window(c.steps),
        rec.unigram_entropy
    );
    s += &format!(
        "{:>6} {:>10} {:>7} {:>7} {:>7} {:>9} {:>6} {:>8} {:>7} {:>9}\n",
        "layers",
        "params",
        "train",
        "valid",
        "best",
        "at step",
        "gap",
        "seconds",
        "s/step",
        "peak MiB"
    );
    for r in &rec.runs {
        s += &format!(
            "{:>6} {:>10} {:>7.3} {:>7.3} {:>7.3} {:>9} {:>6.3} {:>8.0} {:>7.3} {:>9.0}{}\n",
            r.layers,
            r.parameters,
            r.final_train_loss,
            r.final_valid_loss,
            r.best_valid_loss,
            r.best_valid_step,
            r.final_valid_loss - r.final_train_loss,
            r.seconds,
            r.timing.step,
            mib(r.peak_rss_bytes),
            r.stopped
                .as_ref()
                .map(|w| format!("  (stopped at {w})"))
                .unwrap_or_default()
        );
    }
    s
}

/// Draws `scaling.png`: validation loss against tokens seen (thin: the smoothed training loss),
/// and the final and best validation loss against depth.
pub fn draw(rec: &ScalingRecord, path: &std::path::Path) -> Result<()> {
    let c = &rec.config;
    let tokens = c.tokens_per_step() as f64 / 1e6;
    let w = window(c.steps);
    let mut curves = Panel::new(
        "validation loss (thin: training loss, smoothed)",
        "tokens seen (millions)",
        "loss (nats per byte)",
    );
    for (i, r) in rec.runs.iter().enumerate() {
        let valid: Vec<(f64, f64)> = r
            .valid
            .iter()
            .map(|v| (v.step as f64 * tokens, v.loss))
            .collect();
        let train: Vec<(f64, f64)> = r
            .steps
            .iter()
            .map(|s| ((s.step + 1) as f64 * tokens, s.loss))
            .collect();
        curves
            .series
            .push(Series::faint(i, plot::smooth(&train, w)).width(1));
        curves.series.push(Series::new(
            format!("{} layers: {:.3}", r.layers, r.final_valid_loss),
            i,
            valid,
        ));
    }
    curves.hlines.push((
        rec.unigram_entropy,
        format!("unigram entropy {:.2}", rec.unigram_entropy),
    ));
    let mut curves = curves.fit(0.03);
    // The first measurements (near ln 260) would squash the rest: start the axis under the
    // unigram entropy plus a margin.
    curves.y.1 = curves.y.1.min(rec.unigram_entropy + 0.6);

    let mut depth = Panel::new(
        "after the last step",
        "layers",
        "validation loss (nats per byte)",
    );
    let final_pts: Vec<(f64, f64)> = rec
        .runs
        .iter()
        .map(|r| (r.layers as f64, r.final_valid_loss))
        .collect();
    let best_pts: Vec<(f64, f64)> = rec
        .runs
        .iter()
        .map(|r| (r.layers as f64, r.best_valid_loss))
        .collect();
    depth
        .series
        .push(Series::new("final", 2, final_pts).markers());
    depth
        .series
        .push(Series::new("best", 0, best_pts).dashed().width(2).markers());
    let mut depth = depth.fit(0.15);
    depth.x.0 = 0.0;
    depth.x.1 *= 1.05;
    let caption = format!(
        "{} decoders, d={}, {} steps of {}x{} bytes ({:.2} epochs of the corpus)",
        technique_name(c.technique),
        c.dim,
        c.steps,
        c.batch,
        c.seq_len,
        rec.epochs()
    );
    plot::draw(path, Some(&caption), &[curves, depth], 2, (900, 650))
}
