//! train_lm's command line: the run's settings (saved in checkpoints) and the session's.

use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, Command, CommandFactory, FromArgMatches, Parser};
use serde::{Deserialize, Serialize};
use torchscale_models::config::Technique;

use crate::cli::{DTypeArg, DeviceArg};

/// Everything that defines a run; saved in the checkpoint so `--resume` continues the same run.
/// Fields added later carry `#[serde(default)]` values, so older checkpoints still load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunArgs {
    pub data: PathBuf,
    pub stabilizer: String,
    pub layers: usize,
    pub dim: usize,
    pub heads: usize,
    pub ffn: usize,
    pub moe: usize,
    pub moe_freq: usize,
    pub batch: usize,
    pub seq: usize,
    pub steps: u64,
    pub lr: f64,
    pub warmup: u64,
    pub weight_decay: f64,
    pub clip: f64,
    pub dropout: f64,
    pub attention_dropout: f64,
    pub label_smoothing: f64,
    pub moe_loss_weight: f64,
    pub update_freq: usize,
    pub seed: u64,
    pub scale_embedding: bool,
    pub dtype: DTypeArg,
}

impl Default for RunArgs {
    fn default() -> Self {
        Self {
            data: default_data(),
            stabilizer: "subln".into(),
            layers: 4,
            dim: 128,
            heads: 4,
            ffn: 512,
            moe: 0,
            moe_freq: 2,
            batch: 16,
            seq: 128,
            steps: 300,
            lr: 2e-3,
            warmup: 50,
            weight_decay: 0.01,
            clip: 1.0,
            dropout: 0.1,
            attention_dropout: 0.0,
            label_smoothing: 0.0,
            moe_loss_weight: 0.01,
            update_freq: 1,
            seed: 1,
            scale_embedding: true,
            dtype: DTypeArg::F32,
        }
    }
}

/// Options that do not change the run's numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub out: PathBuf,
    pub resume: bool,
    pub device: DeviceArg,
    pub eval_every: u64,
    pub save_every: u64,
    pub log_every: u64,
    pub sample_len: usize,
    pub prompt: String,
    pub temperature: f64,
    /// Under mpirun: the MoE layers' experts spread over the ranks (E / W each).
    pub expert_parallel: bool,
    /// Under mpirun: AdamW's moments sharded over the ranks (ZeRO stage 1).
    pub zero1: bool,
    /// Activation checkpointing: layers per recomputed segment (None: off).
    pub checkpoint_activations: Option<usize>,
}

pub fn default_data() -> PathBuf {
    let local = PathBuf::from("data/kjv.txt");
    if local.exists() {
        local
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/kjv.txt")
    }
}

fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(k) if k >= 1 => Ok(k),
        _ => Err(format!("expected a whole number of layers >= 1, got `{s}`")),
    }
}

fn stabilizer(s: &str) -> Result<String, String> {
    s.parse::<Technique>()
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// Trains a byte-level decoder language model (Magneto / Sub-LN by default) on data/kjv.txt or
/// any text file, checkpointing under --out and ending with a generated sample.
#[derive(Debug, Parser)]
#[command(name = "train_lm", version, max_term_width = 100)]
pub struct Cli {
    /// Text file to train on [default: data/kjv.txt]
    #[arg(long, value_name = "PATH")]
    data: Option<PathBuf>,
    /// Output folder: checkpoint/ and log.jsonl
    #[arg(long, value_name = "DIR", default_value = "runs/train_lm")]
    out: PathBuf,
    /// Continue the run saved in <OUT>/checkpoint (its settings win; --steps may grow)
    #[arg(long)]
    resume: bool,
    /// Residual scheme: post-ln | pre-ln | deepnorm | subln (Magneto) | admin
    #[arg(long, value_name = "NAME", default_value = "subln", value_parser = stabilizer)]
    stabilizer: String,
    /// Decoder layers
    #[arg(long, value_name = "N", default_value_t = 4)]
    layers: usize,
    /// Model width
    #[arg(long, value_name = "N", default_value_t = 128)]
    dim: usize,
    /// Attention heads
    #[arg(long, value_name = "N", default_value_t = 4)]
    heads: usize,
    /// Feed-forward width
    #[arg(long, value_name = "N", default_value_t = 512)]
    ffn: usize,
    /// X-MoE top-2 with E experts (0 = dense)
    #[arg(long, value_name = "E", default_value_t = 0)]
    moe: usize,
    /// Every N-th layer is MoE
    #[arg(long, value_name = "N", default_value_t = 2)]
    moe_freq: usize,
    /// Sequences per micro-batch
    #[arg(long, value_name = "N", default_value_t = 16)]
    batch: usize,
    /// Sequence length in bytes
    #[arg(long, value_name = "N", default_value_t = 128)]
    seq: usize,
    /// Total optimiser steps
    #[arg(long, value_name = "N", default_value_t = 300)]
    steps: u64,
    /// Peak learning rate (linear warm-up, then inverse square root)
    #[arg(long, value_name = "X", default_value_t = 2e-3)]
    lr: f64,
    /// Warm-up updates
    #[arg(long, value_name = "N", default_value_t = 50)]
    warmup: u64,
    /// AdamW decoupled decay on matrices
    #[arg(long, value_name = "X", default_value_t = 0.01)]
    weight_decay: f64,
    /// Max gradient norm; SparseClip with --moe (0 = off)
    #[arg(long, value_name = "X", default_value_t = 1.0)]
    clip: f64,
    /// Dropout on embeddings and sublayer outputs
    #[arg(long, value_name = "X", default_value_t = 0.1)]
    dropout: f64,
    /// Dropout on attention weights
    #[arg(long, value_name = "X", default_value_t = 0.0)]
    attention_dropout: f64,
    /// Label smoothing epsilon
    #[arg(long, value_name = "X", default_value_t = 0.0)]
    label_smoothing: f64,
    /// Weight of the MoE balance loss
    #[arg(long, value_name = "X", default_value_t = 0.01)]
    moe_loss_weight: f64,
    /// Micro-batches per step (gradient accumulation)
    #[arg(long, value_name = "N", default_value_t = 1)]
    update_freq: usize,
    /// Run seed: data, initialisation, dropout, MoE draws
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
    /// Leave token embeddings unscaled (torchscale's no_scale_embedding); by default they are
    /// scaled by sqrt(dim) to match the N(0, 1) positions
    #[arg(long)]
    no_scale_embedding: bool,
    /// Parameters' and activations' dtype (AdamW moments stay f32)
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
    /// cpu, cuda or cuda:N (CUDA needs a build with --features cuda)
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    device: DeviceArg,
    /// Validate every N steps
    #[arg(long, value_name = "N", default_value_t = 100)]
    eval_every: u64,
    /// Save the checkpoint every N steps
    #[arg(long, value_name = "N", default_value_t = 100)]
    save_every: u64,
    /// Print a log line every N steps when stdout is not a terminal
    #[arg(long, value_name = "N", default_value_t = 25)]
    log_every: u64,
    /// Bytes to sample at the end
    #[arg(long, value_name = "N", default_value_t = 300)]
    sample_len: usize,
    /// Text the sample continues
    #[arg(long, value_name = "TEXT", default_value = "And God said")]
    prompt: String,
    /// Sampling temperature (0 = greedy)
    #[arg(long, value_name = "X", default_value_t = 0.8)]
    temperature: f64,
    /// Under mpirun (a build with --features mpi): each rank holds E / W of the --moe experts and
    /// tokens travel to them by all-to-all
    #[arg(long)]
    expert_parallel: bool,
    /// Under mpirun: shard AdamW's moments over the ranks (ZeRO stage 1)
    #[arg(long)]
    zero1: bool,
    /// Keep only the input of every K layers in the forward pass and recompute them in the
    /// backward pass (less memory, a second forward); K defaults to 1
    #[arg(long, value_name = "K", num_args = 0..=1, default_missing_value = "1", value_parser = positive)]
    checkpoint_activations: Option<usize>,
}

/// The parsed command line.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub run: RunArgs,
    pub session: Session,
    /// Flags given on the command line whose settings the checkpoint holds (ignored on resume).
    pub run_flags_given: Vec<String>,
}

/// Flags that may differ from the saved run on `--resume`.
const SESSION_FLAGS: &[&str] = &[
    "out",
    "resume",
    "steps",
    "device",
    "eval_every",
    "save_every",
    "log_every",
    "sample_len",
    "prompt",
    "temperature",
    // How the run is spread over processes: a checkpoint holds every tensor in one layout, so
    // a resume may choose another.
    "expert_parallel",
    "zero1",
    // The same numbers to float rounding, computed with less memory.
    "checkpoint_activations",
];

/// Parses `args` (program name first); clap's error carries the exit code (2 for usage errors,
/// 0 for --help and --version).
pub fn parse_from<I, T>(args: I) -> Result<Parsed, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cmd = Cli::command();
    let matches = cmd.clone().try_get_matches_from(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    Ok(parsed(cli, &cmd, &matches))
}

fn parsed(c: Cli, cmd: &Command, m: &ArgMatches) -> Parsed {
    let run_flags_given = cmd
        .get_arguments()
        .filter(|a| !SESSION_FLAGS.contains(&a.get_id().as_str()))
        .filter(|a| m.value_source(a.get_id().as_str()) == Some(ValueSource::CommandLine))
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .collect();
    Parsed {
        run: RunArgs {
            data: c.data.unwrap_or_else(default_data),
            stabilizer: c.stabilizer,
            layers: c.layers,
            dim: c.dim,
            heads: c.heads,
            ffn: c.ffn,
            moe: c.moe,
            moe_freq: c.moe_freq,
            batch: c.batch,
            seq: c.seq,
            steps: c.steps,
            lr: c.lr,
            warmup: c.warmup,
            weight_decay: c.weight_decay,
            clip: c.clip,
            dropout: c.dropout,
            attention_dropout: c.attention_dropout,
            label_smoothing: c.label_smoothing,
            moe_loss_weight: c.moe_loss_weight,
            update_freq: c.update_freq,
            seed: c.seed,
            scale_embedding: !c.no_scale_embedding,
            dtype: c.dtype,
        },
        session: Session {
            out: c.out,
            resume: c.resume,
            device: c.device,
            eval_every: c.eval_every.max(1),
            save_every: c.save_every.max(1),
            log_every: c.log_every.max(1),
            sample_len: c.sample_len,
            prompt: c.prompt,
            temperature: c.temperature,
            expert_parallel: c.expert_parallel,
            zero1: c.zero1,
            checkpoint_activations: c.checkpoint_activations,
        },
        run_flags_given,
    }
}
