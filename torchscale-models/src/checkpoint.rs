//! Checkpoints: safetensors under torchscale's state_dict names, written atomically, loaded with
//! typed errors for missing, mis-shaped and unexpected tensors.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use torchscale_core::init::ParamStore;
use torchscale_core::{Error, Result};

use crate::layer::Layer;

/// The buffers of `layers`' sublayers (xPos `scale`s), keyed as torchscale keys them:
/// `{prefix}layers.{i}.{site}.{key}`.
pub fn layer_buffers(layers: &[Layer], prefix: &str) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for l in layers {
        for (k, t) in l.buffers()? {
            out.push((format!("{prefix}layers.{}.{k}", l.index()), t));
        }
    }
    Ok(out)
}

/// Reads every tensor of a safetensors file (to CPU), with the file's metadata.
pub fn read_safetensors(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let file_err = |reason: String| Error::File {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| file_err(e.to_string()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| file_err(format!("not a safetensors file: {e}")))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| file_err(format!("corrupt safetensors file: {e}")))?;
    let mut map = HashMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
            .map_err(|e| file_err(format!("tensor `{name}`: {e}")))?;
        map.insert(name, t);
    }
    Ok((map, metadata))
}

/// Copies `tensors` into the parameters of `store`, strictly: every parameter must be present with
/// its shape; a key that is neither a parameter nor one of `buffers` (nor an alias of a tied
/// parameter, in `aliases`) is an error.
pub fn load_into(
    store: &ParamStore,
    tensors: &HashMap<String, Tensor>,
    buffers: &[(String, Tensor)],
    aliases: &[(&str, &str)],
) -> Result<()> {
    let vars = store.named_vars();
    // Check everything before writing anything, so a bad file leaves the model untouched.
    let mut plan = Vec::with_capacity(vars.len());
    for (name, var) in &vars {
        let t = tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor { key: name.clone() })?;
        if t.dims() != var.dims() {
            return Err(Error::TensorShape {
                key: name.clone(),
                expected: var.dims().to_vec(),
                got: t.dims().to_vec(),
            });
        }
        if !matches!(
            t.dtype(),
            DType::F32 | DType::F64 | DType::F16 | DType::BF16
        ) {
            return Err(Error::DType {
                what: name.clone(),
                expected: var.dtype(),
                got: t.dtype(),
            });
        }
        plan.push((var, t));
    }
    for key in tensors.keys() {
        let known = store.get(key).is_some()
            || buffers.iter().any(|(b, _)| b == key)
            || aliases.iter().any(|(alias, _)| alias == key);
        if !known {
            return Err(Error::UnexpectedTensor { key: key.clone() });
        }
    }
    for (name, buf) in buffers {
        if let Some(t) = tensors.get(name) {
            if t.dims() != buf.dims() {
                return Err(Error::TensorShape {
                    key: name.clone(),
                    expected: buf.dims().to_vec(),
                    got: t.dims().to_vec(),
                });
            }
        }
    }
    for (var, t) in plan {
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

/// Loads a checkpoint file into `store` (see [`load_into`]).
pub fn load_file(
    store: &ParamStore,
    path: &Path,
    buffers: &[(String, Tensor)],
    aliases: &[(&str, &str)],
) -> Result<()> {
    let (tensors, _) = read_safetensors(path)?;
    load_into(store, &tensors, buffers, aliases)
}

/// The tensors a checkpoint of `store` holds: every parameter, the `buffers`, and a copy of each
/// tied parameter under its alias (`aliases`: alias key, source key), as torchscale's state_dict
/// lists tied weights under both names.
pub fn state_tensors(
    store: &ParamStore,
    buffers: &[(String, Tensor)],
    aliases: &[(&str, &str)],
) -> Vec<(String, Tensor)> {
    let mut tensors: Vec<(String, Tensor)> = store
        .named_vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    tensors.extend(buffers.iter().cloned());
    for (alias, src) in aliases {
        if let Some(v) = store.get(src) {
            tensors.push((alias.to_string(), v.as_tensor().clone()));
        }
    }
    tensors
}

/// safetensors bytes of `tensors` (on any device) with `metadata` in the header. Every tensor keeps
/// its dtype: f32 as f32, f16 and bf16 as themselves (half the bytes, and a bf16 model reloads
/// bit-exactly), integers as integers. [`load_into`] converts to the receiving model's dtype.
pub fn serialize(
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    // candle's `safetensors::View` for tensors reads the bytes in the tensor's own dtype; it wants
    // host memory, so device tensors are copied over first.
    let host = tensors
        .iter()
        .map(|(k, t)| Ok((k.as_str(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<Vec<(&str, Tensor)>>>()?;
    safetensors::serialize(host.iter().map(|(k, t)| (*k, t)), Some(metadata))
        .map_err(|e| Error::invalid("safetensors", e.to_string()))
}

/// Writes the parameters of `store`, the `buffers` and the tied `aliases` (alias key, source key)
/// to `path` atomically: a temporary file in the same folder, synced, then renamed, so a crash never
/// leaves a half-written checkpoint in place of the previous one. `metadata` goes in the header.
pub fn save_file(
    store: &ParamStore,
    buffers: &[(String, Tensor)],
    aliases: &[(&str, &str)],
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<()> {
    let bytes = serialize(&state_tensors(store, buffers, aliases), metadata)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    write_atomic(&tmp, path, &bytes)
}

/// Writes `bytes` to `tmp`, syncs, renames onto `path`; the temporary file is removed on failure.
pub fn write_atomic(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(tmp);
        return Err(Error::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        });
    }
    Ok(())
}
