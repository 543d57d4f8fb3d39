//! Our side of the check: run the model on the inputs and write `ours.safetensors`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use torchscale_models::decoder::DecoderInputs;
use torchscale_models::encoder::EncoderInputs;

use super::checkpoint::{Checkpoint, Model};
use super::inputs::{input, make_inputs, random_moe_layers, uniforms};
use super::OURS_FILE;

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
    let bytes = torchscale_models::checkpoint::serialize(&all, meta)?;
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
