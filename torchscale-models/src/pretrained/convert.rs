//! A PyTorch torchscale checkpoint (`.pt`) into a checkpoint folder, without Python: candle reads
//! the pickle and the zip of `torch.save`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::pickle::PthTensors;
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

/// The tensors of the state_dict in a `torch.save` file, under their keys as saved, each in its
/// own dtype (f32, f16, bf16...). Tied weights come out once per key, as PyTorch lists them.
pub fn read_pt(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file_err = |reason: String| Error::File {
        path: path.display().to_string(),
        reason,
    };
    let mut first_err = None;
    for key in std::iter::once(None).chain(NESTED.iter().map(|k| Some(*k))) {
        let pth = match PthTensors::new(path, key) {
            Ok(p) => p,
            // A missing nested key is expected; a file candle cannot read at all fails every try.
            Err(e) => {
                first_err.get_or_insert(e.to_string());
                continue;
            }
        };
        if pth.tensor_infos().is_empty() {
            continue;
        }
        let mut names: Vec<&String> = pth.tensor_infos().keys().collect();
        names.sort();
        return names
            .into_iter()
            .map(|name| {
                let t = pth
                    .get(name)
                    .map_err(|e| file_err(format!("tensor `{name}`: {e}")))?
                    .ok_or_else(|| file_err(format!("tensor `{name}` vanished")))?;
                Ok((name.clone(), t))
            })
            .collect();
    }
    Err(file_err(format!(
        "no state_dict found at the top level nor under {NESTED:?} ({})",
        first_err.unwrap_or_else(|| "no tensors".into())
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
        std::fs::write(tmp.join(MODEL_FILE), &bytes)?;
        std::fs::write(tmp.join(CONFIG_FILE), &config_text)?;
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
