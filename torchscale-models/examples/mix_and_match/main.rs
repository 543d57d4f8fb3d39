//! Mix and match per experiment, without changing the crates: four byte-level language models
//! trained from one binary on the shipped corpus, each reporting its validation loss.
//!
//! - `deepnorm-admin`: DeepNorm residuals around attention, Admin residuals around the
//!   feed-forward blocks (a per-site stabiliser written in `deep_attn_admin_ffn.rs`);
//! - `routers`: MoE in layers 1 and 3 (`moe_layers`), X-MoE routing in layer 1 from the config
//!   and, in layer 3, a router written in `z_router.rs` (top-1 with the ST-MoE z-loss);
//! - `peri-ln`: a stabiliser that exists only in `peri_ln.rs`;
//! - `mix-ln`: config fields only: Post-LN in the bottom half, Pre-LN above
//!   (`layer_techniques`), and dropless top-2 routing in an MoE layer (`moe_router`).
//!
//! `cargo run --release -p torchscale-models --example mix_and_match`
//! (`-- --quick` for a smoke run, `--only peri-ln` for one model).

#[path = "../common/cli.rs"]
mod cli;
mod deep_attn_admin_ffn;
mod peri_ln;
mod z_router;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use torchscale_models::build::{BuildOptions, StackHooks};
use torchscale_models::config::{DecoderConfig, LayerTechnique, Technique};
use torchscale_models::data::{ByteCorpus, BYTE_VOCAB};
use torchscale_models::lm::{LanguageModel, LossConfig};
use torchscale_models::torchscale_core::Stabilizer;
use torchscale_models::torchscale_moe::RouterChoice;
use torchscale_models::train::{
    AdamWConfig, ClipMode, InverseSqrt, Schedule, Trainer, TrainerConfig,
};

use deep_attn_admin_ffn::DeepAttnAdminFfn;
use peri_ln::PeriLn;
use z_router::ZLossRouter;

/// The experiments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Experiment {
    /// DeepNorm attention residuals, Admin feed-forward residuals
    DeepnormAdmin,
    /// X-MoE routing in layer 1, the example's z-loss router in layer 3
    Routers,
    /// The example's Peri-LN stabiliser
    PeriLn,
    /// Mix-LN and dropless routing from config fields alone
    MixLn,
}

/// Trains each experiment's model on the same batches and prints its validation loss.
#[derive(Debug, Parser)]
#[command(name = "mix_and_match", version, max_term_width = 100)]
struct Cli {
    /// Run only these experiments (comma separated); all by default
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Experiment>,
    /// Training steps per model
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Sequences per batch
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Bytes per sequence
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// Model width
    #[arg(long, default_value_t = 64)]
    dim: usize,
    /// Layers
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Peak learning rate (inverse square root schedule)
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Seed of the models and the batches
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Training text
    #[arg(long, default_value = "data/kjv.txt")]
    corpus: PathBuf,
    /// Where the summary JSON goes
    #[arg(long, default_value = "runs/mix_and_match")]
    out: PathBuf,
    /// Smoke-test sizes: a few steps of a tiny model
    #[arg(long)]
    quick: bool,
}

/// One experiment's result.
#[derive(Debug, Serialize)]
struct Outcome {
    experiment: Experiment,
    /// Stabiliser of each layer, bottom first.
    stabilizers: Vec<String>,
    /// Router of each MoE layer, as `layer: name`.
    routers: Vec<String>,
    parameters: usize,
    first_loss: f64,
    last_loss: f64,
    valid_loss: f64,
    seconds: f64,
}

impl Cli {
    fn settled(mut self) -> Self {
        if self.quick {
            (self.steps, self.batch, self.seq_len, self.dim) = (12, 4, 32, 32);
        }
        if self.only.is_empty() {
            self.only = Experiment::value_variants().to_vec();
        }
        self
    }

    fn base(&self) -> DecoderConfig {
        let mut c = DecoderConfig::default()
            .with_vocab_size(BYTE_VOCAB as i64)
            .with_embed_dim(self.dim)
            .with_heads(4)
            .with_ffn_dim(2 * self.dim)
            .with_layers(self.layers)
            .with_max_positions(self.seq_len.max(1024));
        c.no_scale_embedding = false;
        c
    }

    /// The config and code-made choices of one experiment.
    fn model(&self, e: Experiment) -> (DecoderConfig, StackHooks) {
        let top = self.layers.saturating_sub(1);
        match e {
            Experiment::DeepnormAdmin => (
                // Post-LN flags: both halves of the mix are Post-LN wirings.
                self.base().with_technique(Technique::PostLn),
                StackHooks::default().with_stabilizer(|spec, _| {
                    let st: Arc<dyn Stabilizer> = Arc::new(DeepAttnAdminFfn::for_stack(spec.kind)?);
                    Ok(Some(st))
                }),
            ),
            Experiment::Routers => {
                let mut c = self.base().with_technique(Technique::PreLn);
                c.moe_expert_count = 4;
                c.moe_freq = 1;
                c.moe_layers = Some(vec![1.min(top), top]);
                c.use_xmoe = true;
                let hooks = StackHooks::default().with_router(move |cx, moe, vb| {
                    if cx.index != top {
                        return Ok(None);
                    }
                    let r = ZLossRouter::new(moe.embed_dim, moe.num_experts, vb)?;
                    Ok(Some(Box::new(r)))
                });
                (c, hooks)
            }
            Experiment::PeriLn => (
                self.base().with_technique(Technique::PreLn),
                StackHooks::default().with_stabilizer(|_, _| {
                    let st: Arc<dyn Stabilizer> = Arc::new(PeriLn);
                    Ok(Some(st))
                }),
            ),
            Experiment::MixLn => {
                let mut c = self.base().with_technique(Technique::PreLn);
                c.layer_techniques = vec![LayerTechnique {
                    layers: [0, self.layers / 2],
                    technique: Technique::PostLn,
                }];
                c.moe_expert_count = 4;
                c.moe_layers = Some(vec![top]);
                c.moe_router = RouterChoice::Dropless { k: 2 };
                (c, StackHooks::default())
            }
        }
    }
}

fn bar(steps: usize, out: cli::Output, name: &str) -> ProgressBar {
    let b = if out.bar {
        ProgressBar::new(steps as u64)
    } else {
        ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::hidden())
    };
    if let Ok(style) = ProgressStyle::with_template("{prefix:>15} [{bar:30}] {pos}/{len} {msg}") {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_prefix(name.to_string());
    b
}

fn run(cli: &Cli, e: Experiment, corpus: &ByteCorpus, out: cli::Output) -> Result<Outcome> {
    let start = Instant::now();
    let dev = Device::Cpu;
    let name = format!("{e:?}");
    let (cfg, hooks) = cli.model(e);
    let opts = BuildOptions {
        hooks,
        ..Default::default()
    };
    let lm = LanguageModel::with_build_options(cfg, &opts, cli.seed, &dev, DType::F32)
        .with_context(|| format!("building {name}"))?;
    let stabilizers = lm
        .model
        .layer_stabilizers()
        .iter()
        .map(|s| s.name().to_string())
        .collect();
    let routers = lm
        .model
        .layers()
        .iter()
        .filter_map(|l| Some(format!("{}: {}", l.index(), l.moe()?.router().name())))
        .collect();
    let mut trainer = Trainer::new(
        &lm.store,
        &lm.model.expert_parameters(),
        TrainerConfig {
            seed: cli.seed,
            clip: ClipMode::GlobalNorm(1.0),
            max_consecutive_skips: 10,
        },
        AdamWConfig {
            lr: cli.lr,
            ..AdamWConfig::default()
        },
        Schedule::InverseSqrt(InverseSqrt::new(cli.lr, (cli.steps as u64 / 10).max(1))),
    )?;
    let loss = LossConfig {
        label_smoothing: 0.0,
        moe_loss_weight: 0.01,
    };
    let progress = bar(cli.steps, out, &name);
    let every = (cli.steps / 5).max(1);
    let mut losses = Vec::with_capacity(cli.steps);
    for s in 0..cli.steps {
        let r = trainer.step(1, |ctx| {
            let (i, t) = corpus.train_batch(cli.batch, cli.seq_len, ctx.seed, &dev)?;
            lm.micro_batch(&i, &t, true, &loss, ctx.seed)
        })?;
        losses.push(r.nll);
        progress.inc(1);
        progress.set_message(format!("loss {:.3}", r.nll));
        if out.lines && ((s + 1) % every == 0 || s + 1 == cli.steps) {
            println!("{name} step {}/{}: loss {:.3}", s + 1, cli.steps, r.nll);
        }
    }
    progress.finish_and_clear();
    let valid = corpus.valid_batches(cli.batch, cli.seq_len, 8, &dev)?;
    let tail = (losses.len() / 10).max(1);
    Ok(Outcome {
        experiment: e,
        stabilizers,
        routers,
        parameters: lm.num_parameters(),
        first_loss: losses.first().copied().unwrap_or(f64::NAN),
        last_loss: losses[losses.len() - tail..].iter().sum::<f64>() / tail as f64,
        valid_loss: lm.evaluate(&valid)?,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn main() -> Result<()> {
    let cli = Cli::parse().settled();
    cli::init_tracing();
    ensure!(cli.steps > 0, "--steps must be at least 1");
    ensure!(
        cli.layers >= 2,
        "--layers must be at least 2 (the experiments mix layers)"
    );
    let corpus = ByteCorpus::from_file(&cli.corpus, 0.02)
        .with_context(|| format!("reading {}", cli.corpus.display()))?;
    let out = cli::Output::detect();
    let mut outcomes = Vec::new();
    for &e in &cli.only {
        let o = run(&cli, e, &corpus, out)?;
        println!(
            "{:?}: valid loss {:.3} (train {:.3} -> {:.3}), {} parameters, {:.1} s\n  stabilisers: {}\n  routers: {}",
            o.experiment,
            o.valid_loss,
            o.first_loss,
            o.last_loss,
            o.parameters,
            o.seconds,
            o.stabilizers.join(", "),
            if o.routers.is_empty() { "none".to_string() } else { o.routers.join(", ") }
        );
        outcomes.push(o);
    }
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let path = cli.out.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&outcomes)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("summary: {}", path.display());
    Ok(())
}
