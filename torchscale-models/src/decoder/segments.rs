//! The decoder's full-sequence forward cut into its stages (embedding, any run of layers, head),
//! for callers that run the stack a stretch at a time: activation checkpointing recomputes one
//! segment of layers in the backward pass from that segment's saved input.

use std::ops::Range;

use candle_core::Tensor;
use torchscale_core::attention::causal_mask;
use torchscale_core::linear::apply;
use torchscale_core::{AuxOutput, Branch, Ctx, Error, Result};

use super::{Decoder, DecoderInputs};

/// The per-call tensors every layer of a full-sequence forward shares: the causal mask and the
/// relative position biases (these keep their graph to the bias parameters, so every segment
/// that uses them sends those parameters its part of the gradient).
#[derive(Debug, Clone)]
pub struct StackShared {
    mask: Tensor,
    self_rel: Option<Tensor>,
    cross_rel: Option<Tensor>,
}

impl Decoder {
    /// The embedding stage of a full-sequence call: `tokens: [B, T]` to `x_0: [B, T, C]`
    /// (token and position embeddings, embedding LayerNorm, dropout when `train`).
    pub fn forward_embed(&self, tokens: &Tensor, train: bool) -> Result<Tensor> {
        match tokens.dims() {
            [_, t] if *t >= 1 => {}
            d => return Err(Error::shape("prev_output_tokens", "[B, T] with T >= 1", d)),
        }
        let (x, _) = self
            .embed
            .forward_named(tokens, "prev_output_tokens", 0, Branch::A, train)?;
        Ok(x)
    }

    /// What every layer of a full-sequence call on `x_0: [B, T, C]` (the embedding output)
    /// shares, with `inp`'s encoder output if any.
    pub fn stack_shared(&self, x0: &Tensor, inp: &DecoderInputs) -> Result<StackShared> {
        let (b, t, _) = x0.dims3()?;
        if let Some(m) = inp.memory {
            let (mb, _, mc) = m.encoder_out.dims3()?;
            if mb != b || mc != self.spec.embed_dim {
                return Err(Error::shape(
                    "encoder_out",
                    format!("[{b}, S, {}]", self.spec.embed_dim),
                    m.encoder_out.dims(),
                ));
            }
        }
        let self_rel = match &self.self_rel {
            Some(r) => Some(r.forward(t, t, 0)?),
            None => None,
        };
        let cross_rel = match (&self.cross_rel, inp.memory) {
            (Some(r), Some(m)) => Some(r.forward(t, m.encoder_out.dim(1)?, 0)?),
            _ => None,
        };
        Ok(StackShared {
            mask: causal_mask(t, x0.device())?.to_dtype(x0.dtype())?,
            self_rel,
            cross_rel,
        })
    }

    /// Layers `layers` (indices into [`Decoder::layers`]) on `x: [B, T, C]`, as the full forward
    /// runs them; returns their output and the auxiliary outputs (MoE balance losses) they
    /// pushed. Running every range in turn from [`Decoder::forward_embed`]'s output and ending
    /// with [`Decoder::forward_head`] is [`Decoder::forward`] without incremental state.
    pub fn forward_layers(
        &self,
        x: &Tensor,
        layers: Range<usize>,
        inp: &DecoderInputs,
        shared: &StackShared,
    ) -> Result<(Tensor, Vec<AuxOutput>)> {
        if layers.start > layers.end || layers.end > self.layers.len() {
            return Err(Error::invalid(
                "layers",
                format!(
                    "{layers:?} is not a range of the decoder's {} layers",
                    self.layers.len()
                ),
            ));
        }
        let mut x = x.clone();
        let mut aux = Vec::new();
        for i in layers {
            let mut ctx = Ctx {
                train: inp.train,
                layer: i,
                branch: Branch::A,
                key_padding_mask: inp.self_attn_padding_mask,
                attn_mask: Some(&shared.mask),
                rel_pos: shared.self_rel.as_ref(),
                memory: inp.memory.map(|m| m.encoder_out),
                memory_padding_mask: inp.memory.and_then(|m| m.padding_mask),
                cross_rel_pos: shared.cross_rel.as_ref(),
                cache: None,
                is_first_step: false,
                moe_uniform: inp.moe_uniforms.get(i).and_then(|u| u.as_ref()),
                time_major: false,
                aux: Vec::new(),
            };
            x = self.layers[i].forward(&x, &mut ctx)?;
            aux.append(&mut ctx.aux);
        }
        Ok((x, aux))
    }

    /// The head on the top layer's output: the final LayerNorm if any, then the output
    /// projection to logits unless `features_only`.
    pub fn forward_head(&self, x: &Tensor, features_only: bool) -> Result<Tensor> {
        let mut x = x.clone();
        if let Some(ln) = &self.layer_norm {
            x = ln.forward(&x)?;
        }
        if features_only {
            return Ok(x);
        }
        let p = self.output_projection.as_ref().ok_or_else(|| {
            Error::config(
                "no_output_layer",
                "logits asked of a decoder without an output projection",
            )
        })?;
        apply(p, &x)
    }

    /// Reseeds layer `i`'s own draws (its MoE router's) exactly as [`Decoder::reseed`]`(seed)`
    /// does, leaving the dropout generator and the other layers alone.
    pub(crate) fn reseed_layer(&self, i: usize, seed: u64) {
        if let Some(l) = self.layers.get(i) {
            l.reseed(crate::randomness::mix_seed(
                seed,
                LAYER_SEED_OFFSET + i as u64 + 1,
            ));
        }
    }
}

/// The salt offset of the decoder's per-layer seeds (see `Decoder::reseed`).
pub(crate) const LAYER_SEED_OFFSET: u64 = 1048576;

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::config::DecoderConfig;
    use crate::decoder::DecoderInputs;
    use crate::lm::LanguageModel;

    /// Stage by stage, in two segments, equals the one-call forward (with dropout and a
    /// relative position bias, so the shared tensors and the mask stream are both exercised).
    #[test]
    fn stages_equal_forward() {
        let cfg = DecoderConfig::default()
            .with_vocab_size(40)
            .with_embed_dim(16)
            .with_heads(2)
            .with_ffn_dim(32)
            .with_layers(3)
            .with_dropout(0.1)
            .with_rel_pos(8, 16);
        let lm = LanguageModel::new(cfg, 3).unwrap();
        let d = &lm.model;
        let tokens = Tensor::new(&[[2u32, 5, 9, 11, 3], [4, 4, 7, 30, 1]], &Device::Cpu).unwrap();
        let inp = DecoderInputs {
            train: true,
            ..Default::default()
        };
        d.reseed(11);
        let full = d.forward(&tokens, &inp).unwrap().x;
        d.reseed(11);
        let x0 = d.forward_embed(&tokens, true).unwrap();
        let shared = d.stack_shared(&x0, &inp).unwrap();
        let (x1, _) = d.forward_layers(&x0, 0..2, &inp, &shared).unwrap();
        let (x2, _) = d.forward_layers(&x1, 2..3, &inp, &shared).unwrap();
        let staged = d.forward_head(&x2, false).unwrap();
        let diff = (full - staged)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
        assert!(d.forward_layers(&x0, 2..4, &inp, &shared).is_err());
    }
}
