//! `from_pretrained`: a model from a checkpoint folder in one call.
//!
//! A folder holds `config.json` (torchscale's config fields, as `vars(config)` in Python) and
//! the weights under torchscale's state_dict names, in `model.safetensors` or in shards
//! `model-0000i-of-0000n.safetensors` listed by `model.safetensors.index.json` (its
//! `weight_map`). [`LanguageModel::save`](crate::LanguageModel::save) and the trainer write such
//! folders; [`convert_pt`] and `scripts/convert_torchscale.py` make one from a PyTorch `.pt`.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use torchscale_models::{BuildOptions, Decoder};
//! # fn main() -> torchscale_core::Result<()> {
//! let model = Decoder::from_pretrained("runs/lm", &BuildOptions::default(), &Device::Cpu, DType::F32)?;
//! # Ok(()) }
//! ```
//!
//! Loading is strict, as PyTorch's `load_state_dict(strict=True)`: a tensor the model needs and
//! the file lacks is [`Error::MissingTensor`], a tensor of another shape [`Error::TensorShape`],
//! a tensor the model has no place for [`Error::UnexpectedTensor`], each naming the key; a bad
//! `config.json` is an error naming its path (and the field). Two kinds of leftover are accepted:
//! buffers the model derives from its config (xPos `scale`, shape checked), and the copies of a
//! tied weight that torchscale's state_dict lists under each module using it
//! (`output_projection.weight` with `share_*_input_output_embed`, `decoder.embed_tokens.weight`
//! with `share_all_embeddings`), which must hold the same values as the table they are tied to.
//!
//! Names. The keys are those of the torchscale module loaded: `layers.0...` for an `Encoder` or a
//! `Decoder`, `encoder.*` / `decoder.*` for an `EncoderDecoder` (torchscale's own layout). A
//! prefix carried by every key is stripped: `model.` and `module.` (wrappers, DDP), and, for a
//! lone `Decoder` (`Encoder`), `decoder.` (`encoder.`), which is how fairseq's language model
//! stores its torchscale decoder. So a fairseq LM state_dict loads as a `Decoder` unchanged.
//!
//! Dtypes. Tensors are converted to the `dtype` asked for: an f32 checkpoint loads into a bf16
//! model (rounded to nearest even) and an f16 one into f32 (exactly). Checkpoints keep the dtype
//! they were saved in.
//!
//! Learned positions are a constructor argument in torchscale, not a config field: unless
//! [`BuildOptions::learned_positions`] says otherwise they are taken from the file's
//! `learned_positions` metadata, else from the presence of `embed_positions.weight`.
//!
//! The weights are memory-mapped and copied to `device` tensor by tensor, so the file is never
//! read whole into memory first. [`Encoder`], [`Decoder`] and [`EncoderDecoder`] come out with
//! constant weights, for inference; [`LanguageModel::from_pretrained`] gives trainable
//! parameters.

mod convert;
mod weights;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use torchscale_core::{Error, Result};

pub use convert::{convert_pt, read_pt};
pub use weights::{detect_prefix, header_metadata, read_header, Header, Weights};

use crate::build::shapes::check_shapes;
use crate::build::{decoder_spec, encoder_spec, BuildOptions, StackHooks};
use crate::config::{DecoderConfig, EncoderConfig, EncoderDecoderConfig};
use crate::embed::PADDING_IDX;
use crate::lm::{LanguageModel, CONFIG_FILE, MODEL_FILE};
use crate::spec::StackSpec;
use crate::{Decoder, Encoder, EncoderDecoder};

/// The index of a sharded checkpoint (its `weight_map` names the file of each tensor).
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The torchscale module a checkpoint holds; its name is the `model_class` metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelClass {
    /// `torchscale.architecture.encoder.Encoder`.
    Encoder,
    /// `torchscale.architecture.decoder.Decoder` (also what a [`LanguageModel`] saves).
    Decoder,
    /// `torchscale.architecture.encoder_decoder.EncoderDecoder`.
    EncoderDecoder,
}

impl ModelClass {
    /// torchscale's class name.
    pub fn name(self) -> &'static str {
        match self {
            ModelClass::Encoder => "Encoder",
            ModelClass::Decoder => "Decoder",
            ModelClass::EncoderDecoder => "EncoderDecoder",
        }
    }

    /// The class called `name` (torchscale's spelling).
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "Encoder" => Ok(ModelClass::Encoder),
            "Decoder" => Ok(ModelClass::Decoder),
            "EncoderDecoder" => Ok(ModelClass::EncoderDecoder),
            other => Err(Error::invalid(
                "model_class",
                format!("`{other}` is not Encoder, Decoder or EncoderDecoder"),
            )),
        }
    }

    /// The attribute a wrapper stores a lone stack under (see [`detect_prefix`]).
    fn stack_prefix(self) -> Option<&'static str> {
        match self {
            ModelClass::Encoder => Some("encoder."),
            ModelClass::Decoder => Some("decoder."),
            ModelClass::EncoderDecoder => None,
        }
    }

    /// (alias, source) pairs of weights torchscale may tie, by state_dict key.
    fn ties(self) -> &'static [(&'static str, &'static str)] {
        match self {
            ModelClass::Encoder | ModelClass::Decoder => {
                &[("output_projection.weight", "embed_tokens.weight")]
            }
            ModelClass::EncoderDecoder => &[
                ("decoder.embed_tokens.weight", "encoder.embed_tokens.weight"),
                (
                    "decoder.output_projection.weight",
                    "decoder.embed_tokens.weight",
                ),
                (
                    "decoder.output_projection.weight",
                    "encoder.embed_tokens.weight",
                ),
            ],
        }
    }

    /// Checks that `path` parses as this class's config (errors name the path and the field).
    fn check_config(self, path: &Path) -> Result<()> {
        match self {
            ModelClass::Encoder => EncoderConfig::from_json_file(path).map(drop),
            ModelClass::Decoder => DecoderConfig::from_json_file(path).map(drop),
            ModelClass::EncoderDecoder => EncoderDecoderConfig::from_json_file(path).map(drop),
        }
    }
}

/// A checkpoint folder opened for loading: its weights (memory-mapped) and header metadata.
#[derive(Debug)]
pub struct PretrainedDir {
    dir: PathBuf,
    weights: Arc<Weights>,
    metadata: HashMap<String, String>,
}

impl PretrainedDir {
    /// Opens `dir` (or `<dir>.old`, left by a save interrupted between its renames) for a model
    /// of `class`; a `model_class` in the metadata must match.
    pub fn open(dir: &Path, class: ModelClass) -> Result<Self> {
        let dir = crate::checkpoint_dir::resolve(dir)?;
        let files = weight_files(&dir)?;
        let metadata = header_metadata(&files[0])?;
        if let Some(found) = metadata.get("model_class") {
            if found != class.name() {
                return Err(Error::File {
                    path: files[0].display().to_string(),
                    reason: format!(
                        "holds a torchscale `{found}` (model_class), not a `{}`",
                        class.name()
                    ),
                });
            }
        }
        let weights = Arc::new(Weights::open(&files, class.stack_prefix())?);
        Ok(Self {
            dir,
            weights,
            metadata,
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `config.json` of the folder.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    /// The weights.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// The header metadata of the (first) weight file.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// `opts` with the learned-position choice filled in: the caller's, else the metadata's,
    /// else whether the weights hold an `embed_positions.weight`.
    pub fn options(&self, opts: &BuildOptions) -> Result<BuildOptions> {
        let mut o = opts.clone();
        if o.learned_positions.is_none() {
            o.learned_positions = Some(match self.metadata.get("learned_positions") {
                Some(v) if v == "true" => true,
                Some(v) if v == "false" => false,
                Some(v) => {
                    return Err(Error::File {
                        path: self.weights.files()[0].display().to_string(),
                        reason: format!("metadata learned_positions = `{v}`, not true or false"),
                    })
                }
                None => self
                    .weights
                    .keys()
                    .iter()
                    .any(|k| k.ends_with("embed_positions.weight")),
            });
        }
        Ok(o)
    }

    /// Compares the weights' shapes (from the headers) with the stack `spec` describes, before
    /// anything is built (see [`check_shapes`]); `prefix` selects the stack's keys (`encoder.`,
    /// `decoder.` of an encoder-decoder; empty for a lone stack).
    fn check_shapes(&self, spec: &StackSpec, hooks: &StackHooks, prefix: &str) -> Result<()> {
        let shapes: Vec<(String, Vec<usize>)> = self
            .weights
            .keys()
            .iter()
            .filter_map(|k| {
                let own = k.strip_prefix(prefix)?;
                Some((own.to_string(), self.weights.shape(k)?))
            })
            .collect();
        check_shapes(
            spec,
            hooks,
            shapes.iter().map(|(k, s)| (k.as_str(), s.as_slice())),
        )
    }

    /// Builds a model straight from the weights: `build` runs against a `VarBuilder` that hands
    /// out the checkpoint's tensors; then every leftover key is checked (see the module docs).
    fn build<M>(
        &self,
        class: ModelClass,
        dtype: DType,
        device: &Device,
        build: impl FnOnce(VarBuilder<'static>) -> Result<M>,
        buffers: impl FnOnce(&M) -> Result<Vec<(String, Tensor)>>,
    ) -> Result<M> {
        let (vb, loaded) = self.weights.var_builder(dtype, device);
        let model = build(vb).map_err(|e| loaded.explain(e))?;
        let used = loaded.used();
        // The token embedding zeroes its padding row when it is built (nn.Embedding's init);
        // load_state_dict would then overwrite it with the file's row, so put that row back.
        for key in used.iter().filter(|k| k.ends_with("embed_tokens.weight")) {
            if let Some(t) = loaded.get(key) {
                let pad = PADDING_IDX as usize;
                if t.dim(0)? > pad {
                    let row = self
                        .weights
                        .raw(key, device)?
                        .narrow(0, pad, 1)?
                        .to_dtype(t.dtype())?;
                    t.slice_set(&row, 0, pad)?;
                }
            }
        }
        self.weights
            .check_rest(&used, &buffers(&model)?, class.ties())?;
        Ok(model)
    }
}

/// The weight files of `dir`: `model.safetensors`, else the shards its index lists.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(MODEL_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX_FILE);
    if !index.is_file() {
        return Err(Error::File {
            path: single.display().to_string(),
            reason: format!("no such file (nor a sharded checkpoint's {INDEX_FILE})"),
        });
    }
    let err = |reason: String| Error::File {
        path: index.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(&index).map_err(|e| err(e.to_string()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| err(format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| err("no `weight_map` object".into()))?;
    let mut files = BTreeSet::new();
    for (key, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| err(format!("weight_map[`{key}`] is not a file name")))?;
        files.insert(dir.join(file));
    }
    if files.is_empty() {
        return Err(err("empty `weight_map`".into()));
    }
    Ok(files.into_iter().collect())
}

impl Encoder {
    /// Loads a torchscale `Encoder` checkpoint folder (see [`crate::pretrained`]): `config.json`
    /// and safetensors weights, strictly, as `dtype` tensors on `device`.
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        opts: &BuildOptions,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let class = ModelClass::Encoder;
        let ck = PretrainedDir::open(dir.as_ref(), class)?;
        let cfg = EncoderConfig::from_json_file(ck.config_path())?;
        let opts = ck.options(opts)?;
        ck.check_shapes(&encoder_spec(&cfg, &opts), &opts.hooks, "")?;
        ck.build(
            class,
            dtype,
            device,
            |vb| Encoder::new(&cfg, &opts, vb),
            Encoder::buffers,
        )
    }
}

impl Decoder {
    /// Loads a torchscale `Decoder` checkpoint folder (see [`crate::pretrained`]), such as one
    /// saved by a [`LanguageModel`] or converted from a fairseq LM, as `dtype` tensors on `device`.
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        opts: &BuildOptions,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let class = ModelClass::Decoder;
        let ck = PretrainedDir::open(dir.as_ref(), class)?;
        let cfg = DecoderConfig::from_json_file(ck.config_path())?;
        let opts = ck.options(opts)?;
        ck.check_shapes(&decoder_spec(&cfg, &opts), &opts.hooks, "")?;
        ck.build(
            class,
            dtype,
            device,
            |vb| Decoder::new(&cfg, &opts, vb),
            Decoder::buffers,
        )
    }
}

impl EncoderDecoder {
    /// Loads a torchscale `EncoderDecoder` checkpoint folder (keys `encoder.*`, `decoder.*`; see
    /// [`crate::pretrained`]) as `dtype` tensors on `device`.
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        opts: &BuildOptions,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let class = ModelClass::EncoderDecoder;
        let ck = PretrainedDir::open(dir.as_ref(), class)?;
        let cfg = EncoderDecoderConfig::from_json_file(ck.config_path())?;
        let opts = ck.options(opts)?;
        let enc = encoder_spec(&cfg.encoder_config(), &opts);
        ck.check_shapes(&enc, &opts.hooks, "encoder.")?;
        let dec = decoder_spec(&cfg.decoder_config(), &opts);
        ck.check_shapes(&dec, &opts.hooks, "decoder.")?;
        ck.build(
            class,
            dtype,
            device,
            |vb| EncoderDecoder::new(&cfg, &opts, vb),
            EncoderDecoder::buffers,
        )
    }
}

impl LanguageModel {
    /// Loads a `Decoder` checkpoint folder (see [`crate::pretrained`]) into a language model with
    /// trainable `dtype` parameters on `device`, ready to fine-tune or sample. A trainer state in
    /// the folder is ignored: resuming a run is [`LanguageModel::load`]'s job.
    ///
    /// The model is built first (a throwaway seeded init, as PyTorch builds a module before
    /// `load_state_dict`), then every parameter is filled from the checkpoint; nothing is written
    /// unless all checks pass.
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &Device, dtype: DType) -> Result<Self> {
        let class = ModelClass::Decoder;
        let ck = PretrainedDir::open(dir.as_ref(), class)?;
        let cfg = DecoderConfig::from_json_file(ck.config_path())?;
        let opts = ck.options(&BuildOptions::default())?;
        ck.check_shapes(&decoder_spec(&cfg, &opts), &opts.hooks, "")?;
        let learned = opts.learned_positions.unwrap_or(true);
        let lm = LanguageModel::with_dtype(cfg, learned, 0, device, dtype)?;
        let mut used = HashSet::new();
        let mut plan = Vec::new();
        for (name, var) in lm.store.named_vars() {
            let t = ck
                .weights
                .load(&name, var.dims(), var.dtype(), var.device())?;
            plan.push((var, t));
            used.insert(name);
        }
        ck.weights
            .check_rest(&used, &lm.model.buffers()?, class.ties())?;
        for (var, t) in plan {
            var.set(&t)?;
        }
        Ok(lm)
    }
}
