//! A decoder-only language model ready to train: the [`Decoder`], its parameters, the training loss
//! (label-smoothed cross entropy plus the MoE balance loss), evaluation, sampling with incremental
//! decoding, and checkpoints in torchscale's layout.
//!
//! A checkpoint folder holds `model.safetensors` (torchscale's state_dict names), `config.json`
//! (torchscale's `DecoderConfig` fields, so `DecoderConfig(**json)` rebuilds it in Python) and, when
//! saved by a trainer, `trainer.safetensors` (optimiser state and step) with the run's settings in
//! its metadata. The folder is replaced atomically ([`crate::checkpoint_dir`]).
//!
//! ```
//! use torchscale_models::config::DecoderConfig;
//! use torchscale_models::data::{ByteCorpus, BYTE_VOCAB};
//! use torchscale_models::lm::LanguageModel;
//! # fn main() -> torchscale_core::Result<()> {
//! let cfg = DecoderConfig::default()
//!     .with_vocab_size(BYTE_VOCAB as i64)
//!     .with_embed_dim(32)
//!     .with_heads(2)
//!     .with_ffn_dim(64)
//!     .with_layers(2)
//!     .with_subln(true);
//! let lm = LanguageModel::new(cfg, 0)?;
//! let sample = lm.generate(&ByteCorpus::encode("In the"), 5, 1.0, 0, 1)?;
//! assert_eq!(sample.len(), 5);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::Path;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::Rng;
use torchscale_core::embedding::{check_token_dtype, check_token_ids};
use torchscale_core::error::describe;
use torchscale_core::init::{seeded_rng, ParamStore, SeededRng};
use torchscale_core::{Collective, Error, Result};

use crate::build::shapes::check_shapes;
use crate::build::{checked_decoder_plan, decoder_spec, BuildOptions, RecentAvailableMemory};
use crate::checkpoint::{load_into, read_safetensors, serialize, state_tensors};
use crate::checkpoint_dir;
use crate::config::DecoderConfig;
use crate::data::{BOS, PAD};
use crate::decoder::{Decoder, DecoderInputs, IncrementalState};
use crate::pretrained::read_header;
use crate::train::{label_smoothed_cross_entropy, moe_balance_loss, AuxCombine, MicroBatch};

/// The ChaCha stream of sampled tokens (see [`torchscale_core::init::seeded_rng`]).
const SAMPLE_STREAM: u64 = 4;

/// File names inside a checkpoint folder.
pub const MODEL_FILE: &str = "model.safetensors";
/// torchscale's config as JSON.
pub const CONFIG_FILE: &str = "config.json";
/// Optimiser state and step.
pub const TRAINER_FILE: &str = "trainer.safetensors";

/// A decoder LM with its parameters.
pub struct LanguageModel {
    /// The validated configuration.
    pub cfg: DecoderConfig,
    /// The parameters, under torchscale's names.
    pub store: ParamStore,
    /// The network.
    pub model: Decoder,
    learned_positions: bool,
    /// The build's [`BuildOptions::memory_budget`], which also bounds a micro-batch's activations.
    memory_budget: Option<u64>,
    /// Without one, the memory available, read at most once a second.
    available: RecentAvailableMemory,
}

impl std::fmt::Debug for LanguageModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LanguageModel")
            .field("cfg", &self.cfg)
            .field("learned_positions", &self.learned_positions)
            .finish()
    }
}

/// The trainer's part of a checkpoint (`trainer.safetensors`): the optimiser state and step as
/// tensors, and free-form metadata such as the run's settings.
#[derive(Debug, Clone, Default)]
pub struct TrainerFile {
    /// Named tensors (see `Trainer::state`).
    pub tensors: HashMap<String, Tensor>,
    /// Header metadata.
    pub metadata: HashMap<String, String>,
}

/// Loss settings of a training micro-batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    /// Label smoothing epsilon (0 = plain cross entropy).
    pub label_smoothing: f64,
    /// Weight of the MoE balance loss (torchscale's recipes use 0.01).
    pub moe_loss_weight: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            label_smoothing: 0.0,
            moe_loss_weight: 0.01,
        }
    }
}

impl LanguageModel {
    /// A freshly initialised model (seeded), on the CPU in f32. Learned positions are used unless
    /// the config asks for xPos or a relative position bias.
    pub fn new(cfg: DecoderConfig, seed: u64) -> Result<Self> {
        let learned = !cfg.xpos_rel_pos && cfg.rel_pos_buckets == 0;
        Self::with_options(cfg, learned, seed, &Device::Cpu)
    }

    /// As [`LanguageModel::new`] with the position choice and device explicit.
    pub fn with_options(
        cfg: DecoderConfig,
        learned_positions: bool,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        Self::with_dtype(cfg, learned_positions, seed, device, DType::F32)
    }

    /// As [`LanguageModel::with_options`] with the parameters' dtype explicit: f16 / bf16
    /// parameters make f16 / bf16 activations (the fused kernels and AdamW's moments stay f32).
    pub fn with_dtype(
        cfg: DecoderConfig,
        learned_positions: bool,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let opts = BuildOptions {
            learned_positions: Some(learned_positions),
            ..Default::default()
        };
        Self::with_build_options(cfg, &opts, seed, device, dtype)
    }

    /// A freshly initialised model built with `opts`: the position choice and the
    /// [hooks](crate::build::StackHooks) that put a stabiliser, router or sublayer defined in
    /// code into the stack. A checkpoint of such a model loads back with
    /// [`LanguageModel::load_with`] and the same hooks.
    pub fn with_build_options(
        cfg: DecoderConfig,
        opts: &BuildOptions,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let store = ParamStore::new(seed);
        let vb = store.var_builder(dtype, device);
        let model = Decoder::new(&cfg, opts, vb)?;
        let learned_positions = model.spec().learned_positions;
        Ok(Self {
            cfg,
            store,
            model,
            learned_positions,
            memory_budget: opts.memory_budget,
            available: RecentAvailableMemory::default(),
        })
    }

    /// As [`LanguageModel::with_dtype`] with every MoE layer expert-parallel over `comm`
    /// (`MoeSpec::expert_comm`): this rank builds only its `E / world` experts, under their global
    /// names (`layers.{i}.moe_layer.experts.{j}.…`), and every forward call is collective.
    ///
    /// The parameters are drawn from the seed's stream in build order, which differs between
    /// ranks once they build different experts: copy or broadcast the values every rank must
    /// share (the dense ones) before training. Errors if the config has no MoE layer or the
    /// experts do not divide over the ranks.
    pub fn expert_parallel(
        cfg: DecoderConfig,
        learned_positions: bool,
        seed: u64,
        device: &Device,
        dtype: DType,
        comm: Arc<dyn Collective>,
    ) -> Result<Self> {
        // Stored as given, as `with_dtype` does (its config.json is the same).
        let fin = cfg.clone().finalize()?;
        let opts = BuildOptions {
            learned_positions: Some(learned_positions),
            ..Default::default()
        };
        let mut spec = decoder_spec(&fin, &opts);
        let world = comm.world_size();
        let moe = spec.moe.as_mut().ok_or_else(|| {
            Error::config(
                "expert_parallel",
                "needs MoE layers (moe_freq > 0 and moe_expert_count > 0)",
            )
        })?;
        if world == 0 || !moe.layer.num_experts.is_multiple_of(world) {
            return Err(Error::config(
                "expert_parallel",
                format!(
                    "{} experts do not divide over {world} ranks",
                    moe.layer.num_experts
                ),
            ));
        }
        moe.expert_comm = Some(comm);
        // Sized with this rank's share of the experts.
        let plan = checked_decoder_plan(&fin, &spec, &opts, dtype, device)?;
        let store = ParamStore::new(seed);
        let model = Decoder::from_plan(spec, plan, false, None, store.var_builder(dtype, device))?;
        Ok(Self {
            cfg,
            store,
            model,
            learned_positions,
            memory_budget: None,
            available: RecentAvailableMemory::default(),
        })
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.store
            .named_vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    fn aliases(&self) -> Vec<(&'static str, &'static str)> {
        if self.cfg.share_decoder_input_output_embed {
            vec![("output_projection.weight", "embed_tokens.weight")]
        } else {
            vec![]
        }
    }

    /// One micro-batch: `input`/`target` `[B, T]` ids. In training mode the model is first reseeded
    /// from `seed` (dropout, MoE draws) and its X-MoE gates are rescaled as torchscale does. The returned loss is summed over non-padding targets, with
    /// `moe_loss_weight * ntokens * mean(l_aux)` added as fairseq's MoE criterion does.
    pub fn micro_batch(
        &self,
        input: &Tensor,
        target: &Tensor,
        train: bool,
        loss: &LossConfig,
        seed: u64,
    ) -> Result<MicroBatch> {
        let vocab = self.model.embed_tokens().vocab_size();
        check_token_dtype(input, "input")?;
        check_token_ids(target, "target", vocab)?;
        if target.dims() != input.dims() {
            return Err(Error::shape(
                "target",
                format!("{:?} (the shape of input)", input.dims()),
                target.dims(),
            ));
        }
        if let Ok((batch, seq_len)) = input.dims2() {
            self.check_activations(batch, seq_len)?;
        }
        if train {
            self.model.reseed(seed);
            self.model.renormalize_gates()?;
        }
        let out = self
            .model
            .forward(
                input,
                &DecoderInputs {
                    train,
                    ..Default::default()
                },
            )
            // The decoder checks the ids; here they are this call's `input`.
            .map_err(|e| rename_arg(e, |w| (w == "prev_output_tokens").then(|| "input".into())))
            .map_err(|e| {
                e.in_call(|| {
                    format!(
                        "LanguageModel::micro_batch({}, {})",
                        describe("input", input),
                        describe("target", target)
                    )
                })
            })?;
        let ce = label_smoothed_cross_entropy(&out.x, target, loss.label_smoothing, Some(PAD))?;
        let aux: Vec<Tensor> = out.aux.iter().map(|a| a.balance_loss.clone()).collect();
        let mut loss_sum = ce.loss_sum;
        if let Some(b) = moe_balance_loss(&aux, loss.moe_loss_weight, AuxCombine::Average)? {
            loss_sum = (loss_sum + (b * ce.ntokens as f64)?)?;
        }
        Ok(MicroBatch {
            loss_sum,
            nll_sum: ce.nll_sum.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            ntokens: ce.ntokens,
            grads: None,
        })
    }

    /// An estimate of the bytes a training micro-batch of `batch` sequences of `seq_len` tokens
    /// keeps alive between forward and backward, in the parameters' dtype (`s` bytes):
    ///
    /// `B × T × (L × (16·C + 2·F + 2·H·T) + 3·V) × s`
    ///
    /// per layer and token, about 16 vectors of width C (norms, q, k, v, attention output,
    /// residuals), 2 of the FFN width F (fc1 and its activation) and 2 rows of attention scores
    /// per head (scores and probabilities, `H × T`); then the logits, their log-softmax and
    /// gradient (`3·V`). It is a lower bound of what candle holds, meant to refuse batches that
    /// cannot fit, not to promise that others do.
    pub fn activation_bytes(&self, batch: usize, seq_len: usize) -> u128 {
        let spec = self.model.spec();
        let (c, f, h) = (
            spec.embed_dim as u128,
            spec.ffn_dim as u128,
            spec.heads as u128,
        );
        let (b, t, l) = (batch as u128, seq_len as u128, spec.layers as u128);
        let v = spec.vocab_size.max(0) as u128;
        let s = self.model.embed_tokens().weight().dtype().size_in_bytes() as u128;
        let per_layer = c
            .saturating_mul(16)
            .saturating_add(f.saturating_mul(2))
            .saturating_add(h.saturating_mul(2).saturating_mul(t));
        let per_token = l
            .saturating_mul(per_layer)
            .saturating_add(v.saturating_mul(3));
        b.saturating_mul(t)
            .saturating_mul(per_token)
            .saturating_mul(s)
    }

    /// Refuses a micro-batch whose [`activation_bytes`](Self::activation_bytes) exceed the
    /// memory budget, with an [`Error::MemoryBudget`] naming `batch` and `seq_len`. The budget
    /// is the build's [`BuildOptions::memory_budget`], else, for a model on the CPU, the memory
    /// available (as read within the last second); an accelerator's memory is not known, so
    /// without a `memory_budget` a model there is not checked.
    pub fn check_activations(&self, batch: usize, seq_len: usize) -> Result<()> {
        let budget = match self.memory_budget {
            Some(b) => b,
            None if self.model.embed_tokens().weight().device().is_cpu() => self.available.get(),
            None => return Ok(()),
        };
        let needed = self.activation_bytes(batch, seq_len);
        if needed <= budget as u128 {
            return Ok(());
        }
        Err(Error::MemoryBudget {
            what: "micro-batch activations".into(),
            sized_by: format!(
                "batch {batch}, seq_len {seq_len} with decoder_embed_dim {}, \
                 decoder_ffn_embed_dim {}, decoder_layers {}, vocab_size {}",
                self.cfg.decoder_embed_dim,
                self.cfg.decoder_ffn_embed_dim,
                self.cfg.decoder_layers,
                self.cfg.vocab_size
            ),
            needed,
            budget,
        })
    }

    /// Mean negative log-likelihood per token over `batches` (evaluation mode, no gradient kept).
    pub fn evaluate(&self, batches: &[(Tensor, Tensor)]) -> Result<f64> {
        let (mut nll, mut n) = (0f64, 0usize);
        for (k, (i, t)) in batches.iter().enumerate() {
            let mb = self
                .micro_batch(i, t, false, &LossConfig::default(), 0)
                .map_err(|e| {
                    rename_arg(e, |w| {
                        matches!(w, "input" | "target").then(|| format!("batches[{k}].{w}"))
                    })
                })?;
            nll += mb.nll_sum;
            n += mb.ntokens;
        }
        if n == 0 {
            return Err(Error::invalid("validation", "no validation tokens"));
        }
        Ok(nll / n as f64)
    }

    /// Samples `n` ids after `prompt` (a `<s>` is put in front) with incremental decoding:
    /// the prompt is run once, then one token per step against the key/value cache.
    /// `temperature <= 0` is greedy; `top_k = 0` keeps every candidate. A NaN or infinite
    /// temperature is an [`Error::Config`] for `temperature`.
    pub fn generate(
        &self,
        prompt: &[u32],
        n: usize,
        temperature: f64,
        top_k: usize,
        seed: u64,
    ) -> Result<Vec<u32>> {
        if !temperature.is_finite() {
            return Err(Error::config(
                "temperature",
                format!("must be finite, got {temperature}"),
            ));
        }
        let dev = self
            .store
            .vars()
            .first()
            .map(|v| v.device().clone())
            .unwrap_or(Device::Cpu);
        let vocab = self.model.embed_tokens().vocab_size();
        if let Some((i, id)) = prompt
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= vocab)
        {
            return Err(Error::invalid(
                "prompt",
                format!("token id {id} at [{i}] is out of range for vocabulary {vocab}"),
            ));
        }
        let mut ids: Vec<u32> = std::iter::once(BOS).chain(prompt.iter().copied()).collect();
        let max = self.cfg.max_target_positions;
        let mut rng = seeded_rng(seed, SAMPLE_STREAM);
        let mut state = IncrementalState::new(true);
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            if ids.len() >= max {
                break;
            }
            let toks = Tensor::from_vec(ids.clone(), (1, ids.len()), &dev)?;
            let logits = self
                .model
                .forward_incremental(&toks, &DecoderInputs::default(), &mut state)
                .map_err(|e| {
                    e.in_call(|| format!("LanguageModel::generate(prompt of {} ids)", prompt.len()))
                })?
                .x;
            let last = logits.narrow(1, logits.dim(1)? - 1, 1)?.flatten_all()?;
            let next = sample(&last, temperature, top_k, &mut rng)?;
            ids.push(next);
            out.push(next);
        }
        Ok(out)
    }

    /// Saves the model (and, if given, a trainer state with its metadata) as a checkpoint folder,
    /// replacing any previous one atomically.
    pub fn save(&self, dir: &Path, trainer: Option<&TrainerFile>) -> Result<()> {
        self.save_with(dir, trainer, Vec::new())
    }

    /// As [`LanguageModel::save`], with `extra` tensors written next to this model's own: the
    /// experts other ranks hold in an expert-parallel run, so that one checkpoint holds every
    /// expert and loads on any number of ranks. A name this model already has is an error.
    pub fn save_with(
        &self,
        dir: &Path,
        trainer: Option<&TrainerFile>,
        extra: Vec<(String, Tensor)>,
    ) -> Result<()> {
        let mut tensors = state_tensors(&self.store, &self.model.buffers()?, &self.aliases());
        let own: std::collections::HashSet<String> =
            tensors.iter().map(|(k, _)| k.clone()).collect();
        if let Some((k, _)) = extra.iter().find(|(k, _)| own.contains(k)) {
            return Err(Error::invalid(
                "extra",
                format!("`{k}` is already a tensor of the model"),
            ));
        }
        tensors.extend(extra);
        let config = serde_json::to_string_pretty(&self.cfg)
            .map_err(|e| Error::invalid("config", e.to_string()))?;
        let meta = HashMap::from([
            ("model_class".to_string(), "Decoder".to_string()),
            (
                "learned_positions".to_string(),
                self.learned_positions.to_string(),
            ),
            (
                "format".to_string(),
                "torchscale-rs checkpoint 1".to_string(),
            ),
        ]);
        let model = serialize(&tensors, meta)?;
        let trainer = match trainer {
            Some(tf) => {
                let mut state: Vec<(String, Tensor)> = tf
                    .tensors
                    .iter()
                    .map(|(k, t)| (k.clone(), t.clone()))
                    .collect();
                state.sort_by(|a, b| a.0.cmp(&b.0));
                Some(serialize(&state, tf.metadata.clone())?)
            }
            None => None,
        };
        // The folder as a whole is swapped in atomically, so its files are written plainly.
        checkpoint_dir::save_atomic(dir, |tmp| {
            checkpoint_dir::write_file(&tmp.join(MODEL_FILE), &model)?;
            checkpoint_dir::write_file(&tmp.join(CONFIG_FILE), &config)?;
            if let Some(bytes) = &trainer {
                checkpoint_dir::write_file(&tmp.join(TRAINER_FILE), bytes)?;
            }
            Ok(())
        })
    }

    /// Loads a checkpoint folder saved by [`LanguageModel::save`] (or a torchscale state_dict
    /// exported the same way): the model, and the trainer state and metadata if present.
    /// A `config.json` that cannot be read, parsed or validated is an error naming its path
    /// ([`Error::File`], or [`Error::Config`] naming the field with the path in its reason).
    pub fn load(dir: &Path) -> Result<(Self, Option<TrainerFile>)> {
        Self::load_with(dir, &BuildOptions::default())
    }

    /// [`LanguageModel::load`] of a model built with `opts` (its hooks); the learned-position
    /// choice comes from the checkpoint unless `opts` sets it.
    pub fn load_with(dir: &Path, opts: &BuildOptions) -> Result<(Self, Option<TrainerFile>)> {
        let dir = checkpoint_dir::resolve(dir)?;
        let cfg_path = dir.join(CONFIG_FILE);
        let shown = cfg_path.display().to_string();
        let cfg = DecoderConfig::from_json_file(&cfg_path).map_err(|e| match e {
            Error::Config { field, reason } if !reason.contains(&shown) => Error::Config {
                field,
                reason: format!("{reason} (in {shown})"),
            },
            e @ (Error::Config { .. } | Error::File { .. }) => e,
            other => Error::File {
                path: shown.clone(),
                reason: other.to_string(),
            },
        })?;
        // The header first: a config that disagrees with the weights is refused before the
        // model it describes is built, and before the weights are read.
        let model_path = dir.join(MODEL_FILE);
        let header = read_header(&model_path)?;
        let learned = match header.metadata.get("learned_positions").map(String::as_str) {
            Some("true") => true,
            Some("false") => false,
            _ => header.shapes.contains_key("embed_positions.weight"),
        };
        let opts = BuildOptions {
            learned_positions: Some(opts.learned_positions.unwrap_or(learned)),
            hooks: opts.hooks.clone(),
            memory_budget: opts.memory_budget,
        };
        check_shapes(
            &decoder_spec(&cfg, &opts),
            &opts.hooks,
            header
                .shapes
                .iter()
                .map(|(k, s)| (k.as_str(), s.as_slice())),
        )?;
        let lm = Self::with_build_options(cfg, &opts, 0, &Device::Cpu, DType::F32)?;
        let (tensors, _) = read_safetensors(&model_path)?;
        load_into(&lm.store, &tensors, &lm.model.buffers()?, &lm.aliases())?;
        let trainer_path = dir.join(TRAINER_FILE);
        let trainer = if trainer_path.exists() {
            let (tensors, metadata) = read_safetensors(&trainer_path)?;
            Some(TrainerFile { tensors, metadata })
        } else {
            None
        };
        Ok((lm, trainer))
    }
}

/// Renames the argument a typed error names, where `rename` gives a new name: the model's
/// errors name its own arguments, a wrapper's caller knows them by the wrapper's.
pub(crate) fn rename_arg(e: Error, rename: impl Fn(&str) -> Option<String>) -> Error {
    match e {
        Error::Shape {
            what,
            expected,
            got,
        } => Error::Shape {
            what: rename(&what).unwrap_or(what),
            expected,
            got,
        },
        Error::DType {
            what,
            expected,
            got,
        } => Error::DType {
            what: rename(&what).unwrap_or(what),
            expected,
            got,
        },
        Error::Invalid { what, reason } => match rename(&what) {
            // The reason may show the input as `(name [B, T] dtype)`.
            Some(new) => Error::Invalid {
                reason: reason.replace(&format!("({what} "), &format!("({new} ")),
                what: new,
            },
            None => Error::Invalid { what, reason },
        },
        other => other,
    }
}

/// Draws one id from `logits: [V]`.
fn sample(logits: &Tensor, temperature: f64, top_k: usize, rng: &mut SeededRng) -> Result<u32> {
    let v: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
    if v.iter().any(|x| !x.is_finite()) {
        return Err(Error::NonFinite {
            what: "logits during generation".into(),
        });
    }
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |b, (i, &x)| {
                if x > b.1 {
                    (i, x)
                } else {
                    b
                }
            })
            .0 as u32
    };
    if temperature <= 0.0 {
        return Ok(argmax(&v));
    }
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    if top_k > 0 {
        order.truncate(top_k);
    }
    let m = v[order[0]] as f64;
    let w: Vec<f64> = order
        .iter()
        .map(|&i| ((v[i] as f64 - m) / temperature).exp())
        .collect();
    let total: f64 = w.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (&i, wi) in order.iter().zip(&w) {
        if u < *wi {
            return Ok(i as u32);
        }
        u -= wi;
    }
    Ok(order[order.len() - 1] as u32)
}
