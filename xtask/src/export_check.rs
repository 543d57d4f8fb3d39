//! `cargo xtask export-check`: a checkpoint written by torchscale-rs loads into PyTorch torchscale
//! 0.3.0 (`load_state_dict(strict=True)`) and gives the same outputs.
//!
//! The Rust side writes (or reads) the checkpoint layout the trainer uses (`model.safetensors` with
//! torchscale's state_dict names, `config.json`), runs our model on fixed tokens in eval mode and
//! stores inputs and outputs in `ours.safetensors`; `xtask/scripts/export_check.py`, run by the
//! reference interpreter, rebuilds torchscale's model from the same files, runs the same call and
//! writes `torchscale.safetensors`, which is compared here under FORMAT.md's forward tolerance.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use torchscale_core::init::ParamStore;
use torchscale_models::build::BuildOptions;
use torchscale_models::checkpoint::{load_into, read_safetensors, save_file};
use torchscale_models::config::{DecoderConfig, EncoderConfig, EncoderDecoderConfig, Technique};
use torchscale_models::decoder::{Decoder, DecoderInputs};
use torchscale_models::encoder::{Encoder, EncoderInputs};
use torchscale_models::encoder_decoder::EncoderDecoder;

use crate::golden::{compare, Comparison, Tolerance};
use crate::parity::TolMode;

/// Command-line usage.
pub const USAGE: &str = "usage: cargo xtask export-check [--python PATH] [--checkpoint DIR] \
[--out DIR] [--tolerance strict|default]";

/// The Python side of the check.
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/export_check.py");

/// File names of the checkpoint layout and of the check's own files.
pub const MODEL_FILE: &str = "model.safetensors";
/// See [`MODEL_FILE`].
pub const CONFIG_FILE: &str = "config.json";
/// Our inputs (`input.*`) and outputs (`ours.*`); metadata `checkpoint` = the checkpoint folder.
pub const OURS_FILE: &str = "ours.safetensors";
/// torchscale's outputs, written by the script under the names of `ours.*` without the prefix.
pub const REFERENCE_FILE: &str = "torchscale.safetensors";

/// The config of one checkpoint, by model class.
#[derive(Debug, Clone)]
pub enum ModelConfig {
    /// `Decoder`.
    Decoder(DecoderConfig),
    /// `Encoder`.
    Encoder(EncoderConfig),
    /// `EncoderDecoder`.
    EncoderDecoder(EncoderDecoderConfig),
}

impl ModelConfig {
    /// torchscale's class name (the `model_class` metadata).
    pub fn class(&self) -> &'static str {
        match self {
            Self::Decoder(_) => "Decoder",
            Self::Encoder(_) => "Encoder",
            Self::EncoderDecoder(_) => "EncoderDecoder",
        }
    }

    /// Parses `config.json` text for `class` (finalised, as torchscale's constructor does).
    pub fn from_json(class: &str, text: &str) -> Result<Self> {
        Ok(match class {
            "Decoder" => Self::Decoder(DecoderConfig::from_json_str(text)?),
            "Encoder" => Self::Encoder(EncoderConfig::from_json_str(text)?),
            "EncoderDecoder" => Self::EncoderDecoder(EncoderDecoderConfig::from_json_str(text)?),
            other => bail!("model_class `{other}`: expected Decoder, Encoder or EncoderDecoder"),
        })
    }

    /// Pretty JSON under torchscale's field names.
    pub fn to_json(&self) -> Result<String> {
        Ok(match self {
            Self::Decoder(c) => serde_json::to_string_pretty(c)?,
            Self::Encoder(c) => serde_json::to_string_pretty(c)?,
            Self::EncoderDecoder(c) => serde_json::to_string_pretty(c)?,
        })
    }

    fn finalize(self) -> Result<Self> {
        Ok(match self {
            Self::Decoder(c) => Self::Decoder(c.finalize()?),
            Self::Encoder(c) => Self::Encoder(c.finalize()?),
            Self::EncoderDecoder(c) => Self::EncoderDecoder(c.finalize()?),
        })
    }

    /// Our extensions have no torchscale counterpart, and torchscale ignores unknown keys, so such
    /// a checkpoint would silently load into a different model.
    fn torchscale_only(&self) -> Result<()> {
        let (admin, paper) = match self {
            Self::Decoder(c) => (c.admin, c.xmoe_paper_routing),
            Self::Encoder(c) => (c.admin, c.xmoe_paper_routing),
            Self::EncoderDecoder(c) => (c.admin, c.xmoe_paper_routing),
        };
        if admin || paper {
            bail!("the config uses an extension torchscale lacks (admin / xmoe_paper_routing)");
        }
        Ok(())
    }
}

/// A built model of any class.
#[derive(Debug)]
pub enum Model {
    /// `Decoder`.
    Decoder(Decoder),
    /// `Encoder`.
    Encoder(Encoder),
    /// `EncoderDecoder` (boxed: twice the size of the others).
    EncoderDecoder(Box<EncoderDecoder>),
}

/// A model with its parameters, config and position choice: what a checkpoint folder holds.
#[derive(Debug)]
pub struct Checkpoint {
    /// The finalised config.
    pub config: ModelConfig,
    /// Learned absolute positions (`embed_positions`).
    pub learned_positions: bool,
    /// The parameters.
    pub store: ParamStore,
    /// The model over `store`.
    pub model: Model,
}

impl Checkpoint {
    /// Builds a model with seeded init.
    pub fn new(config: ModelConfig, learned_positions: bool, seed: u64) -> Result<Self> {
        let config = config.finalize()?;
        let store = ParamStore::new(seed);
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let opts = BuildOptions {
            learned_positions: Some(learned_positions),
        };
        let model = match &config {
            ModelConfig::Decoder(c) => Model::Decoder(Decoder::new(c, &opts, vb)?),
            ModelConfig::Encoder(c) => Model::Encoder(Encoder::new(c, &opts, vb)?),
            ModelConfig::EncoderDecoder(c) => {
                Model::EncoderDecoder(Box::new(EncoderDecoder::new(c, &opts, vb)?))
            }
        };
        Ok(Self {
            config,
            learned_positions,
            store,
            model,
        })
    }

    /// Non-trainable tensors torchscale keeps in its state_dict (xPos scales).
    pub fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(match &self.model {
            Model::Decoder(m) => m.buffers()?,
            Model::Encoder(m) => m.buffers()?,
            Model::EncoderDecoder(m) => m.buffers()?,
        })
    }

    /// Tied parameters: torchscale's state_dict holds a tied tensor under every module that uses
    /// it, our store once. Returns (alias key, stored key) for each tie the model really has.
    pub fn aliases(&self) -> Vec<(String, String)> {
        let candidates: Vec<(&str, &str)> = match &self.config {
            ModelConfig::Decoder(_) => vec![("output_projection.weight", "embed_tokens.weight")],
            ModelConfig::Encoder(_) => vec![("output_projection.weight", "embed_tokens.weight")],
            ModelConfig::EncoderDecoder(_) => vec![
                ("decoder.embed_tokens.weight", "encoder.embed_tokens.weight"),
                (
                    "decoder.output_projection.weight",
                    "encoder.embed_tokens.weight",
                ),
                (
                    "decoder.output_projection.weight",
                    "decoder.embed_tokens.weight",
                ),
            ],
        };
        let mut out: Vec<(String, String)> = Vec::new();
        for (alias, src) in candidates {
            let tied = self.store.get(alias).is_none() && self.store.get(src).is_some();
            if tied && !out.iter().any(|(a, _)| a == alias) && self.is_tied(alias) {
                out.push((alias.to_string(), src.to_string()));
            }
        }
        out
    }

    /// Whether the module named by `alias` exists in the model and reuses another parameter.
    fn is_tied(&self, alias: &str) -> bool {
        match &self.config {
            ModelConfig::Decoder(c) => {
                c.share_decoder_input_output_embed && !c.no_output_layer && c.vocab_size > 0
            }
            ModelConfig::Encoder(c) => {
                c.share_encoder_input_output_embed && !c.no_output_layer && c.vocab_size > 0
            }
            ModelConfig::EncoderDecoder(c) => {
                if alias == "decoder.embed_tokens.weight" {
                    c.share_all_embeddings
                } else {
                    (c.share_decoder_input_output_embed || c.share_all_embeddings)
                        && !c.no_output_layer
                        && c.vocab_size > 0
                }
            }
        }
    }

    /// Sets every LayerNorm to weight `1 + 0.1 N(0,1)`, bias `0.05 N(0,1)` (as the golden files
    /// do), so that a checkpoint that swaps or drops a LayerNorm cannot pass.
    pub fn perturb_norms(&self, seed: u64) -> Result<()> {
        let mut rng = SplitMix::new(seed);
        let mut vars = self.store.named_vars();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in vars {
            let is_norm = name.contains("norm.") || name.contains("_ln.");
            if !is_norm {
                continue;
            }
            let (base, scale) = if name.ends_with(".weight") {
                (1.0, 0.1)
            } else {
                (0.0, 0.05)
            };
            let v: Vec<f32> = (0..var.elem_count())
                .map(|_| (base + scale * rng.normal()) as f32)
                .collect();
            var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu)?)?;
        }
        Ok(())
    }

    /// Writes `dir/model.safetensors` (metadata `model_class`, `learned_positions`) and
    /// `dir/config.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let meta = HashMap::from([
            ("model_class".to_string(), self.config.class().to_string()),
            (
                "learned_positions".to_string(),
                self.learned_positions.to_string(),
            ),
        ]);
        let aliases = self.aliases();
        let aliases: Vec<(&str, &str)> = aliases
            .iter()
            .map(|(a, s)| (a.as_str(), s.as_str()))
            .collect();
        save_file(
            &self.store,
            &self.buffers()?,
            &aliases,
            meta,
            &dir.join(MODEL_FILE),
        )?;
        std::fs::write(dir.join(CONFIG_FILE), self.config.to_json()?)
            .with_context(|| format!("writing {}", dir.join(CONFIG_FILE).display()))?;
        Ok(())
    }

    /// Reads a checkpoint folder and loads it strictly into a fresh model.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MODEL_FILE);
        let (tensors, meta) = read_safetensors(&path)?;
        let class = meta
            .get("model_class")
            .ok_or_else(|| anyhow!("{}: metadata has no model_class", path.display()))?;
        let learned = match meta.get("learned_positions").map(String::as_str) {
            Some("true") => true,
            Some("false") => false,
            Some(other) => bail!("{}: learned_positions = `{other}`", path.display()),
            // Older files: the table's presence decides, as torchscale's constructor args would.
            None => tensors
                .keys()
                .any(|k| k.ends_with("embed_positions.weight")),
        };
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("reading {}", cfg_path.display()))?;
        let config = ModelConfig::from_json(class, &text)
            .with_context(|| format!("config {}", cfg_path.display()))?;
        let ck = Self::new(config, learned, 0)?;
        let aliases = ck.aliases();
        let aliases: Vec<(&str, &str)> = aliases
            .iter()
            .map(|(a, s)| (a.as_str(), s.as_str()))
            .collect();
        load_into(&ck.store, &tensors, &ck.buffers()?, &aliases)
            .with_context(|| format!("loading {}", path.display()))?;
        Ok(ck)
    }
}

/// SplitMix64: a tiny seeded generator for tokens and uniforms (reproducible, no dependency).
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1) with 24 bits (exact in f32).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 40) as f64 / (1u64 << 24) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    /// Uniform integer in [lo, hi).
    pub fn below(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next_u64() % (hi - lo) as u64) as i64
    }
}

const BATCH: usize = 2;
const TGT_LEN: usize = 16;
const SRC_LEN: usize = 12;
const SRC_PAD: usize = 3;

/// Fixed inputs for a model: `input.prev_output_tokens` (decoders; starts with `</s>` = 2),
/// `input.src_tokens` and `input.encoder_padding_mask` (encoders; the second row ends with
/// padding), and `input.moe_uniform.<module>` for every top-2 random-policy MoE layer.
pub fn make_inputs(ck: &Checkpoint, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = SplitMix::new(seed);
    let mut out = HashMap::new();
    let (vocab, src_max, tgt_max) = match &ck.config {
        ModelConfig::Decoder(c) => (c.vocab_size, 0, c.max_target_positions),
        ModelConfig::Encoder(c) => (c.vocab_size, c.max_source_positions, 0),
        ModelConfig::EncoderDecoder(c) => {
            (c.vocab_size, c.max_source_positions, c.max_target_positions)
        }
    };
    if vocab <= 4 {
        bail!("vocab_size = {vocab}: the check draws tokens from [4, vocab)");
    }
    let dev = &Device::Cpu;
    if tgt_max > 0 {
        let t = TGT_LEN.min(tgt_max);
        let ids: Vec<i64> = (0..BATCH * t)
            .map(|i| if i % t == 0 { 2 } else { rng.below(4, vocab) })
            .collect();
        out.insert(
            "input.prev_output_tokens".into(),
            Tensor::from_vec(ids, (BATCH, t), dev)?,
        );
    }
    if src_max > 0 {
        let s = SRC_LEN.min(src_max);
        let pad = if s > SRC_PAD + 1 { SRC_PAD } else { 0 };
        let mut ids = Vec::with_capacity(BATCH * s);
        let mut mask = Vec::with_capacity(BATCH * s);
        for b in 0..BATCH {
            for t in 0..s {
                let padded = b == BATCH - 1 && t >= s - pad;
                ids.push(if padded { 1 } else { rng.below(4, vocab) });
                mask.push(padded as u8);
            }
        }
        out.insert(
            "input.src_tokens".into(),
            Tensor::from_vec(ids, (BATCH, s), dev)?,
        );
        out.insert(
            "input.encoder_padding_mask".into(),
            Tensor::from_vec(mask, (BATCH, s), dev)?,
        );
    }
    let tokens = match &ck.config {
        ModelConfig::Encoder(_) => out.get("input.src_tokens"),
        _ => out.get("input.prev_output_tokens"),
    }
    .map(|t| t.elem_count())
    .unwrap_or(0);
    for i in random_moe_layers(&ck.config) {
        let u: Vec<f32> = (0..tokens).map(|_| rng.uniform() as f32).collect();
        out.insert(
            format!("input.moe_uniform.layers.{i}.moe_layer"),
            Tensor::from_vec(u, tokens, dev)?,
        );
    }
    Ok(out)
}

/// The layers whose MoE gate draws uniforms in eval mode (top-2, random second-expert policy).
fn random_moe_layers(config: &ModelConfig) -> Vec<usize> {
    let (layers, freq, experts, top1, policy) = match config {
        ModelConfig::Decoder(c) => (
            c.decoder_layers,
            c.moe_freq,
            c.moe_expert_count,
            c.moe_top1_expert,
            c.moe_second_expert_policy.as_str(),
        ),
        ModelConfig::Encoder(c) => (
            c.encoder_layers,
            c.moe_freq,
            c.moe_expert_count,
            c.moe_top1_expert,
            c.moe_second_expert_policy.as_str(),
        ),
        ModelConfig::EncoderDecoder(c) => (
            c.encoder_layers.max(c.decoder_layers),
            c.moe_freq,
            c.moe_expert_count,
            c.moe_top1_expert,
            c.moe_second_expert_policy.as_str(),
        ),
    };
    if freq == 0 || experts == 0 || top1 || policy != "random" {
        return vec![];
    }
    (0..layers).filter(|i| (i + 1) % freq == 0).collect()
}

fn uniforms(inputs: &HashMap<String, Tensor>, layers: usize) -> Vec<Option<Tensor>> {
    (0..layers)
        .map(|i| {
            inputs
                .get(&format!("input.moe_uniform.layers.{i}.moe_layer"))
                .cloned()
        })
        .collect()
}

fn input<'a>(inputs: &'a HashMap<String, Tensor>, key: &str) -> Result<&'a Tensor> {
    inputs
        .get(key)
        .ok_or_else(|| anyhow!("inputs have no `{key}`"))
}

/// Runs our model in eval mode on `inputs`; returns `ours.<name>` for each compared output:
/// `logits` (Decoder: `model(prev_output_tokens)`; EncoderDecoder: torchscale's
/// `forward(src, prev)`, which passes no padding mask), `logits_masked` (EncoderDecoder: encoder
/// with the padding mask, then decoder) and `encoder_out` (Encoder, with the padding mask).
pub fn run_ours(
    ck: &Checkpoint,
    inputs: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    match &ck.model {
        Model::Decoder(m) => {
            let o = m.forward(
                input(inputs, "input.prev_output_tokens")?,
                &DecoderInputs {
                    moe_uniforms: uniforms(inputs, m.layers().len()),
                    ..Default::default()
                },
            )?;
            out.insert("ours.logits".to_string(), o.x);
        }
        Model::Encoder(m) => {
            let o = m.forward(
                input(inputs, "input.src_tokens")?,
                &EncoderInputs {
                    padding_mask: Some(input(inputs, "input.encoder_padding_mask")?),
                    moe_uniforms: uniforms(inputs, m.layers().len()),
                    ..Default::default()
                },
            )?;
            out.insert("ours.encoder_out".to_string(), o.encoder_out);
        }
        Model::EncoderDecoder(m) => {
            if !random_moe_layers(&ck.config).is_empty() {
                // EncoderDecoder's forward takes no uniforms, so the two sides would draw apart.
                bail!("an EncoderDecoder with top-2 random-policy MoE cannot be checked");
            }
            let src = input(inputs, "input.src_tokens")?;
            let prev = input(inputs, "input.prev_output_tokens")?;
            let mask = input(inputs, "input.encoder_padding_mask")?;
            out.insert(
                "ours.logits".to_string(),
                m.forward_torchscale(src, prev)?.x,
            );
            out.insert(
                "ours.logits_masked".to_string(),
                m.forward(src, Some(mask), prev, false)?.1.x,
            );
        }
    }
    Ok(out)
}

/// Writes `work/ours.safetensors`: the inputs, our outputs and the checkpoint folder (metadata).
pub fn write_ours(
    work: &Path,
    checkpoint: &Path,
    inputs: &HashMap<String, Tensor>,
    outputs: &HashMap<String, Tensor>,
) -> Result<()> {
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let mut all: Vec<(String, Tensor)> = inputs
        .iter()
        .chain(outputs)
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let ckpt = std::fs::canonicalize(checkpoint)
        .with_context(|| format!("checkpoint folder {}", checkpoint.display()))?;
    let meta = HashMap::from([("checkpoint".to_string(), ckpt.display().to_string())]);
    let data: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> = all
        .iter()
        .map(|(k, t)| -> Result<_> {
            let t = t.flatten_all()?;
            let (bytes, dt): (Vec<u8>, _) = match t.dtype() {
                DType::I64 => (
                    t.to_vec1::<i64>()?
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect(),
                    safetensors::Dtype::I64,
                ),
                DType::U8 => (t.to_vec1::<u8>()?, safetensors::Dtype::U8),
                _ => (
                    t.to_dtype(DType::F32)?
                        .to_vec1::<f32>()?
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect(),
                    safetensors::Dtype::F32,
                ),
            };
            Ok((k.clone(), bytes, vec![], dt))
        })
        .collect::<Result<_>>()?;
    let views = data
        .iter()
        .zip(&all)
        .map(|((k, b, _, dt), (_, t))| {
            let v = safetensors::tensor::TensorView::new(*dt, t.dims().to_vec(), b)
                .map_err(|e| anyhow!("{k}: {e}"))?;
            Ok((k.clone(), v))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, Some(meta))?;
    std::fs::write(work.join(OURS_FILE), bytes)
        .with_context(|| format!("writing {}", work.join(OURS_FILE).display()))?;
    Ok(())
}

/// Builds inputs, runs our model and writes `work/ours.safetensors` for the checkpoint in `ckpt_dir`.
pub fn prepare(ck: &Checkpoint, ckpt_dir: &Path, work: &Path) -> Result<()> {
    let inputs = make_inputs(ck, 7)?;
    let outputs = run_ours(ck, &inputs)?;
    write_ours(work, ckpt_dir, &inputs, &outputs)
}

/// The comparison of one model.
#[derive(Debug, Clone)]
pub struct ModelReport {
    /// The case name.
    pub name: String,
    /// Per compared output.
    pub comparisons: Vec<Comparison>,
}

impl ModelReport {
    /// Every output within tolerance (and at least one compared).
    pub fn pass(&self) -> bool {
        !self.comparisons.is_empty() && self.comparisons.iter().all(|c| c.pass)
    }
    /// One line per model: errors per output and the verdict.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{:<28} {}",
            self.name,
            if self.pass() { "PASS" } else { "FAIL" }
        );
        for c in &self.comparisons {
            s.push_str(&format!(
                "  {}: max_abs={:.3e} max_rel={:.3e}",
                c.key, c.max_abs, c.max_rel
            ));
            if let Some(n) = &c.note {
                s.push_str(&format!(" ({n})"));
            }
        }
        s
    }
}

/// Compares `work/ours.safetensors` with `work/torchscale.safetensors`.
pub fn compare_dir(name: &str, work: &Path, tol: Tolerance) -> Result<ModelReport> {
    let (ours, _) = read_safetensors(&work.join(OURS_FILE))?;
    let (theirs, _) = read_safetensors(&work.join(REFERENCE_FILE))?;
    let mut keys: Vec<&String> = ours.keys().filter(|k| k.starts_with("ours.")).collect();
    keys.sort();
    let mut comparisons = Vec::new();
    for key in keys {
        let short = &key["ours.".len()..];
        let want = theirs
            .get(short)
            .ok_or_else(|| anyhow!("{}: no `{short}`", work.join(REFERENCE_FILE).display()))?;
        comparisons.push(compare(short, &ours[key], want, tol)?);
    }
    Ok(ModelReport {
        name: name.to_string(),
        comparisons,
    })
}

/// Where `setup.sh` of the reference environment is, if the checkout has `../shared`.
fn setup_script() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/ref/setup.sh");
    p.is_file().then(|| std::fs::canonicalize(&p).unwrap_or(p))
}

/// The default reference interpreter: `$HOME/.cache/torchscale-ref-venv/bin/python`.
pub fn default_python(home: Option<&Path>) -> Option<PathBuf> {
    home.map(|h| h.join(".cache/torchscale-ref-venv/bin/python"))
}

/// The interpreter to use: `explicit` (`--python`), else the default under `home`; an error that
/// says how to create the environment when it does not exist.
pub fn find_python(explicit: Option<&Path>, home: Option<&Path>) -> Result<PathBuf> {
    let (p, how) = match explicit {
        Some(p) => (Some(p.to_path_buf()), "given with --python"),
        None => (default_python(home), "the default reference interpreter"),
    };
    if let Some(p) = p.as_ref().filter(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let setup = match setup_script() {
        Some(s) => format!("bash {}", s.display()),
        None => "bash ../shared/ref/setup.sh (from the repository root)".to_string(),
    };
    let shown = p
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "$HOME/.cache/torchscale-ref-venv/bin/python ($HOME is unset)".into());
    bail!(
        "no Python interpreter at {shown} ({how}). Create the reference environment (torch, \
         torchscale 0.3.0, safetensors) with `{setup}`, or pass --python PATH to an interpreter \
         that has them"
    )
}

/// Runs the script on the work folders; returns its stdout. Exit status 1 (a FAIL found by the
/// script itself) is not an error here: the Rust comparison decides.
pub fn run_python(python: &Path, works: &[PathBuf], tol: Tolerance) -> Result<String> {
    let out = Command::new(python)
        .arg(SCRIPT)
        .arg("--atol")
        .arg(tol.atol.to_string())
        .arg("--rtol")
        .arg(tol.rtol.to_string())
        .args(works)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !matches!(out.status.code(), Some(0) | Some(1)) {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "{} {SCRIPT} failed ({}):\n{stdout}{stderr}",
            python.display(),
            out.status
        );
    }
    Ok(stdout)
}

/// One generated case: name, config, learned positions.
pub type Case = (&'static str, ModelConfig, bool);

/// The models built when no `--checkpoint` is given.
pub fn default_cases() -> Vec<Case> {
    let lm = |d: usize, layers: usize, tied: bool| {
        DecoderConfig::new()
            .with_vocab_size(260)
            .with_embed_dim(d)
            .with_heads(4)
            .with_ffn_dim(4 * d)
            .with_layers(layers)
            .with_max_positions(128)
            .with_share_input_output_embed(tied)
    };
    let mut encdec = EncoderDecoderConfig::new()
        .with_vocab_size(260)
        .with_embed_dim(64)
        .with_heads(4)
        .with_ffn_dim(256)
        .with_layers(2, 2)
        .with_max_positions(64, 64);
    let encdec_deepnorm = encdec
        .clone()
        .with_layers(3, 2)
        .with_technique(Technique::DeepNorm)
        .with_share_all_embeddings(true);
    encdec.layernorm_embedding = true;
    let mut encoder = EncoderConfig::new()
        .with_vocab_size(260)
        .with_embed_dim(64)
        .with_heads(4)
        .with_ffn_dim(256)
        .with_layers(2)
        .with_max_positions(64);
    encoder.no_scale_embedding = false;
    vec![
        (
            "decoder_subln_lm_tied",
            ModelConfig::Decoder(lm(128, 3, true)),
            true,
        ),
        (
            "decoder_subln_lm_untied",
            ModelConfig::Decoder(lm(64, 2, false)),
            true,
        ),
        (
            "decoder_deepnorm",
            ModelConfig::Decoder(lm(64, 4, false).with_technique(Technique::DeepNorm)),
            true,
        ),
        (
            "decoder_xmoe_top2",
            ModelConfig::Decoder(lm(64, 4, false).with_moe(2, 4).with_xmoe(true)),
            true,
        ),
        (
            "decoder_xpos",
            ModelConfig::Decoder(lm(64, 2, true).with_xpos(true)),
            false,
        ),
        ("encoder_subln", ModelConfig::Encoder(encoder), true),
        (
            "encoder_decoder_subln",
            ModelConfig::EncoderDecoder(encdec),
            true,
        ),
        (
            "encoder_decoder_deepnorm_shared",
            ModelConfig::EncoderDecoder(encdec_deepnorm),
            true,
        ),
    ]
}

/// Parsed command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--python`.
    pub python: Option<PathBuf>,
    /// `--checkpoint`.
    pub checkpoint: Option<PathBuf>,
    /// `--out` (default `<workspace>/target/export-check`).
    pub out: PathBuf,
    /// `--tolerance`.
    pub tol: TolMode,
}

impl Options {
    /// Parses the arguments after `export-check`.
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut o = Options {
            python: None,
            checkpoint: None,
            out: Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/export-check"),
            tol: TolMode::Strict,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = || {
                it.next()
                    .cloned()
                    .ok_or_else(|| anyhow!("{a} needs a value\n{USAGE}"))
            };
            match a.as_str() {
                "--python" => o.python = Some(val()?.into()),
                "--checkpoint" => o.checkpoint = Some(val()?.into()),
                "--out" => o.out = val()?.into(),
                "--tolerance" => {
                    o.tol = match val()?.as_str() {
                        "strict" => TolMode::Strict,
                        "default" => TolMode::Default,
                        _ => bail!("--tolerance takes strict or default"),
                    }
                }
                "-h" | "--help" => bail!("{USAGE}"),
                other => bail!("unknown argument `{other}`\n{USAGE}"),
            }
        }
        Ok(o)
    }
}

/// `cargo xtask export-check ...`: prints one line per model and fails if any model fails.
pub fn main(args: &[String]) -> Result<()> {
    let opts = Options::parse(args)?;
    let start = Instant::now();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let python = find_python(opts.python.as_deref(), home.as_deref())?;
    let tol = match opts.tol {
        TolMode::Strict => Tolerance::STRICT_FORWARD,
        TolMode::Default => Tolerance::DEFAULT_FORWARD,
    };
    let mut works: Vec<(String, PathBuf)> = Vec::new();
    match &opts.checkpoint {
        Some(dir) => {
            let ck = Checkpoint::load(dir)?;
            ck.config.torchscale_only()?;
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "checkpoint".into());
            // Our files go under --out so that the checkpoint folder stays untouched.
            let work = opts.out.join(format!("checkpoint-{name}"));
            prepare(&ck, dir, &work)?;
            works.push((name, work));
        }
        None => {
            for (i, (name, cfg, learned)) in default_cases().into_iter().enumerate() {
                let dir = opts.out.join(name);
                let ck = Checkpoint::new(cfg, learned, 1000 + i as u64)?;
                ck.perturb_norms(2000 + i as u64)?;
                ck.save(&dir)?;
                // Check what was written, not the in-memory model.
                let ck = Checkpoint::load(&dir)?;
                prepare(&ck, &dir, &dir).with_context(|| name.to_string())?;
                works.push((name.to_string(), dir));
            }
        }
    }
    let prep = start.elapsed();
    let dirs: Vec<PathBuf> = works.iter().map(|(_, w)| w.clone()).collect();
    let py_out = run_python(&python, &dirs, tol)?;
    for l in py_out.lines() {
        println!("  [python] {l}");
    }
    let mut failed = 0;
    for (name, work) in &works {
        let r = compare_dir(name, work, tol)?;
        println!("{}", r.line());
        failed += usize::from(!r.pass());
    }
    println!(
        "{} models, {failed} failed; tolerance atol={:e} rtol={:e}; {:.1}s ({:.1}s Rust side)",
        works.len(),
        tol.atol,
        tol.rtol,
        start.elapsed().as_secs_f64(),
        prep.as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} of {} models differ from torchscale", works.len());
    }
    Ok(())
}
