//! `cargo xtask bench routing`: capacity routing against dropless and expert-choice routing on
//! the same byte-level MoE language model, batches and seed.
//!
//! Every (experts, router) pair gets its own model; the runs advance one step each in turn, so
//! that machine load falls on all of them alike (the load average is recorded). Reported per run:
//! tokens per second (median over the timed steps), the share of token choices dropped by
//! capacity, the share of tokens that reached no expert, and the validation loss after the last
//! step.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use serde::Serialize;
use torchscale_models::config::{DecoderConfig, Technique};
use torchscale_models::data::{ByteCorpus, BYTE_VOCAB, PAD};
use torchscale_models::lm::LanguageModel;
use torchscale_models::train::{
    label_smoothed_cross_entropy, moe_balance_loss, AdamWConfig, AuxCombine, ClipMode, InverseSqrt,
    MicroBatch, Schedule, Trainer, TrainerConfig,
};
use torchscale_models::DecoderInputs;
use torchscale_moe::{set_expert_compute, ExpertCompute, RouterChoice};

use super::median;
use super::train_report::load_average;
use crate::paths::shown;

/// `cargo xtask bench routing`.
#[derive(Debug, Clone, Args)]
pub struct RoutingArgs {
    /// Expert counts to compare, comma separated
    #[arg(long, value_delimiter = ',', default_value = "8,64")]
    pub experts: Vec<usize>,
    /// Training steps per run
    #[arg(long, default_value_t = 150)]
    pub steps: usize,
    /// Steps before timing starts (allocator and caches warm up)
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Sequences per batch
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Bytes per sequence
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Model width
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    /// Layers (every one an MoE layer)
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Peak learning rate
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Seed of the models and batches
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Smoke-test sizes (a few steps, 4 experts)
    #[arg(long)]
    pub quick: bool,
    /// Output folder for routing.json
    #[arg(long, default_value = "target/bench-routing")]
    pub out: PathBuf,
}

/// One run's results.
#[derive(Debug, Clone, Serialize)]
pub struct RoutingRow {
    /// Number of experts.
    pub experts: usize,
    /// Router name.
    pub router: String,
    /// Training tokens per second (median step).
    pub tokens_per_s: f64,
    /// Share of token choices dropped by capacity, over every step.
    pub dropped: f64,
    /// Share of tokens that reached no expert, over every step.
    pub without_expert: f64,
    /// Largest per-expert batch over the mean one (1 = perfectly balanced), median over steps.
    pub imbalance: f64,
    /// Training loss (mean of the last tenth of the steps).
    pub train_loss: f64,
    /// Validation loss after the last step.
    pub valid_loss: f64,
    /// Training loss of every step.
    pub losses: Vec<f64>,
}

/// The whole benchmark, as written to `routing.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RoutingReport {
    /// The command's settings.
    pub steps: usize,
    /// Tokens per step.
    pub tokens_per_step: usize,
    /// Model width and layers.
    pub dim: usize,
    /// Layers.
    pub layers: usize,
    /// Load average (1 min) before and after.
    pub load: [f64; 2],
    /// One row per (experts, router).
    pub rows: Vec<RoutingRow>,
}

/// The routers compared, by display name.
fn routers() -> Vec<(&'static str, RouterChoice, ExpertCompute)> {
    let (dropless, choice) = (
        RouterChoice::Dropless { k: 2 },
        RouterChoice::ExpertChoice {
            capacity_factor: 2.0,
        },
    );
    let (l, g) = (ExpertCompute::Loop, ExpertCompute::Grouped);
    vec![
        ("capacity top-2, loop", RouterChoice::Capacity, l),
        ("capacity top-2, grouped", RouterChoice::Capacity, g),
        ("dropless top-2, loop", dropless.clone(), l),
        ("dropless top-2, grouped", dropless, g),
        ("expert-choice c=2, loop", choice.clone(), l),
        ("expert-choice c=2, grouped", choice, g),
    ]
}

struct Run {
    experts: usize,
    name: &'static str,
    compute: ExpertCompute,
    lm: LanguageModel,
    trainer: Trainer,
    times: Vec<f64>,
    losses: Vec<f64>,
    choices: usize,
    dropped: usize,
    tokens: usize,
    without: usize,
    imbalance: Vec<f64>,
}

impl RoutingArgs {
    fn settled(mut self) -> Self {
        if self.quick {
            self.experts = vec![4];
            self.steps = 4;
            self.warmup = 1;
            self.batch = 4;
            self.seq_len = 32;
            self.dim = 32;
        }
        self
    }

    fn config(&self, experts: usize, router: &RouterChoice) -> DecoderConfig {
        let mut c = DecoderConfig::default()
            .with_vocab_size(BYTE_VOCAB as i64)
            .with_embed_dim(self.dim)
            .with_heads(4)
            .with_ffn_dim(2 * self.dim)
            .with_layers(self.layers)
            .with_max_positions(self.seq_len.max(1024))
            .with_technique(Technique::PreLn);
        c.no_scale_embedding = false;
        c.moe_freq = 1;
        c.moe_expert_count = experts;
        c.use_xmoe = true;
        c.moe_second_expert_policy = "all".into();
        c.moe_router = router.clone();
        c
    }
}

/// Runs the benchmark and writes `routing.json` under `args.out`.
pub fn main(args: RoutingArgs) -> Result<RoutingReport> {
    // As a training loop should run: on one of rayon's workers (see `runtime::in_pool`).
    torchscale_kernels::runtime::in_pool(|| run(args.settled()))
}

fn run(args: RoutingArgs) -> Result<RoutingReport> {
    ensure!(args.steps > args.warmup, "--steps must exceed --warmup");
    let dev = Device::Cpu;
    let corpus = ByteCorpus::from_file(&crate::paths::workspace_root().join("data/kjv.txt"), 0.02)?;
    let valid = corpus.valid_batches(args.batch, args.seq_len, 8, &dev)?;
    let load0 = load_average();
    let mut runs = Vec::new();
    for &e in &args.experts {
        for (name, choice, compute) in routers() {
            let lm = LanguageModel::new(args.config(e, &choice), args.seed)
                .with_context(|| format!("{name} with {e} experts"))?;
            let trainer = Trainer::new(
                &lm.store,
                &lm.model.expert_parameters(),
                TrainerConfig {
                    seed: args.seed,
                    clip: ClipMode::GlobalNorm(1.0),
                    max_consecutive_skips: 10,
                },
                AdamWConfig {
                    lr: args.lr,
                    ..AdamWConfig::default()
                },
                Schedule::InverseSqrt(InverseSqrt::new(args.lr, 10.min(args.steps as u64))),
            )?;
            runs.push(Run {
                experts: e,
                name,
                compute,
                lm,
                trainer,
                times: Vec::new(),
                losses: Vec::new(),
                choices: 0,
                dropped: 0,
                tokens: 0,
                without: 0,
                imbalance: Vec::new(),
            });
        }
    }
    for step in 0..args.steps {
        for run in &mut runs {
            set_expert_compute(run.compute);
            let t0 = Instant::now();
            let mut stats = Vec::new();
            let lm = &run.lm;
            let report = run.trainer.step(1, |ctx| {
                let (i, t) = corpus.train_batch(args.batch, args.seq_len, ctx.seed, &dev)?;
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
                if let Some(b) = moe_balance_loss(&aux, 0.01, AuxCombine::Average)? {
                    loss_sum = (loss_sum + (b * ce.ntokens as f64)?)?;
                }
                stats.extend(out.aux.into_iter().map(|a| a.stats));
                Ok(MicroBatch {
                    loss_sum,
                    nll_sum: ce.nll_sum.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                    ntokens: ce.ntokens,
                    grads: None,
                })
            })?;
            let dt = t0.elapsed().as_secs_f64();
            if step >= args.warmup {
                run.times.push(dt);
            }
            run.losses.push(report.nll);
            for s in stats {
                let kept: usize = s.tokens_per_expert.iter().sum();
                run.choices += kept + s.dropped;
                run.dropped += s.dropped;
                run.tokens += args.batch * args.seq_len;
                run.without += s.tokens_without_expert;
                let mean = kept as f64 / s.tokens_per_expert.len().max(1) as f64;
                let max = s.tokens_per_expert.iter().copied().max().unwrap_or(0) as f64;
                if mean > 0.0 {
                    run.imbalance.push(max / mean);
                }
            }
        }
        if (step + 1) % 25 == 0 || step + 1 == args.steps {
            tracing::info!("step {}/{}", step + 1, args.steps);
        }
    }
    let tokens_per_step = args.batch * args.seq_len;
    let mut rows = Vec::new();
    for mut run in runs {
        let tail = (run.losses.len() / 10).max(1);
        let train_loss = run.losses[run.losses.len() - tail..].iter().sum::<f64>() / tail as f64;
        rows.push(RoutingRow {
            experts: run.experts,
            router: run.name.to_string(),
            tokens_per_s: tokens_per_step as f64 / median(&mut run.times),
            dropped: run.dropped as f64 / run.choices.max(1) as f64,
            without_expert: run.without as f64 / run.tokens.max(1) as f64,
            imbalance: median(&mut run.imbalance),
            train_loss,
            valid_loss: run.lm.evaluate(&valid)?,
            losses: run.losses,
        });
    }
    let report = RoutingReport {
        steps: args.steps,
        tokens_per_step,
        dim: args.dim,
        layers: args.layers,
        load: [load0, load_average()],
        rows,
    };
    print_table(&report);
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", shown(&args.out)))?;
    let path = args.out.join("routing.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", shown(&path)))?;
    println!("wrote {}", shown(&path));
    Ok(report)
}

/// The Markdown table of a report, as pasted into BENCHMARKS.md.
pub fn print_table(r: &RoutingReport) {
    println!(
        "{} steps of {} tokens, width {}, {} MoE layers; load average {:.2} -> {:.2}\n",
        r.steps, r.tokens_per_step, r.dim, r.layers, r.load[0], r.load[1]
    );
    println!("| experts | router | tokens/s | vs capacity | choices dropped | tokens without expert | max/mean expert batch | train loss | valid loss |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in &r.rows {
        let base = r
            .rows
            .iter()
            .find(|b| b.experts == row.experts && b.router == "capacity top-2, loop")
            .map(|b| b.tokens_per_s)
            .unwrap_or(f64::NAN);
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2}% | {:.2}% | {:.2} | {:.3} | {:.3} |",
            row.experts,
            row.router,
            row.tokens_per_s,
            row.tokens_per_s / base,
            100.0 * row.dropped,
            100.0 * row.without_expert,
            row.imbalance,
            row.train_loss,
            row.valid_loss
        );
    }
}
