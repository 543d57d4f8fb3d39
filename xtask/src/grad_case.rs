//! Gradient golden cases (`grad_*`, FORMAT.md section 4): the loss `sum(output * loss_weights)`,
//! its gradient for every parameter (`grad.*`) and, for MoE models, the gradient of the summed
//! balance losses (`grad_laux.*`).

use std::collections::HashMap;

use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor};
use torchscale_core::init::ParamStore;
use torchscale_models::checkpoint::load_into;
use torchscale_models::config::{DecoderConfig, EncoderConfig};
use torchscale_models::decoder::{Decoder, DecoderInputs};
use torchscale_models::encoder::{Encoder, EncoderInputs};

use crate::golden::GoldenFile;
use crate::parity::{build_options, moe_outputs, uniforms};

/// Runs a gradient case and returns `expect.*`, `grad.*` and `grad_laux.*` tensors.
pub fn run(f: &GoldenFile) -> Result<HashMap<String, Tensor>> {
    let config = f
        .meta
        .get("config")
        .ok_or_else(|| anyhow!("metadata has no config"))?;
    let store = ParamStore::new(0);
    let vb = store.var_builder(DType::F32, &Device::Cpu);
    let weights = f.get("input.loss_weights")?;
    let mut out = HashMap::new();
    // torchscale runs this case in train() only when the setup says so (MoE capacity).
    let train = f.json("setup")?.get("mode").and_then(|m| m.as_str()) == Some("train");
    let (output, aux) = match f.word("model_class") {
        "Encoder" => {
            let cfg = EncoderConfig::from_json_str(config)?;
            let model = Encoder::new(&cfg, &build_options(f, ""), vb)?;
            load_into(&store, &f.weights(""), &model.buffers()?, &[])?;
            let o = model.forward(
                f.get("input.src_tokens")?,
                &EncoderInputs {
                    padding_mask: f.tensors.get("input.encoder_padding_mask"),
                    train,
                    moe_uniforms: uniforms(f, "", cfg.encoder_layers),
                    ..Default::default()
                },
            )?;
            out.insert("expect.encoder_out".to_string(), o.encoder_out.clone());
            (o.encoder_out, o.aux)
        }
        "Decoder" => {
            let cfg = DecoderConfig::from_json_str(config)?;
            let model = Decoder::new(&cfg, &build_options(f, ""), vb)?;
            load_into(&store, &f.weights(""), &model.buffers()?, &[])?;
            let o = model.forward(
                f.get("input.prev_output_tokens")?,
                &DecoderInputs {
                    train,
                    moe_uniforms: uniforms(f, "", cfg.decoder_layers),
                    ..Default::default()
                },
            )?;
            out.insert("expect.logits".to_string(), o.x.clone());
            (o.x, o.aux)
        }
        other => return Err(anyhow!("no gradient runner for model_class `{other}`")),
    };
    moe_outputs(f, &mut out, &aux, "")?;
    let loss = (&output * weights)?.sum_all()?;
    out.insert("expect.loss".to_string(), loss.reshape(1)?);
    insert_grads(&mut out, &store, &loss, "grad")?;
    if !aux.is_empty() {
        let mut l_aux = aux[0].balance_loss.sum_all()?;
        for a in &aux[1..] {
            l_aux = (l_aux + a.balance_loss.sum_all()?)?;
        }
        insert_grads(&mut out, &store, &l_aux, "grad_laux")?;
    }
    Ok(out)
}

/// `<family>.<name>` for every parameter; zeros where the loss does not reach it (as torch stores
/// a `None` gradient).
fn insert_grads(
    out: &mut HashMap<String, Tensor>,
    store: &ParamStore,
    loss: &Tensor,
    family: &str,
) -> Result<()> {
    let grads = loss.backward()?;
    for (name, var) in store.named_vars() {
        let g = match grads.get(&var) {
            Some(g) => g.clone(),
            None => var.as_tensor().zeros_like()?,
        };
        out.insert(format!("{family}.{name}"), g);
    }
    Ok(())
}
