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
//!
//! `cargo xtask deepnet` ([`crate::deepnet`]) is this experiment at 1,000 layers: the same code
//! with other defaults, and `deepnet.json` / `deepnet.png` for names.

mod plot;
mod record;
mod verdict;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Result};
use torchscale_models::config::{DecoderConfig, Technique};
use torchscale_models::data::BYTE_VOCAB;
use torchscale_models::lm::{LanguageModel, LossConfig};
use torchscale_models::train::{AdamWConfig, ClipMode};

use crate::experiment::{self, mib, Data, LoopPlan, Progress};
use crate::paths::{shown, workspace_root};

pub use plot::draw;
pub(crate) use record::nan_as_null;
pub use record::{Experiment, ExperimentConfig, RunRecord, StepRecord, ValidRecord};
pub use verdict::{classify, unigram_entropy, window, CurveSummary, Thresholds, Verdict};

/// Defines the command line of a technique-comparison experiment (`stability`, `deepnet`): the
/// same flags, with each command's defaults in its help. `--quick` swaps in the smoke-test sizes;
/// any other flag given overrides them, in whatever order.
macro_rules! technique_flags {
    (
        $(#[$meta:meta])*
        $name:ident, quick: $quick:literal, layers: $layers:literal, dim: $dim:literal,
        heads: $heads:literal, ffn: $ffn:literal, steps: $steps:literal, lr: $lr:literal,
        warmup: $warmup:literal, batch: $batch:literal, seq: $seq:literal,
        techniques: $techniques:literal, valid_every: $valid_every:literal, out: $out:literal
    ) => {
        #[derive(Debug, Clone, ::clap::Parser)]
        $(#[$meta])*
        pub struct $name {
            #[arg(long, help = concat!("Smoke-test sizes: ", $quick))]
            pub quick: bool,
            #[arg(long, value_name = "N", value_parser = $crate::cli::count,
                  help = concat!("Decoder layers [default: ", $layers, "]"))]
            pub layers: Option<usize>,
            #[arg(long, value_name = "D", value_parser = $crate::cli::count,
                  help = concat!("Model width [default: ", $dim, "]"))]
            pub dim: Option<usize>,
            #[arg(long, value_name = "H", value_parser = $crate::cli::count,
                  help = concat!("Attention heads; must divide --dim [default: ", $heads, "]"))]
            pub heads: Option<usize>,
            #[arg(long, value_name = "F", value_parser = $crate::cli::count,
                  help = concat!("FFN width [default: ", $ffn, "]"))]
            pub ffn: Option<usize>,
            #[arg(long, value_name = "S", value_parser = $crate::cli::count,
                  help = concat!("Training steps per technique [default: ", $steps, "]"))]
            pub steps: Option<usize>,
            #[arg(long, value_name = "X", value_parser = $crate::cli::non_negative,
                  allow_negative_numbers = true,
                  help = concat!("Peak learning rate [default: ", $lr, "]"))]
            pub lr: Option<f64>,
            #[arg(long, value_name = "W", help = concat!(
                "Warm-up updates of the inverse square root schedule [default: ", $warmup, "]"))]
            pub warmup: Option<u64>,
            #[arg(long, value_name = "B", value_parser = $crate::cli::count,
                  help = concat!("Sequences per step [default: ", $batch, "]"))]
            pub batch: Option<usize>,
            #[arg(long, value_name = "T", value_parser = $crate::cli::count,
                  help = concat!("Bytes per sequence [default: ", $seq, "]"))]
            pub seq: Option<usize>,
            /// Global-norm clipping threshold, 0 = off [default: 0]
            #[arg(long, value_name = "C", value_parser = $crate::cli::non_negative,
                  allow_negative_numbers = true)]
            pub clip: Option<f64>,
            #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = $crate::stability::technique_arg,
                  help = concat!("Techniques to run, in order: post-ln, pre-ln, deepnorm, subln, \
                                  admin [default: ", $techniques, "]"))]
            pub techniques: Option<Vec<::torchscale_models::config::Technique>>,
            /// Seed of the initialisation and of the data order [default: 1]
            #[arg(long, value_name = "N")]
            pub seed: Option<u64>,
            #[arg(long, value_name = "K", value_parser = $crate::cli::count, help = concat!(
                "Measure the validation loss every K steps (and at the end) [default: ",
                $valid_every, "]"))]
            pub valid_every: Option<usize>,
            /// The training text [default: data/kjv.txt]
            #[arg(long, value_name = "FILE")]
            pub corpus: Option<::std::path::PathBuf>,
            #[arg(long, value_name = "DIR",
                  help = concat!("Output folder for the JSON and the PNG [default: ", $out, "]"))]
            pub out: Option<::std::path::PathBuf>,
            /// CPU threads [default: RAYON_NUM_THREADS, else all cores]
            #[arg(long, value_name = "N", value_parser = $crate::cli::count)]
            pub threads: Option<usize>,
            /// No progress bars (log lines on stderr instead)
            #[arg(long)]
            pub no_progress: bool,
            /// Leave token embeddings unscaled (torchscale's config default)
            #[arg(long)]
            pub no_scale_embedding: bool,
            /// Activation checkpointing: keep one input per segment of K layers and recompute the
            /// segment in the backward pass [default: off]
            #[arg(long, value_name = "K", value_parser = $crate::cli::count)]
            pub checkpoint_activations: Option<usize>,
            /// Redraw the figure (under --out) and reprint the tables from a JSON record written
            /// earlier, without training
            #[arg(long, value_name = "JSON")]
            pub replot: Option<::std::path::PathBuf>,
        }

        impl $name {
            /// The flags, for [`StabilityOpts::with_flags`].
            pub fn flags(self) -> $crate::stability::TechniqueFlags {
                $crate::stability::TechniqueFlags {
                    quick: self.quick,
                    layers: self.layers,
                    dim: self.dim,
                    heads: self.heads,
                    ffn: self.ffn,
                    steps: self.steps,
                    lr: self.lr,
                    warmup: self.warmup,
                    batch: self.batch,
                    seq: self.seq,
                    clip: self.clip,
                    techniques: self.techniques,
                    seed: self.seed,
                    valid_every: self.valid_every,
                    corpus: self.corpus,
                    out: self.out,
                    threads: self.threads,
                    no_progress: self.no_progress,
                    no_scale_embedding: self.no_scale_embedding,
                    checkpoint_activations: self.checkpoint_activations,
                    replot: self.replot,
                }
            }
        }
    };
}
pub(crate) use technique_flags;

technique_flags!(
    /// The command line of `cargo xtask stability`.
    #[command(
        name = "stability",
        about = "DeepNet's convergence experiment: the same deep, narrow byte-level decoder trained \
                 with Post-LN, Pre-LN, DeepNorm, Sub-LN and Admin"
    )]
    StabilityArgs,
    quick: "2 layers, width 32, FFN 64, 2 heads, 3 steps of 2x16 bytes",
    layers: "48", dim: "64", heads: "4", ffn: "256", steps: "500", lr: "3e-3", warmup: "20",
    batch: "8", seq: "32", techniques: "all five", valid_every: "100",
    out: "target/stability"
);

impl StabilityArgs {
    /// The settings: the defaults (or `--quick`'s), then every flag given.
    pub fn into_opts(self) -> Result<StabilityOpts> {
        StabilityOpts::with_flags(
            StabilityOpts::default(),
            StabilityOpts::quick(),
            self.flags(),
        )
    }
}

/// The flags of a technique-comparison command, whichever it is (see `technique_flags!`).
#[derive(Debug, Clone, Default)]
pub struct TechniqueFlags {
    pub quick: bool,
    pub layers: Option<usize>,
    pub dim: Option<usize>,
    pub heads: Option<usize>,
    pub ffn: Option<usize>,
    pub steps: Option<usize>,
    pub lr: Option<f64>,
    pub warmup: Option<u64>,
    pub batch: Option<usize>,
    pub seq: Option<usize>,
    pub clip: Option<f64>,
    pub techniques: Option<Vec<Technique>>,
    pub seed: Option<u64>,
    pub valid_every: Option<usize>,
    pub corpus: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub threads: Option<usize>,
    pub no_progress: bool,
    pub no_scale_embedding: bool,
    pub checkpoint_activations: Option<usize>,
    pub replot: Option<PathBuf>,
}

/// `--techniques`' parser.
pub fn technique_arg(s: &str) -> Result<Technique, String> {
    parse_technique(s).map_err(|e| e.to_string())
}

/// The settings of one experiment.
#[derive(Debug, Clone, PartialEq)]
pub struct StabilityOpts {
    /// The experiment's name: `stability` or `deepnet` (the names of its JSON and PNG files).
    pub experiment: String,
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
    /// Validation batches per measurement (at most).
    pub valid_batches: usize,
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
    /// Activation checkpointing: layers per recomputed segment (None: off).
    pub checkpoint_activations: Option<usize>,
    /// Redraw the figure and reprint the table from this record instead of training.
    pub replot: Option<PathBuf>,
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
            experiment: "stability".into(),
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
            valid_batches: 8,
            corpus: workspace_root().join("data/kjv.txt"),
            out: workspace_root().join("target/stability"),
            progress: true,
            threads: None,
            scale_embedding: true,
            checkpoint_activations: None,
            replot: None,
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

    /// `base` (or `quick` with `--quick`), then every flag given.
    pub fn with_flags(base: Self, quick: Self, f: TechniqueFlags) -> Result<Self> {
        let mut o = if f.quick { quick } else { base };
        macro_rules! set {
            ($($field:ident <- $flag:ident),*) => {
                $(if let Some(v) = f.$flag { o.$field = v; })*
            };
        }
        set!(layers <- layers, dim <- dim, heads <- heads, ffn_dim <- ffn, steps <- steps,
             lr <- lr, warmup <- warmup, batch <- batch, seq_len <- seq, clip <- clip,
             techniques <- techniques, seed <- seed, valid_every <- valid_every,
             corpus <- corpus, out <- out);
        o.threads = f.threads.or(o.threads);
        o.checkpoint_activations = f.checkpoint_activations.or(o.checkpoint_activations);
        o.replot = f.replot.or(o.replot);
        o.progress &= !f.no_progress;
        o.scale_embedding &= !f.no_scale_embedding;
        ensure!(!o.techniques.is_empty(), "--techniques is empty");
        ensure!(
            o.dim % o.heads == 0,
            "--heads {} must divide --dim {}",
            o.heads,
            o.dim
        );
        Ok(o)
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

    /// The JSON record's path.
    pub fn json_path(&self) -> PathBuf {
        self.out.join(format!("{}.json", self.experiment))
    }

    /// The figure's path.
    pub fn png_path(&self) -> PathBuf {
        self.out.join(format!("{}.png", self.experiment))
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

/// Sets the rayon pool's size from `threads` (None: leave it to `RAYON_NUM_THREADS` or the core
/// count). rayon sizes its pool when the first parallel op runs, so call this first.
///
/// With the fused kernels and the runs on one of rayon's workers (`in_pool`), two threads beat one
/// on the 2-core machine (40 steps of two techniques: 2.7 s against 3.6 s); before them, candle's
/// spinning barriers made one thread 4x faster, which is why `--threads` exists.
pub fn set_threads(threads: Option<usize>) {
    if let Some(n) = threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// `cargo xtask stability [flags]` (and `deepnet`): runs, writes the JSON and the PNG under
/// `--out`, and prints the table.
pub fn main(opts: &StabilityOpts) -> Result<Experiment> {
    if let Some(json) = &opts.replot {
        let exp = Experiment::read(json)?;
        std::fs::create_dir_all(&opts.out)?;
        draw(&exp, &opts.png_path())?;
        print!("{}", table(&exp));
        println!("drew {} from {}", shown(&opts.png_path()), shown(json));
        return Ok(exp);
    }
    set_threads(opts.threads);
    let start = Instant::now();
    let exp = torchscale_kernels::runtime::in_pool(|| run(opts))?;
    print!("{}", table(&exp));
    println!(
        "wrote {} and {} in {:.0} s",
        shown(&opts.json_path()),
        shown(&opts.png_path()),
        start.elapsed().as_secs_f64()
    );
    Ok(exp)
}

/// Runs every technique of `opts` and writes the JSON and the PNG to `opts.out`.
pub fn run(opts: &StabilityOpts) -> Result<Experiment> {
    let data = Data::load(&opts.corpus, opts.batch, opts.seq_len, opts.valid_batches)?;
    let thresholds = Thresholds::new(data.unigram_entropy);
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", opts.out.display()))?;
    let progress = Progress::new(opts.progress)?;
    let tickers: Vec<_> = opts
        .techniques
        .iter()
        .map(|&t| progress.bar(technique_name(t), opts.steps))
        .collect();

    let config = ExperimentConfig {
        experiment: opts.experiment.clone(),
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
        corpus: data.path.clone(),
        thresholds,
        techniques: opts
            .techniques
            .iter()
            .map(|&t| technique_name(t).to_string())
            .collect(),
        checkpoint_activations: opts.checkpoint_activations,
        threads: rayon_threads(),
    };
    let mut exp = Experiment {
        config,
        runs: Vec::new(),
    };
    for (&t, ticker) in opts.techniques.iter().zip(&tickers) {
        let run = train_one(opts, t, &data, &thresholds, ticker)?;
        ticker.finish(format!(
            "{}: final loss {:.3}, max |g| {:.3}",
            run.summary.verdict, run.summary.final_loss, run.summary.max_grad_norm
        ));
        exp.runs.push(run);
        // Written after every run so that an interrupted experiment leaves what it did.
        exp.write(&opts.json_path())?;
    }
    draw(&exp, &opts.png_path())?;
    Ok(exp)
}

/// Threads of rayon's pool, as rayon sizes it: `RAYON_NUM_THREADS`, else the cores available.
pub fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Trains one technique.
fn train_one(
    opts: &StabilityOpts,
    technique: Technique,
    data: &Data,
    thresholds: &Thresholds,
    ticker: &experiment::Ticker,
) -> Result<RunRecord> {
    let start = Instant::now();
    ticker.begin();
    let dev = candle_core::Device::Cpu;
    let lm = LanguageModel::new(opts.decoder_config(technique), opts.seed)?;
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
    let built = start.elapsed().as_secs_f64();
    if ticker.logs() {
        tracing::info!(
            "{}: {} parameters, built in {built:.1} s",
            technique_name(technique),
            lm.num_parameters()
        );
    }
    let plan = LoopPlan {
        steps: opts.steps,
        valid_every: opts.valid_every,
    };
    let out = experiment::train_loop(
        &mut trainer,
        plan,
        ticker,
        |ctx| {
            let (i, t) = data
                .corpus
                .train_batch(opts.batch, opts.seq_len, ctx.seed, &dev)?;
            match opts.checkpoint_activations {
                Some(k) => lm.micro_batch_checkpointed(&i, &t, true, &loss_cfg, ctx.seed, k),
                None => lm.micro_batch(&i, &t, true, &loss_cfg, ctx.seed),
            }
        },
        || experiment::evaluate(&lm, &data.valid),
        |_, _| Ok(()),
    )?;
    let losses: Vec<f64> = out.steps.iter().map(|s| s.loss).collect();
    let norms: Vec<f64> = out.steps.iter().map(|s| s.grad_norm).collect();
    let skipped = out.steps.iter().filter(|s| s.skipped).count();
    let summary = classify(&losses, &norms, skipped, opts.steps, thresholds);
    Ok(RunRecord {
        technique: technique_name(technique).to_string(),
        parameters: lm.num_parameters(),
        steps: out.steps,
        valid: out.valid,
        stopped: out.stopped,
        summary,
        seconds: start.elapsed().as_secs_f64(),
        peak_rss_bytes: out.peak_rss_bytes,
        timing: Some(out.timing),
    })
}

/// The printed table: one line per run.
pub fn table(exp: &Experiment) -> String {
    let c = &exp.config;
    let mut s = format!(
        "{} layers, d={}, ffn={}, heads={}, {} steps of {}x{} bytes, lr {:e}, warmup {}, clip {}, seed {}{}\n\
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
        c.checkpoint_activations
            .map(|k| format!(", checkpointing every {k} layers"))
            .unwrap_or_default(),
        window(c.steps),
        c.thresholds.unigram_entropy,
        (BYTE_VOCAB as f64).ln()
    );
    s += &format!(
        "{:<9} {:>7} {:>7} {:>7} {:>7} {:>10} {:>7} {:>7} {:>7} {:>9}  {}\n",
        "technique",
        "initial",
        "final",
        "best",
        "valid",
        "max |g|",
        "skipped",
        "seconds",
        "s/step",
        "peak MiB",
        "verdict"
    );
    for r in &exp.runs {
        let m = &r.summary;
        let per_step = r.timing.map_or(f64::NAN, |t| t.step);
        s += &format!(
            "{:<9} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>10.3} {:>7} {:>7.0} {:>7.3} {:>9.0}  {}{}\n",
            r.technique,
            m.initial_loss,
            m.final_loss,
            m.best_loss,
            r.final_valid_loss(),
            m.max_grad_norm,
            m.skipped,
            r.seconds,
            per_step,
            mib(r.peak_rss_bytes),
            m.verdict,
            r.stopped
                .as_ref()
                .map(|w| format!(" (stopped at {w})"))
                .unwrap_or_default()
        );
    }
    s
}

/// The phase table: mean seconds per step in forward, backward, clipping, the optimizer and the
/// rest, per run (the backward, clipping and optimizer columns need `cargo xtask`'s timing
/// layer; without it they read NaN).
pub fn phase_table(exp: &Experiment) -> String {
    let mut s = format!(
        "{:<9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
        "technique", "step", "forward", "backward", "clip", "adamw", "other"
    );
    for r in &exp.runs {
        if let Some(t) = r.timing {
            s += &format!(
                "{:<9} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}\n",
                r.technique, t.step, t.forward, t.backward, t.clip, t.optimizer, t.other
            );
        }
    }
    s
}
