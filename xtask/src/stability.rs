//! `cargo xtask stability`: the DeepNet paper's convergence experiment on a byte-level language
//! model. The same deep, narrow decoder is trained with Post-LN, Pre-LN, DeepNorm, Sub-LN and
//! Admin from the same seed, on the same batches, under the same learning rate and warm-up; the
//! loss curves go to `stability.png`, every step to `stability.json`, and a table is printed.
//!
//! # Verdicts
//!
//! Let `w` = max(1, steps / 20) (the smoothing window), the *final loss* the mean training loss
//! of the last `w` steps, the *best loss* the lowest mean over any `w` consecutive steps, the
//! *initial loss* the loss of step 0 (before any update) and `H1` the entropy of the corpus's
//! byte frequencies (the loss of a model that ignores context; 3.03 nats on the KJV text,
//! against ln 260 = 5.56 for a uniform guess). A run is
//!
//! - **diverged** if it stopped early (too many non-finite steps in a row), skipped any update
//!   (non-finite loss or gradient), ends with a final loss no lower than its initial loss, or
//!   ends more than 0.5 nats above its best loss (it learned, then blew up);
//! - **stalled** otherwise, if its final loss is above `H1 − 0.1`: it learned no more than the
//!   byte frequencies;
//! - **trained** otherwise.
//!
//! # Settings
//!
//! Token embeddings are scaled by sqrt(d) (`--no-scale-embedding` turns it off). torchscale's
//! config leaves them unscaled, N(0, 1/d), next to learned positions drawn N(0, 1): token identity
//! is then an eighth of the input at d = 64, and in trial runs even 6-layer models with Post-LN
//! wiring (Post-LN, DeepNorm, Admin) sat at the unigram plateau for 150 steps, so the depth effect
//! did not show. The runs use rayon's threads (all cores unless `--threads` or `RAYON_NUM_THREADS`
//! says otherwise), see [`main`].
//!
//! The validation loss (held-out last 2% of the lines) is measured every `valid_every` steps and
//! at the end; it is reported but does not enter the verdict.

mod plot;
mod record;
mod verdict;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::Device;
use clap::Parser;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use torchscale_core::Error as CoreError;
use torchscale_models::config::{DecoderConfig, Technique};
use torchscale_models::data::{ByteCorpus, BYTE_VOCAB};
use torchscale_models::lm::{LanguageModel, LossConfig};
use torchscale_models::train::{
    AdamWConfig, ClipMode, InverseSqrt, Schedule, Trainer, TrainerConfig,
};

use crate::cli::{count, non_negative};
use crate::paths::shown;

pub use plot::draw;
pub use record::{Experiment, ExperimentConfig, RunRecord, StepRecord, ValidRecord};
pub use verdict::{classify, unigram_entropy, window, CurveSummary, Thresholds, Verdict};

/// The command line of `cargo xtask stability`. `--quick` swaps in the smoke-test sizes; any
/// other flag given overrides them, in whatever order.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "stability",
    about = "DeepNet's convergence experiment: the same deep, narrow byte-level decoder trained \
             with Post-LN, Pre-LN, DeepNorm, Sub-LN and Admin"
)]
pub struct StabilityArgs {
    /// Smoke-test sizes: 2 layers, width 32, FFN 64, 2 heads, 3 steps of 2x16 bytes
    #[arg(long)]
    pub quick: bool,
    /// Decoder layers [default: 48]
    #[arg(long, value_name = "N", value_parser = count)]
    pub layers: Option<usize>,
    /// Model width [default: 64]
    #[arg(long, value_name = "D", value_parser = count)]
    pub dim: Option<usize>,
    /// Attention heads; must divide --dim [default: 4]
    #[arg(long, value_name = "H", value_parser = count)]
    pub heads: Option<usize>,
    /// FFN width [default: 256]
    #[arg(long, value_name = "F", value_parser = count)]
    pub ffn: Option<usize>,
    /// Training steps per technique [default: 500]
    #[arg(long, value_name = "S", value_parser = count)]
    pub steps: Option<usize>,
    /// Peak learning rate [default: 3e-3]
    #[arg(long, value_name = "X", value_parser = non_negative, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Warm-up updates of the inverse square root schedule [default: 20]
    #[arg(long, value_name = "W")]
    pub warmup: Option<u64>,
    /// Sequences per step [default: 8]
    #[arg(long, value_name = "B", value_parser = count)]
    pub batch: Option<usize>,
    /// Bytes per sequence [default: 32]
    #[arg(long, value_name = "T", value_parser = count)]
    pub seq: Option<usize>,
    /// Global-norm clipping threshold, 0 = off [default: 0]
    #[arg(long, value_name = "C", value_parser = non_negative, allow_negative_numbers = true)]
    pub clip: Option<f64>,
    /// Techniques to run, in order: post-ln, pre-ln, deepnorm, subln, admin [default: all five]
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = technique_arg)]
    pub techniques: Option<Vec<Technique>>,
    /// Seed of the initialisation and of the data order [default: 1]
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Measure the validation loss every K steps (and at the end) [default: 100]
    #[arg(long, value_name = "K", value_parser = count)]
    pub valid_every: Option<usize>,
    /// The training text [default: data/kjv.txt]
    #[arg(long, value_name = "FILE")]
    pub corpus: Option<PathBuf>,
    /// Output folder for stability.json and stability.png [default: target/stability]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// CPU threads [default: RAYON_NUM_THREADS, else all cores]
    #[arg(long, value_name = "N", value_parser = count)]
    pub threads: Option<usize>,
    /// No progress bars (log lines on stderr instead)
    #[arg(long)]
    pub no_progress: bool,
    /// Leave token embeddings unscaled (torchscale's config default)
    #[arg(long)]
    pub no_scale_embedding: bool,
}

impl StabilityArgs {
    /// The settings: the defaults (or `--quick`'s), then every flag given.
    pub fn into_opts(self) -> Result<StabilityOpts> {
        let mut o = if self.quick {
            StabilityOpts::quick()
        } else {
            StabilityOpts::default()
        };
        macro_rules! set {
            ($($field:ident <- $flag:ident),*) => {
                $(if let Some(v) = self.$flag { o.$field = v; })*
            };
        }
        set!(layers <- layers, dim <- dim, heads <- heads, ffn_dim <- ffn, steps <- steps,
             lr <- lr, warmup <- warmup, batch <- batch, seq_len <- seq, clip <- clip,
             techniques <- techniques, seed <- seed, valid_every <- valid_every,
             corpus <- corpus, out <- out);
        o.threads = self.threads.or(o.threads);
        o.progress &= !self.no_progress;
        o.scale_embedding &= !self.no_scale_embedding;
        ensure!(!o.techniques.is_empty(), "--techniques is empty");
        ensure!(
            o.dim % o.heads == 0,
            "--heads {} must divide --dim {}",
            o.heads,
            o.dim
        );
        Ok(o)
    }
}

fn technique_arg(s: &str) -> Result<Technique, String> {
    parse_technique(s).map_err(|e| e.to_string())
}

/// Held-out fraction of the corpus lines.
const VALID_FRACTION: f64 = 0.02;
/// Validation batches per measurement (at most).
const VALID_BATCHES: usize = 8;
/// Non-finite steps in a row after which a run is stopped.
const MAX_SKIPS: usize = 5;

/// The settings of one experiment.
#[derive(Debug, Clone, PartialEq)]
pub struct StabilityOpts {
    /// Decoder layers.
    pub layers: usize,
    /// Model width.
    pub dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// FFN width.
    pub ffn_dim: usize,
    /// Training steps per technique.
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
    /// Techniques to run, in order.
    pub techniques: Vec<Technique>,
    /// Seed of the initialisation and of the data order.
    pub seed: u64,
    /// Validation every this many steps (and at the end).
    pub valid_every: usize,
    /// The training text.
    pub corpus: PathBuf,
    /// Output folder.
    pub out: PathBuf,
    /// Draw progress bars (on a terminal).
    pub progress: bool,
    /// Scale token embeddings by sqrt(d) (fairseq's default; torchscale's config default is off).
    pub scale_embedding: bool,
    /// CPU threads (`--threads`; None: `RAYON_NUM_THREADS`, else all cores). Only [`main`]
    /// applies it, before the first tensor op.
    pub threads: Option<usize>,
}

/// The workspace root (the parent of this crate's folder).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// All five techniques, in the table's order.
pub const ALL_TECHNIQUES: [Technique; 5] = [
    Technique::PostLn,
    Technique::PreLn,
    Technique::DeepNorm,
    Technique::SubLn,
    Technique::Admin,
];

impl Default for StabilityOpts {
    /// The experiment of the README: a 48-layer decoder of width 64, 500 steps of 8×32 bytes at
    /// lr 3e-3 after 20 warm-up updates, no clipping. Post-LN stays at the unigram plateau there
    /// while DeepNorm leaves it after about 250 steps.
    fn default() -> Self {
        Self {
            layers: 48,
            dim: 64,
            heads: 4,
            ffn_dim: 256,
            steps: 500,
            lr: 3e-3,
            warmup: 20,
            batch: 8,
            seq_len: 32,
            clip: 0.0,
            techniques: ALL_TECHNIQUES.to_vec(),
            seed: 1,
            valid_every: 100,
            corpus: workspace_root().join("data/kjv.txt"),
            out: workspace_root().join("target/stability"),
            progress: true,
            threads: None,
            scale_embedding: true,
        }
    }
}

impl StabilityOpts {
    /// The `--quick` smoke-test sizes: 2 layers, width 32, 3 steps of 2×16 bytes.
    pub fn quick() -> Self {
        Self {
            layers: 2,
            dim: 32,
            heads: 2,
            ffn_dim: 64,
            steps: 3,
            warmup: 1,
            batch: 2,
            seq_len: 16,
            valid_every: 2,
            ..Self::default()
        }
    }

    /// Parses the flags after `stability` (see [`StabilityArgs`]).
    pub fn parse(args: &[String]) -> Result<Self> {
        crate::cli::parse_flags::<StabilityArgs>("stability", args)?.into_opts()
    }

    /// The config of `technique` at these sizes (no dropout, learned positions).
    pub fn decoder_config(&self, technique: Technique) -> DecoderConfig {
        DecoderConfig::default()
            .with_vocab_size(BYTE_VOCAB as i64)
            .with_embed_dim(self.dim)
            .with_heads(self.heads)
            .with_ffn_dim(self.ffn_dim)
            .with_layers(self.layers)
            .with_max_positions(self.seq_len.max(1024))
            .with_scale_embedding(self.scale_embedding)
            .with_technique(technique)
    }
}

/// Parses a technique name (`post-ln`, `pre-ln`, `deepnorm`, `subln`, `admin`; case, `-` and
/// `_` are ignored).
pub fn parse_technique(s: &str) -> Result<Technique> {
    let key: String = s
        .chars()
        .filter(|c| *c != '-' && *c != '_')
        .collect::<String>()
        .to_lowercase();
    Ok(match key.trim() {
        "postln" | "post" => Technique::PostLn,
        "preln" | "pre" => Technique::PreLn,
        "deepnorm" | "deepnet" => Technique::DeepNorm,
        "subln" | "magneto" => Technique::SubLn,
        "admin" => Technique::Admin,
        _ => bail!("unknown technique `{s}` (post-ln, pre-ln, deepnorm, subln, admin)"),
    })
}

/// The display name of a technique.
pub fn technique_name(t: Technique) -> &'static str {
    match t {
        Technique::PostLn => "Post-LN",
        Technique::PreLn => "Pre-LN",
        Technique::DeepNorm => "DeepNorm",
        Technique::SubLn => "Sub-LN",
        Technique::Admin => "Admin",
    }
}

/// `cargo xtask stability [flags]`: runs, writes `stability.json` and `stability.png` under
/// `--out`, and prints the table.
pub fn main(opts: &StabilityOpts) -> Result<()> {
    // rayon sizes its pool from RAYON_NUM_THREADS when the first parallel op runs. With the fused
    // kernels and the runs on one of rayon's workers (`in_pool`), two threads beat one on the
    // 2-core machine (40 steps of two techniques: 2.7 s against 3.6 s); before them, candle's
    // spinning barriers made one thread 4x faster, which is why `--threads` exists.
    if let Some(n) = opts.threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let start = Instant::now();
    let exp = torchscale_kernels::runtime::in_pool(|| run(opts))?;
    print!("{}", table(&exp));
    println!(
        "wrote {} and {} in {:.0} s",
        shown(&opts.out.join("stability.json")),
        shown(&opts.out.join("stability.png")),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs every technique of `opts` and writes `stability.json` and `stability.png` to `opts.out`.
pub fn run(opts: &StabilityOpts) -> Result<Experiment> {
    let bytes = std::fs::read(&opts.corpus)
        .with_context(|| format!("reading the corpus {}", opts.corpus.display()))?;
    let corpus = ByteCorpus::from_text(&String::from_utf8_lossy(&bytes), VALID_FRACTION)?;
    let thresholds = Thresholds::new(unigram_entropy(&bytes));
    let dev = Device::Cpu;
    let valid = corpus.valid_batches(opts.batch, opts.seq_len, VALID_BATCHES, &dev)?;
    ensure!(
        !valid.is_empty(),
        "the validation split holds no batch of {}×{} bytes",
        opts.batch,
        opts.seq_len
    );
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;

    let multi = MultiProgress::with_draw_target(if opts.progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template(
        "{prefix:>9} [{bar:30}] {pos:>4}/{len} {elapsed_precise} {msg}",
    )?
    .progress_chars("=> ");
    let bars: Vec<ProgressBar> = opts
        .techniques
        .iter()
        .map(|&t| {
            let b = multi.add(ProgressBar::new(opts.steps as u64));
            b.set_style(style.clone());
            b.set_prefix(technique_name(t));
            b
        })
        .collect();

    let config = ExperimentConfig {
        layers: opts.layers,
        dim: opts.dim,
        heads: opts.heads,
        ffn_dim: opts.ffn_dim,
        steps: opts.steps,
        lr: opts.lr,
        warmup: opts.warmup,
        batch: opts.batch,
        seq_len: opts.seq_len,
        seed: opts.seed,
        clip: opts.clip,
        betas: (AdamWConfig::default().beta1, AdamWConfig::default().beta2),
        scale_embedding: opts.scale_embedding,
        valid_every: opts.valid_every,
        corpus: opts.corpus.display().to_string(),
        thresholds,
        techniques: opts
            .techniques
            .iter()
            .map(|&t| technique_name(t).to_string())
            .collect(),
    };
    let mut exp = Experiment {
        config,
        runs: Vec::new(),
    };
    for (&t, bar) in opts.techniques.iter().zip(&bars) {
        let run = train_one(opts, t, &corpus, &valid, &thresholds, bar)?;
        let done = format!(
            "{}: final loss {:.3}, max |g| {:.3}",
            run.summary.verdict, run.summary.final_loss, run.summary.max_grad_norm
        );
        if bar.is_hidden() {
            tracing::info!("{} {done} ({:.1} s)", technique_name(t), run.seconds);
        }
        bar.finish_with_message(done);
        exp.runs.push(run);
        // Written after every run so that an interrupted experiment leaves what it did.
        exp.write(&opts.out.join("stability.json"))?;
    }
    draw(&exp, &opts.out.join("stability.png"))?;
    Ok(exp)
}

/// Trains one technique.
fn train_one(
    opts: &StabilityOpts,
    technique: Technique,
    corpus: &ByteCorpus,
    valid: &[(candle_core::Tensor, candle_core::Tensor)],
    thresholds: &Thresholds,
    bar: &ProgressBar,
) -> Result<RunRecord> {
    let start = Instant::now();
    let dev = Device::Cpu;
    let lm = LanguageModel::new(opts.decoder_config(technique), opts.seed)?;
    let mut trainer = Trainer::new(
        &lm.store,
        &lm.model.expert_parameters(),
        TrainerConfig {
            seed: opts.seed,
            clip: ClipMode::GlobalNorm(opts.clip),
            max_consecutive_skips: MAX_SKIPS,
        },
        AdamWConfig {
            lr: opts.lr,
            ..AdamWConfig::default()
        },
        Schedule::InverseSqrt(InverseSqrt::new(opts.lr, opts.warmup)),
    )?;
    let loss_cfg = LossConfig {
        label_smoothing: 0.0,
        moe_loss_weight: 0.0,
    };
    let mut steps = Vec::with_capacity(opts.steps);
    let mut valid_log = Vec::new();
    let mut stopped = None;
    let log_every = (opts.steps / 10).max(1);
    for s in 0..opts.steps {
        let result = trainer.step(1, |ctx| {
            let (i, t) = corpus.train_batch(opts.batch, opts.seq_len, ctx.seed, &dev)?;
            lm.micro_batch(&i, &t, true, &loss_cfg, ctx.seed)
        });
        let r = match result {
            Ok(r) => r,
            Err(CoreError::NonFinite { what }) => {
                stopped = Some(format!("step {s}: {what}"));
                break;
            }
            Err(e) => return Err(e.into()),
        };
        steps.push(StepRecord {
            step: r.step,
            loss: r.nll,
            lr: r.lr,
            grad_norm: r.grad_norm,
            skipped: r.skipped.is_some(),
        });
        bar.inc(1);
        bar.set_message(format!("loss {:.3} |g| {:.3}", r.nll, r.grad_norm));
        let done = s + 1;
        // Without bars (no terminal, --no-progress) a log line every tenth of the run instead.
        if bar.is_hidden() && (done % log_every == 0 || done == opts.steps) {
            let recent = &steps[steps.len().saturating_sub(log_every)..];
            let mean = recent.iter().map(|s| s.loss).sum::<f64>() / recent.len() as f64;
            tracing::info!(
                "{} step {done}/{}: loss {mean:.3} (mean of {}), lr {:.2e}, |g| {:.3}, {:.1} s",
                technique_name(technique),
                opts.steps,
                recent.len(),
                r.lr,
                r.grad_norm,
                start.elapsed().as_secs_f64()
            );
        }
        if done % opts.valid_every == 0 && done < opts.steps {
            valid_log.push(ValidRecord {
                step: trainer.num_updates(),
                loss: evaluate(&lm, valid)?,
            });
        }
    }
    valid_log.push(ValidRecord {
        step: trainer.num_updates(),
        loss: evaluate(&lm, valid)?,
    });
    let losses: Vec<f64> = steps.iter().map(|s| s.loss).collect();
    let norms: Vec<f64> = steps.iter().map(|s| s.grad_norm).collect();
    let skipped = steps.iter().filter(|s| s.skipped).count();
    let summary = classify(&losses, &norms, skipped, opts.steps, thresholds);
    Ok(RunRecord {
        technique: technique_name(technique).to_string(),
        parameters: lm.num_parameters(),
        steps,
        valid: valid_log,
        stopped,
        summary,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Validation NLL per byte; a diverged model's non-finite evaluation is recorded as NaN.
fn evaluate(
    lm: &LanguageModel,
    valid: &[(candle_core::Tensor, candle_core::Tensor)],
) -> Result<f64> {
    match lm.evaluate(valid) {
        Ok(v) => Ok(v),
        Err(CoreError::NonFinite { .. }) => Ok(f64::NAN),
        Err(e) => Err(e.into()),
    }
}

/// The printed table: one line per run.
pub fn table(exp: &Experiment) -> String {
    let c = &exp.config;
    let mut s = format!(
        "{} layers, d={}, ffn={}, heads={}, {} steps of {}x{} bytes, lr {:e}, warmup {}, clip {}, seed {}\n\
         final = mean of the last {} steps; H1 (unigram entropy) = {:.3}, ln 260 = {:.3}\n\n",
        c.layers,
        c.dim,
        c.ffn_dim,
        c.heads,
        c.steps,
        c.batch,
        c.seq_len,
        c.lr,
        c.warmup,
        c.clip,
        c.seed,
        window(c.steps),
        c.thresholds.unigram_entropy,
        (BYTE_VOCAB as f64).ln()
    );
    s += &format!(
        "{:<9} {:>7} {:>7} {:>7} {:>7} {:>10} {:>7} {:>7}  {}\n",
        "technique",
        "initial",
        "final",
        "best",
        "valid",
        "max |g|",
        "skipped",
        "seconds",
        "verdict"
    );
    for r in &exp.runs {
        let m = &r.summary;
        s += &format!(
            "{:<9} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>10.3} {:>7} {:>7.0}  {}{}\n",
            r.technique,
            m.initial_loss,
            m.final_loss,
            m.best_loss,
            r.final_valid_loss(),
            m.max_grad_norm,
            m.skipped,
            r.seconds,
            m.verdict,
            r.stopped
                .as_ref()
                .map(|w| format!(" (stopped at {w})"))
                .unwrap_or_default()
        );
    }
    s
}
