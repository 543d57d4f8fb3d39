//! The weights of a checkpoint folder, memory-mapped, handed out under strict rules: every tensor
//! the model asks for must be there with its shape, and every tensor left over must be a buffer
//! or a tied copy; otherwise a typed error names the key.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use torchscale_core::{Error, Result};

/// Wrapper prefixes that are stripped when every key carries them: DDP's `module.`, and the
/// `model.` of checkpoints that wrap the whole network.
const WRAPPERS: [&str; 2] = ["model.", "module."];

/// The common prefix to strip from `keys` so that they become the state_dict names of the
/// torchscale module being loaded. `stack` is `decoder.` (or `encoder.`) when loading a lone
/// decoder (encoder): the fairseq LM wrapper stores its decoder under that attribute. An
/// encoder-decoder keeps its own `encoder.` / `decoder.` keys.
pub fn detect_prefix<'a>(
    keys: impl Iterator<Item = &'a str> + Clone,
    stack: Option<&str>,
) -> String {
    let mut prefix = String::new();
    loop {
        let next = WRAPPERS.iter().copied().chain(stack).find(|p| {
            let mut any = false;
            let all = keys.clone().all(|k| {
                any = true;
                k.strip_prefix(prefix.as_str())
                    .is_some_and(|rest| rest.starts_with(p))
            });
            any && all
        });
        match next {
            Some(p) => prefix.push_str(p),
            None => return prefix,
        }
    }
}

/// One or more safetensors files, memory-mapped, read under torchscale's names.
pub struct Weights {
    st: MmapedSafetensors,
    files: Vec<PathBuf>,
    prefix: String,
    /// Model-side keys (the file keys without `prefix`).
    keys: BTreeSet<String>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("files", &self.files)
            .field("prefix", &self.prefix)
            .field("tensors", &self.keys.len())
            .finish()
    }
}

impl Weights {
    /// Maps `files` (one file, or the shards of one checkpoint). `stack`: see [`detect_prefix`].
    pub fn open(files: &[PathBuf], stack: Option<&str>) -> Result<Self> {
        for f in files {
            if !f.is_file() {
                return Err(Error::File {
                    path: f.display().to_string(),
                    reason: "no such file".into(),
                });
            }
        }
        // SAFETY: a memory map is undefined behaviour if the file is truncated or rewritten while
        // mapped. The map lives only while a model is being loaded (every tensor is copied out of
        // it into owned storage by `load`), and torchscale-rs never rewrites a checkpoint in place:
        // it writes a new file or folder and renames it over the old one, which leaves the mapped
        // inode intact. Other writers are outside our control, as with every mmap loader
        // (candle's `VarBuilder::from_mmaped_safetensors` carries the same contract).
        let st = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| Error::File {
            path: files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            reason: format!("not a safetensors file: {e}"),
        })?;
        let names: Vec<String> = st.tensors().into_iter().map(|(k, _)| k).collect();
        let prefix = detect_prefix(names.iter().map(String::as_str), stack);
        let keys = names
            .iter()
            .map(|k| k[prefix.len()..].to_string())
            .collect();
        Ok(Self {
            st,
            files: files.to_vec(),
            prefix,
            keys,
        })
    }

    /// The prefix stripped from every key of the files (empty for our own checkpoints).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The keys, without the prefix.
    pub fn keys(&self) -> &BTreeSet<String> {
        &self.keys
    }

    /// The shape of `key` (without the prefix) from the files' headers, without reading its
    /// data.
    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        let view = self.st.get(&format!("{}{key}", self.prefix)).ok()?;
        Some(view.shape().to_vec())
    }

    /// Whether `key` (without the prefix) is in the files.
    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains(key)
    }

    /// The tensor `key` as stored (its own dtype), on `device`.
    pub fn raw(&self, key: &str, device: &Device) -> Result<Tensor> {
        if !self.contains(key) {
            return Err(Error::MissingTensor { key: key.into() });
        }
        Ok(self.st.load(&format!("{}{key}", self.prefix), device)?)
    }

    /// The tensor `key`, checked against the `shape` the model has, converted to `dtype` (so an
    /// f32 file loads into a bf16 model, rounding to nearest) on `device`.
    pub fn load(
        &self,
        key: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if !self.contains(key) {
            return Err(Error::MissingTensor { key: key.into() });
        }
        let view = self.st.get(&format!("{}{key}", self.prefix))?;
        if view.shape() != shape {
            return Err(Error::TensorShape {
                key: key.into(),
                expected: shape.to_vec(),
                got: view.shape().to_vec(),
            });
        }
        let t = self.raw(key, device)?;
        if !t.dtype().is_float() {
            return Err(Error::DType {
                what: key.into(),
                expected: dtype,
                got: t.dtype(),
            });
        }
        Ok(t.to_dtype(dtype)?)
    }

    /// The checks after a model took what it needs (`used`): a key left over must be one of the
    /// model's `buffers` (shape checked, values ignored: the model derives them from its config)
    /// or an alias of a loaded parameter among `ties` (alias key, source key) holding the same
    /// values; anything else is [`Error::UnexpectedTensor`].
    pub fn check_rest(
        &self,
        used: &HashSet<String>,
        buffers: &[(String, Tensor)],
        ties: &[(&str, &str)],
    ) -> Result<()> {
        for key in self.keys.iter().filter(|k| !used.contains(*k)) {
            if let Some((_, b)) = buffers.iter().find(|(name, _)| name == key) {
                let got = self
                    .st
                    .get(&format!("{}{key}", self.prefix))?
                    .shape()
                    .to_vec();
                if got != b.dims() {
                    return Err(Error::TensorShape {
                        key: key.clone(),
                        expected: b.dims().to_vec(),
                        got,
                    });
                }
                continue;
            }
            let Some((_, src)) = ties
                .iter()
                .find(|(alias, src)| alias == key && used.contains(*src))
            else {
                return Err(Error::UnexpectedTensor { key: key.clone() });
            };
            let (a, s) = (self.raw(key, &Device::Cpu)?, self.raw(src, &Device::Cpu)?);
            if a.dims() != s.dims() {
                return Err(Error::TensorShape {
                    key: key.clone(),
                    expected: s.dims().to_vec(),
                    got: a.dims().to_vec(),
                });
            }
            let differs = a
                .to_dtype(DType::F32)?
                .ne(&s.to_dtype(DType::F32)?)?
                .flatten_all()?
                .max(0)?
                .to_scalar::<u8>()?
                > 0;
            if differs {
                return Err(Error::invalid(
                    key.clone(),
                    format!("tied to `{src}` in this model, but the checkpoint holds other values"),
                ));
            }
        }
        Ok(())
    }

    /// A `VarBuilder` that builds a model straight from these weights (see `StrictBackend` below).
    pub fn var_builder(
        self: &Arc<Self>,
        dtype: DType,
        device: &Device,
    ) -> (VarBuilder<'static>, Arc<Loaded>) {
        let loaded = Arc::new(Loaded::default());
        let backend = StrictBackend {
            weights: self.clone(),
            loaded: loaded.clone(),
        };
        (
            VarBuilder::from_backend(Box::new(backend), dtype, device.clone()),
            loaded,
        )
    }

    /// The paths of the files.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

/// What a [`StrictBackend`] handed out, and the first typed error it met (candle's `VarBuilder`
/// can only carry candle errors, so the typed one waits here for the caller).
#[derive(Debug, Default)]
pub struct Loaded {
    tensors: Mutex<HashMap<String, Tensor>>,
    error: Mutex<Option<Error>>,
}

impl Loaded {
    /// The keys handed out.
    pub fn used(&self) -> HashSet<String> {
        self.tensors
            .lock()
            .expect("loaded lock")
            .keys()
            .cloned()
            .collect()
    }

    /// The tensor handed out under `key`: the model's own storage.
    pub fn get(&self, key: &str) -> Option<Tensor> {
        self.tensors.lock().expect("loaded lock").get(key).cloned()
    }

    /// `build`'s error, replaced by the typed error the backend recorded, if any.
    pub fn explain(&self, build: Error) -> Error {
        self.error
            .lock()
            .expect("loaded lock")
            .take()
            .unwrap_or(build)
    }
}

/// A `VarBuilder` backend over [`Weights`]: each `get` loads the tensor of that name (shape
/// checked, converted to the requested dtype) instead of initialising one. The tensors are
/// constants (no `Var`): the model is for inference; `LanguageModel::from_pretrained` gives
/// trainable parameters.
struct StrictBackend {
    weights: Arc<Weights>,
    loaded: Arc<Loaded>,
}

impl StrictBackend {
    fn fetch(
        &self,
        name: &str,
        shape: Option<&Shape>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        // A name asked twice (a shared module) gets the same tensor, as a VarMap would.
        if let Some(t) = self.loaded.get(name) {
            return Ok(t);
        }
        let res = match shape {
            Some(s) => self.weights.load(name, s.dims(), dtype, dev),
            None => self
                .weights
                .raw(name, dev)
                .and_then(|t| Ok(t.to_dtype(dtype)?)),
        };
        let t = match res {
            Ok(t) => t,
            Err(e) => {
                let msg = e.to_string();
                let mut slot = self.loaded.error.lock().expect("loaded lock");
                slot.get_or_insert(e);
                return Err(candle_core::Error::Msg(msg));
            }
        };
        self.loaded
            .tensors
            .lock()
            .expect("loaded lock")
            .insert(name.to_string(), t.clone());
        Ok(t)
    }
}

impl SimpleBackend for StrictBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.fetch(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.weights.contains(name)
    }
}

/// What the header of a safetensors file says: its metadata and every tensor's shape.
#[derive(Debug, Clone, Default)]
pub struct Header {
    /// The `__metadata__` map.
    pub metadata: HashMap<String, String>,
    /// Every tensor's shape, by key.
    pub shapes: BTreeMap<String, Vec<usize>>,
}

/// Reads the header of a safetensors file (its first `8 + n` bytes, `n` at most safetensors'
/// 100 MB cap), not the tensors. safetensors' own `read_metadata` wants the whole file in
/// memory (it checks the data length), so the header's JSON is parsed here into its `Metadata`.
pub fn read_header(path: &Path) -> Result<Header> {
    use std::io::Read;
    let err = |reason: String| Error::File {
        path: path.display().to_string(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| err(format!("not a safetensors file: {e}")))?;
    let n = u64::from_le_bytes(len);
    // safetensors caps headers at 100 MB; a larger length means this is not one.
    if n > 100_000_000 {
        return Err(err(format!("not a safetensors file (header length {n})")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| err(format!("truncated safetensors header: {e}")))?;
    let meta: safetensors::tensor::Metadata = serde_json::from_slice(&header)
        .map_err(|e| err(format!("not a safetensors header: {e}")))?;
    Ok(Header {
        metadata: meta.metadata().clone().unwrap_or_default(),
        shapes: meta
            .tensors()
            .into_iter()
            .map(|(k, info)| (k, info.shape.clone()))
            .collect(),
    })
}

/// Reads the `__metadata__` of a safetensors file from its header alone.
pub fn header_metadata(path: &Path) -> Result<HashMap<String, String>> {
    Ok(read_header(path)?.metadata)
}

#[cfg(test)]
mod tests {
    use super::detect_prefix;

    #[test]
    fn prefixes() {
        let own = ["layers.0.fc1.weight", "embed_tokens.weight"];
        assert_eq!(detect_prefix(own.iter().copied(), Some("decoder.")), "");
        let lm = ["decoder.layers.0.fc1.weight", "decoder.embed_tokens.weight"];
        assert_eq!(
            detect_prefix(lm.iter().copied(), Some("decoder.")),
            "decoder."
        );
        let wrapped = ["module.model.decoder.a", "module.model.decoder.b"];
        assert_eq!(
            detect_prefix(wrapped.iter().copied(), Some("decoder.")),
            "module.model.decoder."
        );
        // An encoder-decoder keeps its stacks' prefixes.
        let ed = ["model.encoder.a", "model.decoder.b"];
        assert_eq!(detect_prefix(ed.iter().copied(), None), "model.");
        let none: [&str; 0] = [];
        assert_eq!(detect_prefix(none.iter().copied(), None), "");
    }
}
