//! `cargo xtask sparseclip`: SparseClip against vanilla global-norm clipping, TorchScale's Figures
//! 3 and 4 in miniature. A dense byte-level decoder and X-MoE decoders with 8, 32 and 64 experts
//! are each trained twice from the same seed on the same batches, once with vanilla clipping
//! (`ClipMode::GlobalNorm`) and once with SparseClip (`ClipMode::SparseClip`) at the same
//! threshold. Every step records the loss, the gradient norm as the run's clipper measures it, the
//! clipping coefficient, and the routing entropy of the MoE layers (mean over layers of the mean
//! gate entropy per token, `RoutingStats::entropy`); the validation loss is measured along the
//! way. `sparseclip.json` holds every step, `sparseclip.png` the curves (validation loss, routing
//! entropy over ln E, clipped steps, gradient norm), and a table is printed.
//!
//! Vanilla clipping counts every expert's gradient in the global norm, so the norm grows with the
//! number of experts and a fixed threshold clips the dense parameters harder the more experts
//! there are; SparseClip weighs expert gradients by 1/E in the norm. For the dense model the two
//! are the same computation (its two runs must agree to the last bit).
//!
//! In one process with the gradient divided by the global token count, as here, the expert
//! gradients make up a small and shrinking share of the squared norm (at the default sizes, step
//! 0: 2.8%, 1.2% and 0.9% with 8, 32 and 64 experts), so the two methods end within 0.01 nats
//! of each other; README.md ("More experiments") has the run.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use clap::Parser;
use serde::{Deserialize, Serialize};
use torchscale_core::RoutingStats;
use torchscale_models::config::{DecoderConfig, Technique};
use torchscale_models::data::{BYTE_VOCAB, PAD};
use torchscale_models::lm::LanguageModel;
use torchscale_models::train::{
    label_smoothed_cross_entropy, moe_balance_loss, AuxCombine, ClipMode, MicroBatch,
};
use torchscale_models::DecoderInputs;

use crate::cli::{count, non_negative};
use crate::experiment::plot::{self, Panel, Series};
use crate::experiment::{self, mib, Data, LoopPlan, PhaseTimes, Progress};
use crate::paths::{shown, workspace_root};
use crate::stability::{nan_as_null, set_threads, window, StepRecord, ValidRecord};

/// The command line of `cargo xtask sparseclip`. `--quick` swaps in the smoke-test sizes; any
/// other flag given overrides them.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "sparseclip",
    about = "SparseClip against vanilla global-norm clipping (TorchScale Figures 3 and 4 in \
             miniature): a dense decoder and X-MoE decoders of 8, 32 and 64 experts"
)]
pub struct SparseclipArgs {
    /// Smoke-test sizes: 2 layers of width 32, 4 experts, 4 steps of 2x16 bytes
    #[arg(long)]
    pub quick: bool,
    /// Expert counts of the MoE models, comma separated (a dense model always runs first)
    /// [default: 8,32,64]
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = count)]
    pub experts: Option<Vec<usize>>,
    /// Decoder layers [default: 4]
    #[arg(long, value_name = "N", value_parser = count)]
    pub layers: Option<usize>,
    /// Every K-th layer is an MoE layer [default: 2]
    #[arg(long, value_name = "K", value_parser = count)]
    pub moe_freq: Option<usize>,
    /// Model width [default: 64]
    #[arg(long, value_name = "D", value_parser = count)]
    pub dim: Option<usize>,
    /// Attention heads; must divide --dim [default: 4]
    #[arg(long, value_name = "H", value_parser = count)]
    pub heads: Option<usize>,
    /// FFN width, of the dense layers and of each expert [default: 128]
    #[arg(long, value_name = "F", value_parser = count)]
    pub ffn: Option<usize>,
    /// Training steps of every run [default: 1200]
    #[arg(long, value_name = "S", value_parser = count)]
    pub steps: Option<usize>,
    /// Peak learning rate [default: 3e-3]
    #[arg(long, value_name = "X", value_parser = non_negative, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Warm-up updates of the inverse square root schedule [default: 50]
    #[arg(long, value_name = "W")]
    pub warmup: Option<u64>,
    /// Sequences per step [default: 16]
    #[arg(long, value_name = "B", value_parser = count)]
    pub batch: Option<usize>,
    /// Bytes per sequence [default: 64]
    #[arg(long, value_name = "T", value_parser = count)]
    pub seq: Option<usize>,
    /// The clipping threshold of both methods [default: 0.5]
    #[arg(long, value_name = "C", value_parser = non_negative, allow_negative_numbers = true)]
    pub clip: Option<f64>,
    /// Weight of the MoE balance loss [default: 0.01]
    #[arg(long, value_name = "W", value_parser = non_negative, allow_negative_numbers = true)]
    pub moe_loss_weight: Option<f64>,
    /// Seed of the initialisation and of the data order [default: 1]
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Measure the validation loss every K steps (and at the end) [default: 50]
    #[arg(long, value_name = "K", value_parser = count)]
    pub valid_every: Option<usize>,
    /// Validation batches per measurement [default: 8]
    #[arg(long, value_name = "N", value_parser = count)]
    pub valid_batches: Option<usize>,
    /// The training text [default: data/kjv.txt]
    #[arg(long, value_name = "FILE")]
    pub corpus: Option<PathBuf>,
    /// Output folder for sparseclip.json and sparseclip.png [default: target/sparseclip]
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

/// The settings of the experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SparseclipOpts {
    /// Expert counts of the MoE models (the dense model runs first in any case).
    pub experts: Vec<usize>,
    /// Decoder layers.
    pub layers: usize,
    /// Every `moe_freq`-th layer is an MoE layer.
    pub moe_freq: usize,
    /// Model width.
    pub dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// FFN width (dense layers and each expert).
    pub ffn_dim: usize,
    /// Training steps of every run.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up updates.
    pub warmup: u64,
    /// Sequences per step.
    pub batch: usize,
    /// Bytes per sequence.
    pub seq_len: usize,
    /// The clipping threshold of both methods.
    pub clip: f64,
    /// Weight of the MoE balance loss.
    pub moe_loss_weight: f64,
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

impl Default for SparseclipOpts {
    /// The full run: 4 Pre-LN layers of width 64, every other one X-MoE, 1,200 steps of 16×64 bytes
    /// at lr 3e-3, both methods clipping at 0.5.
    fn default() -> Self {
        Self {
            experts: vec![8, 32, 64],
            layers: 4,
            moe_freq: 2,
            dim: 64,
            heads: 4,
            ffn_dim: 128,
            steps: 1200,
            lr: 3e-3,
            warmup: 50,
            batch: 16,
            seq_len: 64,
            clip: 0.5,
            moe_loss_weight: 0.01,
            seed: 1,
            valid_every: 50,
            valid_batches: 8,
            corpus: workspace_root().join("data/kjv.txt"),
            out: workspace_root().join("target/sparseclip"),
            progress: true,
            threads: None,
            replot: None,
        }
    }
}

impl SparseclipOpts {
    /// The `--quick` sizes: 2 layers of width 32 (the second with 4 experts), 4 steps of 2×16
    /// bytes.
    pub fn quick() -> Self {
        Self {
            experts: vec![4],
            layers: 2,
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

    /// Parses the flags after `sparseclip` (see [`SparseclipArgs`]).
    pub fn parse(args: &[String]) -> Result<Self> {
        crate::cli::parse_flags::<SparseclipArgs>("sparseclip", args)?.into_opts()
    }

    /// The decoder with `experts` experts per MoE layer (0: dense): Pre-LN, X-MoE routing (top-2,
    /// every second expert kept, capacity routing), no dropout, token embeddings scaled by sqrt(d).
    pub fn decoder_config(&self, experts: usize) -> DecoderConfig {
        let c = DecoderConfig::default()
            .with_vocab_size(BYTE_VOCAB as i64)
            .with_embed_dim(self.dim)
            .with_heads(self.heads)
            .with_ffn_dim(self.ffn_dim)
            .with_layers(self.layers)
            .with_max_positions(self.seq_len.max(1024))
            .with_scale_embedding(true)
            .with_technique(Technique::PreLn);
        if experts == 0 {
            c
        } else {
            c.with_moe(self.moe_freq, experts)
                .with_xmoe(true)
                .with_moe_second_expert_policy("all")
        }
    }

    /// The runs, in order: (experts, clip mode), the dense model (0 experts) first.
    pub fn runs(&self) -> Vec<(usize, ClipMode)> {
        std::iter::once(0)
            .chain(self.experts.iter().copied())
            .flat_map(|e| {
                [
                    (e, ClipMode::GlobalNorm(self.clip)),
                    (
                        e,
                        ClipMode::SparseClip {
                            max_norm: self.clip,
                            num_experts: e.max(1),
                        },
                    ),
                ]
            })
            .collect()
    }
}

impl SparseclipArgs {
    /// The settings: the defaults (or `--quick`'s), then every flag given.
    pub fn into_opts(self) -> Result<SparseclipOpts> {
        let mut o = if self.quick {
            SparseclipOpts::quick()
        } else {
            SparseclipOpts::default()
        };
        macro_rules! set {
            ($($field:ident <- $flag:ident),*) => {
                $(if let Some(v) = self.$flag { o.$field = v; })*
            };
        }
        set!(experts <- experts, layers <- layers, moe_freq <- moe_freq, dim <- dim,
             heads <- heads, ffn_dim <- ffn, steps <- steps, lr <- lr, warmup <- warmup,
             batch <- batch, seq_len <- seq, clip <- clip, moe_loss_weight <- moe_loss_weight,
             seed <- seed, valid_every <- valid_every, valid_batches <- valid_batches,
             corpus <- corpus, out <- out);
        o.threads = self.threads.or(o.threads);
        o.replot = self.replot;
        o.progress &= !self.no_progress;
        ensure!(
            o.dim % o.heads == 0,
            "--heads {} must divide --dim {}",
            o.heads,
            o.dim
        );
        ensure!(
            o.moe_freq <= o.layers,
            "--moe-freq {} leaves {} layers without an MoE layer",
            o.moe_freq,
            o.layers
        );
        ensure!(
            o.clip > 0.0,
            "--clip must be positive (both methods clip at it)"
        );
        Ok(o)
    }
}

/// The MoE layers' routing in one step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoutingStep {
    /// Mean over the MoE layers of the mean gate entropy per token (nats; at most ln E).
    #[serde(with = "nan_as_null")]
    pub entropy: f64,
    /// Share of the top-2 choices dropped by capacity, over the MoE layers.
    #[serde(with = "nan_as_null")]
    pub dropped: f64,
}

/// One (model, clipping method) run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipRun {
    /// Experts per MoE layer (0: the dense model).
    pub experts: usize,
    /// `vanilla` or `sparseclip`.
    pub method: String,
    /// Trainable scalars.
    pub parameters: usize,
    /// Of which expert parameters.
    pub expert_parameters: usize,
    /// Every step (its `grad_norm` as this run's clipper measures it).
    pub steps: Vec<StepRecord>,
    /// The routing of every step (empty for the dense model).
    pub routing: Vec<RoutingStep>,
    /// Validation losses.
    pub valid: Vec<ValidRecord>,
    /// Why the run stopped early, if it did.
    pub stopped: Option<String>,
    /// Steps whose gradient was scaled down (coefficient below 1).
    pub clipped_steps: usize,
    /// Mean clipping coefficient over the steps.
    #[serde(with = "nan_as_null")]
    pub mean_clip_coef: f64,
    /// Mean training loss of the last twentieth of the steps.
    #[serde(with = "nan_as_null")]
    pub final_train_loss: f64,
    /// The last validation loss.
    #[serde(with = "nan_as_null")]
    pub final_valid_loss: f64,
    /// Mean routing entropy of the last twentieth of the steps (NaN for the dense model).
    #[serde(with = "nan_as_null")]
    pub final_entropy: f64,
    /// Wall-clock seconds (building and validation included).
    pub seconds: f64,
    /// Peak resident memory during the run, bytes (0 if unknown).
    pub peak_rss_bytes: u64,
    /// Mean seconds per step by phase.
    pub timing: PhaseTimes,
}

impl ClipRun {
    /// `dense` or `E experts`, with the method.
    pub fn label(&self) -> String {
        let model = if self.experts == 0 {
            "dense".to_string()
        } else {
            format!("{} experts", self.experts)
        };
        format!("{model}, {}", self.method)
    }
}

/// The whole experiment, as written to `sparseclip.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SparseclipRecord {
    /// The settings.
    pub config: SparseclipOpts,
    /// Entropy of the byte frequencies (nats).
    pub unigram_entropy: f64,
    /// The runs, dense first, vanilla before SparseClip for each model.
    pub runs: Vec<ClipRun>,
}

impl SparseclipRecord {
    /// Writes pretty JSON to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)?)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
    }

    /// Reads a file written by [`SparseclipRecord::write`].
    pub fn read(path: &Path) -> Result<Self> {
        let s = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        Ok(serde_json::from_str(&s)?)
    }
}

/// `cargo xtask sparseclip [flags]`: runs, writes the JSON and the PNG, prints the table.
pub fn main(opts: &SparseclipOpts) -> Result<SparseclipRecord> {
    if let Some(json) = &opts.replot {
        let rec = SparseclipRecord::read(json)?;
        let png = opts.out.join("sparseclip.png");
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
        shown(&opts.out.join("sparseclip.json")),
        shown(&opts.out.join("sparseclip.png")),
        start.elapsed().as_secs_f64()
    );
    Ok(rec)
}

fn method_name(m: ClipMode) -> &'static str {
    match m {
        ClipMode::GlobalNorm(_) => "vanilla",
        ClipMode::SparseClip { .. } => "sparseclip",
    }
}

/// Runs every (model, method) pair and writes `sparseclip.json` and `sparseclip.png`.
pub fn run(opts: &SparseclipOpts) -> Result<SparseclipRecord> {
    let data = Data::load(&opts.corpus, opts.batch, opts.seq_len, opts.valid_batches)?;
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", opts.out.display()))?;
    let progress = Progress::new(opts.progress)?;
    let plan = opts.runs();
    let tickers: Vec<_> = plan
        .iter()
        .map(|&(e, m)| {
            let name = if e == 0 {
                format!("dense {}", method_name(m))
            } else {
                format!("{e}E {}", method_name(m))
            };
            progress.bar(&name, opts.steps)
        })
        .collect();
    let mut rec = SparseclipRecord {
        config: opts.clone(),
        unigram_entropy: data.unigram_entropy,
        runs: Vec::new(),
    };
    for (&(experts, mode), ticker) in plan.iter().zip(&tickers) {
        let run = train_one(opts, experts, mode, &data, ticker)?;
        ticker.finish(format!(
            "valid {:.3}, {} of {} steps clipped, entropy {:.3}",
            run.final_valid_loss,
            run.clipped_steps,
            run.steps.len(),
            run.final_entropy
        ));
        rec.runs.push(run);
        rec.write(&opts.out.join("sparseclip.json"))?;
    }
    draw(&rec, &opts.out.join("sparseclip.png"))?;
    Ok(rec)
}

fn train_one(
    opts: &SparseclipOpts,
    experts: usize,
    mode: ClipMode,
    data: &Data,
    ticker: &experiment::Ticker,
) -> Result<ClipRun> {
    let start = Instant::now();
    ticker.begin();
    let dev = candle_core::Device::Cpu;
    let lm = LanguageModel::new(opts.decoder_config(experts), opts.seed)?;
    let expert_params = lm.model.expert_parameters();
    let mut trainer = experiment::inverse_sqrt_trainer(
        &lm,
        &expert_params,
        opts.seed,
        mode,
        opts.lr,
        opts.warmup,
    )?;
    // The micro-batch closure leaves the step's routing statistics here for `after`.
    let stats: RefCell<Vec<RoutingStats>> = RefCell::new(Vec::new());
    let mut routing = Vec::with_capacity(opts.steps);
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
            lm.model.reseed(ctx.seed);
            lm.model.renormalize_gates()?;
            let out = lm.model.forward(
                &i,
                &DecoderInputs {
                    train: true,
                    ..Default::default()
                },
            )?;
            let ce = label_smoothed_cross_entropy(&out.x, &t, 0.0, Some(PAD))?;
            let aux: Vec<Tensor> = out.aux.iter().map(|a| a.balance_loss.clone()).collect();
            let mut loss_sum = ce.loss_sum;
            if let Some(b) = moe_balance_loss(&aux, opts.moe_loss_weight, AuxCombine::Average)? {
                loss_sum = (loss_sum + (b * ce.ntokens as f64)?)?;
            }
            stats
                .borrow_mut()
                .extend(out.aux.into_iter().map(|a| a.stats));
            Ok(MicroBatch {
                loss_sum,
                nll_sum: ce.nll_sum.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                ntokens: ce.ntokens,
                grads: None,
            })
        },
        || experiment::evaluate(&lm, &data.valid),
        |_, _| {
            let st = std::mem::take(&mut *stats.borrow_mut());
            if experts > 0 {
                routing.push(routing_step(&st));
            }
            Ok(())
        },
    )?;
    let w = window(opts.steps);
    let tail = |v: &[f64]| experiment::finite_mean(v[v.len().saturating_sub(w)..].iter().copied());
    let losses: Vec<f64> = out.steps.iter().map(|s| s.loss).collect();
    let entropies: Vec<f64> = routing.iter().map(|r| r.entropy).collect();
    Ok(ClipRun {
        experts,
        method: method_name(mode).into(),
        parameters: lm.num_parameters(),
        expert_parameters: expert_params.iter().map(|t| t.elem_count()).sum(),
        clipped_steps: out.steps.iter().filter(|s| s.clip_coef < 1.0).count(),
        mean_clip_coef: experiment::finite_mean(out.steps.iter().map(|s| s.clip_coef)),
        final_train_loss: tail(&losses),
        final_valid_loss: out.valid.last().map_or(f64::NAN, |v| v.loss),
        final_entropy: tail(&entropies),
        steps: out.steps,
        routing,
        valid: out.valid,
        stopped: out.stopped,
        seconds: start.elapsed().as_secs_f64(),
        peak_rss_bytes: out.peak_rss_bytes,
        timing: out.timing,
    })
}

/// One step's routing from the MoE layers' statistics.
fn routing_step(stats: &[RoutingStats]) -> RoutingStep {
    let entropy = experiment::finite_mean(stats.iter().map(|s| s.entropy));
    let (kept, dropped) = stats.iter().fold((0usize, 0usize), |(k, d), s| {
        (k + s.tokens_per_expert.iter().sum::<usize>(), d + s.dropped)
    });
    RoutingStep {
        entropy,
        dropped: if kept + dropped == 0 {
            f64::NAN
        } else {
            dropped as f64 / (kept + dropped) as f64
        },
    }
}

/// The printed table: one line per run.
pub fn table(rec: &SparseclipRecord) -> String {
    let c = &rec.config;
    let mut s = format!(
        "{} Pre-LN layers (every {} X-MoE), d={}, ffn={}, {} steps of {}x{} bytes, lr {:e}, \
         warmup {}, clip at {} (both methods), balance loss {}, seed {}\n\
         train / entropy = mean of the last {} steps; entropy in nats (max ln E); H1 = {:.3}\n\n",
        c.layers,
        c.moe_freq,
        c.dim,
        c.ffn_dim,
        c.steps,
        c.batch,
        c.seq_len,
        c.lr,
        c.warmup,
        c.clip,
        c.moe_loss_weight,
        c.seed,
        window(c.steps),
        rec.unigram_entropy
    );
    s += &format!(
        "{:<24} {:>9} {:>7} {:>7} {:>8} {:>6} {:>8} {:>8} {:>8} {:>7} {:>8}\n",
        "model, method",
        "params",
        "train",
        "valid",
        "clipped",
        "coef",
        "max |g|",
        "entropy",
        "ln E",
        "s/step",
        "peak MiB"
    );
    for r in &rec.runs {
        let max_g = r
            .steps
            .iter()
            .map(|s| s.grad_norm)
            .filter(|g| g.is_finite())
            .fold(f64::NAN, f64::max);
        let ln_e = if r.experts == 0 {
            f64::NAN
        } else {
            (r.experts as f64).ln()
        };
        s += &format!(
            "{:<24} {:>9} {:>7.3} {:>7.3} {:>8} {:>6.3} {:>8.3} {:>8.3} {:>8.3} {:>7.3} {:>8.0}{}\n",
            r.label(),
            r.parameters,
            r.final_train_loss,
            r.final_valid_loss,
            format!("{}/{}", r.clipped_steps, r.steps.len()),
            r.mean_clip_coef,
            max_g,
            r.final_entropy,
            ln_e,
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

/// Draws `sparseclip.png`: four panels (validation loss, routing entropy over ln E, clipped
/// steps so far, gradient norm as each run's clipper measures it); one colour per model, dashed
/// for vanilla clipping, solid for SparseClip.
pub fn draw(rec: &SparseclipRecord, path: &Path) -> Result<()> {
    let c = &rec.config;
    let w = window(c.steps);
    let models: Vec<usize> = std::iter::once(0)
        .chain(c.experts.iter().copied())
        .collect();
    let color = |e: usize| models.iter().position(|&m| m == e).unwrap_or(0);
    let style = |s: Series, r: &ClipRun| {
        if r.method == "vanilla" {
            s.dashed()
        } else {
            s
        }
    };
    let mut valid = Panel::new("validation loss", "step", "loss (nats per byte)");
    let mut entropy = Panel::new(
        "routing entropy / ln E (smoothed)",
        "step",
        "mean gate entropy over ln E",
    );
    let mut clipped = Panel::new("clipped steps so far", "step", "steps");
    clipped.legend = plotters::prelude::SeriesLabelPosition::UpperLeft;
    let mut norm = Panel::new(
        "gradient norm as clipped (smoothed)",
        "step",
        "norm before clipping",
    );
    for r in &rec.runs {
        let k = color(r.experts);
        let label = r.label();
        valid.series.push(style(
            Series::new(
                format!("{label}: {:.3}", r.final_valid_loss),
                k,
                r.valid.iter().map(|v| (v.step as f64, v.loss)).collect(),
            ),
            r,
        ));
        if r.experts > 0 {
            let ln_e = (r.experts as f64).ln();
            let pts: Vec<(f64, f64)> = r
                .routing
                .iter()
                .zip(&r.steps)
                .map(|(g, s)| (s.step as f64, g.entropy / ln_e))
                .collect();
            entropy.series.push(style(
                Series::new(label.clone(), k, plot::smooth(&pts, w)),
                r,
            ));
        }
        let mut n = 0.0;
        let cum: Vec<(f64, f64)> = r
            .steps
            .iter()
            .map(|s| {
                if s.clip_coef < 1.0 {
                    n += 1.0;
                }
                (s.step as f64, n)
            })
            .collect();
        clipped.series.push(style(
            Series::new(format!("{label}: {}", r.clipped_steps), k, cum),
            r,
        ));
        let g: Vec<(f64, f64)> = r
            .steps
            .iter()
            .map(|s| (s.step as f64, s.grad_norm))
            .collect();
        norm.series
            .push(style(Series::new(label, k, plot::smooth(&g, w)), r));
    }
    let valid = valid.fit(0.03);
    norm.hlines.push((c.clip, format!("threshold {}", c.clip)));
    entropy.legend = plotters::prelude::SeriesLabelPosition::LowerLeft;
    let mut entropy = entropy.fit(0.05);
    entropy.y.1 = entropy.y.1.clamp(1.0, 1.02);
    let caption = format!(
        "vanilla clipping (dashed) vs SparseClip (solid) at {}: {} layers, every {} X-MoE, d={}, \
         {} steps of {}x{} bytes",
        c.clip, c.layers, c.moe_freq, c.dim, c.steps, c.batch, c.seq_len
    );
    plot::draw(
        path,
        Some(&caption),
        &[valid, entropy, clipped.fit(0.02), norm.fit(0.03)],
        2,
        (900, 620),
    )
}
