//! torchscale's `EncoderDecoder`.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use std::sync::Arc;

use torchscale_core::{Error, Result, Stabilizer};

use crate::build::StackPlan;
use crate::decoder::{Decoder, DecoderInputs, DecoderOutput, Memory};
use crate::encoder::{Encoder, EncoderInputs, EncoderOutput};
use crate::spec::StackSpec;

/// An encoder (`encoder.*`) and a decoder with cross-attention (`decoder.*`).
#[derive(Debug)]
pub struct EncoderDecoder {
    /// The encoder (no output projection).
    pub encoder: Encoder,
    /// The decoder.
    pub decoder: Decoder,
}

impl EncoderDecoder {
    /// Builds both stacks under `vb`, each wired by one stabiliser; with `share_all_embeddings`
    /// the decoder reuses the encoder's token table.
    pub fn from_specs(
        enc: StackSpec,
        enc_st: Box<dyn Stabilizer>,
        dec: StackSpec,
        dec_st: Box<dyn Stabilizer>,
        share_all_embeddings: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let enc_plan = StackPlan::uniform(Arc::from(enc_st), enc.layers);
        let dec_plan = StackPlan::uniform(Arc::from(dec_st), dec.layers);
        Self::from_plans(enc, enc_plan, dec, dec_plan, share_all_embeddings, vb)
    }

    /// Builds both stacks under `vb` from their [`StackPlan`]s.
    pub fn from_plans(
        enc: StackSpec,
        enc_plan: StackPlan,
        dec: StackSpec,
        dec_plan: StackPlan,
        share_all_embeddings: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let encoder = Encoder::from_plan(enc, enc_plan, true, None, vb.pp("encoder"))?;
        let shared = if share_all_embeddings {
            Some(encoder.embed_tokens().clone())
        } else {
            None
        };
        let decoder = Decoder::from_plan(dec, dec_plan, true, shared, vb.pp("decoder"))?;
        Ok(Self { encoder, decoder })
    }

    /// Encodes `src_tokens` with its padding mask and decodes `prev_output_tokens` against it.
    /// The two must have the same batch size; each stack checks its own inputs, and errors name
    /// the argument at fault (`src_tokens`, `encoder_padding_mask`, `prev_output_tokens`).
    /// Unlike torchscale's `forward` (see [`EncoderDecoder::forward_torchscale`]) the source padding
    /// mask is honoured.
    pub fn forward(
        &self,
        src_tokens: &Tensor,
        src_padding_mask: Option<&Tensor>,
        prev_output_tokens: &Tensor,
        train: bool,
    ) -> Result<(EncoderOutput, DecoderOutput)> {
        let _span = tracing::trace_span!("forward", model = "EncoderDecoder", train).entered();
        check_batches(src_tokens, prev_output_tokens)?;
        let enc = self.encoder.forward(
            src_tokens,
            &EncoderInputs {
                padding_mask: src_padding_mask,
                train,
                return_all_hiddens: true,
                ..Default::default()
            },
        )?;
        let dec = self.decode(&enc, prev_output_tokens, train)?;
        Ok((enc, dec))
    }

    /// Decodes against an encoder output.
    pub fn decode(
        &self,
        enc: &EncoderOutput,
        prev_output_tokens: &Tensor,
        train: bool,
    ) -> Result<DecoderOutput> {
        let memory = Memory {
            encoder_out: &enc.encoder_out,
            padding_mask: Some(&enc.encoder_padding_mask),
        };
        let mut out = self.decoder.forward(
            prev_output_tokens,
            &DecoderInputs {
                memory: Some(memory),
                train,
                ..Default::default()
            },
        )?;
        // torchscale appends the decoder's l_aux to the encoder's list.
        let mut l_aux = enc.l_aux.clone();
        l_aux.append(&mut out.l_aux);
        out.l_aux = l_aux;
        let mut aux = enc.aux.clone();
        aux.append(&mut out.aux);
        out.aux = aux;
        Ok(out)
    }

    /// torchscale 0.3.0's `EncoderDecoder.forward(src, prev)`: no padding mask reaches the encoder,
    /// so padded source tokens are attended to. Kept for parity.
    pub fn forward_torchscale(
        &self,
        src_tokens: &Tensor,
        prev_output_tokens: &Tensor,
    ) -> Result<DecoderOutput> {
        check_batches(src_tokens, prev_output_tokens)?;
        let enc = self
            .encoder
            .forward(src_tokens, &EncoderInputs::default())?;
        self.decode(&enc, prev_output_tokens, false)
    }

    /// Reseeds the random draws of both stacks (see [`Decoder::reseed`]).
    pub fn reseed(&self, seed: u64) {
        self.encoder.reseed(seed);
        self.decoder.reseed(seed);
    }

    /// Every sublayer's pre-step work in both stacks, such as the X-MoE gate rescale (see
    /// [`Decoder::renormalize_gates`]).
    pub fn renormalize_gates(&self) -> Result<()> {
        self.encoder.renormalize_gates()?;
        self.decoder.renormalize_gates()
    }

    /// The MoE expert parameters of both stacks.
    pub fn expert_parameters(&self) -> Vec<Tensor> {
        let mut v = self.encoder.expert_parameters();
        v.extend(self.decoder.expert_parameters());
        v
    }

    /// Buffers of both stacks, by key.
    pub fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let mut b = crate::checkpoint::layer_buffers(self.encoder.layers(), "encoder.")?;
        b.extend(crate::checkpoint::layer_buffers(
            self.decoder.layers(),
            "decoder.",
        )?);
        Ok(b)
    }
}

/// Source and target must pair row for row; checked before the encoder runs, so the error names
/// `prev_output_tokens` rather than the decoder's view of `encoder_out`.
fn check_batches(src_tokens: &Tensor, prev_output_tokens: &Tensor) -> Result<()> {
    if let (Some(&b), Some(&tb)) = (src_tokens.dims().first(), prev_output_tokens.dims().first()) {
        if src_tokens.rank() == 2 && prev_output_tokens.rank() == 2 && b != tb {
            return Err(Error::shape(
                "prev_output_tokens",
                format!("[{b}, T] (the batch of src_tokens)"),
                prev_output_tokens.dims(),
            ));
        }
    }
    Ok(())
}
