//! A PyTorch torchscale checkpoint (`.pt`) into a checkpoint folder, without Python: candle's
//! pickle reader walks the state_dict inside the zip archive `torch.save` writes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{DType, Device, Tensor};
use torchscale_core::{Error, Result};

use super::{detect_prefix, ModelClass};
use crate::build::BuildOptions;
use crate::checkpoint::serialize;
use crate::lm::{CONFIG_FILE, MODEL_FILE};
use crate::{Decoder, Encoder, EncoderDecoder};

/// Where a `.pt` may keep its state_dict: at the top level (`torch.save(model.state_dict())`),
/// or under one of these keys (fairseq and most trainers save `{"model": state_dict, ...}`).
const NESTED: [&str; 3] = ["model", "state_dict", "module"];

type PtZip = zip::ZipArchive<std::io::BufReader<std::fs::File>>;

/// Opens the zip archive `torch.save` writes. It starts at byte 0: the zip crate's search for an
/// archive offset (for self-extracting archives) rejects some valid torch files, which is why
/// candle's own `PthTensors` cannot read them.
fn open_zip(path: &Path) -> Result<PtZip> {
    let file_err = |reason: String| Error::File {
        path: path.display().to_string(),
        reason,
    };
    let open = || {
        std::fs::File::open(path)
            .map(std::io::BufReader::new)
            .map_err(|e| file_err(e.to_string()))
    };
    let at_zero = zip::read::Config {
        archive_offset: zip::read::ArchiveOffset::Known(0),
    };
    match zip::ZipArchive::with_config(at_zero, open()?) {
        Ok(z) => Ok(z),
        Err(_) => zip::ZipArchive::new(open()?)
            .map_err(|e| file_err(format!("not a torch.save zip archive: {e}"))),
    }
}

/// The tensor entries of the pickled object (the state_dict, or the dict under `key`).
fn tensor_infos(zip: &mut PtZip, key: Option<&str>) -> candle_core::Result<Vec<TensorInfo>> {
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .filter(|n| n.ends_with("data.pkl"))
        .collect();
    let mut infos = Vec::new();
    for name in names {
        let dir = PathBuf::from(name.trim_end_matches(".pkl"));
        let mut stack = Stack::empty();
        stack.read_loop(&mut std::io::BufReader::new(
            zip.by_name(&name).map_err(candle_core::Error::wrap)?,
        ))?;
        let mut obj = stack.finalize()?;
        if let Some(key) = key {
            let Object::Dict(entries) = obj else { continue };
            let wanted = Object::Unicode(key.to_string());
            match entries.into_iter().find(|(k, _)| *k == wanted) {
                Some((_, v)) => obj = v,
                None => continue,
            }
        }
        if let Object::Dict(entries) = obj {
            for (k, v) in entries {
                if let Some(info) = v.into_tensor_info(k, &dir)? {
                    infos.push(info);
                }
            }
        }
    }
    Ok(infos)
}

/// Reads one tensor's bytes from the archive.
fn read_tensor(zip: &mut PtZip, info: &TensorInfo) -> candle_core::Result<Tensor> {
    use std::io::Read;
    let layout = &info.layout;
    let fortran = layout.is_fortran_contiguous() && layout.dims().len() > 1;
    if !layout.is_contiguous() && !fortran {
        candle_core::bail!("strided tensor {:?} (save a .contiguous() copy)", layout);
    }
    let mut entry = zip.by_name(&info.path).map_err(candle_core::Error::wrap)?;
    let mut skip = vec![0u8; layout.start_offset()];
    entry.read_exact(&mut skip)?;
    let mut bytes = vec![0u8; layout.shape().elem_count() * info.dtype.size_in_bytes()];
    entry.read_exact(&mut bytes)?;
    if fortran {
        // Column-major storage: read with the dimensions reversed, then put them back.
        let rev: Vec<usize> = layout.dims().iter().rev().copied().collect();
        let t = Tensor::from_raw_buffer(&bytes, info.dtype, &rev, &Device::Cpu)?;
        let order: Vec<usize> = (0..rev.len()).rev().collect();
        return t.permute(order)?.contiguous();
    }
    Tensor::from_raw_buffer(&bytes, info.dtype, layout.dims(), &Device::Cpu)
}

/// The tensors of the state_dict in a `torch.save` file, under their keys as saved, each in its
/// own dtype (f32, f16, bf16...). Tied weights come out once per key, as PyTorch lists them.
pub fn read_pt(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file_err = |reason: String| Error::File {
        path: path.display().to_string(),
        reason,
    };
    let mut zip = open_zip(path)?;
    for key in std::iter::once(None).chain(NESTED.iter().map(|k| Some(*k))) {
        let mut infos = tensor_infos(&mut zip, key)
            .map_err(|e| file_err(format!("cannot read the pickle: {e}")))?;
        if infos.is_empty() {
            continue;
        }
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        return infos
            .iter()
            .map(|info| {
                let t = read_tensor(&mut zip, info)
                    .map_err(|e| file_err(format!("tensor `{}`: {e}", info.name)))?;
                Ok((info.name.clone(), t))
            })
            .collect();
    }
    Err(file_err(format!(
        "no state_dict found: no tensors at the top level nor under {NESTED:?}"
    )))
}

/// Converts the torchscale state_dict in `pt` (a `torch.save` file; see [`read_pt`]) with the
/// torchscale config `config` (JSON of the config's fields, `json.dumps(vars(config))`) into the
/// checkpoint folder `out` that `from_pretrained` of `class` loads.
///
/// Keys lose the prefixes [`detect_prefix`] finds (`model.`, `module.`, fairseq's `decoder.` for a
/// lone decoder). Tied weights stay listed under each name, as torchscale's state_dict has them.
/// Every tensor keeps its dtype unless `dtype` is given. The config is copied as is, after it
/// parses. Before `out` is replaced (atomically), the new folder is loaded strictly, so a
/// state_dict that does not fit the config is an error naming the key and nothing is written.
pub fn convert_pt(
    pt: &Path,
    config: &Path,
    class: ModelClass,
    out: &Path,
    dtype: Option<DType>,
) -> Result<()> {
    class.check_config(config)?;
    let config_text = std::fs::read_to_string(config).map_err(|e| Error::File {
        path: config.display().to_string(),
        reason: e.to_string(),
    })?;
    let tensors = read_pt(pt)?;
    let prefix = detect_prefix(
        tensors.iter().map(|(k, _)| k.as_str()),
        class.stack_prefix(),
    );
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| {
            let t = match dtype {
                Some(d) if t.dtype().is_float() => t.to_dtype(d)?,
                _ => t,
            };
            Ok((k[prefix.len()..].to_string(), t))
        })
        .collect::<Result<Vec<_>>>()?;
    let learned = tensors
        .iter()
        .any(|(k, _)| k.ends_with("embed_positions.weight"));
    let source = pt
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let metadata = HashMap::from([
        ("model_class".to_string(), class.name().to_string()),
        ("learned_positions".to_string(), learned.to_string()),
        (
            "format".to_string(),
            "torchscale-rs checkpoint 1".to_string(),
        ),
        ("converted_from".to_string(), source),
    ]);
    let bytes = serialize(&tensors, metadata)?;
    // Check in the dtype stored, so the check costs no more memory than the weights themselves.
    let check_dtype = tensors
        .iter()
        .map(|(_, t)| t.dtype())
        .find(|d| d.is_float())
        .unwrap_or(DType::F32);
    crate::checkpoint_dir::save_atomic(out, |tmp| {
        crate::checkpoint_dir::write_file(&tmp.join(MODEL_FILE), &bytes)?;
        crate::checkpoint_dir::write_file(&tmp.join(CONFIG_FILE), &config_text)?;
        let (opts, cpu) = (BuildOptions::default(), Device::Cpu);
        match class {
            ModelClass::Encoder => {
                Encoder::from_pretrained(tmp, &opts, &cpu, check_dtype).map(drop)
            }
            ModelClass::Decoder => {
                Decoder::from_pretrained(tmp, &opts, &cpu, check_dtype).map(drop)
            }
            ModelClass::EncoderDecoder => {
                EncoderDecoder::from_pretrained(tmp, &opts, &cpu, check_dtype).map(drop)
            }
        }
    })
}
