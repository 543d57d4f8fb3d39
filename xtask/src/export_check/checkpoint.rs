//! The checkpoint folder: a model of any class with its parameters and config, saved in
//! torchscale's state_dict layout and loaded back strictly.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use torchscale_core::init::ParamStore;
use torchscale_models::build::BuildOptions;
use torchscale_models::checkpoint::{load_into, read_safetensors, save_file};
use torchscale_models::config::{DecoderConfig, EncoderConfig, EncoderDecoderConfig};
use torchscale_models::decoder::Decoder;
use torchscale_models::encoder::Encoder;
use torchscale_models::encoder_decoder::EncoderDecoder;

use super::inputs::SplitMix;
use super::{CONFIG_FILE, MODEL_FILE};

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
    pub(super) fn torchscale_only(&self) -> Result<()> {
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
            ..Default::default()
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
