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
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use torchscale_core::Error as CoreError;
use torchscale_models::config::{DecoderConfig, Technique};
use torchscale_models::data::{ByteCorpus, BYTE_VOCAB};
use torchscale_models::lm::{LanguageModel, LossConfig};
use torchscale_models::train::{
    AdamWConfig, ClipMode, InverseSqrt, Schedule, Trainer, TrainerConfig,
};

pub use plot::draw;
pub use record::{Experiment, ExperimentConfig, RunRecord, StepRecord, ValidRecord};
pub use verdict::{classify, unigram_entropy, window, CurveSummary, Thresholds, Verdict};

const USAGE: &str = "usage: cargo xtask stability [--quick] [--layers N] [--dim D] [--heads H] \
[--ffn F] [--steps S] [--lr X] [--warmup W] [--batch B] [--seq T] [--clip C] \
[--techniques post-ln,pre-ln,deepnorm,subln,admin] [--seed N] [--valid-every K] \
[--corpus FILE] [--out DIR] [--threads N] [--no-progress]";

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

    /// Parses the flags after `stability` (`--quick` resets the sizes; later flags override).
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut o = Self::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |flag: &str| {
                it.next()
                    .with_context(|| format!("{flag} needs a value\n{USAGE}"))
                    .cloned()
            };
            match a.as_str() {
                "--quick" => o = Self::quick(),
                "--layers" => o.layers = count("--layers", &value(a)?)?,
                "--dim" => o.dim = count("--dim", &value(a)?)?,
                "--heads" => o.heads = count("--heads", &value(a)?)?,
                "--ffn" => o.ffn_dim = count("--ffn", &value(a)?)?,
                "--steps" => o.steps = count("--steps", &value(a)?)?,
                "--lr" => o.lr = float("--lr", &value(a)?)?,
                "--warmup" => o.warmup = value(a)?.parse().context("--warmup: not a count")?,
                "--batch" => o.batch = count("--batch", &value(a)?)?,
                "--seq" => o.seq_len = count("--seq", &value(a)?)?,
                "--clip" => o.clip = float("--clip", &value(a)?)?,
                "--seed" => o.seed = value(a)?.parse().context("--seed: not an integer")?,
                "--valid-every" => o.valid_every = count("--valid-every", &value(a)?)?,
                "--corpus" => o.corpus = PathBuf::from(value(a)?),
                "--out" => o.out = PathBuf::from(value(a)?),
                "--techniques" => {
                    o.techniques = value(a)?
                        .split(',')
                        .map(parse_technique)
                        .collect::<Result<_>>()?
                }
                "--no-progress" => o.progress = false,
                "--no-scale-embedding" => o.scale_embedding = false,
                "--threads" => o.threads = Some(count("--threads", &value(a)?)?),
                other => bail!("unknown flag `{other}`\n{USAGE}"),
            }
        }
        ensure!(!o.techniques.is_empty(), "--techniques is empty");
        ensure!(
            o.dim % o.heads == 0,
            "--heads {} must divide --dim {}",
            o.heads,
            o.dim
        );
        Ok(o)
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

fn count(flag: &str, s: &str) -> Result<usize> {
    let n: usize = s
        .trim()
        .parse()
        .with_context(|| format!("{flag}: `{s}` is not a count"))?;
    ensure!(n > 0, "{flag} must be positive");
    Ok(n)
}

fn float(flag: &str, s: &str) -> Result<f64> {
    let x: f64 = s
        .trim()
        .parse()
        .with_context(|| format!("{flag}: `{s}` is not a number"))?;
    ensure!(
        x.is_finite() && x >= 0.0,
        "{flag} must be a finite number >= 0"
    );
    Ok(x)
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
pub fn main(args: &[String]) -> Result<()> {
    let opts = StabilityOpts::parse(args)?;
    // rayon sizes its pool from RAYON_NUM_THREADS when the first parallel op runs. With the fused
    // kernels and the runs on one of rayon's workers (`in_pool`), two threads beat one on the
    // 2-core machine (40 steps of two techniques: 2.7 s against 3.6 s); before them, candle's
    // spinning barriers made one thread 4x faster, which is why `--threads` exists.
    if let Some(n) = opts.threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let start = Instant::now();
    let exp = torchscale_kernels::runtime::in_pool(|| run(&opts))?;
    print!("{}", table(&exp));
    println!(
        "wrote {} and {} in {:.0} s",
        opts.out.join("stability.json").display(),
        opts.out.join("stability.png").display(),
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
        bar.finish_with_message(format!(
            "{}: final loss {:.3}, max |g| {:.3}",
            run.summary.verdict, run.summary.final_loss, run.summary.max_grad_norm
        ));
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
