//! Trains an `EncoderDecoder` on a synthetic translation task with label-smoothed cross entropy.
//!
//! The "languages" share an alphabet of `--words` letters (token ids 4.. ; 0 = BOS, 1 = PAD,
//! 2 = EOS as in fairseq). A source sentence is a random string of `--min-len..=--max-len`
//! letters; its translation is the sentence read backwards with every letter looked up in a fixed
//! random "dictionary" (a permutation drawn from the seed). The model has to learn both the
//! lexicon and the reordering, which needs cross-attention. A sentence belongs to the validation
//! split when a seeded hash of it falls in the held-out bucket, so the two splits never share a
//! sentence; training batches are drawn fresh at every step from the step's seed.
//!
//! The decoder is fed `[EOS] + target` and predicts `target + EOS` (fairseq's
//! `prev_output_tokens`), batches are right-padded with PAD. The run ends with teacher-forced
//! validation (smoothed loss, NLL, perplexity, token accuracy) and batched greedy decoding with
//! the decoder's key/value cache (exact-match rate and a few samples).
//!
//! `cargo run --release -p torchscale-models --example train_translate -- --help`

// Items are `pub` because tests/translate_task.rs includes this file as a module.

#[path = "common/cli.rs"]
mod cli;
#[path = "common/report.rs"]
mod report;

use std::str::FromStr;
use std::time::Instant;

#[global_allocator]
static ALLOC: torchscale_kernels::alloc::Allocator = torchscale_kernels::alloc::Allocator {};

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};
use clap::{CommandFactory, Parser};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use torchscale_core::init::ParamStore;
use torchscale_core::Result as CoreResult;
use torchscale_models::data::{EOS, PAD};
use torchscale_models::randomness::mix_seed;
use torchscale_models::train::{
    label_smoothed_cross_entropy, AdamWConfig, ClipMode, InverseSqrt, MicroBatch, Schedule,
    StepReport, Trainer, TrainerConfig,
};

use cli::{DTypeArg, DeviceArg, Output};
use report::{Interval, Summary};
use torchscale_models::{
    BuildOptions, DecoderInputs, EncoderDecoder, EncoderDecoderConfig, EncoderInputs,
    EncoderOutput, IncrementalState, Memory, Technique,
};

/// First id of the alphabet (after BOS, PAD, EOS and fairseq's UNK).
pub const FIRST_WORD: u32 = 4;
/// One sentence in this many (by seeded hash) is held out for validation.
const HELD_OUT_BUCKETS: u64 = 10;
/// Salts that separate the seeds of the dictionary, the split and the validation sampler.
const DICT_SALT: u64 = 0xd1c7;
const SPLIT_SALT: u64 = 0x5b17;
const VALID_SALT: u64 = 0x7a11d;

/// Trains an encoder-decoder on a synthetic translation task (reverse the sentence, translate
/// each letter through a seeded dictionary) and reports validation loss and greedy decoding.
#[derive(Debug, Clone, Parser)]
#[command(name = "train_translate", version, max_term_width = 100)]
pub struct Args {
    /// Residual scheme of both stacks: post-ln | pre-ln | deepnorm | subln | admin
    #[arg(long, value_name = "NAME", default_value = "pre-ln", value_parser = Technique::from_str)]
    pub stabilizer: Technique,
    /// Encoder and decoder layers
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub layers: usize,
    /// Model width; 4 heads, FFN twice the width
    #[arg(long, value_name = "D", default_value_t = 64)]
    pub dim: usize,
    /// Optimiser steps
    #[arg(long, value_name = "N", default_value_t = 400)]
    pub steps: u64,
    /// Sentences per step
    #[arg(long, value_name = "N", default_value_t = 48)]
    pub batch: usize,
    /// Peak learning rate, inverse-sqrt schedule
    #[arg(long, value_name = "X", default_value_t = 2e-3)]
    pub lr: f64,
    /// Warm-up updates
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub warmup: u64,
    /// Epsilon of the smoothed loss
    #[arg(long, value_name = "X", default_value_t = 0.1)]
    pub label_smoothing: f64,
    /// Dropout on embeddings and sublayer outputs
    #[arg(long, value_name = "X", default_value_t = 0.0)]
    pub dropout: f64,
    /// Global gradient-norm clip, 0 = off
    #[arg(long, value_name = "X", default_value_t = 1.0)]
    pub clip_norm: f64,
    /// Alphabet size, 2..=26
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub words: usize,
    /// Shortest sentence
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub min_len: usize,
    /// Longest sentence
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub max_len: usize,
    /// Validation sentences
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub valid: usize,
    /// Validate every N steps, 0 = only at the end
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub eval_every: u64,
    /// Print a log line every N steps when stdout is not a terminal
    #[arg(long, value_name = "N", default_value_t = 25)]
    pub log_every: u64,
    /// Run seed: data, dictionary, split, init
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// Parameters' and activations' dtype (AdamW moments stay f32)
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
    /// cpu, cuda or cuda:N (CUDA needs a build with --features cuda)
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    pub device: DeviceArg,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            stabilizer: Technique::PreLn,
            layers: 2,
            dim: 64,
            steps: 400,
            batch: 48,
            lr: 2e-3,
            warmup: 100,
            label_smoothing: 0.1,
            dropout: 0.0,
            clip_norm: 1.0,
            words: 16,
            min_len: 3,
            max_len: 10,
            valid: 512,
            eval_every: 100,
            log_every: 25,
            seed: 1,
            dtype: DTypeArg::F32,
            device: DeviceArg::Cpu,
        }
    }
}

impl Args {
    /// The command line; usage errors (clap's and [`Args::check`]'s) exit with code 2.
    fn from_command_line() -> Self {
        let a = Args::parse();
        if let Err(e) = a.check() {
            Args::command()
                .error(clap::error::ErrorKind::ValueValidation, e)
                .exit();
        }
        a
    }

    fn check(&self) -> Result<()> {
        if !(2..=26).contains(&self.words) {
            bail!("--words must be in 2..=26 (sentences are printed as letters)");
        }
        if self.min_len == 0 || self.min_len > self.max_len {
            bail!("need 1 <= --min-len <= --max-len");
        }
        if self.batch == 0 || self.valid == 0 || self.steps == 0 {
            bail!("--batch, --valid and --steps must be positive");
        }
        // Sampling a split rejects sentences until one lands in it: make sure both are populated
        // (each sentence is held out with probability 1/10; 0.9^1000 is negligible).
        let sentences = (self.min_len..=self.max_len)
            .map(|l| (self.words as u64).saturating_pow(l as u32))
            .fold(0u64, u64::saturating_add);
        if sentences < 1000 {
            bail!("only {sentences} distinct sentences: raise --words or --max-len");
        }
        if !self.dim.is_multiple_of(4) {
            bail!("--dim must be a multiple of the 4 heads");
        }
        Ok(())
    }
}

/// Which side of the seeded split a sentence is drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Valid,
}

/// The synthetic language pair: sentence lengths, the dictionary and the split.
#[derive(Debug, Clone)]
pub struct Task {
    /// `dict[i]` is the target word of source word `FIRST_WORD + i`.
    pub dict: Vec<u32>,
    min_len: usize,
    max_len: usize,
    split_seed: u64,
}

impl Task {
    pub fn new(seed: u64, words: usize, min_len: usize, max_len: usize) -> Self {
        let mut dict: Vec<u32> = (0..words as u32).map(|i| FIRST_WORD + i).collect();
        dict.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(seed, DICT_SALT)));
        Self {
            dict,
            min_len,
            max_len,
            split_seed: mix_seed(seed, SPLIT_SALT),
        }
    }

    /// Vocabulary size: the specials and the alphabet.
    pub fn vocab_size(&self) -> usize {
        FIRST_WORD as usize + self.dict.len()
    }

    /// The reference translation: reversed, word by word through the dictionary.
    pub fn translate(&self, src: &[u32]) -> Vec<u32> {
        src.iter()
            .rev()
            .map(|&w| self.dict[(w - FIRST_WORD) as usize])
            .collect()
    }

    /// Which split `src` belongs to, from a seeded hash of its words.
    pub fn split_of(&self, src: &[u32]) -> Split {
        let h = src
            .iter()
            .fold(self.split_seed, |h, &w| mix_seed(h, u64::from(w)));
        if h % HELD_OUT_BUCKETS == 0 {
            Split::Valid
        } else {
            Split::Train
        }
    }

    /// A random source sentence of `split` (rejection sampling on the split hash).
    pub fn sample(&self, rng: &mut ChaCha8Rng, split: Split) -> Vec<u32> {
        loop {
            let len = rng.random_range(self.min_len..=self.max_len);
            let src: Vec<u32> = (0..len)
                .map(|_| FIRST_WORD + rng.random_range(0..self.dict.len() as u32))
                .collect();
            if self.split_of(&src) == split {
                return src;
            }
        }
    }

    /// `n` (source, target) pairs of `split` drawn from `seed`.
    pub fn pairs(&self, seed: u64, n: usize, split: Split) -> Vec<(Vec<u32>, Vec<u32>)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let src = self.sample(&mut rng, split);
                let tgt = self.translate(&src);
                (src, tgt)
            })
            .collect()
    }
}

/// A padded batch as the model and the loss take it.
pub struct Batch {
    /// `[B, S]` source ids.
    pub src: Tensor,
    /// `[B, S]` u8, 1 = padding.
    pub src_mask: Tensor,
    /// `[B, T+1]` decoder input: EOS then the target.
    pub prev: Tensor,
    /// `[B, T+1]` decoder output: the target then EOS.
    pub target: Tensor,
}

/// Right-pads `rows` with PAD to their longest length.
fn pad(rows: &[Vec<u32>], dev: &Device) -> CoreResult<Tensor> {
    let len = rows.iter().map(Vec::len).max().unwrap_or(0);
    let flat: Vec<u32> = rows
        .iter()
        .flat_map(|r| r.iter().copied().chain(std::iter::repeat(PAD)).take(len))
        .collect();
    Ok(Tensor::from_vec(flat, (rows.len(), len), dev)?)
}

/// The model's inputs and targets for `pairs`; the trainer's closure calls it, hence the core
/// error type.
pub fn make_batch(pairs: &[(Vec<u32>, Vec<u32>)], dev: &Device) -> CoreResult<Batch> {
    let src: Vec<Vec<u32>> = pairs.iter().map(|(s, _)| s.clone()).collect();
    let prev: Vec<Vec<u32>> = pairs
        .iter()
        .map(|(_, t)| std::iter::once(EOS).chain(t.iter().copied()).collect())
        .collect();
    let target: Vec<Vec<u32>> = pairs
        .iter()
        .map(|(_, t)| t.iter().copied().chain(std::iter::once(EOS)).collect())
        .collect();
    let src = pad(&src, dev)?;
    Ok(Batch {
        src_mask: src.eq(PAD)?,
        src,
        prev: pad(&prev, dev)?,
        target: pad(&target, dev)?,
    })
}

/// The encoder-decoder of `args` on the CPU (see [`build_model_on`]).
pub fn build_model(args: &Args, task: &Task, store: &ParamStore) -> Result<EncoderDecoder> {
    build_model_on(args, task, store, &Device::Cpu)
}

/// The encoder-decoder of `args` on `dev`, in `args.dtype`: 4 heads, FFN twice the width,
/// positions for the longest sentence plus EOS.
pub fn build_model_on(
    args: &Args,
    task: &Task,
    store: &ParamStore,
    dev: &Device,
) -> Result<EncoderDecoder> {
    let cfg = EncoderDecoderConfig::new()
        .with_embed_dim(args.dim)
        .with_heads(4)
        .with_ffn_dim(2 * args.dim)
        .with_layers(args.layers, args.layers)
        .with_vocab_size(task.vocab_size() as i64)
        .with_max_positions(args.max_len + 2, args.max_len + 2)
        .with_dropout(args.dropout)
        .with_technique(args.stabilizer);
    let vb = store.var_builder(args.dtype.dtype(), dev);
    Ok(EncoderDecoder::new(&cfg, &BuildOptions::default(), vb)?)
}

/// Teacher-forced validation totals.
#[derive(Debug, Default, Clone, Copy)]
struct Eval {
    loss: f64,
    nll: f64,
    correct: usize,
    tokens: usize,
}

impl Eval {
    fn summary(&self) -> String {
        let n = self.tokens as f64;
        format!(
            "valid: smoothed loss {:.4}  nll {:.4}  ppl {:.3}  token accuracy {:.2}% ({}/{})",
            self.loss / n,
            self.nll / n,
            (self.nll / n).exp(),
            100.0 * self.correct as f64 / n,
            self.correct,
            self.tokens
        )
    }
}

/// A scalar tensor of any float dtype as f64.
fn scalar(t: &Tensor) -> CoreResult<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Teacher-forced smoothed loss, NLL and argmax accuracy over the non-padding target tokens.
fn evaluate(model: &EncoderDecoder, batches: &[Batch], eps: f64) -> Result<Eval> {
    let mut e = Eval::default();
    for b in batches {
        let (_, dec) = model.forward(&b.src, Some(&b.src_mask), &b.prev, false)?;
        let l = label_smoothed_cross_entropy(&dec.x, &b.target, eps, Some(PAD))?;
        e.loss += scalar(&l.loss_sum)?;
        e.nll += scalar(&l.nll_sum)?;
        e.tokens += l.ntokens;
        let hit = dec.x.argmax(D::Minus1)?.eq(&b.target)?;
        let real = b.target.ne(PAD)?;
        e.correct += (hit * real)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as usize;
    }
    Ok(e)
}

/// Greedy decoding of a batch with the decoder's key/value cache; each row is cut at its EOS.
pub fn greedy(model: &EncoderDecoder, b: &Batch, max_len: usize) -> Result<Vec<Vec<u32>>> {
    let enc: EncoderOutput = model.encoder.forward(
        &b.src,
        &EncoderInputs {
            padding_mask: Some(&b.src_mask),
            ..Default::default()
        },
    )?;
    let inputs = DecoderInputs {
        memory: Some(Memory {
            encoder_out: &enc.encoder_out,
            padding_mask: Some(&enc.encoder_padding_mask),
        }),
        ..Default::default()
    };
    let rows = b.src.dim(0)?;
    let mut prefix = Tensor::full(EOS, (rows, 1), b.src.device())?;
    let mut state = IncrementalState::new(false);
    let mut out = vec![Vec::new(); rows];
    let mut done = vec![false; rows];
    for _ in 0..=max_len {
        let logits = model
            .decoder
            .forward_incremental(&prefix, &inputs, &mut state)?
            .x;
        let next = logits.argmax(D::Minus1)?; // [B, 1]
        for (i, &t) in next.flatten_all()?.to_vec1::<u32>()?.iter().enumerate() {
            done[i] |= t == EOS;
            if !done[i] {
                out[i].push(t);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        prefix = Tensor::cat(&[&prefix, &next], 1)?;
    }
    Ok(out)
}

/// Renders word ids as letters (`a` = the first word); specials as `<id>`.
fn letters(ids: &[u32]) -> String {
    ids.iter()
        .map(|&t| match t.checked_sub(FIRST_WORD) {
            Some(i) if i < 26 => char::from(b'a' + i as u8).to_string(),
            _ => format!("<{t}>"),
        })
        .collect()
}

/// Greedy-decodes every sentence of `batches`, in order.
fn decode_all(model: &EncoderDecoder, batches: &[Batch], max_len: usize) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::new();
    for b in batches {
        out.extend(greedy(model, b, max_len)?);
    }
    Ok(out)
}

/// Label smoothing at work: the smoothed loss is minimised by putting `1 - eps` on the target and
/// `eps / (V - 1)` on every other class, so a perfect model's NLL cannot drop below `-ln(1 - eps)`
/// and its smoothed loss below the entropy of that distribution.
fn print_smoothing_floors(eps: f64, vocab: usize, e: &Eval) {
    let other = eps / (vocab - 1) as f64;
    let nll_floor = -(1.0 - eps).ln();
    let loss_floor = if eps > 0.0 {
        (1.0 - eps) * nll_floor - eps * other.ln()
    } else {
        0.0
    };
    let n = e.tokens as f64;
    println!(
        "label smoothing eps = {eps}: smoothed loss {:.4} vs nll {:.4}; their floors for a \
         perfect model are {loss_floor:.4} and -ln(1 - eps) = {nll_floor:.4}",
        e.loss / n,
        e.nll / n
    );
}

fn progress_bar(steps: u64, out: Output) -> ProgressBar {
    let pb = if out.bar {
        ProgressBar::new(steps)
    } else {
        ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::hidden())
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos:>5}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    pb
}

fn step_message(r: &StepReport, loss_ema: f64) -> String {
    format!(
        "loss {loss_ema:.3} (ema) nll {:.3} lr {:.2e} |g| {:.2}",
        r.nll, r.lr, r.grad_norm
    )
}

fn print_task(task: &Task) {
    let dict: Vec<String> = (FIRST_WORD..)
        .zip(&task.dict)
        .map(|(s, &t)| format!("{}->{}", letters(&[s]), letters(&[t])))
        .collect();
    println!(
        "task: target = reverse(source) through the dictionary {}",
        dict.join(" ")
    );
}

fn make_trainer(args: &Args, store: &ParamStore, model: &EncoderDecoder) -> Result<Trainer> {
    Ok(Trainer::new(
        store,
        &model.expert_parameters(),
        TrainerConfig {
            seed: args.seed,
            clip: ClipMode::GlobalNorm(args.clip_norm),
            max_consecutive_skips: 8,
        },
        AdamWConfig {
            lr: args.lr,
            ..AdamWConfig::default()
        },
        Schedule::InverseSqrt(InverseSqrt {
            warmup_init_lr: 1e-7,
            ..InverseSqrt::new(args.lr, args.warmup)
        }),
    )?)
}

/// The training loop: a fresh batch per step from the step's seed, progress on the bar (or a
/// log line every `--log-every` steps when stdout is not a terminal) and a validation line every
/// `--eval-every` steps. Returns the summary's training part.
fn train(
    args: &Args,
    task: &Task,
    model: &EncoderDecoder,
    trainer: &mut Trainer,
    valid: &[Batch],
    dev: &Device,
) -> Result<Summary> {
    let output = Output::detect();
    let pb = progress_bar(args.steps, output);
    let log_every = args.log_every.max(1);
    let clock = Instant::now();
    let (mut since_log, mut since_eval) = (Interval::default(), Interval::default());
    let mut summary = Summary::default();
    let mut loss_ema = f64::NAN;
    for step in 1..=args.steps {
        let mut loss_sum = 0.0;
        let report = trainer.step(1, |ctx| {
            model.reseed(ctx.seed);
            let b = make_batch(&task.pairs(ctx.seed, args.batch, Split::Train), dev)?;
            let (_, dec) = model.forward(&b.src, Some(&b.src_mask), &b.prev, true)?;
            let l =
                label_smoothed_cross_entropy(&dec.x, &b.target, args.label_smoothing, Some(PAD))?;
            loss_sum = scalar(&l.loss_sum)?;
            Ok(MicroBatch {
                nll_sum: scalar(&l.nll_sum)?,
                ntokens: l.ntokens,
                loss_sum: l.loss_sum,
                grads: None,
            })
        })?;
        summary.steps += 1;
        summary.tokens += report.ntokens;
        summary.skipped += u64::from(report.skipped.is_some());
        since_log.add(&report);
        since_eval.add(&report);
        let loss = loss_sum / report.ntokens as f64;
        loss_ema = if loss_ema.is_nan() {
            loss
        } else {
            0.95 * loss_ema + 0.05 * loss
        };
        pb.set_message(step_message(&report, loss_ema));
        pb.inc(1);
        if output.lines && (step % log_every == 0 || step == args.steps) {
            pb.suspend(|| {
                println!(
                    "{}",
                    since_log.line(step, args.steps, report.lr, clock.elapsed())
                )
            });
            since_log.reset();
        }
        if args.eval_every > 0 && step % args.eval_every == 0 && step < args.steps {
            let e = evaluate(model, valid, args.label_smoothing)?;
            let train = since_eval.mean_loss().unwrap_or(f64::NAN);
            pb.suspend(|| {
                println!(
                    "step {step} train nll {train:.4} (mean of {} steps) | {}",
                    since_eval.steps(),
                    e.summary()
                )
            });
            since_eval.reset();
        }
    }
    pb.finish_and_clear();
    summary.wall = clock.elapsed();
    summary.train_loss = since_eval.mean_loss().map(|l| (l, since_eval.steps()));
    Ok(summary)
}

/// Greedy-decodes the validation set and prints the exact-match rate and a few samples.
fn report_decoding(
    model: &EncoderDecoder,
    args: &Args,
    pairs: &[(Vec<u32>, Vec<u32>)],
    valid: &[Batch],
) -> Result<()> {
    let produced = decode_all(model, valid, args.max_len)?;
    let exact = pairs
        .iter()
        .zip(&produced)
        .filter(|((_, t), p)| t == *p)
        .count();
    println!(
        "greedy decoding (cached): exact match {}/{} = {:.2}%",
        exact,
        pairs.len(),
        100.0 * exact as f64 / pairs.len() as f64
    );
    for ((src, tgt), out) in pairs.iter().zip(&produced).take(6) {
        println!(
            "  source {:<12} expected {:<12} produced {:<12} {}",
            letters(src),
            letters(tgt),
            letters(out),
            if tgt == out { "ok" } else { "MISS" }
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    // Usage errors exit with clap's code 2 and its message, before anything is set up.
    let args = Args::from_command_line();
    cli::init_tracing();
    torchscale_kernels::alloc::keep_freed_memory();
    torchscale_kernels::runtime::one_compute_pool();
    // The whole run on one of rayon's workers, so the kernels split their work cheaply.
    torchscale_kernels::runtime::in_pool(move || run(args))
}

fn run(args: Args) -> Result<()> {
    let dev = match args.device.open() {
        Ok(d) => d,
        Err(e) => bail!("--device {}: {e}", args.device),
    };
    let task = Task::new(args.seed, args.words, args.min_len, args.max_len);
    print_task(&task);

    let store = ParamStore::new(args.seed);
    let model = build_model_on(&args, &task, &store, &dev)?;
    let n_params: usize = store.named_vars().iter().map(|(_, v)| v.elem_count()).sum();
    println!(
        "model: {}+{} layers, dim {}, {:?}, {} parameters, vocab {}, {} on {}; label smoothing {}",
        args.layers,
        args.layers,
        args.dim,
        args.stabilizer,
        n_params,
        task.vocab_size(),
        args.dtype,
        args.device,
        args.label_smoothing
    );

    let valid_pairs = task.pairs(mix_seed(args.seed, VALID_SALT), args.valid, Split::Valid);
    let valid: Vec<Batch> = valid_pairs
        .chunks(128)
        .map(|c| make_batch(c, &dev))
        .collect::<CoreResult<_>>()?;
    println!(
        "{} validation sentences; chance token accuracy {:.2}% (1 of {} words + EOS)",
        args.valid,
        100.0 / (args.words + 1) as f64,
        args.words
    );
    let e = evaluate(&model, &valid, args.label_smoothing)?;
    println!("step 0 {}", e.summary());

    let mut trainer = make_trainer(&args, &store, &model)?;
    let mut summary = train(&args, &task, &model, &mut trainer, &valid, &dev)?;

    let e = evaluate(&model, &valid, args.label_smoothing)?;
    println!("final {}", e.summary());
    print_smoothing_floors(args.label_smoothing, task.vocab_size(), &e);
    report_decoding(&model, &args, &valid_pairs, &valid)?;
    summary.valid_loss = Some(e.nll / e.tokens as f64);
    print!("{summary}");
    Ok(())
}
